"""The benchmarks' own dense formulas, the baselines NysAct's pieces are measured against.

Independent of the library's code (NumPy in float64, or public ``jax.lax``):
the dense ``p x p`` preconditioner the factored apply stands for, the one the
authors' code builds, and the im2col patch matrix of a convolution.
``tests/_reference.py`` holds the tests' own copies;
``tests/test_public_api.py`` checks that the two agree.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nysact_optax import ConvSpec

__all__ = ["conv_patches", "dense_preconditioner", "reference_preconditioner"]


def dense_preconditioner(u: Any, lam: Any, rho: float) -> np.ndarray:
  """The dense ``P = U diag(1/(lam + rho)) U^T + (I - U U^T) / rho`` (float64).

  As ``nysact_optax.linalg.precondition`` applies it: without the complement
  term when ``U`` is square (exact mode's complete eigenbasis), unless ``U``
  is all zero (a fresh state, ``P = I / rho``).

  Examples:
    >>> import numpy as np
    >>> dense_preconditioner(np.eye(3)[:, :1], np.array([1.0]), 1.0).diagonal()
    array([0.5, 1. , 1. ])
  """
  u, lam = np.asarray(u, np.float64), np.asarray(lam, np.float64)
  p, r = u.shape
  main = (u * (1.0 / (lam + rho))[None, :]) @ u.T
  if p == r and np.any(u != 0):
    return main
  return main + (np.eye(p) - u @ u.T) / rho


def reference_preconditioner(c_hat: Any, s: Any, rho: float, solve_with_l: bool = True):
  """The dense ``P`` the authors' code builds from ``c_hat = A^T A S / n`` (float64).

  ``C_rho = c_hat + rho S``, ``W = S^T C_rho`` (not symmetrised: ``eigh`` and
  ``cholesky`` read one triangle, as torch does), shifted by
  ``|lambda_min(W)| + rho``, ``W + shift I = L L^T``, ``B = C_rho L^{-1}``
  (their code; ``solve_with_l=False``: the standard ``C_rho L^{-T}``),
  ``B = U Sigma V^T``, ``lam = max(sigma^2 - shift, 0)``.

  Examples:
    >>> import numpy as np
    >>> c = np.diag([4.0, 2.0, 1.0])
    >>> s = np.eye(3)[:, :2]
    >>> p = reference_preconditioner(c @ s, s, 1.0)
    >>> bool(np.allclose(p, p.T)), bool(np.linalg.eigvalsh(p).min() > 0)
    (True, True)
  """
  c_hat, s = np.asarray(c_hat, np.float64), np.asarray(s, np.float64)
  p, r = s.shape
  c_rho = c_hat + rho * s
  w = s.T @ c_rho
  lam_min = np.linalg.eigvalsh(w)[0]
  shift = abs(lam_min) + rho
  chol = np.linalg.cholesky(w + shift * np.eye(r))
  b = c_rho @ (np.linalg.inv(chol) if solve_with_l else np.linalg.inv(chol).T)
  u, sigma, _ = np.linalg.svd(b, full_matrices=False)
  lam = np.maximum(sigma**2 - shift, 0.0)
  return u @ np.diag(1.0 / (lam + rho)) @ u.T + (np.eye(p) - u @ u.T) / rho


def conv_patches(x: jax.Array, spec: ConvSpec) -> jax.Array:
  """The explicit im2col patch matrix ``A`` of a convolution, rows ``(n * G, p_in)``.

  ``x`` is ``(batch, *spatial, c_in)``; the columns are ordered like
  ``kernel.reshape(p_in, o)`` (kernel positions, then the group's input
  channels). The memory-hungry formula that NysAct's patch-free statistics
  replace. Paddings that ``lax.conv_general_dilated_patches`` takes (``"SAME"``,
  ``"VALID"``, explicit pairs); flax's ``"CAUSAL"``/``"CIRCULAR"``/``"REFLECT"``
  are not needed here.

  Examples:
    >>> import jax.numpy as jnp
    >>> from nysact_optax import ConvSpec
    >>> spec = ConvSpec((2,), (1,), "VALID", (1,), (1,))
    >>> conv_patches(jnp.arange(4.0).reshape(1, 4, 1), spec)
    Array([[0., 1.],
           [1., 2.],
           [2., 3.]], dtype=float32)
  """
  if isinstance(spec.padding, str) and spec.padding not in ("SAME", "VALID"):
    raise ValueError(f"padding {spec.padding!r} is not supported here")
  nsp = len(spec.kernel_size)
  spatial = "DHW"[3 - nsp :]
  patches = jax.lax.conv_general_dilated_patches(
    x,
    spec.kernel_size,
    spec.strides,
    spec.padding,
    lhs_dilation=spec.input_dilation,
    rhs_dilation=spec.kernel_dilation,
    dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
  )  # (..., c_in * K), channel-major
  c, k = x.shape[-1], math.prod(spec.kernel_size)
  groups = spec.feature_group_count
  patches = patches.reshape(-1, groups, c // groups, k)
  patches = jnp.swapaxes(patches, -1, -2)  # (n, G, K, cg): kernel order
  return jnp.swapaxes(patches, 0, 1).reshape(-1, k * (c // groups))
