"""Properties of the preconditioner over random layer shapes, ranks and dampings.

One dense layer of input width ``p_in`` (``p = p_in + 1`` with a bias) whose
gradient has ``p`` output columns, so the update of the identity gradient is
the dense preconditioner ``P`` itself. Each example compiles once (damping and
data are traced; shapes, rank and method are not), so examples are few and
shapes small.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import nysact_optax
from nysact_optax import DenseSpec, LayerInputs
from tests import _reference


def _as_grads(m, p_in, has_bias):
  """A (p, o) gradient matrix as the layer's kernel (and bias) gradient."""
  grads = {"kernel": m[:p_in]}
  if has_bias:
    grads["bias"] = m[p_in]
  return {"l": grads}


@functools.partial(jax.jit, static_argnames=("rank", "nystrom", "sketch", "has_bias"))
def _updates(gs, x, damping, *, rank, nystrom, sketch, has_bias):
  """The update of each gradient matrix in ``gs`` (k, p, o) after one step on ``x``."""
  p_in = x.shape[-1]
  tx = nysact_optax.scale_by_nysact(
    rank=rank,
    nystrom=nystrom,
    sketch=sketch,
    damping=damping,
    stat_decay=0.0,
    cov_update_every=1,
    inv_update_every=1,
  )
  acts = {"l": LayerInputs([x], DenseSpec())}
  state = tx.init(_as_grads(gs[0], p_in, has_bias))

  def one(g):
    updates, new_state = tx.update(_as_grads(g, p_in, has_bias), state, activations=acts)
    u = updates["l"]
    u = jnp.concatenate([u["kernel"], u["bias"][None]]) if has_bias else u["kernel"]
    return u, new_state.layers["l"]

  # The state does not depend on the gradient: it stays unbatched.
  return jax.vmap(one, out_axes=(0, None))(gs)


layer_cases = st.fixed_dictionaries(
  {
    "p_in": st.integers(1, 7),
    "has_bias": st.booleans(),
    "rows": st.integers(2, 8),
    "data_rank": st.integers(1, 8),
    "rank": st.integers(1, 9),
    "log_damping": st.floats(-2.0, 2.0),
    "log_scale": st.floats(-1.0, 0.5),
    "nystrom": st.sampled_from(["shifted", "stable"]),
    "sketch": st.sampled_from(["gaussian", "subcolumns"]),
    "seed": st.integers(0, 2**16),
  }
)


@settings(max_examples=16, deadline=None, derandomize=True, database=None)
@given(case=layer_cases)
def test_preconditioner_properties(case):
  p_in, has_bias = case["p_in"], case["has_bias"]
  p = p_in + has_bias
  rho = 10.0 ** case["log_damping"]
  rng = np.random.default_rng(case["seed"])
  k = min(case["data_rank"], p_in)
  x = (
    rng.standard_normal((case["rows"], k))
    @ rng.standard_normal((k, p_in))
    * 10.0 ** case["log_scale"]
    / np.sqrt(k)
  )
  g1, g2 = rng.standard_normal((2, p, p))
  a, b = rng.standard_normal(2)
  gs = np.stack([np.eye(p), g1, g2, a * g1 + b * g2])
  static = dict(
    rank=case["rank"], nystrom=case["nystrom"], sketch=case["sketch"], has_bias=has_bias
  )
  (p_mat, u1, u2, u12), ls = _updates(
    jnp.asarray(gs, jnp.float32), jnp.asarray(x, jnp.float32), rho, **static
  )
  p_mat = np.asarray(p_mat, np.float64)
  lam = np.asarray(ls.eigvals, np.float64)
  # Errors are measured against ||P|| = 1 / rho; float32 round-off grows with
  # the condition number of P.
  cond = (lam.max() + rho) / rho
  tol = 1e-6 * cond / rho

  # Symmetric positive definite, eigenvalues in [1/(lam_max + rho), 1/rho].
  np.testing.assert_allclose(p_mat, p_mat.T, atol=tol)
  eig = np.linalg.eigvalsh((p_mat + p_mat.T) / 2)
  assert eig[0] > 0
  assert eig[0] >= 1.0 / (lam.max() + rho) - tol
  assert eig[-1] <= 1.0 / rho + tol

  # Linear in the gradient: U(G) = P G, and U(a G1 + b G2) = a U(G1) + b U(G2).
  np.testing.assert_allclose(u1, p_mat @ g1, atol=tol * np.abs(g1).sum(0).max())
  np.testing.assert_allclose(
    u12,
    a * np.asarray(u1) + b * np.asarray(u2),
    atol=tol * (abs(a) + abs(b)) * np.abs(gs[1:3]).sum(1).max(),
  )

  # Exact mode (rank >= p) is the dense damped inverse.
  if case["rank"] >= p:
    rows = _reference.with_bias_column(x) if has_bias else x
    np.testing.assert_allclose(p_mat, _reference.damped_inverse(rows, rho), atol=tol)

  # The order of the batch rows does not matter.
  perm = rng.permutation(case["rows"])
  (p_perm, *_), ls_perm = _updates(
    jnp.asarray(gs, jnp.float32), jnp.asarray(x[perm], jnp.float32), rho, **static
  )
  np.testing.assert_allclose(
    ls_perm.cov, ls.cov, rtol=1e-5, atol=1e-5 * np.abs(np.asarray(ls.cov)).max()
  )
  np.testing.assert_allclose(p_perm, p_mat, atol=10 * tol)
