"""Nyström factorisations of the activation covariance.

Every factorisation returns ``(U, lam)``: columns ``U`` (p x r) and
eigenvalues ``lam >= 0`` (r) of a low-rank approximation ``U diag(lam) U^T`` of
the activation covariance, from which :mod:`nysact_optax._apply` applies

  ``P = U diag(1 / (lam + rho)) U^T + (I - U U^T) / rho``.

The columns with ``lam > 0`` are orthonormal to a few float ulps, and
``U^T U <= I``: then ``I - U U^T`` is positive semi-definite and ``P`` is
symmetric positive definite with its eigenvalues in ``[1/(lam_max + rho),
1/rho]``, whatever ``lam_max / rho`` (``tests/test_nystrom.py`` checks
``lam_max / rho`` up to ``1e7`` in float32). Directions the float32 Gram
eigendecomposition cannot resolve (``sigma^2 < sqrt(eps) sigma_max^2``,
about ``3.5e-4`` of the largest in float32) are dropped: they get
``lam = 0``, i.e. the plain ``1 / rho`` step.

Exact mode (:func:`exact_eigh`, ``r = p``) is different: its basis is a
complete, refined eigenbasis, not shrunk, and ``_apply`` applies
``P = U diag(1 / (lam + rho)) U^T`` without the complement term, positive
definite by construction (``tests/test_float64_edges.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["NYSTROM_METHODS", "exact_eigh", "nystrom_shifted", "nystrom_stable"]

NYSTROM_METHODS = ("shifted", "stable")
_HIGHEST = jax.lax.Precision.HIGHEST


def _sym(w: jax.Array) -> jax.Array:
  # S^T Y is symmetric in exact arithmetic only when one sketch made Y.
  return 0.5 * (w + w.T)


def _factor_from_gram(y: jax.Array, q: jax.Array, theta: jax.Array, shift: jax.Array):
  """``B = Y W^{-1/2}``, ``B = U Sigma V^T``, ``lam = max(sigma^2 - shift, 0)``.

  ``W = Q diag(theta) Q^T`` is the (shifted) core matrix, positive definite;
  any ``B`` with ``B B^T = Y W^{-1} Y^T`` gives the same Nyström
  approximation, here ``B = Y Q diag(theta^{-1/2})`` (a Cholesky factor of
  ``W`` gives the same ``B`` up to a rotation on the right, with two more
  LAPACK calls). Every LAPACK call is on an ``r x r`` matrix; the
  ``p``-sized work is plain matrix products. On CPU, threaded LAPACK calls on
  tall ``p x r`` matrices (triangular solve, QR) were measured 100-1000x
  slower than these products for some ``p`` on a busy 2-core machine, and
  products also map better to accelerators and sharded ``p``. The thin SVD
  of ``B`` comes from the eigendecomposition of ``B^T B``: directions with
  ``sigma^2 <= shift`` get ``lam = 0`` and a zero column in ``U``, so they
  drop out of ``P`` (their ``1/(lam + rho) - 1/rho`` is 0 anyway) and a
  rank-deficient ``B`` is harmless. A ``theta <= 0`` (a failed shift) makes
  ``B`` non-finite, and the caller keeps the previous factors.
  """
  b = jnp.matmul(y, q * jax.lax.rsqrt(theta)[None, :], precision=_HIGHEST)  # Y W^{-1/2}
  sigma2, v = jnp.linalg.eigh(jnp.matmul(b.T, b, precision=_HIGHEST))
  # The Gram eigendecomposition resolves sigma_i^2 to about eps sigma_max^2:
  # columns below sqrt(eps) of the largest would be off by more than
  # sqrt(eps) from orthonormal, so they are dropped (lam = 0, a 1/rho step).
  resolved = sigma2 > jnp.sqrt(jnp.finfo(y.dtype).eps) * sigma2[-1]
  lam = jnp.where(resolved, jnp.maximum(sigma2 - shift, 0.0), 0.0)
  keep = lam > 0
  scale = jnp.where(keep, jax.lax.rsqrt(jnp.maximum(sigma2, 1e-30)), 0.0)
  u = jnp.matmul(b, v, precision=_HIGHEST) * scale[None, :]
  u = _orthonormal(u, keep)
  # Non-finite statistics or a failed shift must not hide behind the
  # dropped (zeroed) columns: the caller then keeps the previous factors.
  finite = jnp.isfinite(b).all() & jnp.isfinite(sigma2).all()
  return jnp.where(finite, u, jnp.nan), lam


def _orthonormal(u: jax.Array, keep: jax.Array) -> jax.Array:
  """The kept columns of ``u`` made orthonormal, the others zero, ``U^T U <= I``.

  Symmetric (Löwdin) orthogonalisation ``U (U^T U)^{-1/2}`` moves nearly
  orthonormal columns the least; a final scale by ``1/sqrt(||U^T U||)``
  (a few ulps) makes ``I - U U^T`` positive semi-definite in the arithmetic
  that follows, so ``P`` cannot turn indefinite at any ``lam / rho``. All
  LAPACK work is on ``r x r`` matrices.
  """
  r = u.shape[1]
  both = keep[:, None] & keep[None, :]
  gram = jnp.matmul(u.T, u, precision=_HIGHEST)
  gram = jnp.where(both, gram, jnp.eye(r, dtype=u.dtype))
  w, q = jnp.linalg.eigh(gram)
  inv_sqrt = jnp.matmul(q * jax.lax.rsqrt(jnp.maximum(w, 1e-30))[None, :], q.T, precision=_HIGHEST)
  u = jnp.where(keep[None, :], jnp.matmul(u, inv_sqrt, precision=_HIGHEST), 0.0)
  # Gershgorin: the largest row sum of |U^T U| bounds its top eigenvalue.
  top = jnp.max(jnp.sum(jnp.abs(jnp.matmul(u.T, u, precision=_HIGHEST)), axis=1))
  eps = jnp.finfo(u.dtype).eps
  return u * jax.lax.rsqrt(jnp.maximum(top, 1.0) * (1.0 + 4.0 * r * eps))


def nystrom_shifted(c_hat: jax.Array, s: jax.Array, rho, *, p=None) -> tuple[jax.Array, jax.Array]:
  """The paper's factorisation (design note, section 2).

  ``C_rho = C_hat + rho S``, ``W = S^T C_rho``, shifted by
  ``|lambda_min(W)| + rho`` (plus ``10 r eps ||W||``, so that it stays
  positive definite when ``rho`` is below ``W``'s round-off) before its
  inverse square root. ``U diag(lam) U^T`` is meant to approximate the damped covariance
  ``A + rho I`` (the preconditioner damps it once more, as the reference
  does), but the shift is added to ``W`` only, not to ``C_rho``, and then
  subtracted from ``sigma^2``: the eigenvalues come out below the
  covariance's, clipped to 0 when ``rho`` is comparable to them.

  Args:
    c_hat: bias-corrected sketched covariance ``A S`` (p x r).
    s: the sketch ``S`` (p x r) that made ``c_hat``.
    rho: damping.
    p: unused; present so both methods share one signature.

  Returns:
    ``(U, lam)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> c = jnp.diag(jnp.array([4.0, 2.0, 1.0, 0.0]))  # the covariance
    >>> s = jnp.eye(4)[:, :2]
    >>> u, lam = nystrom_shifted(c @ s, s, 0.01)
    >>> u.shape, bool((lam <= jnp.array([2.0, 4.0])).all())  # below C's top two
    ((4, 2), True)
  """
  del p
  c_rho = c_hat + rho * s
  theta, q = jnp.linalg.eigh(_sym(jnp.matmul(s.T, c_rho, precision=_HIGHEST)))
  # When W is indefinite (statistics averaged over several sketches) the
  # paper's shift leaves W + shift I with smallest eigenvalue rho; with rho
  # below W's round-off that eigenvalue is not resolved (a zero or negative
  # theta). A margin of 10 r ulps of ||W|| keeps it positive; it is of the
  # order of W's own float32 round-off, so it changes nothing where the
  # factor was accurate.
  margin = 10.0 * theta.shape[0] * jnp.finfo(theta.dtype).eps * jnp.max(jnp.abs(theta))
  shift = jnp.abs(theta[0]) + rho + margin
  return _factor_from_gram(c_rho, q, theta + shift, shift)  # W + shift I


def nystrom_stable(
  c_hat: jax.Array, s: jax.Array, rho=None, *, p=None
) -> tuple[jax.Array, jax.Array]:
  """Stable Nyström (Tropp et al. 2017; Frangella et al. 2021) of ``A`` itself.

  ``Y_nu = Y + nu S`` with ``nu = sqrt(p) eps ||Y||_F``, ``W = S^T Y_nu``,
  ``B = Y_nu W^{-1/2}`` (Tropp et al. use ``chol(W)^{-T}``: the same ``B B^T``),
  ``lam = max(sigma^2 - nu, 0)``. ``S`` should have orthonormal columns. When
  ``W`` is indefinite (statistics averaged over different sketches) the
  shift grows by ``-lambda_min(W)`` so that ``W`` is positive definite; with
  one sketch this never triggers.

  Args:
    c_hat: bias-corrected sketched covariance ``Y = A S`` (p x r).
    s: the sketch ``S`` (p x r).
    rho: unused; present so both methods share one signature.
    p: the layer's rows when ``c_hat`` and ``s`` are zero-padded below them
      (default: all rows); ``nu`` depends on it.

  Returns:
    ``(U, lam)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> c = jnp.diag(jnp.array([4.0, 2.0, 1.0, 0.0]))  # the covariance
    >>> s = jnp.eye(4)[:, :2]  # orthonormal columns
    >>> u, lam = nystrom_stable(c @ s, s)
    >>> jnp.round(lam, 4)  # C's top two eigenvalues, ascending
    Array([2., 4.], dtype=float32)
    >>> jnp.round(jnp.abs(u), 4)
    Array([[0., 1.],
           [1., 0.],
           [0., 0.],
           [0., 0.]], dtype=float32)
  """
  del rho
  p = c_hat.shape[0] if p is None else p
  eps = jnp.finfo(c_hat.dtype).eps
  # Floor at a tiny positive value so an all-zero Y (a dead layer) still has
  # a positive definite W; then lam = 0 exactly.
  nu = jnp.sqrt(jnp.asarray(p, c_hat.dtype)) * eps * jnp.linalg.norm(c_hat) + 1e-30
  w0 = _sym(jnp.matmul(s.T, c_hat, precision=_HIGHEST))
  sts = jnp.matmul(s.T, s, precision=_HIGHEST)
  theta, q = jnp.linalg.eigh(w0 + nu * sts)
  deficit = jnp.maximum(-theta[0], 0.0)
  shift = nu + 2.0 * deficit
  # W = w0 + shift S^T S: with S^T S = I (to float32 round-off) its
  # eigenvalues are theta + 2 deficit, on the same vectors.
  return _factor_from_gram(c_hat + shift * s, q, theta + 2.0 * deficit, shift)


def exact_eigh(c_hat: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eigendecomposition of the full covariance (exact mode, ``rank >= p``).

  ``U`` is a complete, orthonormal (to a few ulps) eigenbasis: exact mode
  applies ``P = U diag(1 / (lam + rho)) U^T`` with no complement term
  (:func:`nysact_optax.linalg.precondition` with a square ``U``), symmetric positive
  definite for any ``lam / rho`` with no shrink of ``U`` (a shrink by
  ``delta`` would cost ``delta lam / rho`` in the factored form with the
  complement, 1e-2 at ``p = 1025``, ``lam / rho = 3e4``).

  A float32 ``eigh`` is accurate to about ``eps lam_max`` in each direction,
  which for the directions near ``rho`` (those that dominate ``P g``) is an
  error of order ``eps lam_max / rho``: 1.6e-3 at ``p = 1025``,
  ``lam_max / rho = 2.5e4`` on relu-like inputs (a strong mean direction).
  One refinement brings that to the float32 covariance's own round-off, 5e-5.

  Args:
    c_hat: the full (bias-corrected) covariance ``C`` (p x p).

  Returns:
    ``(U, lam)``: ``U`` (p x p) and ``lam >= 0`` (p), ascending; both NaN when
    ``C`` is not finite.

  Examples:
    >>> import jax.numpy as jnp
    >>> u, lam = exact_eigh(jnp.array([[2.0, 1.0], [1.0, 2.0]]))
    >>> jnp.round(lam, 4)
    Array([1., 3.], dtype=float32)
  """
  c = _sym(c_hat)
  lam0, u0 = jnp.linalg.eigh(c)
  finite = jnp.isfinite(lam0).all() & jnp.isfinite(u0).all()
  u0 = jnp.where(finite, u0, 0.0)
  lam, u = _refine(jnp.where(finite, c, 0.0), lam0, u0)
  finite = finite & jnp.isfinite(lam).all() & jnp.isfinite(u).all()
  lam = jnp.where(finite, jnp.maximum(lam, 0.0), jnp.nan)  # clip round-off negatives
  return jnp.where(finite, u, jnp.nan), lam


_LEADING = 1e-2  # the refinement's leading block: eigenvalues above this fraction of the largest


def _refine(c: jax.Array, lam0: jax.Array, u0: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One refinement of an eigendecomposition ``c ~ u0 diag(lam0) u0^T`` (``lam0`` ascending).

  In the basis ``u0``, ``M = u0^T c u0`` is diagonal up to the first
  ``eigh``'s error, off-diagonal entries of order ``eps lam_max``; the float32
  products compute them far more accurately than that (a small direction's
  products cancel to small values, with small round-off). The trailing block
  (``lam0 <= 1e-2 lam_max``) is diagonalised by a second ``eigh`` of a matrix
  with ``1e-2`` of ``c``'s norm, so with ``1e-2`` of the error; the leading
  columns get the first-order correction ``e_j + sum_i M_ij / (M_jj - M_ii) e_i``
  (gaps above ``sqrt(eps) lam_max``; closer pairs, both large, keep their
  small coupling), and the trailing columns the matching (antisymmetric)
  components along them. The leading rows and columns are replaced by a
  sentinel above the trailing spectrum, so the second ``eigh`` returns the
  trailing eigenvectors first, in the trailing block's positions. Cost: a
  second ``eigh`` and four ``p x p`` products. (A second level, splitting the
  trailing block again, measured no better on graded spectra: what remains is
  the round-off of the float32 products.)
  """
  p = c.shape[0]
  eye = jnp.eye(p, dtype=c.dtype)
  m = _sym(jnp.matmul(u0.T, jnp.matmul(c, u0, precision=_HIGHEST), precision=_HIGHEST))
  d = jnp.diagonal(m)
  top = jnp.max(jnp.abs(lam0))
  lead = lam0 > _LEADING * top  # a suffix, as lam0 ascends
  trail = ~lead
  both = trail[:, None] & trail[None, :]
  sentinel = 2.0 * _LEADING * top + jnp.finfo(c.dtype).tiny
  mu, w = jnp.linalg.eigh(jnp.where(both, m, 0.0) + jnp.diag(jnp.where(lead, sentinel, 0.0)))
  gap = d[None, :] - d[:, None]  # d_j - d_i
  coupled = ~both & (jnp.abs(gap) > jnp.sqrt(jnp.finfo(c.dtype).eps) * top)
  k = jnp.where(coupled, m / jnp.where(coupled, gap, 1.0), 0.0)  # antisymmetric
  q = jnp.matmul(eye + k, jnp.where(lead[None, :], eye, w), precision=_HIGHEST)
  return jnp.where(lead, d, mu), jnp.matmul(u0, q, precision=_HIGHEST)
