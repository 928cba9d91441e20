"""bf16/fp16 activations and parameters; statistics in ``stats_dtype``."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nysact_optax
from nysact_optax import demo
from tests import _reference
from tests.test_nnx import INIT, _normal

RHO = 0.3
EXACT = dict(rank=10**6, damping=RHO, stat_decay=0.0, cov_update_every=1, inv_update_every=1)


def _init_params(model, x, seed=0):
  """Lecun-normal kernels, zero biases, drawn with numpy (no per-shape compiles)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, s):
    if path[-1].key == "bias":
      return np.zeros(s.shape, np.float32)
    return (rng.standard_normal(s.shape) / math.sqrt(math.prod(s.shape[:-1]))).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _train(params, data, dtype, steps=200, batch=64):
  """``steps`` of NysAct on the digits CNN with params and inputs in ``dtype``."""
  model = demo.DigitsCNN()
  params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
  tx = nysact_optax.nysact(0.1, weight_decay=5e-4)
  opt_state = tx.init(params)
  apply = nysact_optax.capture_activations(model.apply)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits, acts = apply({"params": p}, x.astype(dtype))
      logits = logits.astype(jnp.float32)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), acts

    (loss, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    return optax.apply_updates(params, updates), opt_state, loss

  order = np.random.default_rng(0).permutation(len(data.x_train))
  losses = []
  for i in range(steps):
    idx = np.take(order, np.arange(i * batch, (i + 1) * batch), mode="wrap")
    params, opt_state, loss = step(params, opt_state, data.x_train[idx], data.y_train[idx])
    losses.append(loss)
  logits = model.apply({"params": params}, data.x_test.astype(dtype)).astype(jnp.float32)
  accuracy = float((np.asarray(logits).argmax(-1) == data.y_test).mean())
  return np.asarray(losses), accuracy, params, opt_state


def test_bf16_training_stays_finite_and_tracks_float32():
  data = demo.load_digits_split()
  params = _init_params(demo.DigitsCNN(), data.x_train[:1])
  loss32, acc32, _, _ = _train(params, data, jnp.float32)
  loss16, acc16, params16, state16 = _train(params, data, jnp.bfloat16)
  assert np.isfinite(loss16).all()
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params16))
  layers = state16[0].layers
  assert all(ls.basis.dtype == ls.cov.dtype == jnp.float32 for ls in layers.values())
  assert all(int(ls.failures) == 0 for ls in layers.values())
  # The stated tolerance (README, "Mixed precision"): mean |loss difference| over
  # the 200 steps below 0.03, the last 20 steps' mean losses within 0.02, test
  # accuracy within 2 points.
  assert np.abs(loss16 - loss32).mean() < 0.03
  assert abs(loss16[-20:].mean() - loss32[-20:].mean()) < 0.02
  assert abs(acc16 - acc32) <= 0.02 and acc32 >= 0.9


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Conv(3, (3, 3), dtype=x.dtype, param_dtype=x.dtype, **INIT)(x)
    return nn.Dense(2, dtype=x.dtype, param_dtype=x.dtype, **INIT)(h.reshape(h.shape[0], -1))


def _exact_check(x, params, acts, grads, updates, atol_scale, rho=RHO):
  """Each layer's update against the float64 damped inverse of its inputs."""
  x64 = np.asarray(x, np.float64)
  rows = {
    "Conv_0": _reference.im2col(x64, (3, 3), (1, 1), "SAME", (1, 1)),
    "Dense_0": np.asarray(acts["Dense_0"].inputs[0], np.float64).reshape(x.shape[0], -1),
  }
  for name, a in rows.items():
    g, u = grads[name], updates[name]
    gmat = np.concatenate(
      [
        np.asarray(g["kernel"], np.float64).reshape(a.shape[1], -1),
        np.asarray(g["bias"], np.float64)[None],
      ]
    )
    umat = np.concatenate(
      [
        np.asarray(u["kernel"], np.float64).reshape(a.shape[1], -1),
        np.asarray(u["bias"], np.float64)[None],
      ]
    )
    expected = _reference.damped_inverse(_reference.with_bias_column(a), rho) @ gmat
    np.testing.assert_allclose(
      umat, expected, rtol=0, atol=atol_scale * np.abs(expected).max(), err_msg=name
    )


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_statistics_do_not_overflow_and_are_exact(dtype):
  # Inputs of magnitude ~300: their squares (~1e5) overflow float16 (max 65504).
  x = jnp.asarray(300 * _normal((4, 5, 5, 2), 0), dtype)
  model = Net()
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  _, acts = nysact_optax.capture_activations(model.apply)({"params": params}, x)
  assert float(jnp.max(jnp.abs(x.astype(jnp.float32)))) ** 2 > 65504
  grads = jax.tree.map(lambda a: jnp.asarray(_normal(a.shape, 1), dtype), params)
  # Damping on the inputs' scale keeps the float32 solve well conditioned, so the
  # comparison isolates the half-precision inputs and outputs.
  tx = nysact_optax.scale_by_nysact(**{**EXACT, "damping": 1e4})
  updates, state = jax.jit(tx.update)(grads, tx.init(params), activations=acts)
  assert all(u.dtype == dtype for u in jax.tree.leaves(updates))  # the parameter dtype
  assert all(
    ls.cov.dtype == jnp.float32 and np.isfinite(ls.cov).all() for ls in state.layers.values()
  )
  # Exact up to rounding the float32 result to the half-precision update.
  _exact_check(x, params, acts, grads, updates, 2 * float(jnp.finfo(dtype).eps), rho=1e4)


def test_float64_statistics_when_configured():
  with jax.enable_x64(True):
    x = jnp.asarray(_normal((4, 5, 5, 2), 0), jnp.float64)
    model = Net()
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    _, acts = nysact_optax.capture_activations(model.apply)({"params": params}, x)
    grads = jax.tree.map(lambda a: jnp.asarray(_normal(a.shape, 1), jnp.float64), params)
    tx = nysact_optax.scale_by_nysact(**EXACT, stats_dtype="float64")
    updates, state = jax.jit(tx.update)(grads, tx.init(params), activations=acts)
    assert all(ls.basis.dtype == jnp.float64 for ls in state.layers.values())
    _exact_check(x, params, acts, grads, updates, 1e-10)


@pytest.mark.parametrize(
  "stats_dtype, message",
  [
    (
      "bfloat16",
      r"stats_dtype must be one of \('float32', 'float64'\), got stats_dtype='bfloat16'",
    ),
    (
      "float64",
      r"stats_dtype='float64' needs 64-bit JAX: set "
      r"jax.config.update\('jax_enable_x64', True\) first",
    ),
    ("floaty", r"stats_dtype must be one of .*got stats_dtype='floaty'"),
  ],
)
def test_bad_stats_dtype_raises(stats_dtype, message):
  with pytest.raises(ValueError, match=message):
    nysact_optax.nysact(0.1, stats_dtype=stats_dtype)
