"""A proposed change to nysact_optax, kept here as an opt-in experiment.

Nothing in this module is imported by the library; the benchmarks apply it
only when asked (``--patch-conv-stats``) to measure what the change would buy.

Problem (measured by ``benchmarks.profile_update``): NysAct computes the
patch-free conv statistics ``A^T (A S)`` inside ``lax.cond`` (they run every
T_cov steps). ``A^T Z`` is written as ``jax.vjp`` of the convolution, which
lowers to a kernel-gradient ``convolution`` with ``dim_labels=f01b_i01o->01bf``.
At the top level of a jitted function XLA:CPU rewrites such a convolution to
the canonical ``b01f_01io->b01f`` form (transposes + the Eigen convolution);
inside a conditional's branch it does not, and emits a naive loop
(``backend_config={"outer_dimension_partitions": ...}``) that is 20-80x
slower.

Fix: write ``A^T Z`` directly as a canonical convolution on explicitly
transposed operands: with ``x`` padded, ``xt = x^T`` as (c, H, W, b) and
``zt`` = Z as (H', W', b, r), ``conv(xt, zt)`` with ``rhs_dilation = strides``
and ``window_strides = kernel_dilation`` is ``A^T Z`` laid out as
(c, kh, kw, r). Same arithmetic, no patch matrix, and XLA emits the fast
convolution wherever it sits.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
from jax import lax

from nysact_optax import _statistics

_ORIGINAL = _statistics._conv_stats


def _explicit_pads(x_spatial, padding, spec):
  if isinstance(padding, str):
    dilated = [(k - 1) * d + 1 for k, d in zip(spec.kernel_size, spec.kernel_dilation)]
    return [tuple(p) for p in lax.padtype_to_pads(x_spatial, dilated, spec.strides, padding)]
  return [tuple(p) for p in padding]


def conv_stats_canonical(x, spec, sketch, has_bias, *rest):
  """Drop-in replacement for ``nysact_optax._statistics._conv_stats``.

  ``rest`` is the library's optional trailing ``dtype`` argument (float32
  when absent).
  """
  supported = (
      spec.feature_group_count == 1
      and all(d == 1 for d in spec.input_dilation)
      and len(spec.kernel_size) == 2
  )
  if not supported:
    return _ORIGINAL(x, spec, sketch, has_bias, *rest)
  dtype = rest[0] if rest else jnp.float32
  x, padding = _statistics.prepare_conv_input(x.astype(dtype), spec)
  c = x.shape[-1]
  p_in = math.prod(spec.kernel_size) * c
  s = sketch.matrix.astype(dtype)
  r = s.shape[1]
  kernel = s[:p_in].reshape(spec.kernel_size + (c, r))
  pads = _explicit_pads(x.shape[1:3], padding, spec)
  xp = jnp.pad(x, [(0, 0)] + pads + [(0, 0)])
  z = lax.conv_general_dilated(
      xp, kernel, spec.strides, "VALID", rhs_dilation=spec.kernel_dilation,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))  # A S: (b, H', W', r)
  if has_bias:
    z = z + s[p_in]
  xt = jnp.transpose(xp, (3, 1, 2, 0))  # (c, Hp, Wp, b)
  zt = jnp.transpose(z, (1, 2, 0, 3))   # (H', W', b, r)
  y = lax.conv_general_dilated(
      xt, zt, spec.kernel_dilation, "VALID", rhs_dilation=spec.strides,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))  # (c, >=kh, >=kw, r)
  kh, kw = spec.kernel_size
  y = jnp.transpose(y[:, :kh, :kw, :], (1, 2, 0, 3)).reshape(p_in, r)
  if has_bias:
    y = jnp.concatenate([y, z.sum((0, 1, 2))[None]], axis=0)
  return y, math.prod(z.shape[:-1])


@contextlib.contextmanager
def patched_conv_stats():
  """Within the block, NysAct's conv statistics use the canonical form.

  Functions must be traced (jitted) inside the block for it to take effect.
  """
  _statistics._conv_stats = conv_stats_canonical
  try:
    yield
  finally:
    _statistics._conv_stats = _ORIGINAL

