"""Random sketches ``S`` (p x r) for the Nyström approximation.

A sketch is never stored: it is redrawn from a per-layer PRNG key whenever
statistics or factors need it, so the state holds two uint32 per layer instead
of a ``p x r`` matrix.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["SKETCHES", "Sketch", "draw_sketch", "next_sketch_key"]

SKETCHES = ("gaussian", "subcolumns")


class Sketch(NamedTuple):
  """A sketch ``S`` (p x r); ``indices`` is set when ``S = I[:, indices]``."""

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
  """Orthonormal columns spanning a full-rank tall Gaussian ``s`` (CholeskyQR2).

  Two Cholesky passes on ``r x r`` Gram matrices reach QR's orthogonality for
  the well-conditioned Gaussian sketches used here, without a LAPACK QR or
  triangular solve on the tall matrix (slow on CPU for some shapes, see
  ``_nystrom``): every LAPACK call is ``r x r``, the ``p``-sized work GEMMs.
  """
  eye = jnp.eye(s.shape[1], dtype=s.dtype)
  for _ in range(2):
    chol = jnp.linalg.cholesky(jnp.matmul(s.T, s, precision=jax.lax.Precision.HIGHEST))
    # An r x r inverse and one product: a LAPACK triangular solve with the
    # p-sized right-hand side is 50-170x slower on a threaded CPU LAPACK.
    chol_inv = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)
    s = jnp.matmul(s, chol_inv.T, precision=jax.lax.Precision.HIGHEST)
  return s


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
    orthonormal: orthonormalise a Gaussian sketch by QR (the stable Nyström
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
  with jax.named_scope("sketch"):  # its r x r work is always at HIGHEST
    return _draw(key, p, r, kind, orthonormal, dtype)


def _classic_threefry():
  """jax's non-partitionable threefry for the draws (same keys, other bits).

  A sketch is small and replicated: the partitionable threefry (jax's
  default) buys nothing here, and each of its draws took ~2 s of XLA:CPU
  compile (4-5x the classic form's), half of NysAct's compile time on the
  digits CNN.
  """
  switch = getattr(jax, "threefry_partitionable", None)
  return switch(False) if switch is not None else contextlib.nullcontext()


def _draw(key, p, r, kind, orthonormal, dtype) -> Sketch:
  if r >= p:
    return Sketch(jnp.eye(p, dtype=dtype))
  if kind == "subcolumns":
    with _classic_threefry():
      idx = jax.random.choice(key, p, (r,), replace=False)
    return Sketch(jax.nn.one_hot(idx, p, dtype=dtype).T, idx)
  if kind == "gaussian":
    with _classic_threefry():
      s = jax.random.normal(key, (p, r), dtype) / jnp.sqrt(jnp.asarray(p, dtype))
    if orthonormal:
      s = _orthonormalise(s)
    return Sketch(s)
  raise ValueError(f"sketch must be one of {SKETCHES}, got {kind!r}")
