"""The gradient matrix of a layer and the factored apply ``G <- P G``.

A layer's kernel (and bias) gradient is laid out as the ``p x o`` matrix
``G``: kernel rows in the order of the kernel's input axes, then the bias row,
columns in the order of the kernel's output axes (:class:`~nysact_optax._tree.Layer`
decides both). The preconditioner

  ``P = U diag(1 / (lam + rho)) U^T + (I - U U^T) / rho``

is applied in factored form, ``O(p r o)``; no ``p x p`` array is formed unless
``U`` itself is square (exact mode). In exact mode (``r == p``) the basis is
complete and ``P = U diag(1 / (lam + rho)) U^T``: the complement term is
dropped, because there its only effect is round-off, ``(I - U U^T) g / rho``,
which for a gradient in the covariance's range is an error of order
``eps lam / rho``, and which turns ``P`` indefinite when ``U^T U`` exceeds
``I`` by more than ``rho / lam``. The complement-free form is symmetric
positive definite for any nonsingular ``U`` and any ``lam / rho``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nysact_optax._tree import Layer

__all__ = [
  "from_matrix",
  "from_parts",
  "map_layers",
  "precondition",
  "precondition_parts",
  "to_matrix",
  "to_parts",
]

_HIGHEST = jax.lax.Precision.HIGHEST


def _bias_perm(layer: Layer) -> tuple[int, ...]:
  s = layer.stack_axes
  assert layer.bias_perm is not None, layer.name  # only called for layers with a bias
  return tuple(range(s)) + tuple(s + a for a in layer.bias_perm)


def to_parts(
  layer: Layer, kernel: jax.Array, bias: jax.Array | None, dtype: Any
) -> tuple[jax.Array, jax.Array | None]:
  """The kernel rows ``(*stack, p_in, o)`` and the bias row ``(*stack, 1, o)``
  (or ``None``) of the gradient matrix, in ``dtype``."""
  g = jnp.transpose(kernel, layer.kernel_perm)
  g = g.reshape(layer.stack_shape + (layer.p_in, layer.out)).astype(dtype)
  if bias is None:
    return g, None
  if layer.bias_perm is not None:
    bias = jnp.transpose(bias, _bias_perm(layer))
  return g, bias.reshape(layer.stack_shape + (1, layer.out)).astype(dtype)


def to_matrix(layer: Layer, kernel: jax.Array, bias: jax.Array | None, dtype: Any) -> jax.Array:
  """The gradient matrix ``(*stack, p, o)`` in ``dtype``: kernel rows, then the bias row."""
  g, b = to_parts(layer, kernel, bias, dtype)
  return g if b is None else jnp.concatenate([g, b], axis=-2)


def from_parts(
  layer: Layer, pk: jax.Array, pb: jax.Array | None, kernel: jax.Array, bias: jax.Array | None
):
  """Inverse of :func:`to_parts`, in the kernel's and bias's dtypes."""
  kperm = layer.kernel_perm
  k = pk.reshape(tuple(kernel.shape[i] for i in kperm))
  k = jnp.transpose(k, tuple(np.argsort(kperm))).astype(kernel.dtype)
  if bias is None:
    return k, None
  assert pb is not None, layer.name
  if layer.bias_perm is None:
    return k, pb.reshape(bias.shape).astype(bias.dtype)
  bperm = _bias_perm(layer)
  b = pb.reshape(tuple(bias.shape[i] for i in bperm))
  return k, jnp.transpose(b, tuple(np.argsort(bperm))).astype(bias.dtype)


def from_matrix(layer: Layer, matrix: jax.Array, kernel: jax.Array, bias: jax.Array | None):
  """Inverse of :func:`to_matrix`: the ``(*stack, p, o)`` matrix as kernel and
  bias leaves shaped and typed like ``kernel`` and ``bias``."""
  if bias is None:
    return from_parts(layer, matrix, None, kernel, None)
  return from_parts(layer, matrix[..., :-1, :], matrix[..., -1:, :], kernel, bias)


def map_layers(
  fn: Callable[..., tuple[Sequence[Any], Any]],
  layers: Sequence[Layer],
  inputs: Sequence[Any],
  outputs: Sequence[Any],
  *,
  dtype: Any,
  parts: bool = False,
  scope: str = "nysact",
) -> tuple[list[Any], dict[str, Any]]:
  """Runs ``fn`` on every layer's gradient matrices and writes its results
  into the layer's leaves of ``outputs``.

  Args:
    fn: ``fn(layer, *matrices) -> (results, aux)``: one matrix per tree of
      ``inputs`` (the ``(*stack, p, o)`` matrix of :func:`to_matrix`, or with
      ``parts`` the pair of :func:`to_parts`), in ``dtype``; one result per
      tree of ``outputs``, in the same form; ``aux`` is kept per layer.
    layers: the layers, whose paths are those of the trees.
    inputs: trees of one structure.
    outputs: trees of that structure; leaves that belong to no layer pass
      through, and each result takes the shape and dtype of the leaves it
      replaces.
    dtype: the dtype of the matrices ``fn`` gets.
    parts: kernel rows and bias row apart, never concatenated.
    scope: the ``jax.named_scope`` prefix of each layer's computation.

  Returns:
    ``(outputs, {layer name: aux})``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from nysact_optax._tree import find_layers
    >>> g = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}, "scale": jnp.ones(3)}
    >>> (layer,) = find_layers(g, rank=1)
    >>> double = lambda layer, m: ((2 * m,), m.shape)  # the matrix: kernel rows, bias row
    >>> (out,), aux = map_layers(double, [layer], [g], [g], dtype="float32")
    >>> out["dense"]["bias"], out["scale"], aux
    (Array([2., 2., 2.], dtype=float32), Array([1., 1., 1.], dtype=float32), {'dense': (3, 3)})
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(inputs[0])
  position = {tuple(path): i for i, (path, _) in enumerate(flat)}
  ins = [treedef.flatten_up_to(tree) for tree in inputs]  # type: ignore[attr-defined]
  outs = [list(treedef.flatten_up_to(tree)) for tree in outputs]  # type: ignore[attr-defined]
  read: Callable[..., Any] = to_parts if parts else to_matrix
  write: Callable[..., Any] = from_parts if parts else from_matrix
  aux = {}
  for layer in layers:
    k = position[layer.kernel_path]
    b = None if layer.bias_path is None else position[layer.bias_path]
    leaves = lambda tree, k=k, b=b: (tree[k], None if b is None else tree[b])
    with jax.named_scope(f"{scope}/{layer.name}"):
      results, aux[layer.name] = fn(layer, *(read(layer, *leaves(tree), dtype) for tree in ins))
      for tree, result in zip(outs, results, strict=True):
        kernel, bias = write(layer, *(result if parts else (result,)), *leaves(tree))
        tree[k] = kernel
        if b is not None:
          tree[b] = bias
  return [jax.tree_util.tree_unflatten(treedef, tree) for tree in outs], aux


