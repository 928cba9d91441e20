"""One call's sketched statistics ``(A^T A S, rows)``, per layer kind; ``A^T A`` is never formed.

For a dense layer ``A`` is the (flattened) input; for a convolution ``A`` is
the im2col patch matrix, which is never built (except for small inputs of
at most :data:`PATCH_CHANNELS` channels, :data:`PATCH_LIMIT`, where two GEMMs
on it are faster): ``A S`` is a convolution of the
input with ``S`` reshaped as a kernel of ``r`` output channels and ``A^T Z``
is that convolution's kernel-gradient for the output cotangent ``Z``
(design note, section 4), written as a canonical convolution of the
transposed input with ``Z`` as its kernel: XLA:CPU emits the kernel-gradient
form as a naive loop inside ``lax.cond``, where the optimizer runs the
statistics (10-70x slower, ``python -m benchmarks.conv_stats``). With a bias,
a constant 1 is appended to each row of ``A``; its column needs only sums.

Grouped convolutions (``feature_group_count = G``, depthwise included) share
one kernel row space of width ``p_in = prod(kernel_size) * c_in / G`` across
the ``G`` groups, so the covariance is averaged over groups: every group's
patch rows count as rows of ``A``.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from nysact_optax import _distributed
from nysact_optax._layers import ConvSpec, DenseSpec, EinsumSpec
from nysact_optax._sketch import Sketch

__all__ = ["conv_stats", "dense_stats", "prepare_conv_input"]


def _dense_rows(x: jax.Array, spec: DenseSpec | EinsumSpec) -> jax.Array:
  """Moves the contracted axes last and merges them into one feature axis.

  Only the contracted (feature) axes are merged, never the row axes, so a
  batch axis sharded across devices stays intact.
  """
  axes = tuple(a % x.ndim for a in spec.axis)
  rows = [a for a in range(x.ndim) if a not in axes]
  x = jnp.transpose(x, rows + list(axes))
  return x.reshape(x.shape[: len(rows)] + (-1,))


def _row(v: jax.Array, ndim: int) -> jax.Array:
  """``v`` (r,) shaped to broadcast against an ``ndim``-array's last axis."""
  return v.reshape((1,) * (ndim - 1) + v.shape)


def _sketch_rows(x: jax.Array, sketch: Sketch, has_bias: bool, precision) -> jax.Array:
  """``[x, 1] @ S`` for rows ``x`` (..., p_in)."""
  p_in = x.shape[-1]
  if sketch.indices is not None:
    idx = sketch.indices
    picked = jnp.take(x, jnp.minimum(idx, p_in - 1), axis=-1)
    return jnp.where(_row(idx < p_in, x.ndim), picked, 1.0) if has_bias else picked
  s = sketch.matrix.astype(x.dtype)
  z = jnp.einsum("...p,pr->...r", x, s[:p_in], precision=precision)
  return z + _row(s[p_in], z.ndim) if has_bias else z


def dense_stats(
  x: jax.Array, spec: DenseSpec | EinsumSpec, sketch: Sketch, has_bias: bool, dtype, precision
):
  """``(A^T A S, rows)`` of one input of a dense or einsum layer."""
  x = _dense_rows(x, spec).astype(dtype)
  z = _sketch_rows(x, sketch, has_bias, precision)
  row_axes = tuple(range(x.ndim - 1))
  # Contracts the row axes in place (they may be sharded over a batch axis).
  y = jnp.tensordot(
    x,
    z,
    axes=(row_axes, row_axes),
    precision=precision,
    out_sharding=_distributed.contraction_out_sharding(x, z),
  )
  if has_bias:
    y = jnp.concatenate([y, z.sum(row_axes)[None]], axis=0)
  return y, math.prod(x.shape[:-1])


def prepare_conv_input(x: jax.Array, spec: ConvSpec) -> tuple[jax.Array, Any]:
  """Merges batch axes into one and applies flax's non-lax paddings.

  Returns the input as ``(batch, *spatial, c_in)`` and the padding to hand to
  ``lax.conv_general_dilated``, exactly as ``flax.linen.Conv`` does.
  """
  nsp = len(spec.kernel_size)
  if x.ndim != nsp + 2:  # several leading axes: merge them, a sharded one major
    x = _distributed.sharded_axes_first(x, x.ndim - nsp - 1)
    x = x.reshape((-1,) + x.shape[x.ndim - nsp - 1 :])
  padding = spec.padding
  if padding in ("CIRCULAR", "REFLECT"):
    dilated = [(k - 1) * d + 1 for k, d in zip(spec.kernel_size, spec.kernel_dilation)]
    pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
    x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
    padding = "VALID"
  elif padding == "CAUSAL":
    left = spec.kernel_dilation[0] * (spec.kernel_size[0] - 1)
    x = jnp.pad(x, [(0, 0), (left, 0), (0, 0)])
    padding = "VALID"
  return x, padding


