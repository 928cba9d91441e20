"""graft, preconditioned_mask and nysact(graft="rmsprop") against hand computations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nysact_optax


def _tree(seed):
  r = np.random.default_rng(seed)
  return {
    "Dense_0": {
      "kernel": jnp.asarray(r.normal(size=(3, 4)), jnp.float32),
      "bias": jnp.asarray(r.normal(size=(4,)), jnp.float32),
    },
    "LayerNorm_0": {"scale": jnp.asarray(r.normal(size=(4,)), jnp.float32)},
  }


def _times(tree):
  """A direction that multiplies every update by a fixed tree."""
  return optax.GradientTransformation(
    lambda p: optax.EmptyState(), lambda u, s, p=None: (jax.tree.map(jnp.multiply, u, tree), s)
  )


def _norm(*xs):
  return np.sqrt(sum(float(np.sum(np.square(x))) for x in xs))


@pytest.mark.parametrize("group", ["layer", "leaf"])
def test_graft_equals_hand_computation(group):
  g, w = _tree(0), _tree(1)
  mask = {"Dense_0": {"kernel": True, "bias": True}, "LayerNorm_0": {"scale": False}}
  tx = nysact_optax.graft(_times(w), optax.scale(3.0), mask=mask, group=group)
  u, _ = jax.jit(tx.update)(g, tx.init(g))
  dk = np.asarray(g["Dense_0"]["kernel"] * w["Dense_0"]["kernel"])
  db = np.asarray(g["Dense_0"]["bias"] * w["Dense_0"]["bias"])
  mk, mb = 3 * np.asarray(g["Dense_0"]["kernel"]), 3 * np.asarray(g["Dense_0"]["bias"])
  if group == "layer":
    s = _norm(mk, mb) / _norm(dk, db)
    want_k, want_b = dk * s, db * s
  else:
    want_k, want_b = dk * _norm(mk) / _norm(dk), db * _norm(mb) / _norm(db)
  np.testing.assert_allclose(u["Dense_0"]["kernel"], want_k, rtol=1e-5)
  np.testing.assert_allclose(u["Dense_0"]["bias"], want_b, rtol=1e-5)
  # The leaf the direction does not transform gets the magnitude's update.
  np.testing.assert_allclose(u["LayerNorm_0"]["scale"], 3 * g["LayerNorm_0"]["scale"], rtol=1e-6)


def test_graft_zero_direction_gives_zero_and_mask_function():
  g = _tree(0)
  zero = jax.tree.map(jnp.zeros_like, g)
  tx = nysact_optax.graft(
    _times(zero), optax.scale(2.0), mask=lambda t: jax.tree.map(lambda x: x.ndim == 2, t)
  )
  u, _ = tx.update(g, tx.init(g))
  assert np.all(np.asarray(u["Dense_0"]["kernel"]) == 0)
  assert np.all(np.isfinite(np.asarray(u["Dense_0"]["kernel"])))
  # ndim < 2 leaves are outside the mask: magnitude's update.
  np.testing.assert_allclose(u["Dense_0"]["bias"], 2 * g["Dense_0"]["bias"])


def test_graft_forwards_extra_args_and_does_not_recompile():
  seen = []

  def update(u, s, p=None, *, activations=None, **extra):
    seen.append((activations, sorted(extra)))
    return u, s

  probe = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
  tx = nysact_optax.graft(probe, probe)
  g = _tree(0)
  traces = []

  @jax.jit
  def step(g, state):
    traces.append(1)
    return tx.update(g, state, activations=7, unknown=1)

  state = tx.init(g)
  u, state = step(g, state)
  u, state = step(g, state)
  assert len(traces) == 1
  assert seen == [(7, ["unknown"]), (7, ["unknown"])]
  # Same direction and magnitude: the graft is the identity.
  np.testing.assert_allclose(u["Dense_0"]["kernel"], g["Dense_0"]["kernel"], rtol=1e-6)


def test_identity_graft_is_layerwise_rmsprop_normalised_momentum_sgd():
  """chain(graft(identity, rmsprop), ema, decay, lr) against NumPy, 4 steps."""
  params = _tree(2)
  mask = nysact_optax.preconditioned_mask(nysact_optax.scale_by_nysact())
  lr, mu, wd, b2, eps = 0.1, 0.9, 0.01, 0.999, 1e-8
  rms = optax.scale_by_rms(decay=b2, eps=eps, eps_in_sqrt=False, bias_correction=True)
  tx = optax.chain(
    nysact_optax.graft(optax.identity(), rms, mask=mask),
    optax.ema(mu, debias=True),
    optax.add_decayed_weights(wd),
    optax.scale_by_learning_rate(lr),
  )
  state = tx.init(params)
  p_np = jax.tree.map(np.asarray, params)
  v = jax.tree.map(np.zeros_like, p_np)
  m = jax.tree.map(np.zeros_like, p_np)
  for t in range(1, 5):
    g = _tree(10 + t)
    u, state = jax.jit(tx.update)(g, state, params)
    params = optax.apply_updates(params, u)
    g_np = jax.tree.map(np.asarray, g)
    v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, g_np)
    r = jax.tree.map(lambda v, g: g / (np.sqrt(v / (1 - b2**t)) + eps), v, g_np)
    d = dict(r)
    layer = g_np["Dense_0"]  # one group: kernel and bias
    s = _norm(*r["Dense_0"].values()) / _norm(*layer.values())
    d["Dense_0"] = {k: x * s for k, x in layer.items()}
    m = jax.tree.map(lambda m, d: mu * m + (1 - mu) * d, m, d)
    step = jax.tree.map(lambda m, p: -lr * (m / (1 - mu**t) + wd * p), m, p_np)
    p_np = jax.tree.map(np.add, p_np, step)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
    jax.tree.map(np.asarray, params),
    p_np,
  )


def _dense_model():
  model = nn.Sequential([nn.Dense(5), nn.tanh, nn.LayerNorm(), nn.Dense(2)])
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  apply = nysact_optax.capture_activations(model.apply)

  def loss(p):
    y, acts = apply({"params": p}, x)
    return jnp.mean(y**2), acts

  (_, acts), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return model, x, params, acts, grads


def test_nysact_graft_first_step_equals_hand_computation():
  """Exact rank: NysAct's direction is G (A^T A / n + rho I)^{-1}; at step 1
  the RMSProp step is g / (|g| + eps) and the debiased EMA is the update."""
  _, x, params, acts, grads = _dense_model()
  lr, wd, rho = 0.05, 0.01, 0.5
  tx = nysact_optax.nysact(
    lr, graft="rmsprop", weight_decay=wd, damping=rho, rank=10**6, momentum=0.9
  )
  u, _ = tx.update(grads, tx.init(params), params, activations=acts)
  a = np.concatenate([np.asarray(x), np.ones((6, 1))], 1)
  p_inv = np.linalg.inv(a.T @ a / 6 + rho * np.eye(4))
  gk, gb = np.asarray(grads["layers_0"]["kernel"]), np.asarray(grads["layers_0"]["bias"])
  d = p_inv @ np.concatenate([gk, gb[None]], 0)  # (p, o): G P with G = (o, p)
  r = [g / (np.abs(g) + 1e-8) for g in (gk, gb)]
  d = d * _norm(*r) / _norm(d)
  want_k = -lr * (d[:3] + wd * np.asarray(params["layers_0"]["kernel"]))
  want_b = -lr * (d[3] + wd * np.asarray(params["layers_0"]["bias"]))
  np.testing.assert_allclose(u["layers_0"]["kernel"], want_k, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(u["layers_0"]["bias"], want_b, rtol=1e-4, atol=1e-7)
  # LayerNorm (not preconditioned): RMSProp's step, plus decay.
  s = grads["layers_2"]["scale"]
  np.testing.assert_allclose(
    u["layers_2"]["scale"],
    -lr * (s / (jnp.abs(s) + 1e-8) + wd * params["layers_2"]["scale"]),
    rtol=1e-5,
  )


def test_nysact_graft_one_chain_shape_and_default_unchanged():
  _, _, params, acts, grads = _dense_model()
  a = jax.tree.structure(nysact_optax.nysact(0.1, graft="rmsprop").init(params))
  b = jax.tree.structure(
    nysact_optax.nysact(0.1, graft="rmsprop", momentum=0.0, weight_decay=0.0).init(params)
  )
  assert a == b
  # graft=None is today's chain: precondition, decay, heavy ball, lr.
  tx = nysact_optax.nysact(0.1, weight_decay=5e-4, momentum=0.9)
  ref = optax.chain(
    nysact_optax.scale_by_nysact(),
    optax.add_decayed_weights(5e-4),
    optax.trace(0.9),
    optax.scale_by_learning_rate(0.1),
  )
  u1, _ = tx.update(grads, tx.init(params), params, activations=acts)
  u2, _ = ref.update(grads, ref.init(params), params, activations=acts)
  jax.tree.map(np.testing.assert_array_equal, u1, u2)
  # The NysAct state is found inside the grafted chain.
  state = nysact_optax.nysact(0.1, graft="rmsprop").init(params)
  assert sorted(nysact_optax.find_nysact_state(state).layers) == ["layers_0", "layers_3"]


def test_preconditioned_mask_honours_exclude():
  _, _, params, _, _ = _dense_model()
  mask = nysact_optax.preconditioned_mask(nysact_optax.scale_by_nysact(exclude=["layers_3"]))
  assert mask(params) == {
    "layers_0": {"kernel": True, "bias": True},
    "layers_2": {"scale": False, "bias": False},
    "layers_3": {"kernel": False, "bias": False},
  }


def test_graft_with_muon_direction():
  """Muon's orthogonalised direction on the kernels, grafted onto RMSProp."""
  g = _tree(3)
  is_matrix = lambda t: jax.tree.map(lambda x: x.ndim == 2, t)
  rms = optax.scale_by_rms(decay=0.999, eps=1e-8, eps_in_sqrt=False, bias_correction=True)
  # Muon's own update with lr -1: the gradient's sign, orthogonalised
  # momentum on the kernels (Adam on the rest, which the graft ignores).
  muon = optax.contrib.muon(learning_rate=-1.0)
  tx = nysact_optax.graft(muon, rms, mask=is_matrix, group="leaf")
  u, _ = tx.update(g, tx.init(g), g)
  d, _ = muon.update(g, muon.init(g), g)
  k, dk = np.asarray(u["Dense_0"]["kernel"]), np.asarray(d["Dense_0"]["kernel"])
  gk = np.asarray(g["Dense_0"]["kernel"])
  # Muon's direction (cosine 1), RMSProp's norm (sqrt of the entry count at step 1).
  assert np.sum(k * dk) / (_norm(k) * _norm(dk)) == pytest.approx(1.0, abs=1e-6)
  assert _norm(k) == pytest.approx(_norm(gk / (np.abs(gk) + 1e-8)), rel=1e-5)
  np.testing.assert_allclose(
    u["Dense_0"]["bias"], g["Dense_0"]["bias"] / (jnp.abs(g["Dense_0"]["bias"]) + 1e-8), rtol=1e-5
  )


