"""One statistics path: ``update(statistics=sketched_statistics(...))`` equals
``update(activations=...)`` for every layer kind, dtype and sketch; per-layer
statistics counts; and the module layout (no flax in the math, one chain shape)."""

import functools
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import nysact_optax
from tests import _params
from tests import test_layers_more as linen_zoo
from tests import test_nnx as nnx_zoo

PERIODS = dict(cov_update_every=1, inv_update_every=1, stat_decay=0.5, damping=0.3)


class ConvNet(nn.Module):
  """A grouped conv, a DenseGeneral with two output axes and a plain Dense."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3), feature_group_count=2, name="conv_groups")(x))
    x = nn.DenseGeneral((2, 3), name="general")(x.reshape(x.shape[0], -1))
    return nn.Dense(3, name="head")(x.reshape(x.shape[0], -1))


@functools.cache
def _linen():
  _, params, acts = linen_zoo._setup()
  model, x = ConvNet(), _params.data((3, 5, 5, 4))[0]
  conv_params = _params.init_params(model, x)
  _, conv_acts = nysact_optax.capture_activations(model.apply)({"params": conv_params}, x)
  params = dict(params, **conv_params)
  acts = dict(acts, **conv_acts)
  kwargs = dict(stack_axes=linen_zoo.STACKED, input_axes={"einsum_mid": (1,)})
  return params, acts, kwargs


@functools.cache
def _nnx():
  model = nnx_zoo.Zoo(nnx.Rngs(0))
  xs = {name: nnx_zoo._normal(nnx_zoo.CASES[name][1], i) for i, name in enumerate(nnx_zoo.CASES)}
  xs["linear_again"] = nnx_zoo._normal((3, 4), 99)
  _, acts = nysact_optax.capture_activations(model)(xs)
  params = nnx.pure(nnx.state(model, nnx.Param))
  return params, acts, {}


def _both_paths(setup, dtype, sketch, rank, steps=2):
  params, acts, kwargs = setup()
  tx = nysact_optax.scale_by_nysact(
    rank=rank, sketch=sketch, stats_dtype=dtype, **PERIODS, **kwargs
  )
  by_acts = by_stats = tx.init(params)
  with_acts = jax.jit(lambda g, s, a: tx.update(g, s, activations=a))
  with_stats = jax.jit(
    lambda g, s, a: tx.update(g, s, statistics=nysact_optax.sketched_statistics(s, a))
  )
  for step in range(steps):
    grads = nnx_zoo._random_like(params, step)
    want, by_acts = with_acts(grads, by_acts, acts)
    got, by_stats = with_stats(grads, by_stats, acts)
  return want, got, by_acts, by_stats


@pytest.mark.parametrize(
  "setup, sketch, rank",
  [
    (_linen, "gaussian", 2),
    (_linen, "subcolumns", 2),
    (_linen, "gaussian", 10**6),
    (_nnx, "gaussian", 2),
  ],
  ids=["linen-gaussian", "linen-subcolumns", "linen-exact", "nnx-gaussian"],
)
def test_statistics_path_equals_activations_path(setup, sketch, rank):
  """Einsum with a permuted bias, grouped conv, scanned and vmapped layers
  included (float32; float64 below). The sketch kinds and exact mode differ
  after the captures, so NNX runs one of them; the linen zoo has every layer
  kind."""
  want, got, s1, s2 = _both_paths(setup, "float32", sketch, rank)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max()), got, want
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max()),
    s2.layers,
    s1.layers,
  )


@pytest.mark.parametrize(
  "setup, sketch",
  [(_linen, "gaussian"), (_nnx, "gaussian")],
  ids=["linen", "nnx"],
)
def test_statistics_path_in_float64(setup, sketch):
  """It drew a float32 sketch while the refresh drew a float64 one (200 % off)."""
  with jax.enable_x64(True):
    want, got, s1, _ = _both_paths(setup, "float64", sketch, 2)
  assert all(ls.cov.dtype == jnp.float64 for ls in s1.layers.values())
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10 * np.abs(b).max()),
    got,
    want,
  )


def test_einsum_bias_layout_comes_from_the_shapes():
  """The statistics path has no captured spec: the bias order is decided at
  init from the shapes (it was read off the activations, 8 % off)."""
  params, _, kwargs = _linen()
  tx = nysact_optax.scale_by_nysact(**kwargs)
  layer = next(l for l in tx.init(params).config.layers if l.name == "einsum_lead")
  assert layer.bias_perm == (1, 0) and not layer.bias_perm_ambiguous


def test_ambiguous_bias_layout_is_an_error_not_a_silent_difference():
  class Square(nn.Module):
    @nn.compact
    def __call__(self, x):  # kernel (d, n, h) with n == h: bias (h, n) looks like (n, h)
      return nn.Einsum((4, 3, 3), "btd,dnh->bthn", name="sq")(x)

  model, x = Square(), _params.data((2, 3, 4))[0]
  params = _params.init_params(model, x)
  _, acts = nysact_optax.capture_activations(model.apply)({"params": params}, x)
  tx = nysact_optax.scale_by_nysact(rank=2)
  state = tx.init(params)
  grads = nnx_zoo._random_like(params, 0)
  msg = (
    r"layer 'sq': its bias of shape \(3, 3\) is laid out with axes \(1, 0\) "
    r".*shapes alone gave \(0, 1\).*exclude=\['sq'\]"
  )
  with pytest.raises(ValueError, match=msg):
    tx.update(grads, state, activations=acts)
  with pytest.raises(ValueError, match=msg):
    nysact_optax.sketched_statistics(state, acts)


def test_sketched_statistics_needs_no_settings():
  params, acts, kwargs = _linen()
  tx = nysact_optax.nysact(
    0.1,
    rank=3,
    sketch="subcolumns",
    sketch_refresh="reference",
    nystrom="shifted",
    cov_update_every=2,
    inv_update_every=4,
    **kwargs,
  )
  state = tx.init(params)
  stats = jax.jit(nysact_optax.sketched_statistics)(state, acts)
  assert stats["scan/Dense_0"].shape == (3, 5, 3)  # per stacked copy
  assert stats["conv_groups"].shape == (19, 3)
  with pytest.raises(TypeError, match="unexpected keyword argument 'sketch'"):
    nysact_optax.sketched_statistics(state, acts, sketch="gaussian")


def test_first_statistics_update_skipped_does_not_bias_the_layer():
  """Each layer's bias correction counts its own updates: one that skipped
  its first statistics (non-finite) is corrected by 1 - b, not 1 - b^2."""
  params = {"a": {"kernel": jnp.ones((3, 2))}, "b": {"kernel": jnp.ones((3, 2))}}
  tx = nysact_optax.scale_by_nysact(
    rank=3, damping=1.0, stat_decay=0.9, cov_update_every=1, inv_update_every=1
  )
  state = tx.init(params)
  good = jnp.asarray(np.diag([4.0, 1.0, 0.25]), jnp.float32)
  _, state = tx.update(params, state, statistics={"a": good, "b": good * jnp.nan})
  assert int(state.layers["b"].stat_skips) == 1 and int(state.layers["b"].stat_count) == 0
  _, state = tx.update(params, state, statistics={"a": good, "b": good})
  assert int(state.layers["b"].stat_count) == 1 and int(state.layers["a"].stat_count) == 2
  for name in "ab":  # both estimate exactly `good`
    ls = state.layers[name]
    cov = (ls.basis * ls.eigvals[None, :]) @ ls.basis.T
    np.testing.assert_allclose(cov, good, rtol=1e-5, atol=1e-6)


def test_nysact_keeps_one_chain_shape_whatever_the_values():
  params = {"dense": {"kernel": jnp.ones((3, 2))}}
  plain = jax.tree.structure(nysact_optax.nysact(0.1, momentum=0.0, weight_decay=0.0).init(params))
  full = jax.tree.structure(nysact_optax.nysact(0.1, momentum=0.9, weight_decay=1e-3).init(params))
  assert plain == full
  inject = optax.inject_hyperparams(
    nysact_optax.nysact, static_args=("rank", "cov_update_every", "inv_update_every")
  )
  for momentum in (0.0, 0.9):  # momentum as an array: the same chain
    state = inject(learning_rate=0.1, momentum=momentum).init(params)
    assert jax.tree.structure(state.inner_state) == full


def test_math_modules_import_no_flax():
  code = (
    "import sys\n"
    "import nysact_optax\n"
    "from nysact_optax import _apply, _nystrom, _sketch, _statistics, _transform\n"
    "from nysact_optax import _accumulate, _alias, _state, _validation, _diagnostics\n"
    "from nysact_optax import _covariance, _graft, _kinds, _layers\n"
    "loaded = sorted(m for m in sys.modules if m == 'flax' or m.startswith('flax.'))\n"
    "assert not loaded, loaded\n"
    "nysact_optax.capture_activations\n"
    "assert 'flax' in sys.modules\n"
  )
  subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
