"""scale_by_nysact / nysact: exactness, schedule, optax contract, errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nysact_optax
from tests import _reference

RHO = 0.3


class Single(nn.Module):
  """Wraps one layer (called ``calls`` times) so its path is ``"layer"``."""

  make: callable
  calls: int = 1

  @nn.compact
  def __call__(self, x):
    layer = self.make(name="layer")
    return [layer(x) for _ in range(self.calls)]


def _dense_rows(axes):
  def rows(x):
    x = np.moveaxis(x, axes, tuple(range(-len(axes), 0)))
    return x.reshape(-1, int(np.prod(x.shape[x.ndim - len(axes) :])))

  return rows


P = functools.partial
CASES = {
  "dense": (P(nn.Dense, 5), (6, 4), _dense_rows((-1,))),
  "dense_nobias": (P(nn.Dense, 5, use_bias=False), (6, 4), _dense_rows((-1,))),
  "dense_tokens": (P(nn.Dense, 3), (2, 5, 4), _dense_rows((-1,))),
  "dense_general_out": (P(nn.DenseGeneral, 3, axis=(-2, -1)), (4, 5, 2, 3), _dense_rows((-2, -1))),
  "dense_general_heads": (P(nn.DenseGeneral, (2, 3)), (4, 5, 4), _dense_rows((-1,))),
  "dense_general_axis1": (P(nn.DenseGeneral, 2, axis=(1, -1)), (3, 2, 4, 3), _dense_rows((1, -1))),
  "conv2d_same": (P(nn.Conv, 4, (3, 3)), (2, 5, 6, 3), _reference.conv_rows((3, 3))),
  "conv2d_strided_dilated": (
    P(nn.Conv, 4, (3, 2), strides=2, kernel_dilation=(2, 1), padding="VALID", use_bias=False),
    (2, 9, 6, 2),
    _reference.conv_rows((3, 2), (2, 2), "VALID", (2, 1)),
  ),
  "conv2d_explicit_pad": (
    P(nn.Conv, 3, (2, 3), padding=((1, 2), (0, 1)), strides=(1, 2)),
    (2, 5, 6, 2),
    _reference.conv_rows((2, 3), (1, 2), ((1, 2), (0, 1))),
  ),
  "conv2d_groups": (
    P(nn.Conv, 6, (3, 3), feature_group_count=2),
    (2, 5, 5, 4),
    _reference.conv_rows((3, 3), groups=2),
  ),
  "conv2d_depthwise": (
    P(nn.Conv, 4, (3, 3), feature_group_count=4, strides=2),
    (2, 6, 6, 4),
    _reference.conv_rows((3, 3), (2, 2), groups=4),
  ),
  "conv2d_circular": (
    P(nn.Conv, 3, (3, 3), padding="CIRCULAR"),
    (1, 4, 5, 2),
    _reference.conv_rows((3, 3), padding="CIRCULAR"),
  ),
  "conv1d_causal": (
    P(nn.Conv, 3, (3,), padding="CAUSAL", kernel_dilation=2),
    (2, 9, 2),
    _reference.conv_rows((3,), padding="CAUSAL", dilation=(2,)),
  ),
  "conv3d": (
    P(nn.Conv, 2, (2, 2, 2), padding="VALID"),
    (1, 3, 4, 3, 2),
    _reference.conv_rows((2, 2, 2), padding="VALID"),
  ),
}


def _one_step(module, x, tx, seed=0):
  params = module.init(jax.random.PRNGKey(seed), x)["params"]
  grads = jax.tree.map(lambda a: jax.random.normal(jax.random.PRNGKey(7), a.shape), params)
  _, acts = nysact_optax.capture_activations(module.apply)({"params": params}, x)
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(grads, state, params, activations=acts)
  return grads, updates, state


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("calls", [1, 2])
def test_exact_mode_equals_dense_damped_inverse(case, calls):
  make, shape, rows = CASES[case]
  module = Single(make, calls)
  x = jax.random.normal(jax.random.PRNGKey(1), shape)
  tx = nysact_optax.scale_by_nysact(
    rank=10**6, damping=RHO, stat_decay=0.0, cov_update_every=1, inv_update_every=1
  )
  grads, updates, _ = _one_step(module, x, tx)
  a = np.concatenate([rows(np.asarray(x, np.float64))] * calls)
  g, u = grads["layer"], updates["layer"]
  n_in = a.shape[1]
  gmat = np.asarray(g["kernel"], np.float64).reshape(n_in, -1)
  umat = np.asarray(u["kernel"]).reshape(n_in, -1)
  if "bias" in g:
    a = _reference.with_bias_column(a)
    gmat = np.concatenate([gmat, np.asarray(g["bias"], np.float64).reshape(1, -1)])
    umat = np.concatenate([umat, np.asarray(u["bias"]).reshape(1, -1)])
  expected = _reference.damped_inverse(a, RHO) @ gmat  # (G P)^T = P G^T
  np.testing.assert_allclose(umat, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())


def test_bias_free_multi_axis_kernel_needs_input_axes():
  """Any bias-free DenseGeneral with features=(2, 3), but flax's attention
  projections (query, key, value), whose layout is flax's convention."""
  module = Single(P(nn.DenseGeneral, (2, 3), use_bias=False))
  x = jnp.ones((4, 5))
  params = module.init(jax.random.PRNGKey(0), x)["params"]
  _, acts = nysact_optax.capture_activations(module.apply)({"params": params}, x)
  tx = nysact_optax.scale_by_nysact(rank=3)
  with pytest.raises(ValueError, match=r"layer 'layer'.*input_axes=\{'layer': 1\}"):
    tx.update(params, tx.init(params), activations=acts)
  tx = nysact_optax.scale_by_nysact(rank=3, input_axes={"layer": 1})
  state = tx.init(params)
  assert state.layers["layer"].basis.shape == (5, 3)
  tx.update(params, state, activations=acts)


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = nn.LayerNorm()(x.reshape(x.shape[0], -1))
    return nn.Dense(3)(x)


