"""Gradient accumulation: k micro-batches (gradients and statistics) equal one batch."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nysact_optax
from tests import _params

K, MICRO, STEPS = 4, 4, 8
PERIODS = dict(cov_update_every=2, inv_update_every=4)


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = nn.relu(nn.Dense(8)(x.reshape(x.shape[0], -1)))
    return nn.Dense(3, use_bias=False)(x)


MODEL = Net()
APPLY = nysact_optax.capture_activations(MODEL.apply)


@functools.cache  # one init for the whole module
def _data():
  x, y = _params.data((K * MICRO, 4, 4, 2))
  return _params.init_params(MODEL, x), x, y


def _grads(params, x, y):
  def loss_fn(p):
    logits, acts = APPLY({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), acts

  (_, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return grads, acts


def _full_batch_step(tx, params, state, x, y):
  grads, acts = _grads(params, x, y)
  updates, state = tx.update(grads, state, params, activations=acts)
  return optax.apply_updates(params, updates), state


def _accumulated_step(tx, params, state, x, y):
  """The README recipe: a scan over micro-batches sums gradients and sketched
  statistics; one update with their means."""
  xs = x.reshape(K, MICRO, *x.shape[1:])
  ys = y.reshape(K, MICRO)

  def micro_step(carry, batch):
    grads, acts = _grads(params, *batch)
    stats = nysact_optax.sketched_statistics(state, acts)
    return jax.tree.map(jnp.add, carry, (grads, stats)), None

  zeros = (
    jax.tree.map(jnp.zeros_like, params),
    {k: jnp.zeros_like(v.cov) for k, v in nysact_optax.find_nysact_state(state).layers.items()},
  )
  (grads, stats), _ = jax.lax.scan(micro_step, zeros, (xs, ys))
  grads, stats = jax.tree.map(lambda a: a / K, (grads, stats))
  updates, state = tx.update(grads, state, params, statistics=stats)
  return optax.apply_updates(params, updates), state


def test_micro_batches_equal_one_large_batch():
  config = {}  # the defaults; the other sketch options: the MultiSteps test
  # rank 6: Dense_0 (p = 65) is Nystrom, Conv_0 (p = 19) and Dense_1 (p = 8) too.
  tx = nysact_optax.nysact(0.1, weight_decay=1e-3, rank=6, damping=0.5, **PERIODS, **config)
  params, x, y = _data()
  full = jax.jit(functools.partial(_full_batch_step, tx))
  accumulated = jax.jit(functools.partial(_accumulated_step, tx))
  p1, s1 = params, tx.init(params)
  p2, s2 = params, tx.init(params)
  for _ in range(STEPS):
    p1, s1 = full(p1, s1, x, y)
    p2, s2 = accumulated(p2, s2, x, y)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * np.abs(b).max()), p2, p1
  )
  for layer, want in s1[0].layers.items():
    got = s2[0].layers[layer]
    np.testing.assert_allclose(got.cov, want.cov, rtol=2e-5, atol=2e-5 * np.abs(want.cov).max())
    np.testing.assert_array_equal(got.sketch_key, want.sketch_key)
  for name in s1[0].layers:
    assert int(s2[0].layers[name].stat_count) == int(s1[0].layers[name].stat_count) == STEPS // 2
  # The updates moved the parameters: the comparison is not of two no-ops.
  assert not np.allclose(p1["Dense_0"]["kernel"], params["Dense_0"]["kernel"])


def test_optax_multisteps_sees_only_the_last_micro_batch():
  """Why the recipe exists: MultiSteps hands the inner NysAct the activations
  of the micro-step that emits the update, and drops the others. Also: with
  the other sketch options, sketched_statistics draws the sketch the update
  draws (the state's cov is exactly (1 - stat_decay) times it)."""
  config = dict(sketch="subcolumns", sketch_refresh="fixed", nystrom="stable")
  tx = nysact_optax.scale_by_nysact(
    rank=6, stat_decay=0.5, cov_update_every=1, inv_update_every=1, **config
  )
  multi = optax.MultiSteps(tx, every_k_schedule=2)
  params, x, y = _data()
  state = multi.init(params)
  micro = [
    _grads(params, x[i * MICRO : (i + 1) * MICRO], y[i * MICRO : (i + 1) * MICRO]) for i in range(2)
  ]
  stats = [nysact_optax.sketched_statistics(state, acts) for _, acts in micro]
  update = jax.jit(multi.update)
  for grads, acts in micro:
    _, state = update(grads, state, params, activations=acts)
  for layer in ("Conv_0", "Dense_0", "Dense_1"):
    cov = state.inner_opt_state.layers[layer].cov
    np.testing.assert_allclose(cov, 0.5 * stats[1][layer], rtol=1e-5, atol=1e-6 * np.abs(cov).max())
    mean = 0.5 * (stats[0][layer] + stats[1][layer])
    assert not np.allclose(cov, 0.5 * mean, rtol=1e-2)


def test_statistics_only_on_statistics_steps():
  tx = nysact_optax.nysact(0.1, rank=6, **PERIODS)
  params, x, y = _data()
  state = tx.init(params)
  _, acts = _grads(params, x, y)
  stats = jax.jit(nysact_optax.sketched_statistics)
  on = stats(state, acts)
  assert all(np.abs(v).max() > 0 for v in on.values())
  state = (state[0]._replace(count=jnp.asarray(1, jnp.int32)),) + tuple(state[1:])  # no stats
  off = stats(state, acts)
  assert all(np.array_equal(v, np.zeros_like(v)) for v in off.values())
  assert {k: v.shape for k, v in on.items()} == {
    "Conv_0": (19, 6),
    "Dense_0": (65, 6),
    "Dense_1": (8, 6),
  }


def test_errors_name_what_is_wrong():
  tx = nysact_optax.nysact(0.1, rank=6)
  params, x, y = _data()
  state = tx.init(params)
  grads, acts = _grads(params, x, y)
  stats = nysact_optax.sketched_statistics(state, acts)
  with pytest.raises(
    ValueError,
    match=r"expected layers \['Conv_0', 'Dense_0', "
    r"'Dense_1'\], got \['Conv_0', 'Dense_0'\]",
  ):
    tx.update(grads, state, params, statistics={k: stats[k] for k in ("Conv_0", "Dense_0")})
  with pytest.raises(
    ValueError,
    match=r"layer 'Dense_0': statistics has shape "
    r"\(65, 3\), expected \(65, 6\) \(p, rank\)",
  ):
    tx.update(grads, state, params, statistics=dict(stats, Dense_0=stats["Dense_0"][:, :3]))
  with pytest.raises(ValueError, match="got both activations= and statistics="):
    tx.update(grads, state, params, activations=acts, statistics=stats)
  with pytest.raises(ValueError, match=r"exactly one ScaleByNysActState.*found 0"):
    nysact_optax.sketched_statistics(optax.sgd(0.1).init(params), acts)
  with pytest.raises(ValueError, match=r"layer 'Conv_0': no captured inputs"):
    nysact_optax.sketched_statistics(state, {k: v for k, v in acts.items() if k != "Conv_0"})
  wide = {"Dense_0": nysact_optax.LayerInputs([jnp.ones((2, 70))], nysact_optax.DenseSpec())}
  with pytest.raises(
    ValueError,
    match=r"layer 'Dense_0': its input of shape \(2, 70\) has 70 "
    r"features, but its kernel \(64, 8\) expects 64",
  ):
    nysact_optax.sketched_statistics(state, dict(acts, **wide))
