"""scale_by_nysact_adam / nysact_adam: Adam in the activation covariance's eigenbasis.

Against optax.adamw (rank 0, and an identity basis), against a float64
NumPy transcription of the design note's formula (separate rotated and
complement moments, the first moment rotated at each refresh), the
orthogonalised variant against optax's Newton-Schulz iteration, and a
checkpoint that resumes bitwise.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nysact_optax

B1, B2, EPS, LR, WD = 0.9, 0.999, 1e-8, 1e-2, 1e-2


class MLP(nn.Module):
  """gelu, not relu: a unit dead on the whole batch has an exactly zero
  gradient row, which plain Adam leaves at 0, while in a rotated basis its
  component is float32 round-off that Adam's normalisation lifts to a step
  of order 0.1 (float64 gets another one): not a comparison of formulas."""

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(12)(x))
    return nn.Dense(3)(x)


def _data(n=32, d=9, seed=0):
  rng = np.random.default_rng(seed)
  # relu-like inputs with a strong mean direction, as real layers see
  x = np.maximum(rng.normal(size=(n, d)), 0.0) + 0.5
  return jnp.asarray(x, jnp.float32), jnp.asarray(rng.integers(0, 3, n))


def _trajectory(tx, model, steps, *, batches=None, seed=0):
  """Updates and states of ``steps`` steps of ``tx`` on the cross-entropy loss."""
  x, y = _data(seed=seed)
  params = model.init(jax.random.PRNGKey(seed), x)["params"]
  state = tx.init(params)

  @jax.jit
  def step(params, state, x, y):
    def loss_fn(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    (_, grads), acts = nysact_optax.value_and_grad(loss_fn)(params)
    updates, new_state = tx.update(grads, state, params, activations=acts)
    return optax.apply_updates(params, updates), new_state, updates, grads, acts

  out = []
  for t in range(steps):
    xt, yt = (x, y) if batches is None else batches(t)
    old = state
    params, state, updates, grads, acts = step(params, state, xt, yt)
    out.append((old, state, updates, grads, acts))
  return out


def _assert_trees_close(a, b, rtol, atol=0.0):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


def test_rank_zero_is_adamw():
  model = MLP()
  ours = _trajectory(nysact_optax.nysact_adam(LR, rank=0, weight_decay=WD), model, 6)
  ref = _trajectory(optax.adamw(LR, weight_decay=WD), model, 6)
  for (_, _, u, _, _), (_, _, v, _, _) in zip(ours, ref):
    _assert_trees_close(u, v, rtol=1e-6)


def test_identity_basis_is_adamw():
  """Exact mode with a diagonal covariance (one-hot inputs of distinct
  scales): the eigenbasis is a signed permutation of I, so the rotated Adam
  step is Adam's, across refreshes."""
  model = nn.Dense(3, use_bias=False)
  scales = jnp.arange(1.0, 10.0)
  rng = np.random.default_rng(3)

  def batches(t):  # every batch: each input coordinate alone, once
    return jnp.diag(scales), jnp.asarray(rng.integers(0, 3, 9))

  tx = nysact_optax.nysact_adam(
    LR, rank=10**9, weight_decay=WD, cov_update_every=1, inv_update_every=2
  )
  ours = _trajectory(tx, model, 6, batches=batches)
  rng = np.random.default_rng(3)
  ref = _trajectory(optax.adamw(LR, weight_decay=WD), model, 6, batches=batches)
  basis = np.asarray(ours[-1][1][0].factors.layers[""].basis)
  np.testing.assert_allclose(np.abs(basis).sum(0), np.ones(9), rtol=1e-5)  # a signed permutation
  np.testing.assert_array_equal((np.abs(basis) > 0.5).sum(0), np.ones(9))
  for (_, _, u, _, _), (_, _, v, _, _) in zip(ours, ref):
    _assert_trees_close(u, v, rtol=1e-5, atol=1e-7)


def _matrix(grads, name):
  g = np.asarray(grads[name]["kernel"], np.float64)
  if "bias" in grads[name]:
    g = np.concatenate([g, np.asarray(grads[name]["bias"], np.float64)[None]])
  return g