def _net_setup(tx, batch=8):
  model = Net()
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, 6, 6, 2))
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  apply = nysact_optax.capture_activations(model.apply)

  def grads_and_acts(params, x):
    def loss(p):
      y, acts = apply({"params": p}, x)
      return jnp.mean(y**2), acts

    (_, acts), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return grads, acts

  return params, x, grads_and_acts


@pytest.mark.parametrize("refresh", ["reference", "fixed"])
def test_sketch_changes_exactly_at_statistics_updates(refresh):
  tx = nysact_optax.scale_by_nysact(
    rank=4, cov_update_every=2, inv_update_every=4, sketch_refresh=refresh
  )
  params, x, grads_and_acts = _net_setup(tx)
  state = tx.init(params)
  update = jax.jit(tx.update)
  keys = [np.asarray(state.layers["Dense_0"].sketch_key)]
  covs = [np.asarray(state.layers["Dense_0"].cov)]
  for _ in range(6):
    grads, acts = grads_and_acts(params, x)
    _, state = update(grads, state, params, activations=acts)
    keys.append(np.asarray(state.layers["Dense_0"].sketch_key))
    covs.append(np.asarray(state.layers["Dense_0"].cov))
  key_changed = [not np.array_equal(a, b) for a, b in zip(keys, keys[1:])]
  cov_changed = [not np.array_equal(a, b) for a, b in zip(covs, covs[1:])]
  assert cov_changed == [True, False] * 3  # statistics at steps 0, 2, 4
  assert key_changed == ([True, False] * 3 if refresh == "reference" else [False] * 6)
  assert int(state.layers["Dense_0"].stat_count) == 3


