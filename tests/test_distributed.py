"""pmap and sharded jit on 8 simulated CPU devices equal one device on the whole batch."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import nysact_optax
from tests import _params

pytestmark = pytest.mark.skipif(
  jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py simulates them)"
)

BATCH, STEPS = 16, 8
# Dense_0 (p = 65) gets a rank-20 Nystrom approximation; Conv_0 (p = 19) and
# Dense_1 (p = 9) are exact. 8 steps = 2 inverse periods.
KWARGS = dict(rank=20, damping=0.5, cov_update_every=2, inv_update_every=4)


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = nn.relu(nn.Dense(8)(x.reshape(x.shape[0], -1)))
    return nn.Dense(3)(x)


MODEL = Net()
APPLY = nysact_optax.capture_activations(MODEL.apply)
TX = nysact_optax.nysact(0.1, weight_decay=1e-3, **KWARGS)


@functools.cache  # one init for the whole module
def _data():
  x, y = _params.data((BATCH, 4, 4, 2))
  return _params.init_params(MODEL, x), x, y


def _grads(params, x, y, loss_axis=None):
  def loss_fn(p):
    logits, acts = APPLY({"params": p}, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    if loss_axis is not None:  # shard_map: gradients of the mean over devices
      loss = jax.lax.pmean(loss, loss_axis)
    return loss, acts

  (_, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return grads, acts


def _step(tx, params, state, x, y, axis_name=None, loss_axis=None):
  grads, acts = _grads(params, x, y, loss_axis)
  if axis_name is not None:  # pmap: average the per-device gradients
    grads = jax.lax.pmean(grads, axis_name)
  updates, state = tx.update(grads, state, params, activations=acts)
  return optax.apply_updates(params, updates), state


@functools.cache
def _single_device_run():
  params, x, y = _data()
  state = TX.init(params)
  step = jax.jit(functools.partial(_step, TX))
  for _ in range(STEPS):
    params, state = step(params, state, x, y)
  return jax.device_get((params, state))


def _assert_close(actual, expected, rtol=2e-5):
  jax.tree.map(
    lambda a, e: np.testing.assert_allclose(
      np.asarray(a), np.asarray(e), rtol=rtol, atol=rtol * np.abs(e).max()
    ),
    actual,
    expected,
  )


def _assert_same_run(params, state, expected_params, expected_state):
  """Parameters, statistics and eigenvalues agree; the bases are compared
  through what they do (the parameters), since eigenvectors of (nearly)
  repeated eigenvalues are only defined up to rotation."""
  _assert_close(params, expected_params)
  for name, layer in state.layers.items():
    want = expected_state.layers[name]
    _assert_close((layer.cov, layer.eigvals), (want.cov, want.eigvals))
    np.testing.assert_array_equal(layer.sketch_key, want.sketch_key)
  assert int(state.count) == int(expected_state.count) == STEPS


@pytest.mark.parametrize("mapper", ["pmap", "shard_map"])
def test_mapped_equals_single_device_on_the_whole_batch(mapper):
  """pmap, and shard_map whose autodiff checks replication (check_vma): the
  statistics of each device's rows are averaged with lax.pmean."""
  tx = nysact_optax.nysact(0.1, weight_decay=1e-3, axis_name="batch", **KWARGS)
  params, x, y = _data()
  n = 8
  if mapper == "pmap":
    step = functools.partial(_step, tx, axis_name="batch")
    replicate = lambda t: jax.tree.map(lambda a: jnp.stack([a] * n), t)
    run, state = replicate(params), replicate(tx.init(params))
    xs, ys = x.reshape(n, BATCH // n, *x.shape[1:]), y.reshape(n, BATCH // n)
    step = jax.pmap(step, axis_name="batch")
  else:
    run, state, xs, ys = params, tx.init(params), x, y
    # With check_vma, the gradient of replicated parameters is already summed
    # over devices: average the loss, not the gradients.
    step = functools.partial(_step, tx, loss_axis="batch")
    mesh = jax.make_mesh((n,), ("batch",), axis_types=(AxisType.Explicit,))
    step = jax.jit(
      jax.shard_map(
        step, mesh=mesh, in_specs=(P(), P(), P("batch"), P("batch")), out_specs=(P(), P())
      )
    )
  for _ in range(STEPS):
    run, state = step(run, state, xs, ys)
  run, state = jax.device_get((run, state))
  if mapper == "pmap":
    for leaf in jax.tree.leaves((run, state)):  # every replica holds the same
      for i in range(1, n):
        np.testing.assert_array_equal(leaf[i], leaf[0])
    run, state = jax.tree.map(lambda a: a[0], (run, state))
  expected_params, expected_state = _single_device_run()
  _assert_same_run(run, state[0], expected_params, expected_state[0])
  assert all(
    int(ls.stat_count) == STEPS // KWARGS["cov_update_every"] for ls in state[0].layers.values()
  )


def _param_specs(params, auto):
  """Dense_0 column-parallel (kernel and bias over ``model`` on the output
  axis); with Auto axes also Conv_0 column-parallel and Dense_1 row-parallel
  (kernel over ``model`` on the input axis). Everything else replicated.
  (With Explicit axes, linen's Conv and Dense cannot say how to shard their
  outputs for those two.)"""

  def spec(path, leaf):
    layer, name = (nysact_optax._tree.key_name(k) for k in path)
    if layer == "Dense_0" or (auto and layer == "Conv_0"):
      return P(*([None] * (leaf.ndim - 1)), "model")
    if auto and layer == "Dense_1" and name == "kernel":
      return P("model", None)
    return P()

  return jax.tree_util.tree_map_with_path(spec, params)


def _specs(tree):
  return jax.tree.map(lambda a: a.sharding.spec, tree)


def _same_sharding(a, b):
  return a.sharding.is_equivalent_to(b.sharding, a.ndim)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_sharded_jit_equals_single_device_and_keeps_shardings(axis_type):
  """The batch over "data" (4 devices), parameters replicated, except kernels
  over "model" (2 devices) as `_param_specs` says. (Data parallelism over all
  8 devices with every parameter replicated: tests/test_multiprocess.py.)"""
  params, x, y = _data()
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)
  with jax.set_mesh(mesh):
    params = jax.tree.map(
      lambda a, s: jax.device_put(a, NamedSharding(mesh, s)),
      params,
      _param_specs(params, axis_type == AxisType.Auto),
    )
    x = jax.device_put(x, NamedSharding(mesh, P("data")))
    y = jax.device_put(y, NamedSharding(mesh, P("data")))
    param_shardings = jax.tree.map(lambda a: a.sharding, params)
    state = TX.init(params)
    init_state = state
    step = jax.jit(functools.partial(_step, TX))
    for i in range(STEPS):
      params, state = step(params, state, x, y)
      # Steps 0-7 take every combination of the two lax.cond branches.
      same = jax.tree.map(_same_sharding, state, init_state)
      assert all(jax.tree.leaves(same)), (i, _specs(state[0].layers), _specs(init_state[0].layers))
      kept = jax.tree.map(
        lambda a, s: a.sharding.is_equivalent_to(s, a.ndim), params, param_shardings
      )
      assert all(jax.tree.leaves(kept)), (i, _specs(params))
    for layer in state[0].layers.values():  # the factors are replicated
      for leaf in (layer.cov, layer.basis, layer.eigvals):
        assert leaf.sharding.is_fully_replicated
    if axis_type == AxisType.Explicit:  # the types, not only the placements
      out_types = jax.eval_shape(step, params, state, x, y)
      assert jax.tree.map(lambda t: t.sharding.spec, out_types[1][0].layers) == (
        jax.tree.map(lambda a: jax.typeof(a).sharding.spec, init_state[0].layers)
      )
    full = lambda a: tuple(a.sharding.spec) + (None,) * (a.ndim - len(a.sharding.spec))
    assert full(params["Dense_0"]["kernel"]) == (None, "model")
    row_parallel = ("model", None) if axis_type == AxisType.Auto else (None, None)
    assert full(params["Dense_1"]["kernel"]) == row_parallel
  expected_params, expected_state = _single_device_run()
  _assert_same_run(
    jax.device_get(params), jax.device_get(state[0]), expected_params, expected_state[0]
  )


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_sharded_jit_without_a_mesh_context_equals_single_device(axis_type):
  """``jit`` with ``NamedSharding`` in/out shardings and no ``jax.set_mesh``
  (the lm1b pattern): the mesh is only in the operands' types, and the
  factors are still kept replicated on it."""
  params, x, y = _data()
  mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
  assert jax.sharding.get_abstract_mesh().empty
  replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  params = jax.device_put(params, replicated)
  state = jax.jit(TX.init, out_shardings=replicated)(params)
  step = jax.jit(
    functools.partial(_step, TX),
    in_shardings=(replicated, replicated, rows, rows),
    out_shardings=(replicated, replicated),
  )
  x, y = jax.device_put(x, rows), jax.device_put(y, rows)
  for _ in range(STEPS):
    params, state = step(params, state, x, y)
  for layer in state[0].layers.values():
    for leaf in (layer.cov, layer.basis, layer.eigvals):
      assert leaf.sharding.is_fully_replicated
  expected_params, expected_state = _single_device_run()
  _assert_same_run(
    jax.device_get(params), jax.device_get(state[0]), expected_params, expected_state[0]
  )


