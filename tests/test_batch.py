"""Layers batched into groups: the grouping rule, the padding round trip, and
that padding a layer into a group changes neither its sketch nor its factors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nysact_optax
from nysact_optax import _batch, _sketch, _statistics
from nysact_optax._options import Options
from nysact_optax._pipeline import Factors
from nysact_optax._transform import _inverse_factorisation
from nysact_optax._tree import find_layers

# p = rows + 1 (bias): 301, 121, 41, 8 (exact at rank 8), and a 2 x 3 stack of p = 61.
ROWS = (300, 120, 40, 7)
RANK = 8


def _params():
  params = {f"d{i}": {"kernel": jnp.ones((n, 5)), "bias": jnp.zeros(5)} for i, n in enumerate(ROWS)}
  params["stacked"] = {"kernel": jnp.ones((2, 3, 60, 4)), "bias": jnp.zeros((2, 3, 4))}
  return params


def _layers():
  return find_layers(_params(), rank=RANK, stack_axes={"stacked": 2})


@pytest.mark.parametrize("waste, small", [(2.0, 4096), (2.0, 0), (1.0, 0), (100.0, 0)])
def test_every_layer_in_one_group_within_the_padding_bound(waste, small):
  layers = _layers()
  groups = _batch.group_layers(layers, waste, small)
  names = [layer.name for g in groups for layer in g.layers]
  assert sorted(names) == sorted(layer.name for layer in layers)
  for g in groups:
    assert g.width == max(layer.p for layer in g.layers)
    assert len(g.widths) == sum(g.copies)
    if g.exact:
      assert all(layer.exact and layer.p == g.width for layer in g.layers)
    else:
      assert all(not layer.exact and layer.rank == g.rank for layer in g.layers)
      padded, rows = len(g.widths) * g.width, sum(g.widths)
      assert len(g.layers) == 1 or padded <= max(waste * rows, small)
  assert _batch.group_layers(layers, waste, small) == groups  # deterministic
  if waste == 1.0:  # no padding allowed: one Nystrom width per group
    assert all(len({layer.p for layer in g.layers}) == 1 for g in groups)


def test_stack_and_split_round_trip_with_stack_axes_and_padding():
  layers = _layers()
  (group,) = [g for g in _batch.group_layers(layers, 100.0, 0) if not g.exact]
  rng = np.random.default_rng(0)
  arrays = [
    jnp.asarray(rng.normal(size=layer.stack_shape + (layer.p, RANK)), jnp.float32)
    for layer in group.layers
  ]
  batch = group.stack(arrays, pad_axis=0)
  assert batch.shape == (sum(group.copies), group.width, RANK)
  start = 0
  for layer, a, n in zip(group.layers, arrays, group.copies, strict=True):
    block = np.asarray(batch[start : start + n])
    assert (block[:, layer.p :] == 0).all()  # the padding is zeros
    np.testing.assert_array_equal(block[:, : layer.p], np.asarray(a).reshape(n, layer.p, RANK))
    start += n
  for a, b in zip(arrays, group.split(batch, pad_axis=0), strict=True):
    np.testing.assert_array_equal(a, b)


def test_a_padded_draw_is_the_unpadded_draw_on_its_rows():
  keys = jax.random.split(jax.random.PRNGKey(4), 3)
  widths = (50, 31, 12)
  padded = _sketch.draw_sketches(keys, widths, 64, 6, "gaussian", orthonormal=True)
  jitted = jax.jit(lambda k: _sketch.draw_sketches(k, widths, 64, 6, "gaussian", orthonormal=True))(
    keys
  )
  draw = jax.jit(_sketch.draw_sketch, static_argnums=(1, 2, 3), static_argnames="orthonormal")
  for i, p in enumerate(widths):
    alone = draw(keys[i], p, 6, "gaussian", orthonormal=True).matrix
    np.testing.assert_allclose(padded.matrix[i, :p], alone, atol=2e-6)
    # Compiled elsewhere (statistics and factors live in different jitted
    # functions), the draw agrees to round-off: no sign or order choices.
    np.testing.assert_allclose(jitted.matrix[i], padded.matrix[i], atol=2e-6)
    assert (padded.matrix[i, p:] == 0).all()
    np.testing.assert_allclose(alone.T @ alone, np.eye(6), atol=2e-6)
  raw = draw(keys[0], 4000, 3, "gaussian").matrix * math.sqrt(4000)
  assert abs(float(raw.mean())) < 0.05 and abs(float(raw.std()) - 1.0) < 0.03  # N(0, 1/p)


def test_bad_sketch_widths_are_refused():
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  with pytest.raises(ValueError, match=r"sketch widths \(5, 3\) must exceed r=3"):
    _sketch.draw_sketches(keys, (5, 3), 8, 3, "gaussian")


@pytest.mark.parametrize("nystrom", ["stable", "shifted"])
def test_factors_of_a_layer_do_not_depend_on_its_group(nystrom):
  """Each layer's factors computed in one padded group equal those computed
  in groups of one, and equal the dense Nyström approximation."""
  layers = _layers()
  tx = nysact_optax.scale_by_nysact(rank=RANK, nystrom=nystrom, stack_axes={"stacked": 2})
  state = tx.init(_params())
  config = state.config
  rng = np.random.default_rng(1)
  covs = {}
  for layer in layers:  # a random PSD covariance per copy, and its sketch product
    a = rng.normal(size=layer.stack_shape + (3 * layer.p, layer.p)).astype(np.float32)
    covs[layer.name] = np.einsum("...np,...nq->...pq", a, a) / a.shape[-2]
  keys = {name: ls.sketch_key for name, ls in state.layers.items()}
  results = []
  for waste, small in [(100.0, 10**6), (1.0, 0)]:
    groups = _batch.group_layers(layers, waste, small)
    batches = [_batch.draw(g, keys, config) for g in groups]
    sketches = _batch.layer_sketches(groups, batches, config.dtype)
    layer_states = {
      name: ls._replace(
        cov=jnp.asarray(covs[name] @ np.asarray(sketches[name].matrix)),
        stat_count=jnp.ones_like(ls.stat_count),
      )
      for name, ls in state.layers.items()
    }
    options = Options.build(
      dict(
        rank=RANK, stat_decay=0.0, cov_update_every=1, inv_update_every=1, stack_axes={"stacked": 2}
      )
    )
    factorise = _inverse_factorisation(0.5, nystrom, False)
    factors = Factors("test", options, factorise, orthonormal=nystrom == "stable")
    refresh = jax.jit(factors._refresh, static_argnums=(1, 3))
    results.append((refresh(layer_states, groups, batches, config), sketches))
  (together, sketches), (alone, _) = results
  assert len(_batch.group_layers(layers, 100.0, 10**6)) == 2  # exact + one padded group
  for layer in layers:
    a, b = together[layer.name], alone[layer.name]
    np.testing.assert_allclose(a.eigvals, b.eigvals, rtol=1e-4, atol=1e-5)
    p_a = np.einsum("...pr,...r,...qr->...pq", a.basis, a.eigvals, a.basis)
    p_b = np.einsum("...pr,...r,...qr->...pq", b.basis, b.eigvals, b.basis)
    np.testing.assert_allclose(p_a, p_b, atol=2e-5 * np.abs(p_b).max())
    if nystrom == "stable" and not layer.exact:  # the dense stable Nystrom of C
      s = np.asarray(sketches[layer.name].matrix, np.float64)
      c = covs[layer.name].astype(np.float64)
      y = c @ s
      dense = y @ np.linalg.pinv(np.swapaxes(s, -1, -2) @ y) @ np.swapaxes(y, -1, -2)
      np.testing.assert_allclose(p_a, dense, atol=1e-4 * np.abs(dense).max())


def test_statistics_and_factors_share_the_groups_sketches():
  """The micro-batch statistics path draws the same sketches as the update."""
  layers = _layers()
  state = nysact_optax.scale_by_nysact(rank=RANK, stack_axes={"stacked": 2}).init(_params())
  keys = {name: ls.sketch_key for name, ls in state.layers.items()}
  groups = _batch.group_layers(layers)
  _, eager = _statistics.sketches_of(groups, keys, state.config)
  jitted = jax.jit(lambda k: _statistics.sketches_of(groups, k, state.config)[1])(keys)
  for name in eager:
    np.testing.assert_allclose(eager[name].matrix, jitted[name].matrix, atol=2e-6)
