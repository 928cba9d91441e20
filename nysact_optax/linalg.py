"""NysAct's pieces one at a time, for measuring them: the sketch, the sketched
covariance of a layer's inputs, the Nyström factorisations and the factored
apply of the preconditioner.

These are the functions the optimizer itself runs (the same objects, not
copies). For one layer with inputs ``A`` (``n x p``, a constant-1 column
appended when the layer has a bias) and a sketch ``S`` (``p x r``):

* :func:`draw_sketch` draws ``S``; ``r >= p`` gives the identity (exact mode);
* :func:`sketched_covariance` computes ``Y = A^T A S / n`` from the captured
  inputs (:class:`~nysact_optax.LayerInputs`) without forming ``A`` (a
  convolution's patch matrix) or ``A^T A``;
* :func:`nystrom_stable` (the default), :func:`nystrom_shifted` (the paper's)
  and, in exact mode, :func:`exact_eigh` factor ``Y`` into ``(U, lam)``;
* :func:`precondition` applies
  ``P = U diag(1 / (lam + rho)) U^T + (I - U U^T) / rho`` to a gradient
  matrix ``G`` (``p x o``: kernel rows, then the bias row) in factored form;
  in exact mode (``U`` square) without the complement term, i.e.
  ``P = (C + rho I)^{-1}``.

Examples:
  A dense layer with a bias (``p = 6 + 1``), rank 3, checked against dense NumPy:

  >>> import jax, numpy as np
  >>> from nysact_optax import DenseSpec, LayerInputs
  >>> from nysact_optax import linalg
  >>> x = jax.random.normal(jax.random.PRNGKey(0), (64, 6))
  >>> a = np.c_[np.asarray(x, np.float64), np.ones(64)]
  >>> c = a.T @ a / 64  # the covariance, dense
  >>> s = linalg.draw_sketch(jax.random.PRNGKey(1), 7, 3, "gaussian", orthonormal=True)
  >>> sm = np.asarray(s.matrix, np.float64)
  >>> y = linalg.sketched_covariance(LayerInputs([x], DenseSpec()), s, has_bias=True)
  >>> y.shape, bool(np.allclose(y, c @ sm, atol=1e-5))
  ((7, 3), True)
  >>> u, lam = linalg.nystrom_stable(y, s.matrix)
  >>> un, ln = np.asarray(u, np.float64), np.asarray(lam, np.float64)
  >>> nys = c @ sm @ np.linalg.inv(sm.T @ c @ sm) @ sm.T @ c  # C S (S^T C S)^{-1} S^T C
  >>> bool(np.allclose((un * ln) @ un.T, nys, atol=1e-4))
  True
  >>> g = jax.random.normal(jax.random.PRNGKey(2), (7, 4))
  >>> p_dense = (un / (ln + 1.0)) @ un.T + (np.eye(7) - un @ un.T) / 1.0
  >>> bool(np.allclose(linalg.precondition(g, u, lam, 1.0), p_dense @ np.asarray(g), atol=1e-5))
  True

  Exact mode (``r >= p``): the identity sketch gives the covariance itself,
  and ``P`` is the damped inverse:

  >>> eye = linalg.draw_sketch(jax.random.PRNGKey(1), 7, 7, "gaussian")
  >>> cov = linalg.sketched_covariance(LayerInputs([x], DenseSpec()), eye, has_bias=True)
  >>> u, lam = linalg.exact_eigh(cov)
  >>> pg = np.asarray(linalg.precondition(g, u, lam, 0.1))
  >>> bool(np.allclose(pg, np.linalg.solve(c + 0.1 * np.eye(7), g), rtol=1e-4, atol=1e-4))
  True
"""

from __future__ import annotations

from nysact_optax._apply import precondition
from nysact_optax._nystrom import exact_eigh, nystrom_shifted, nystrom_stable
from nysact_optax._sketch import Sketch, draw_sketch
from nysact_optax._statistics import sketched_covariance

__all__ = [
  "Sketch",
  "draw_sketch",
  "exact_eigh",
  "nystrom_shifted",
  "nystrom_stable",
  "precondition",
  "sketched_covariance",
]
