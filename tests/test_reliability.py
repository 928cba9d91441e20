"""Hostile numerics, failure containment, diagnostics and determinism.

The hostile-input runs are open loop: for 200 steps every layer receives
hostile inputs and the gradients those inputs give (``A^T delta / n`` plus
noise), so that nothing but the optimizer can produce a NaN. Damping and
stat_decay are traced, so one compilation serves every (damping, stat_decay)
pair, batched with ``vmap``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import nysact_optax
from nysact_optax import ConvSpec, DenseSpec, LayerInputs
from nysact_optax._sketch import draw_sketch

STEPS = 200
FAMILIES = (
  "normal",
  "dead_relu",
  "rank1",
  "constant_columns",
  "duplicated_columns",
  "scale_1e-8",
  "scale_1e8",
)
DAMPINGS = (1e-8, 1e-4, 1.0, 1e2)
DECAYS = (0.0, 0.95)
CONV = ConvSpec((3, 3), (1, 1), "SAME", (1, 1), (1, 1))

# name: (input shape, kernel shape, has bias, dtype of inputs and gradients).
# Layers are independent in these open-loop runs, so one model holds the
# special cases (batch size 1, very wide outputs, bf16) side by side.
LAYERS = {
  "dense": ((4, 8), (8, 5), True, "float32"),
  "small": ((4, 2), (2, 3), True, "float32"),  # p = 3: exact once rank >= 3
  "conv": ((4, 4, 4, 2), (3, 3, 2, 4), False, "float32"),
  "batch1": ((1, 8), (8, 5), True, "float32"),
  "wide": ((4, 8), (8, 2048), True, "float32"),
  "bf16": ((4, 8), (8, 5), True, "bfloat16"),
}
# name: (rank, sketch, nystrom, sketch_refresh, cov_every, inv_every, layers)
CONFIGS = {
  "default": (3, "gaussian", "stable", "fixed", 1, 1, tuple(LAYERS)),
  "reference": (3, "gaussian", "stable", "reference", 1, 1, ("dense", "small", "conv")),
  "shifted": (3, "gaussian", "shifted", "reference", 1, 1, ("dense", "small", "conv")),
  "stable_fixed": (3, "subcolumns", "stable", "fixed", 2, 4, ("dense", "small")),
  "rank1": (1, "gaussian", "shifted", "reference", 1, 1, ("dense", "small")),
  "rank_above_p": (64, "gaussian", "shifted", "reference", 1, 1, ("dense", "small")),
}


def _rows(family, rng, n, w):
  """``n`` hostile input rows of width ``w``."""
  z = rng.standard_normal((n, w))
  cols = np.arange(w)
  if family == "dead_relu":
    return np.maximum(-np.abs(z), 0.0)  # every unit dead: exact zeros
  if family == "rank1":
    return rng.standard_normal((n, 1)) * np.linspace(-1.0, 2.0, w)[None, :]
  if family == "constant_columns":
    return np.where(cols[None, :] < (w + 1) // 2, 1.0, z)
  if family == "duplicated_columns":
    return z[:, cols // 2]
  if family == "scale_1e-8":
    return z * 1e-8
  if family == "scale_1e8":
    return z * 1e8
  return z


def _stream(family, names, seed=0):
  """Per layer and step: the input ``x``, an output cotangent ``delta`` and
  gradient noise (float32; leading axis: step)."""
  rng = np.random.default_rng(seed)
  data = {}
  for name in names:
    x_shape, k_shape, _, _ = LAYERS[name]
    rows = int(np.prod(x_shape[:-1]))
    data[name] = {
      "x": np.stack([_rows(family, rng, rows, x_shape[-1]).reshape(x_shape) for _ in range(STEPS)]),
      "delta": rng.standard_normal((STEPS,) + x_shape[:-1] + k_shape[-1:]),
      "noise": rng.standard_normal((STEPS,) + k_shape),
    }
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), data)


def _layer_grads(name, x, delta, noise):
  """``A^T delta / n`` plus noise, as the layer's kernel (and bias) gradient."""
  if name == "conv":

    def conv(k):
      return lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
      )

    (kernel,) = jax.vjp(conv, jnp.zeros(noise.shape))[1](delta)
    return {"kernel": kernel / (delta.size // delta.shape[-1]) + noise}
  grads = {"kernel": x.T @ delta / x.shape[0] + noise}
  if LAYERS[name][2]:
    grads["bias"] = delta.mean(0)
  return grads


def _as_matrix(tree, name):
  """A layer's kernel (and bias) as the (p, o) matrix the preconditioner sees."""
  kernel = tree[name]["kernel"].astype(jnp.float32)
  m = kernel.reshape(-1, kernel.shape[-1])
  if "bias" in tree[name]:
    m = jnp.concatenate([m, tree[name]["bias"].astype(jnp.float32)[None]])
  return m


@functools.cache
def _runner(config):
  """A jitted run of STEPS updates, vmapped over (damping, stat_decay)."""
  rank, sketch, nystrom, refresh, cov_every, inv_every, _ = CONFIGS[config]

  def run(data, rho, beta, seed):
    tx = nysact_optax.scale_by_nysact(
      rank=rank,
      sketch=sketch,
      nystrom=nystrom,
      sketch_refresh=refresh,
      damping=rho,
      stat_decay=beta,
      cov_update_every=cov_every,
      inv_update_every=inv_every,
      seed=seed,
    )

    def inputs_of(step_data):
      grads, acts = {}, {}
      for name, d in step_data.items():
        dtype = jnp.dtype(LAYERS[name][3])
        grads[name] = jax.tree.map(lambda a: a.astype(dtype), _layer_grads(name, **d))
        spec = CONV if name == "conv" else DenseSpec()
        acts[name] = LayerInputs([d["x"].astype(dtype)], spec)
      return grads, acts

    state = tx.init(inputs_of(jax.tree.map(lambda a: a[0], data))[0])

    def step(state, step_data):
      grads, acts = inputs_of(step_data)
      updates, state = tx.update(grads, state, activations=acts)
      ratio = jnp.stack(
        [
          # ||P g|| / (||g|| / damping) per output column: at most 1.
          jnp.max(
            jnp.linalg.norm(_as_matrix(updates, name), axis=0)
            * rho
            / jnp.linalg.norm(_as_matrix(grads, name), axis=0)
          )
          for name in grads
        ]
      ).max()
      finite = jnp.stack(
        [jnp.isfinite(u).all() for u in jax.tree.leaves(updates)]
        + [jnp.isfinite(s).all() for s in jax.tree.leaves(state)]
      ).all()
      fingerprint = jnp.stack([jnp.sum(u.astype(jnp.float32)) for u in jax.tree.leaves(updates)])
      return state, (finite, ratio, fingerprint)

    state, (finite, ratio, fingerprint) = lax.scan(step, state, data)
    diag = nysact_optax.diagnostics(state, damping=rho)
    return finite.all(), ratio.max(), state, diag, fingerprint

  return jax.jit(jax.vmap(run, in_axes=(None, 0, 0, None)))


def _run(config, family, seed=0):
  rhos = jnp.asarray([r for r in DAMPINGS for _ in DECAYS], jnp.float32)
  betas = jnp.asarray([b for _ in DAMPINGS for b in DECAYS], jnp.float32)
  data = _stream(family, CONFIGS[config][-1])
  return rhos, betas, _runner(config)(data, rhos, betas, seed)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_hostile_inputs_stay_finite_and_bounded(config, family):
  rhos, betas, (finite, ratio, state, diag, _) = _run(config, family)
  tol = 1e-2 if "bf16" in CONFIGS[config][-1] else 1e-4  # bf16 rounding of P g
  for i, (rho, beta) in enumerate(zip(rhos.tolist(), betas.tolist())):
    where = f"{config}/{family} damping={rho:g} stat_decay={beta:g}"
    assert finite[i], f"{where}: non-finite update or state"
    assert ratio[i] <= 1 + tol, f"{where}: |P g| = {ratio[i]} |g| / damping"
    for name, ls in state.layers.items():
      assert int(ls.failures[i]) == 0, f"{where}: {name} had {ls.failures[i]} failed refreshes"
      assert int(ls.stat_skips[i]) == 0, f"{where}: {name} skipped statistics"
      assert (np.asarray(ls.eigvals[i]) >= 0).all()
      cond = float(diag[name].condition_number[i])
      assert np.isfinite(cond) and cond >= 1.0, f"{where}: {name} condition {cond}"
  assert int(state.count[0]) == STEPS


def test_same_seed_is_bitwise_identical_and_other_seeds_differ():
  config = "stable_fixed"
  _, _, first = _run(config, "normal", seed=0)
  _, _, second = _run(config, "normal", seed=0)
  _, _, other = _run(config, "normal", seed=1)
  # Every step's updates and the final state, for every (damping, stat_decay).
  jax.tree.map(np.testing.assert_array_equal, first, second)
  ls0, ls1 = first[2].layers["dense"], other[2].layers["dense"]
  assert not np.array_equal(ls0.sketch_key[0], ls1.sketch_key[0])
  p, r = ls0.cov.shape[1:]
  s0, s1 = (
    np.asarray(draw_sketch(k[0], p, r, "subcolumns").matrix)
    for k in (ls0.sketch_key, ls1.sketch_key)
  )
  assert not np.array_equal(s0, s1)
  assert not np.array_equal(ls0.cov, ls1.cov)
  assert not np.array_equal(first[4], other[4])  # the updates differ too


# --------------------------------------------------------------------------
# Failure containment and diagnostics: one layer (p = 6), two compilations
# (rank 2: Nyström; rank 6: exact), shared by the tests below.


@functools.partial(jax.jit, static_argnames=("rank", "nystrom"))
def _step(grads, state, acts, damping, stat_decay, rank, nystrom="shifted"):
  tx = nysact_optax.scale_by_nysact(
    rank=rank,
    damping=damping,
    stat_decay=stat_decay,
    cov_update_every=1,
    inv_update_every=1,
    nystrom=nystrom,
  )
  return tx.update(grads, state, activations=acts)


def _problem(rank, seed=0):
  rng = np.random.default_rng(seed)
  params = {"d": {"kernel": jnp.zeros((5, 3)), "bias": jnp.zeros((3,))}}
  x = jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)
  grads = {
    "d": {
      "kernel": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32),
      "bias": jnp.asarray(rng.standard_normal((3,)), jnp.float32),
    }
  }
  state = nysact_optax.scale_by_nysact(rank=rank).init(params)
  return state, {"d": LayerInputs([x], DenseSpec())}, grads