def test_one_compilation_across_two_inverse_periods():
  # "stable" keeps every direction of a full-rank covariance, so each refresh
  # visibly changes the basis ("shifted" may clip every eigenvalue to 0).
  tx = nysact_optax.nysact(0.1, rank=3, cov_update_every=2, inv_update_every=4, nystrom="stable")
  params, x, grads_and_acts = _net_setup(tx)
  traces = []

  @jax.jit
  def step(params, state, x):
    traces.append(1)
    grads, acts = grads_and_acts(params, x)
    updates, state = tx.update(grads, state, params, activations=acts)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  bases = []
  for _ in range(9):
    params, state = step(params, state, x)
    bases.append(np.asarray(state[0].layers["Conv_0"].basis))
  assert len(traces) == 1
  changed = [not np.array_equal(a, b) for a, b in zip(bases, bases[1:])]
  assert changed == [False, False, False, True, False, False, False, True]  # steps 4, 8


def test_state_is_order_p_r_and_tracks_layers():
  tx = nysact_optax.scale_by_nysact(rank=5)
  params, _, _ = _net_setup(tx)
  state = tx.init(params)
  assert sorted(state.layers) == ["Conv_0", "Dense_0"]  # LayerNorm is not a layer
  dense = state.layers["Dense_0"]
  assert dense.cov.shape == dense.basis.shape == (6 * 6 * 4 + 1, 5)
  assert state.layers["Conv_0"].cov.shape == (3 * 3 * 2 + 1, 5)


def test_unknown_kwargs_bf16_and_passthrough():
  tx = nysact_optax.scale_by_nysact(rank=3, cov_update_every=1, inv_update_every=1)
  params, x, grads_and_acts = _net_setup(tx)
  grads, acts = grads_and_acts(params, x)
  params16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  grads16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), grads)
  updates, _ = jax.jit(tx.update)(
    grads16, tx.init(params16), params16, activations=acts, value=1.0, some_other_arg=3
  )
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
  # Non-layer parameters pass through untouched; layer kernels change.
  assert np.array_equal(updates["LayerNorm_0"]["scale"], grads16["LayerNorm_0"]["scale"])
  assert not np.allclose(
    np.asarray(updates["Dense_0"]["kernel"], np.float32),
    np.asarray(grads16["Dense_0"]["kernel"], np.float32),
  )


def test_chain_and_inject_hyperparams():
  inner = nysact_optax.nysact
  tx = optax.inject_hyperparams(
    inner,
    static_args=(
      "rank",
      "sketch",
      "cov_update_every",
      "inv_update_every",
      "seed",
      "sketch_refresh",
      "nystrom",
      "exclude",
      "input_axes",
    ),
  )(learning_rate=0.1, damping=1.0, rank=3, cov_update_every=1, inv_update_every=2)
  tx = optax.chain(optax.clip_by_global_norm(1.0), tx)
  params, x, grads_and_acts = _net_setup(tx)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for _ in range(3):
    grads, acts = grads_and_acts(params, x)
    updates, state = step(grads, state, params, activations=acts)
    params = optax.apply_updates(params, updates)
  state[1].hyperparams["damping"] = jnp.asarray(2.0)  # dynamic, no recompile
  grads, acts = grads_and_acts(params, x)
  updates, state = step(grads, state, params, activations=acts)
  assert all(np.isfinite(u).all() for u in jax.tree.leaves(updates))


def test_nysact_equals_manual_chain():
  kwargs = dict(rank=3, cov_update_every=1, inv_update_every=2)
  tx = nysact_optax.nysact(0.05, momentum=0.9, weight_decay=1e-3, **kwargs)
  manual = optax.chain(
    nysact_optax.scale_by_nysact(**kwargs),
    optax.add_decayed_weights(1e-3),
    optax.trace(0.9),
    optax.scale(-0.05),
  )
  params, x, grads_and_acts = _net_setup(tx)
  s1, s2 = tx.init(params), manual.init(params)
  update1, update2 = jax.jit(tx.update), jax.jit(manual.update)
  for _ in range(3):
    grads, acts = grads_and_acts(params, x)
    u1, s1 = update1(grads, s1, params, activations=acts)
    u2, s2 = update2(grads, s2, params, activations=acts)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u1, u2)
    params = optax.apply_updates(params, u1)