def precondition(
  g: jax.Array, u: jax.Array, lam: jax.Array, rho, *, precision: jax.lax.Precision = _HIGHEST
) -> jax.Array:
  """``P g`` for ``g`` of shape (p, o), in O(p r o) time.

  ``P g = U ((1/(lam + rho) - 1/rho) * (U^T g)) + g / rho``: with the zero
  basis of a fresh state, ``P = I / rho``. A square ``U`` (exact mode, a
  complete eigenbasis) gives ``P g = U ((1/(lam + rho)) * (U^T g))`` instead
  (module docstring), and ``g / rho`` while it is all zero. ``precision`` is
  that of both products: below ``HIGHEST`` the ``U^T g`` term carries a
  relative error ``delta`` (bf16: ``2^-9``) that ``1/(lam + rho) - 1/rho``
  multiplies, so a direction with ``lam / rho`` above about ``1 / delta`` can
  get a negative step in the factored form (measured from ``lam / rho`` of
  about 600 with bf16 operands: ``python -m benchmarks.precision``).

  Examples:
    >>> import jax.numpy as jnp
    >>> u = jnp.eye(3)[:, :1]
    >>> precondition(jnp.ones((3, 1)), u, jnp.array([1.0]), 1.0).ravel()
    Array([0.5, 1. , 1. ], dtype=float32)
  """
  return precondition_parts(g, None, u, lam, rho, precision=precision)[0]


def precondition_parts(
  g: jax.Array,
  b: jax.Array | None,
  u: jax.Array,
  lam: jax.Array,
  rho,
  *,
  precision: jax.lax.Precision = _HIGHEST,
) -> tuple[jax.Array, jax.Array | None]:
  """:func:`precondition` of the matrix ``[g; b]`` (kernel rows ``g``, bias row
  ``b`` or ``None``) without forming it: the rows of ``P [g; b]``, split alike.

  Examples:
    >>> import jax.numpy as jnp
    >>> u = jnp.eye(3)[:, :1]
    >>> pk, pb = precondition_parts(jnp.ones((2, 1)), jnp.ones((1, 1)), u, jnp.array([1.0]), 1.0)
    >>> pk.ravel(), pb.ravel()
    (Array([0.5, 1. ], dtype=float32), Array([1.], dtype=float32))
  """
  p_in = g.shape[0]
  uk = u[:p_in]
  ug = jnp.matmul(uk.T, g, precision=precision)
  if b is not None:
    ug = ug + u[p_in:].T * b  # the bias row's outer product, (r, 1) * (1, o)
  if u.shape[0] == u.shape[1]:  # exact mode: a complete basis, no complement
    c = (1.0 / (lam + rho))[:, None] * ug
    pk = jnp.matmul(uk, c, precision=precision)
    # A fresh state's zero basis (no refresh yet) means P = I / rho.
    fresh = ~jnp.any(u != 0)
    pk = jnp.where(fresh, g / rho, pk)
    if b is None:
      return pk, None
    return pk, jnp.where(fresh, b / rho, jnp.matmul(u[p_in:], c, precision=precision))
  c = (1.0 / (lam + rho) - 1.0 / rho)[:, None] * ug
  pk = jnp.matmul(uk, c, precision=precision) + g / rho
  if b is None:
    return pk, None
  return pk, jnp.matmul(u[p_in:], c, precision=precision) + b / rho
