"""Random sketches ``S`` (p x r) for the Nyström approximation.

A sketch is never stored: it is redrawn from a per-layer PRNG key whenever
statistics or factors need it, so the state holds two uint32 per layer instead
of a ``p x r`` matrix. Layers of one :class:`~nysact_optax._batch.Group` draw
their sketches in one vmapped call (:func:`draw_sketches`), zero-padded to the
group's width; entry ``(i, j)`` of a Gaussian sketch depends only on the key,
``i``, ``j`` and ``p``, so the padding never changes a layer's sketch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend.random import threefry_2x32

__all__ = ["SKETCHES", "Sketch", "draw_sketch", "draw_sketches", "next_sketch_key"]

SKETCHES = ("gaussian", "subcolumns")
_HIGHEST = jax.lax.Precision.HIGHEST


class Sketch(NamedTuple):
  """A sketch ``S`` (p x r); ``indices`` is set when ``S = I[:, indices]``.

  A batch of sketches (the optimizer draws a group of layers' sketches at
  once) carries leading batch axes on both fields.
  """

  matrix: jax.Array
  indices: jax.Array | None = None


def next_sketch_key(key: jax.Array, sketch_refresh: str, exact: bool) -> jax.Array:
  """The key of the sketch the next statistics update of a layer uses.

  ``"fixed"`` keeps the layer's one sketch; ``"reference"`` draws a new one
  at every statistics update, as the authors' code does. Exact mode has no
  sketch to refresh. ``key`` is one layer copy's key (uint32[2]).
  """
  if sketch_refresh == "reference" and not exact:
    return jax.random.fold_in(key, 1)
  return key


def _orthonormalise(s: jax.Array) -> jax.Array:
  """Orthonormal columns spanning a full-rank tall Gaussian ``s``.

  Two passes of ``S <- S (S^T S)^{-1/2}`` (symmetric, Löwdin), from the
  eigendecomposition ``S^T S = Q diag(g) Q^T``: like CholeskyQR2, they reach
  QR's orthogonality for the well-conditioned Gaussian sketches used here
  without a LAPACK QR or triangular solve on the tall matrix (slow on CPU for
  some shapes, see ``_nystrom``), with one LAPACK call (``r x r``) per pass.
  The result is a continuous function of ``S``, whatever the signs and order
  the eigensolver picks, so differently compiled copies of a draw (the
  statistics in one jitted function, the factors in another) agree to
  round-off. Zero rows (a padded sketch) stay zero.
  """
  for _ in range(2):
    g, q = jnp.linalg.eigh(jnp.matmul(s.T, s, precision=_HIGHEST))
    inv_sqrt = jnp.matmul(q * jax.lax.rsqrt(g)[None, :], q.T, precision=_HIGHEST)
    s = jnp.matmul(s, inv_sqrt, precision=_HIGHEST)
  return s


def _gaussian(key: jax.Array, width: int, p: jax.Array, r: int, dtype: Any) -> jax.Array:
  """``N(0, 1/p)`` entries in the first ``p`` of ``width`` rows, zeros below.

  Entries ``(i, 2k)`` and ``(i, 2k + 1)`` are the two words of one threefry
  hash of the counter pair ``(i ceil(r/2) + k, 0)`` under the key, turned
  into normals as ``jax.random.normal`` does: a function of the key, ``i``,
  the column and ``r`` only, so a padded draw agrees with an unpadded one on
  the rows they share. One hash for a whole group of layers: each hash in a
  step costs about 0.4 s of XLA:CPU compile, whatever its size.
  """
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  half = -(-r // 2)
  counter = jnp.arange(width * half, dtype=jnp.uint32)
  words = threefry_2x32(key, jnp.concatenate([counter, jnp.zeros_like(counter)]))
  bits = jnp.stack([words[: width * half], words[width * half :]], axis=-1)
  bits = bits.reshape(width, 2 * half)[:, :r]
  float_bits = (bits >> 9) | jnp.uint32(0x3F800000)  # 23 random mantissa bits in [1, 2)
  uniform = jax.lax.bitcast_convert_type(float_bits, jnp.float32) - 1.0
  low = jnp.nextafter(jnp.float32(-1.0), jnp.float32(0.0))
  uniform = jnp.maximum(low, uniform * (1.0 - low) + low)  # in (-1, 1)
  z = (jnp.sqrt(jnp.float32(2.0)) * jax.lax.erf_inv(uniform)).astype(dtype)
  rows = jnp.arange(width)[:, None] < p
  return jnp.where(rows, z, 0.0) / jnp.sqrt(jnp.asarray(p, dtype))


def _classic_threefry():
  """jax's non-partitionable threefry for subcolumn draws (same keys, other
  bits): its permutations compile several times faster on XLA:CPU."""
  switch = getattr(jax, "threefry_partitionable", None)
  return switch(False) if switch is not None else contextlib.nullcontext()


def draw_sketch(
  key: jax.Array,
  p: int,
  r: int,
  kind: str,
  *,
  orthonormal: bool = False,
  dtype: Any = jnp.float32,
) -> Sketch:
  """Draws a ``p x r`` sketch.

  Args:
    key: a PRNG key.
    p: rows (the layer's input width, bias column included).
    r: columns (the rank); ``r >= p`` gives the identity (exact mode).
    kind: ``"gaussian"``, i.i.d. ``N(0, 1/p)`` entries, or ``"subcolumns"``,
      ``r`` distinct columns of the identity.
    orthonormal: orthonormalise a Gaussian sketch (the stable Nyström
      variant needs ``S^T S = I``; subcolumns already are).
    dtype: the sketch's float dtype.

  Returns:
    The :class:`Sketch`; ``indices`` is set for subcolumns.

  Examples:
    >>> import jax
    >>> s = draw_sketch(jax.random.PRNGKey(0), 6, 2, "subcolumns")
    >>> s.matrix.shape, s.indices.shape, float(s.matrix.sum())
    ((6, 2), (2,), 2.0)
  """
  if r >= p:
    return Sketch(jnp.eye(p, dtype=dtype))
  batch = draw_sketches(key[None], (p,), p, r, kind, orthonormal=orthonormal, dtype=dtype)
  return jax.tree.map(lambda a: a[0], batch)


def draw_sketches(
  keys: jax.Array,
  widths: Sequence[int],
  width: int,
  r: int,
  kind: str,
  *,
  orthonormal: bool = False,
  dtype: Any = jnp.float32,
) -> Sketch:
  """A batch of sketches, ``keys[i]`` drawing a ``widths[i] x r`` one zero-padded
  to ``width`` rows; row for row, each is :func:`draw_sketch`'s.

  Args:
    keys: PRNG keys, ``(n, 2)``.
    widths: the ``n`` row counts ``p``, each above ``r`` (exact-mode layers
      have no sketch).
    width: the padded row count, at least ``max(widths)``.
    r: columns (the rank), below every width.
    kind: ``"gaussian"`` or ``"subcolumns"``.
    orthonormal: orthonormalise Gaussian sketches.
    dtype: the sketches' float dtype.

  Returns:
    The :class:`Sketch` batch: ``matrix`` ``(n, width, r)``, ``indices``
    ``(n, r)`` for subcolumns.

  Examples:
    >>> import jax
    >>> keys = jax.random.split(jax.random.PRNGKey(0), 2)
    >>> s = draw_sketches(keys, (5, 8), 8, 3, "gaussian", orthonormal=True)
    >>> s.matrix.shape, float(abs(s.matrix[0, 5:]).max())
    ((2, 8, 3), 0.0)
  """
  if min(widths) <= r or width < max(widths) or len(widths) != keys.shape[0]:
    raise ValueError(f"sketch widths {tuple(widths)} must exceed r={r} and fit width={width}")
  with jax.named_scope("sketch"):  # its r x r work is always at HIGHEST
    if kind == "gaussian":
      p = jnp.asarray(widths, jnp.int32)
      s = jax.vmap(lambda k, p: _gaussian(k, width, p, r, dtype))(keys, p)
      return Sketch(jax.vmap(_orthonormalise)(s) if orthonormal else s)
    if kind == "subcolumns":
      with _classic_threefry():
        idx = jnp.stack(
          [jax.random.choice(k, p, (r,), replace=False) for k, p in zip(keys, widths)]
        )
      return Sketch(jnp.swapaxes(jax.nn.one_hot(idx, width, dtype=dtype), -1, -2), idx)
  raise ValueError(f"sketch must be one of {SKETCHES}, got {kind!r}")