def _conv_dimension_numbers(ndim: int) -> lax.ConvDimensionNumbers:
  spatial = tuple(range(1, ndim - 1))
  return lax.ConvDimensionNumbers(
    lhs_spec=(0, ndim - 1) + spatial,
    rhs_spec=(ndim - 1, ndim - 2) + tuple(range(ndim - 2)),
    out_spec=(0, ndim - 1) + spatial,
  )


_CANONICAL = {
  1: ("NHC", "HIO", "NHC"),
  2: ("NHWC", "HWIO", "NHWC"),
  3: ("NDHWC", "DHWIO", "NDHWC"),
}


def _conv_pads(x: jax.Array, spec: ConvSpec, padding) -> list[tuple[int, int]]:
  """Explicit ``(low, high)`` pads of the spatial axes, as lax computes them."""
  if not isinstance(padding, str):
    return [tuple(p) for p in padding]
  dilated = [(k - 1) * d + 1 for k, d in zip(spec.kernel_size, spec.kernel_dilation)]
  return [tuple(p) for p in lax.padtype_to_pads(x.shape[1:-1], dilated, spec.strides, padding)]


def _padded(x: jax.Array, spec: ConvSpec, padding) -> jax.Array:
  """``x`` with the convolution's padding and input dilation applied, so that
  every convolution (or slice) over it is ``VALID``."""
  pads = _conv_pads(x, spec, padding)
  return lax.pad(
    x,
    jnp.zeros((), x.dtype),
    [(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(pads, spec.input_dilation)] + [(0, 0, 0)],
  )


def _out_sizes(padded_shape, spec: ConvSpec) -> list[int]:
  """Output positions along each spatial axis of a ``VALID`` convolution."""
  return [
    (n - (k - 1) * d - 1) // st + 1
    for n, k, d, st in zip(padded_shape[1:-1], spec.kernel_size, spec.kernel_dilation, spec.strides)
  ]


def _explicitly_sharded(x: jax.Array) -> bool:
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  return spec is not None and any(entry is not None for entry in spec)


# Convolutions with at most PATCH_CHANNELS input channels whose patch matrix
# has at most PATCH_LIMIT entries gather it (one strided slice per kernel
# offset) and take two GEMMs: on few channels the two convolutions below run
# far below the machine's speed (3x3 kernels, batch 64-128, one CPU core:
# 8x8x1 0.35 against 0.76 ms, 28x28x1 8.9 against 19.8 ms, 32x32x3 with
# stride 2 2.5 against 4.9 ms); with more channels or entries they win
# (32x32x3 with stride 1: 15.1 against 13.5 ms).
PATCH_CHANNELS = 4
PATCH_LIMIT = 1 << 20


def _patch_stats(xp, spec, s, has_bias, precision):
  """``A^T (A S)`` from the explicit patch matrix ``A`` (kernel row order) of
  the padded input ``xp``, gathered by one strided slice per kernel offset."""
  out = _out_sizes(xp.shape, spec)
  cols = []
  for offset in itertools.product(*(range(k) for k in spec.kernel_size)):
    start = [0] + [o * d for o, d in zip(offset, spec.kernel_dilation)] + [0]
    limit = (
      [xp.shape[0]]
      + [b + (m - 1) * st + 1 for b, m, st in zip(start[1:], out, spec.strides)]
      + [xp.shape[-1]]
    )
    cols.append(lax.slice(xp, start, limit, [1, *spec.strides, 1]))
  a = jnp.stack(cols, axis=-2).reshape(-1, len(cols) * xp.shape[-1])  # kernel order (*k, c)
  z = _sketch_rows(a, Sketch(s), has_bias, precision)
  y = jnp.matmul(a.T, z, precision=precision)
  if has_bias:
    y = jnp.concatenate([y, z.sum(0)[None]], axis=0)
  return y, a.shape[0]


# On one CPU device the convolution statistics run over chunks of the batch
# whose work (input entries, or patch entries on the patch path) is at most
# CHUNK_LIMIT: XLA:CPU allocates a step's temporaries afresh at every
# execution, so a chunk's few MiB cost fewer page faults than the whole
# batch's tens, and stay in cache (2-core AMD EPYC, batch 64: VGG's 32x32x32
# stride-2 input 15.2 -> 13.3 ms, 10.9 -> 2.3 MB of temporaries; a 32x32x3
# patch path 7.6 -> 5.4 ms).
CHUNK_LIMIT = 1 << 18


def _chunking_applies(x: jax.Array) -> bool:
  """Only on a single CPU device: elsewhere the whole batch is one product
  (and a sharded batch axis must not be split)."""
  return jax.default_backend() == "cpu" and jax.device_count() == 1 and not _explicitly_sharded(x)


def _chunks(x: jax.Array, work: int) -> int:
  """The fewest equal batch chunks of ``x`` with at most CHUNK_LIMIT work
  each; 1 where chunking does not apply."""
  if not _chunking_applies(x):
    return 1
  b = x.shape[0]
  return next((k for k in range(1, b) if b % k == 0 and work <= k * CHUNK_LIMIT), max(b, 1))


def conv_stats(x: jax.Array, spec: ConvSpec, sketch: Sketch, has_bias: bool, dtype, precision):
  """``(A^T A S, rows)`` of one input of a convolution."""
  x, padding = prepare_conv_input(x.astype(dtype), spec)
  groups = spec.feature_group_count
  cg = x.shape[-1] // groups
  p_in = math.prod(spec.kernel_size) * cg
  padded = jax.eval_shape(lambda x: _padded(x, spec, padding), x)  # its shape, not built
  rows = x.shape[0] * math.prod(_out_sizes(padded.shape, spec))  # rows of A
  patches = False
  if groups == 1 and cg <= PATCH_CHANNELS and not _explicitly_sharded(x):
    k = _chunks(x, rows * p_in)  # the patch matrix, chunk by chunk
    patches = rows * p_in // k <= PATCH_LIMIT
  if not patches:
    k = _chunks(x, max(x.size, rows * sketch.matrix.shape[-1]))  # the input, or A S
  if k == 1:
    return _conv_stats_whole(x, padding, patches, spec, sketch, has_bias, dtype, precision)

  def chunk(total, xc):
    y, _ = _conv_stats_whole(xc, padding, patches, spec, sketch, has_bias, dtype, precision)
    return total + y, None

  zeros = jnp.zeros((p_in + has_bias, sketch.matrix.shape[1]), dtype)
  total, _ = lax.scan(chunk, zeros, x.reshape((k, -1) + x.shape[1:]))
  return total, rows * groups  # as _conv_stats_whole counts them


def _conv_stats_whole(x, padding, patches, spec, sketch, has_bias, dtype, precision):
  """``(A^T A S, rows)`` of the merged-batch input ``x``, in one go."""
  groups = spec.feature_group_count
  cg = x.shape[-1] // groups
  p_in = math.prod(spec.kernel_size) * cg
  s = sketch.matrix.astype(dtype)
  r = s.shape[1]
  if patches:
    return _patch_stats(_padded(x, spec, padding), spec, s, has_bias, precision)
  kernel = s[:p_in].reshape(spec.kernel_size + (cg, r))
  kernel = jnp.tile(kernel, (1,) * (kernel.ndim - 1) + (groups,))
  kernel = _distributed.replicate(kernel)  # typed on the mesh, if any
  kernel = _distributed.varying_like(kernel, x)  # per-device A^T Z in shard_map
  dnums = _conv_dimension_numbers(x.ndim)
  if _explicitly_sharded(x):
    # Under explicit sharding, the kernel-gradient of the convolution carries
    # the sharding rules; the canonical form below would transpose the
    # sharded batch axis into a feature axis.
    def conv(k):
      return lax.conv_general_dilated(
        x,
        k,
        spec.strides,
        padding,
        lhs_dilation=spec.input_dilation,
        rhs_dilation=spec.kernel_dilation,
        dimension_numbers=dnums,
        feature_group_count=groups,
        precision=precision,
      )

    z, conv_vjp = jax.vjp(conv, kernel)  # z = A S for every group: (..., G * r)
    if has_bias:
      z = z + _row(jnp.tile(s[p_in], groups), z.ndim)
    (y,) = conv_vjp(z)  # A^T Z, kernel-shaped
    y = y.reshape(p_in, groups, r).sum(1)
  else:
    # Input dilation and padding applied once, explicitly, so both products
    # below are plain strided convolutions.
    xp = _padded(x, spec, padding)
    z = lax.conv_general_dilated(
      xp,
      kernel,
      spec.strides,
      "VALID",
      rhs_dilation=spec.kernel_dilation,
      dimension_numbers=dnums,
      feature_group_count=groups,
      precision=precision,
    )  # A S: (b, *out, G*r)
    if has_bias:
      z = z + _row(jnp.tile(s[p_in], groups), z.ndim)
    if groups == 1 and max(spec.strides) > 1 and max(spec.kernel_dilation) == 1:
      y = _phase_atz(xp, z, spec.kernel_size, spec.strides, precision)
    else:
      y = _transposed_atz(
        xp, z, groups, spec.kernel_size, spec.kernel_dilation, spec.strides, precision
      )
    y = y.reshape(p_in, r)  # kernel order (*k, cg)
  if has_bias:
    zsum = z.sum(tuple(range(z.ndim - 1))).reshape(groups, r).sum(0)
    y = jnp.concatenate([y, zsum[None]], axis=0)
  return y, math.prod(z.shape[:-1]) * groups


def _transposed_atz(xp, z, groups, kernel_size, window, dilation, precision):
  """``A^T Z`` kernel-shaped ``(*kernel_size, cg, r)`` from the padded input
  ``xp`` and ``Z = A S`` of a convolution with strides ``dilation`` and
  kernel dilation ``window``.

  The kernel-gradient transposed by hand into a canonical convolution: the
  channels of a group act as the batch, the (group, batch) pairs as the
  contracted features, ``Z`` as the kernel with rhs dilation = strides.
  XLA:CPU lowers the kernel-gradient form to a naive loop inside
  ``lax.cond`` (where the optimizer runs it), 10-80x slower.
  """
  nsp = xp.ndim - 2
  b, sp = xp.shape[0], xp.shape[1:-1]
  cg, r = xp.shape[-1] // groups, z.shape[-1] // groups
  xt = xp.reshape((b,) + sp + (groups, cg))
  xt = jnp.transpose(xt, (nsp + 2, *range(1, nsp + 1), nsp + 1, 0))  # (cg, *sp, G, b)
  xt = xt.reshape((cg,) + sp + (groups * b,))
  zt = z.reshape(z.shape[:-1] + (groups, r))
  zt = jnp.moveaxis(zt, (0, nsp + 1), (-2, -3))  # (*out, G, b, r)
  zt = zt.reshape(zt.shape[:nsp] + (groups * b, r))
  y = lax.conv_general_dilated(
    xt,
    zt,
    window,
    "VALID",
    rhs_dilation=dilation,
    dimension_numbers=lax.conv_dimension_numbers(xt.shape, zt.shape, _CANONICAL[nsp]),
    precision=precision,
  )  # (cg, >= k..., r)
  y = y[(slice(None),) + tuple(slice(0, k) for k in kernel_size)]
  return jnp.moveaxis(y, 0, -2)


def _phase_atz(xp, z, kernel_size, strides, precision):
  """``A^T Z`` kernel-shaped ``(*kernel_size, c, r)`` of a strided convolution
  (one group, no kernel dilation) as a stride-1 one over the input's stride
  phases.

  With ``k = s q + a`` (``0 <= a < s``), the tap ``k`` reads the phase image
  ``X_a[u] = xp[s u + a]`` at ``u = i + q``: stacking the ``s^d`` phases as
  channels gives a stride-1 kernel-gradient with ``ceil(k / s)`` taps, which
  XLA:CPU runs at full speed, where the rhs-dilated form runs several times
  slower than the stride-1 convolution of the same input (2-core AMD EPYC,
  64 channels, 64x64, stride 2: 92 ms). Phase rows past ``xp`` are zeros
  and only reach taps ``>= k``, which are dropped.
  """
  nsp = len(kernel_size)
  taps = [-(-k // s) for k, s in zip(kernel_size, strides)]
  need = [(m + q - 1) * s for m, q, s in zip(z.shape[1:-1], taps, strides)]
  xp = xp[(slice(None),) + tuple(slice(0, n) for n in need)]
  xp = jnp.pad(xp, [(0, 0)] + [(0, n - h) for n, h in zip(need, xp.shape[1:-1])] + [(0, 0)])
  b, c = xp.shape[0], xp.shape[-1]
  phases = [n // s for n, s in zip(need, strides)]
  xs = xp.reshape((b,) + tuple(v for u, s in zip(phases, strides) for v in (u, s)) + (c,))
  order = (0, *range(1, 2 * nsp, 2), *range(2, 2 * nsp + 1, 2), 2 * nsp + 1)
  xs = jnp.transpose(xs, order).reshape((b, *phases, math.prod(strides) * c))
  ones = (1,) * nsp
  y = _transposed_atz(xs, z, 1, taps, ones, ones, precision)  # (*q, (*s, c), r)
  r = y.shape[-1]
  y = y.reshape((*taps, *strides, c, r))
  order = (*(i for d in range(nsp) for i in (d, nsp + d)), 2 * nsp, 2 * nsp + 1)
  y = jnp.transpose(y, order).reshape(tuple(q * s for q, s in zip(taps, strides)) + (c, r))
  return y[tuple(slice(0, k) for k in kernel_size)]