def _with_cov(state, value):
  ls = state.layers["d"]
  return state._replace(layers={"d": ls._replace(cov=jnp.full_like(ls.cov, value))})


def _dense_p(ls, rho):
  u, lam = np.asarray(ls.basis, np.float64), np.asarray(ls.eigvals, np.float64)
  return (u / (lam + rho)) @ u.T + (np.eye(u.shape[0]) - u @ u.T) / rho


@pytest.mark.parametrize("rank", [2, 6])  # Nyström, exact
def test_non_finite_factors_keep_previous_factors_and_count(rank):
  # "stable" keeps every direction here, so a good refresh visibly changes the
  # factors ("shifted" can clip all eigenvalues of this small problem to 0).
  state, acts, grads = _problem(rank)
  rho, beta = 0.5, 0.95
  # Statistics this large overflow the factorisation (but not the EMA).
  updates, failed = _step(
    grads, _with_cov(state, 3e38), acts, rho, beta, rank=rank, nystrom="stable"
  )
  assert int(failed.layers["d"].failures) == 1
  np.testing.assert_array_equal(failed.layers["d"].basis, 0.0)  # initial factors kept
  jax.tree.map(lambda u, g: np.testing.assert_array_equal(u, g / rho), updates, grads)
  # After a good refresh, a failing one keeps the good factors.
  _, good = _step(grads, state, acts, rho, beta, rank=rank, nystrom="stable")
  assert np.abs(good.layers["d"].basis).max() > 0
  updates, kept = _step(grads, _with_cov(good, 3e38), acts, rho, beta, rank=rank, nystrom="stable")
  assert int(kept.layers["d"].failures) == 1
  np.testing.assert_array_equal(kept.layers["d"].basis, good.layers["d"].basis)
  np.testing.assert_array_equal(kept.layers["d"].eigvals, good.layers["d"].eigvals)
  assert all(np.isfinite(u).all() for u in jax.tree.leaves(updates))
  d = nysact_optax.diagnostics(kept, damping=rho)["d"]
  assert (int(d.failures), int(d.stat_skips)) == (1, 0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_activations_skip_statistics_and_keep_estimate(bad):
  state, acts, grads = _problem(2)
  rho, beta = 0.5, 0.9
  for _ in range(3):
    _, state = _step(grads, state, acts, rho, beta, rank=2)
  x = acts["d"].inputs[0]
  poisoned = {"d": LayerInputs([x.at[2, 1].set(bad)], DenseSpec())}
  updates, after = _step(grads, state, poisoned, rho, beta, rank=2)
  before_ls, after_ls = state.layers["d"], after.layers["d"]
  assert int(after_ls.stat_skips) == 1 and int(after_ls.failures) == 0
  np.testing.assert_array_equal(after_ls.sketch_key, before_ls.sketch_key)
  # The statistics and the layer's own count are unchanged, so is the
  # bias-corrected estimate C / (1 - beta^k), and the preconditioner
  # refreshed from it.
  np.testing.assert_array_equal(after_ls.cov, before_ls.cov)
  assert int(after_ls.stat_count) == int(before_ls.stat_count) == 3
  np.testing.assert_allclose(_dense_p(after_ls, rho), _dense_p(before_ls, rho), atol=1e-4)
  assert all(np.isfinite(u).all() for u in jax.tree.leaves(updates))
  _, later = _step(grads, after, acts, rho, beta, rank=2)
  assert int(later.layers["d"].stat_skips) == 1 and int(later.layers["d"].failures) == 0


def test_non_finite_statistics_at_the_first_update_leave_zero_statistics():
  state, acts, grads = _problem(6)
  x = acts["d"].inputs[0]
  poisoned = {"d": LayerInputs([x.at[0, 0].set(np.nan)], DenseSpec())}
  updates, state = _step(grads, state, poisoned, 0.5, 0.95, rank=6)
  np.testing.assert_array_equal(state.layers["d"].cov, 0.0)
  assert int(state.layers["d"].stat_skips) == 1 and int(state.layers["d"].failures) == 0
  # Zero statistics in exact mode: lam = 0, so P = I / damping.
  jax.tree.map(lambda u, g: np.testing.assert_allclose(u, g / 0.5, rtol=1e-6), updates, grads)


def test_non_finite_gradient_composes_with_apply_if_finite():
  state, acts, grads = _problem(2)
  params = jax.tree.map(jnp.zeros_like, grads)
  tx = optax.apply_if_finite(
    nysact_optax.nysact(0.1, rank=2, cov_update_every=1, inv_update_every=2),
    max_consecutive_errors=3,
  )
  update = jax.jit(tx.update)
  state = tx.init(params)
  updates, state = update(grads, state, params, activations=acts)
  params = optax.apply_updates(params, updates)
  nan_grads = jax.tree.map(lambda g: g.at[0].set(np.nan), grads)
  # Unwrapped, NysAct passes a non-finite gradient on as a non-finite update.
  raw, _ = _step(nan_grads, state.inner_state[0], acts, 1.0, 0.95, rank=2)
  assert not np.isfinite(raw["d"]["kernel"]).all()
  # Wrapped, the step is skipped and NysAct's state is left untouched.
  skipped, new_state = update(nan_grads, state, params, activations=acts)
  jax.tree.map(lambda u: np.testing.assert_array_equal(u, 0.0), skipped)
  jax.tree.map(np.testing.assert_array_equal, new_state.inner_state, state.inner_state)
  assert int(new_state.total_notfinite) == 1
  updates, state = update(grads, new_state, params, activations=acts)
  assert all(np.isfinite(u).all() and np.abs(u).max() > 0 for u in jax.tree.leaves(updates))
  assert int(state.inner_state[0].count) == 2
  # diagnostics finds the NysAct state inside wrappers and chains.
  assert list(nysact_optax.diagnostics(state, damping=1.0)) == ["d"]
  static = ("rank", "cov_update_every", "inv_update_every", "seed")
  for wrapped in (
    optax.MultiSteps(nysact_optax.nysact(0.1, rank=2), every_k_schedule=2),
    optax.inject_hyperparams(nysact_optax.nysact, static_args=static)(0.1, rank=2),
  ):
    diag = nysact_optax.diagnostics(wrapped.init(params), damping=1.0)
    assert list(diag) == ["d"] and float(diag["d"].condition_number) == 1.0


@pytest.mark.parametrize("rank", [2, 6])  # Nyström, exact
def test_diagnostics_match_the_dense_preconditioner(rank):
  state, acts, grads = _problem(rank)
  rho = 0.3
  fresh = nysact_optax.diagnostics(state, damping=rho)["d"]
  assert float(fresh.condition_number) == 1.0  # P = I / rho before any refresh
  _, state = _step(grads, state, acts, rho, 0.95, rank=rank)
  diag = nysact_optax.diagnostics(state, damping=rho)["d"]
  ls = state.layers["d"]
  eig = np.linalg.eigvalsh(_dense_p(ls, rho))
  np.testing.assert_allclose(float(diag.condition_number), eig[-1] / eig[0], rtol=1e-4)
  lam = np.asarray(ls.eigvals)
  assert float(diag.eig_min) == lam.min() and float(diag.eig_max) == lam.max()
  assert int(diag.failures) == int(diag.stat_skips) == 0
  jitted = jax.jit(functools.partial(nysact_optax.diagnostics, damping=rho))(state)
  assert float(jitted["d"].condition_number) == float(diag.condition_number)


def test_diagnostics_errors():
  """The one state finder's errors (diagnostics, sketched_statistics and
  find_nysact_state share it)."""
  with pytest.raises(ValueError) as err:
    nysact_optax.diagnostics(optax.sgd(0.1).init({"w": jnp.ones(2)}), damping=1.0)
  assert str(err.value) == (
    "expected exactly one ScaleByNysActState in the optimizer state, found 0: "
    "pass the state of a transformation built with nysact_optax.nysact or "
    "nysact_optax.scale_by_nysact, got a tuple"
  )
  one = nysact_optax.scale_by_nysact().init({"d": {"kernel": jnp.ones((3, 2))}})
  with pytest.raises(ValueError) as err:
    nysact_optax.diagnostics((one, one), damping=1.0)
  assert str(err.value) == (
    "expected exactly one ScaleByNysActState in the optimizer state, found 2 "
    "(at ['[0]', '[1]']): pass the state of a transformation built with "
    "nysact_optax.nysact or nysact_optax.scale_by_nysact, got a tuple"
  )