def test_replication_helpers_spell_out_the_mesh():
  """Inside a jit with sharded operands and no mesh in context, the helpers
  name the operands' mesh (a bare PartitionSpec would need one in context);
  with no sharding at all they do nothing."""
  from nysact_optax import _distributed

  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  rows = NamedSharding(mesh, P("data"))
  seen = {}

  def f(x):
    seen["out_sharding"] = _distributed.contraction_out_sharding(x, x)
    return _distributed.replicate(x)

  y = jax.jit(f)(jax.device_put(jnp.ones((8, 3)), rows))
  assert y.sharding.is_fully_replicated
  assert isinstance(seen["out_sharding"], NamedSharding)
  assert seen["out_sharding"].spec == P() and seen["out_sharding"].mesh.axis_names == ("data",)
  z = jax.jit(f)(jnp.ones((8, 3)))  # no sharding: identity, no out_sharding
  assert seen["out_sharding"] is None
  np.testing.assert_array_equal(z, jnp.ones((8, 3)))


@pytest.mark.parametrize("spec", [P("data"), P(None, "data")], ids=["first", "second"])
def test_conv_statistics_with_two_leading_axes_under_explicit_sharding(spec):
  """A conv input (a, b, H, W, C) sharded on one leading axis: the leading
  axes are merged with the sharded one major (no resharding), exactly."""
  from nysact_optax import _sketch, _statistics

  conv = nysact_optax.ConvSpec((3, 3), (1, 1), "SAME", (1, 1), (1, 1))
  xin, _ = _params.data((8, 8, 5, 5, 3))
  s = _sketch.Sketch(_params.data((28, 4), seed=2)[0])
  fn = jax.jit(
    lambda v: _statistics.sketched_covariance(nysact_optax.LayerInputs([v], conv), s, has_bias=True)
  )
  expected = fn(xin)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  with jax.set_mesh(mesh):
    y = fn(jax.device_put(xin, NamedSharding(mesh, spec)))
  assert y.sharding.is_fully_replicated
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