def test_excluded_layer_passes_through_and_missing_layer_is_an_error():
  params, x, grads_and_acts = _net_setup(None)
  grads, acts = grads_and_acts(params, x)
  del acts["Conv_0"]
  tx = nysact_optax.scale_by_nysact(rank=3)
  with pytest.raises(ValueError, match=r"layer 'Conv_0': no captured inputs.*exclude"):
    tx.update(grads, tx.init(params), activations=acts)
  tx = nysact_optax.scale_by_nysact(rank=3, exclude=["^Conv"])
  updates, _ = tx.update(grads, tx.init(params), activations=acts)
  np.testing.assert_array_equal(updates["Conv_0"]["kernel"], grads["Conv_0"]["kernel"])


def test_missing_activations_argument_is_an_error():
  params, _, _ = _net_setup(None)
  tx = nysact_optax.scale_by_nysact()
  with pytest.raises(ValueError, match=r"needs activations=.*nysact_optax.value_and_grad"):
    tx.update(params, tx.init(params))


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(rank=0), "rank must be an integer >= 1, got rank=0"),
    (dict(rank=2.5), "rank must be an integer >= 1, got rank=2.5"),
    (dict(damping=0.0), "damping must be > 0, got damping=0.0"),
    (dict(damping=-1), "damping must be > 0, got damping=-1"),
    (dict(stat_decay=1.0), r"stat_decay must be in \[0, 1\), got stat_decay=1.0"),
    (dict(stat_decay=-0.1), r"stat_decay must be in \[0, 1\), got stat_decay=-0.1"),
    (dict(cov_update_every=0), "cov_update_every must be an integer >= 1, got cov_update_every=0"),
    (dict(inv_update_every=0), "inv_update_every must be an integer >= 1, got inv_update_every=0"),
    (
      dict(cov_update_every=3, inv_update_every=10),
      "inv_update_every must be a multiple of cov_update_every, got inv_update_every=10",
    ),
    (dict(sketch="rademacher"), "sketch must be one of .*got sketch='rademacher'"),
    (dict(sketch_refresh="never"), "sketch_refresh must be one of .*got sketch_refresh='never'"),
    (dict(nystrom="svd"), "nystrom must be one of .*got nystrom='svd'"),
  ],
)
def test_bad_hyperparameters_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    nysact_optax.scale_by_nysact(**kwargs)
  with pytest.raises(ValueError, match=message):
    nysact_optax.nysact(0.1, **kwargs)


def test_flax_attention_without_bias_needs_no_input_axes():
  """lm1b's pattern: nn.MultiHeadDotProductAttention(use_bias=False); its
  query/key/value kernels are (d, heads, head_dim), out is (heads, head_dim, d)."""
  module = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=6, use_bias=False)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 4)), jnp.float32)
  params = module.init(jax.random.PRNGKey(0), x)["params"]
  _, acts = nysact_optax.capture_activations(module.apply)({"params": params}, x)
  tx = nysact_optax.scale_by_nysact(rank=10**6, damping=RHO, stat_decay=0.0)
  state = tx.init(params)
  widths = {name: ls.cov.shape[0] for name, ls in state.layers.items()}
  assert widths == {"query": 4, "key": 4, "value": 4, "out": 6}
  updates, _ = tx.update(params, state, activations=acts)
  rows = np.asarray(x, np.float64).reshape(-1, 4)
  g = np.asarray(params["query"]["kernel"], np.float64).reshape(4, -1)
  expected = _reference.damped_inverse(rows, RHO) @ g
  np.testing.assert_allclose(
    np.asarray(updates["query"]["kernel"]).reshape(4, -1),
    expected,
    rtol=2e-4,
    atol=2e-4 * np.abs(expected).max(),
  )