def _reference(trajectory, name, *, exact, second_moment="keep", inv_every):
  """The design note's formula in float64: moments m_R, v_R (rotated) and
  m_C, v_C (complement) kept apart; at a refresh the first moment moves to
  the new basis (M = U_old m_R + m_C, m_R = U_new^T M, m_C = M - U_new m_R)
  and v_R is kept or rotated; the bases are the optimizer's own."""
  first = trajectory[0][1][0].factors.layers[name].basis
  p, r = first.shape
  o = _matrix(trajectory[0][3], name).shape[1]
  m_r, v_r = np.zeros((r, o)), np.zeros((r, o))
  m_c, v_c = np.zeros((p, o)), np.zeros((p, o))
  u_old = np.zeros((p, r))
  steps = []
  for t, (_, state, _, grads, _) in enumerate(trajectory, start=1):
    u = np.asarray(state[0].factors.layers[name].basis, np.float64)
    if (t - 1) % inv_every == 0:  # this step refreshed the basis
      big_m = u_old @ m_r + m_c
      m_r = u.T @ big_m
      m_c = big_m - u @ m_r
      if second_moment == "rotate":
        v_r = np.square(u.T @ u_old) @ v_r
    u_old = u
    g = _matrix(grads, name)
    rot = u.T @ g
    comp = np.zeros_like(g) if exact else g - u @ rot
    m_r = B1 * m_r + (1 - B1) * rot
    v_r = B2 * v_r + (1 - B2) * rot**2
    m_c = B1 * m_c + (1 - B1) * comp
    v_c = B2 * v_c + (1 - B2) * comp**2
    bc1, bc2 = 1 - B1**t, 1 - B2**t
    a_r = (m_r / bc1) / (np.sqrt(v_r / bc2) + EPS)
    a_c = (m_c / bc1) / (np.sqrt(v_c / bc2) + EPS)
    steps.append(u @ a_r + (0 if exact else a_c - u @ (u.T @ a_c)))
  return steps


@pytest.mark.parametrize(
  "rank, second_moment",
  [(4, "keep"), (4, "rotate"), (10**9, "keep")],
  ids=["nystrom", "nystrom-rotate", "exact"],
)
def test_matches_the_formula_in_float64(rank, second_moment):
  model = MLP()
  rng = np.random.default_rng(5)

  def batches(t):
    x, y = _data(seed=int(rng.integers(1000)))
    return x, y

  inv_every = 2
  tx = nysact_optax.scale_by_nysact_adam(
    rank=rank,
    second_moment=second_moment,
    cov_update_every=1,
    inv_update_every=inv_every,
  )
  tx = optax.chain(tx)  # as the alias holds it: state[0]
  trajectory = _trajectory(tx, model, 7, batches=batches)
  for name in ("Dense_0", "Dense_1"):
    ref = _reference(
      trajectory, name, exact=rank >= 10, second_moment=second_moment, inv_every=inv_every
    )
    for t, ((_, _, updates, _, _), want) in enumerate(zip(trajectory, ref)):
      got = _matrix(updates, name)
      err = np.linalg.norm(got - want) / np.linalg.norm(want)
      assert err < 2e-4, (name, t, err)


def test_first_moment_moves_with_the_basis():
  """At a refresh the rotated and complement first moments re-express one
  plain-coordinate moment in the new basis: m_R = U^T M, m_C = M - U m_R,
  so U m_R + m_C is the same M before and after (the state keeps M)."""
  model = MLP()
  tx = nysact_optax.scale_by_nysact_adam(rank=4, cov_update_every=1, inv_update_every=3)
  trajectory = _trajectory(tx, model, 4, batches=lambda t: _data(seed=t))
  before, after = trajectory[3][0], trajectory[3][1]  # step 3 refreshes
  u_old = np.asarray(before.factors.layers["Dense_0"].basis)
  u_new = np.asarray(after.factors.layers["Dense_0"].basis)
  assert np.abs(u_old - u_new).max() > 1e-3  # the basis moved
  g = _matrix(trajectory[3][3], "Dense_0")
  m_old, m_new = _matrix(before.mu, "Dense_0"), _matrix(after.mu, "Dense_0")
  np.testing.assert_allclose(m_new, B1 * m_old + (1 - B1) * g, rtol=1e-5, atol=1e-8)
  m_r = u_new.T @ m_new
  np.testing.assert_allclose(u_new @ m_r + (m_new - u_new @ m_r), m_new, atol=1e-6)


