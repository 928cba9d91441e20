"""Choosing which layers are preconditioned (include/exclude) and their ranks."""

import flax.linen as nn
import jax
import numpy as np
import pytest

import nysact_optax
from tests.test_nnx import INIT, _normal, _random_like

ALL = ["enc/Dense_0", "enc/Dense_1", "head"]


class Encoder(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, **INIT)(nn.relu(nn.Dense(6, **INIT)(x)))


class Model(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, name="head", **INIT)(Encoder(name="enc")(x))


@pytest.fixture(scope="module")
def setup():
  x = _normal((8, 5), 0)
  params = Model().init(jax.random.PRNGKey(0), x)["params"]
  _, acts = nysact_optax.capture_activations(Model().apply)({"params": params}, x)
  return params, _random_like(params, 3), acts


def _leaf(tree, name):
  for key in name.split("/"):
    tree = tree[key]
  return tree


EXACT = dict(rank=10**6, cov_update_every=1, inv_update_every=1)


@pytest.mark.parametrize(
  "selection",
  [
    dict(include=["^enc/"], exclude=["Dense_1$"]),
    dict(include=lambda name: name.startswith("enc"), exclude=lambda name: name.endswith("_1")),
    dict(include=["Dense_0"]),
  ],
)
def test_unselected_layers_pass_through_unchanged(setup, selection):
  params, grads, acts = setup
  tx = nysact_optax.scale_by_nysact(**EXACT, **selection)
  state = tx.init(params)
  assert list(state.layers) == ["enc/Dense_0"]
  updates, _ = tx.update(grads, state, activations=acts)  # acts of the others are ignored
  reference, _ = nysact_optax.scale_by_nysact(**EXACT).update(
    grads, nysact_optax.scale_by_nysact(**EXACT).init(params), activations=acts
  )
  for name in ALL:
    for leaf in ("kernel", "bias"):
      got = _leaf(updates, name)[leaf]
      if name == "enc/Dense_0":  # preconditioned, exactly as without a selection
        np.testing.assert_allclose(got, _leaf(reference, name)[leaf], rtol=1e-5, atol=1e-6)
        assert not np.allclose(got, _leaf(grads, name)[leaf])
      else:
        np.testing.assert_array_equal(got, _leaf(grads, name)[leaf])


def test_rank_rule_per_layer_capped_at_p(setup):
  params, _, _ = setup
  seen = []

  def rule(name, p):
    seen.append((name, p))
    return {"enc/Dense_0": 2, "enc/Dense_1": 3}.get(name, 100)

  tx = nysact_optax.nysact(0.1, rank=rule, cov_update_every=1, inv_update_every=1)
  state = tx.init(params)[0]
  # p = inputs + bias; linen numbers Dense(4) (made first, fed 6 features) Dense_0
  assert sorted(seen) == [("enc/Dense_0", 7), ("enc/Dense_1", 6), ("head", 5)]
  shapes = {name: ls.basis.shape for name, ls in state.layers.items()}
  assert shapes == {"enc/Dense_0": (7, 2), "enc/Dense_1": (6, 3), "head": (5, 5)}


@pytest.mark.parametrize("bad", [0, 2.5, None, True])
def test_rank_rule_returning_a_bad_value_names_the_layer(setup, bad):
  params, _, _ = setup
  tx = nysact_optax.scale_by_nysact(rank=lambda name, p: bad if name == "head" else 2)
  with pytest.raises(
    ValueError,
    match=rf"layer 'head': rank\('head', 5\) returned {bad!r}; "
    r"the rank rule must return an integer >= 1",
  ):
    tx.init(params)


def test_activations_must_still_match_some_kernel(setup):
  params, _, acts = setup
  trimmed = {"enc": params["enc"]}  # "head" captured but gone from the tree
  tx = nysact_optax.scale_by_nysact(rank=2, include=["^enc/", "^head$"])
  with pytest.raises(ValueError, match="captured for layer 'head', which has no kernel"):
    tx.update(trimmed, tx.init(trimmed), activations=acts)
  tx = nysact_optax.scale_by_nysact(rank=2, include=["^enc/"])  # "head" not selected: fine
  tx.update(trimmed, tx.init(trimmed), activations=acts)
