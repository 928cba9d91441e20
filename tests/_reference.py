"""Independent dense NumPy formulas the library is checked against (float64)."""

from __future__ import annotations

import itertools

import numpy as np

from benchmarks._reference import dense_preconditioner, reference_preconditioner  # noqa: F401


def _same_pads(size, k, stride, dil):
  eff = (k - 1) * dil + 1
  out = -(-size // stride)
  total = max((out - 1) * stride + eff - size, 0)
  return total // 2, total - total // 2


def im2col(x, kernel_size, strides, padding, dilation, groups=1):
  """Patch rows of a channels-last conv, by explicit loops; rows ``(G * n, p_in)``.

  ``padding`` is 'SAME', 'VALID' or a sequence of (lo, hi) pairs.
  """
  x = np.asarray(x, np.float64)
  nsp = len(kernel_size)
  if padding == "VALID":
    pads = [(0, 0)] * nsp
  elif padding == "SAME":
    pads = [_same_pads(x.shape[1 + i], kernel_size[i], strides[i], dilation[i]) for i in range(nsp)]
  else:
    pads = list(padding)
  x = np.pad(x, [(0, 0)] + pads + [(0, 0)])
  out_sizes = [
    (x.shape[1 + i] - ((kernel_size[i] - 1) * dilation[i] + 1)) // strides[i] + 1
    for i in range(nsp)
  ]
  c = x.shape[-1]
  cg = c // groups
  rows = [[] for _ in range(groups)]
  for b in range(x.shape[0]):
    for pos in itertools.product(*[range(o) for o in out_sizes]):
      window = []
      for koff in itertools.product(*[range(k) for k in kernel_size]):
        idx = tuple(pos[i] * strides[i] + koff[i] * dilation[i] for i in range(nsp))
        window.append(x[(b,) + idx])  # (c,)
      window = np.stack(window)  # (K, c)
      for g in range(groups):
        rows[g].append(window[:, g * cg : (g + 1) * cg].reshape(-1))
  return np.concatenate([np.stack(r) for r in rows])


def with_bias_column(a):
  return np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)


def damped_inverse(a, rho):
  """``(A^T A / n + rho I)^{-1}`` for rows ``a``."""
  cov = a.T @ a / a.shape[0]
  return np.linalg.inv(cov + rho * np.eye(cov.shape[0]))


def conv_rows(kernel, strides=None, padding="SAME", dilation=None, groups=1):
  """Rows ``x -> A`` (im2col) of a conv as flax pads it (CAUSAL, CIRCULAR too)."""
  n = len(kernel)
  strides, dilation = strides or (1,) * n, dilation or (1,) * n

  def rows(x):
    pad = padding
    if padding == "CAUSAL":
      pad = [((kernel[0] - 1) * dilation[0], 0)]
    if padding == "CIRCULAR":
      eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
      x = np.pad(x, [(0, 0)] + [((e - 1) // 2, e // 2) for e in eff] + [(0, 0)], mode="wrap")
      pad = "VALID"
    return im2col(x, kernel, strides, pad, dilation, groups)

  return rows


def conv_patches(x, spec):
  """The explicit im2col patch matrix of a convolution with the library's
  padding rules, rows ``(n * G, p_in)``, columns ordered like
  ``kernel.reshape(p_in, o)`` (the memory-hungry formula the patch-free
  statistics replace; for tests and benchmarks)."""
  import math

  import jax.numpy as jnp
  from jax import lax

  from nysact_optax import _covariance

  x, padding = _covariance.prepare_conv_input(jnp.asarray(x), spec)
  patches = lax.conv_general_dilated_patches(
    x,
    spec.kernel_size,
    spec.strides,
    padding,
    lhs_dilation=spec.input_dilation,
    rhs_dilation=spec.kernel_dilation,
    dimension_numbers=_covariance._conv_dimension_numbers(x.ndim),
  )  # (..., c_in * K), channel-major
  c, k = x.shape[-1], math.prod(spec.kernel_size)
  groups = spec.feature_group_count
  patches = patches.reshape(-1, groups, c // groups, k)
  patches = jnp.swapaxes(patches, -1, -2)  # (n, G, K, cg): kernel order
  return jnp.swapaxes(patches, 0, 1).reshape(-1, k * (c // groups))