def test_orthogonalised_step_is_optax_newton_schulz_of_the_rotated_step():
  model = MLP()
  kw = dict(rank=4, cov_update_every=1, inv_update_every=2)
  batches = lambda t: _data(seed=t)
  plain = _trajectory(nysact_optax.scale_by_nysact_adam(**kw), model, 3, batches=batches)
  orth = _trajectory(
    nysact_optax.scale_by_nysact_adam(orthogonalise=True, consistent_rms=0.2, **kw),
    model,
    3,
    batches=batches,
  )
  muon = optax.contrib.scale_by_muon(
    beta=0.0, nesterov=False, weight_dimension_numbers=optax.contrib.MuonDimensionNumbers()
  )
  # the same gradients up to step 0 only (the params then differ): compare step 0
  d = jnp.asarray(_matrix(plain[0][2], "Dense_0"), jnp.float32)
  want, _ = muon.update(d, muon.init(d))
  want = np.asarray(want) * 0.2 * np.sqrt(max(d.shape))
  got = _matrix(orth[0][2], "Dense_0")
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-6)
  sv = np.linalg.svd(got / (0.2 * np.sqrt(max(d.shape))), compute_uv=False)
  raw = np.linalg.svd(np.asarray(d), compute_uv=False)
  assert sv.max() < 1.5 and np.median(sv) > 0.5  # Newton-Schulz's band
  assert raw.max() / np.median(raw) > 2 * sv.max() / np.median(sv)  # flatter than the raw step


def test_statistics_path_equals_activations_path():
  model = MLP()
  x, y = _data()
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  tx = nysact_optax.nysact_adam(LR, rank=4)
  state = tx.init(params)

  def loss_fn(p):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

  (_, grads), acts = nysact_optax.value_and_grad(loss_fn)(params)
  a, sa = tx.update(grads, state, params, activations=acts)
  stats = nysact_optax.sketched_statistics(state, acts)
  b, sb = tx.update(grads, state, params, statistics=stats)
  _assert_trees_close(a, b, rtol=1e-5, atol=1e-8)
  _assert_trees_close(sa, sb, rtol=1e-5, atol=1e-8)


def test_checkpoint_resumes_bitwise(tmp_path):
  pytest.importorskip("orbax.checkpoint")
  model = MLP()
  tx = nysact_optax.nysact_adam(LR, rank=4, cov_update_every=1, inv_update_every=2)
  batches = lambda t: _data(seed=t)
  whole = _trajectory(tx, model, 5, batches=batches)
  saved = whole[2][1]  # after step 2
  nysact_optax.save_checkpoint(tmp_path / "ckpt", {"opt_state": saved})
  back = nysact_optax.restore_checkpoint(tmp_path / "ckpt", {"opt_state": tx.init(saved[0].mu)})
  jax.tree.map(np.testing.assert_array_equal, back["opt_state"], saved)
  # the next update from the restored state equals the uninterrupted one
  x, _ = _data()
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  for _, _, updates, _, _ in whole[:3]:  # the params after step 2
    params = optax.apply_updates(params, updates)
  _, _, _, grads, acts = whole[3]
  u_resumed, s_resumed = jax.jit(lambda g, s, p, a: tx.update(g, s, p, activations=a))(
    grads, back["opt_state"], params, acts
  )
  jax.tree.map(np.testing.assert_array_equal, u_resumed, whole[3][2])
  jax.tree.map(np.testing.assert_array_equal, s_resumed, whole[3][1])


def test_finds_the_factors_for_diagnostics():
  model = MLP()
  tx = nysact_optax.nysact_adam(LR, rank=4)
  ((_, state, _, _, _),) = _trajectory(tx, model, 1)
  found = nysact_optax.find_nysact_state(state)
  assert sorted(found.layers) == ["Dense_0", "Dense_1"]
  diag = nysact_optax.diagnostics(state, damping=1.0)
  assert float(diag["Dense_0"].eig_max) > 0  # the factors of step 0's statistics


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (
      dict(second_moment="reset"),
      r"second_moment must be one of \('keep', 'rotate'\), got second_moment='reset'",
    ),
    (dict(b1=1.0), r"b1 must be a float in \[0, 1\), got b1=1.0"),
    (dict(b2=-0.1), r"b2 must be a float in \[0, 1\), got b2=-0.1"),
    (dict(eps=-1.0), r"eps must be a float >= 0, got eps=-1.0"),
    (dict(consistent_rms=0.0), r"consistent_rms must be a float > 0, got consistent_rms=0.0"),
    (
      dict(rank=-1),
      r"rank must be an integer >= 0 \(0: Adam on every leaf\) or a rule, got rank=-1",
    ),
    (dict(stat_decay=1.0), r"stat_decay must be in \[0, 1\), got stat_decay=1.0"),
  ],
)
def test_bad_settings_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    nysact_optax.scale_by_nysact_adam(**kwargs)


def test_both_activations_and_statistics_is_an_error():
  model = MLP()
  x, _ = _data()
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  tx = nysact_optax.scale_by_nysact_adam(rank=2)
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"scale_by_nysact_adam\.update got both activations="):
    tx.update(params, state, params, activations={}, statistics={})