def test_errors_name_the_argument_and_value():
  rms = optax.scale_by_rms()
  with pytest.raises(ValueError, match=r"group='block'"):
    nysact_optax.graft(optax.identity(), rms, group="block")
  with pytest.raises(TypeError, match=r"direction=3"):
    nysact_optax.graft(3, rms)
  with pytest.raises(TypeError, match=r"magnitude='rms'"):
    nysact_optax.graft(optax.identity(), "rms")
  with pytest.raises(TypeError, match=r"transform=None"):
    nysact_optax.preconditioned_mask(None)
  g = _tree(0)
  tx = nysact_optax.graft(optax.identity(), rms, mask={"Dense_0": True})
  with pytest.raises(ValueError, match=r"mask must have the structure"):
    tx.update(g, tx.init(g))
  tx = nysact_optax.graft(optax.identity(), rms, mask=jax.tree.map(lambda x: 1, g))
  with pytest.raises(TypeError, match=r"mask leaf 1"):
    tx.update(g, tx.init(g))
  with pytest.raises(ValueError, match=r"graft='adam'"):
    nysact_optax.nysact(0.1, graft="adam")
  with pytest.raises(ValueError, match=r"nesterov=True"):
    nysact_optax.nysact(0.1, graft="rmsprop", nesterov=True)
