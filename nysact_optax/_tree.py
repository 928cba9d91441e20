"""Finding the preconditioned layers in a parameter tree, and their shapes.

A layer is a node of the tree that holds a ``kernel`` leaf with two or more
axes (and optionally a ``bias`` leaf beside it). Its name is the '/'-joined
path to that node, e.g. ``"Block_0/Conv_1"``, which is also the path of the
module in ``flax.linen`` and of the captured activations. Leaves boxed in a
pytree with a ``value`` attribute (``nnx.Param`` in an ``nnx.State``,
``nn.Partitioned``) are named by the box's path, so NNX states and
partitioned linen params name their layers the same way.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from nysact_optax._layers import LayerInputs

__all__ = [
  "ATTENTION_PROJECTIONS",
  "Layer",
  "activation_table",
  "default_input_axes",
  "find_layers",
  "key_name",
  "over_stack",
  "path_name",
  "selected",
]

LayerFilter = Sequence[str] | Callable[[str], bool]
RankRule = int | Callable[[str, int], int]


def key_name(key: Any) -> str:
  """The plain name of one pytree path entry (dict key, attribute, index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_name(path: Sequence[Any]) -> str:
  return "/".join(key_name(k) for k in path)


def _unboxed(path: tuple) -> tuple:
  """The path without a trailing ``.value`` (``nnx.Variable``, ``nn.Partitioned``)."""
  last = path[-1] if path else None
  if isinstance(last, jax.tree_util.GetAttrKey) and last.name == "value":
    return path[:-1]
  return path


@dataclasses.dataclass(frozen=True)
class Layer:
  """One preconditioned layer and the layout of its gradient matrix.

  Everything here is decided once, by :func:`find_layers`, from the kernel
  and bias shapes and the configuration (``input_axes=``, ``stack_axes=``):
  the statistics, the factors and the apply all read it from here.

  Attributes:
    name: '/'-joined module path.
    kernel_path: pytree path of the kernel leaf.
    bias_path: pytree path of the bias leaf, or ``None``.
    kernel_shape: shape of the kernel (stack axes included).
    rank: the sketch width ``r`` (``== p`` in exact mode).
    input_axes: the kernel axes (after the stack axes) that meet the input,
      sorted.
    stack_axes: leading kernel axes that index stacked copies of the layer
      (``nn.scan``/``nn.vmap`` over parameters); each copy has its own state.
    bias_shape: shape of the bias (stack axes included), or ``None``.
    bias_perm: transposes the bias (after its stack axes) to the kernel's
      output-axis order; ``None`` when the bias is only reshaped (another
      number of axes than the kernel's outputs).
    bias_perm_ambiguous: the bias's axis sizes repeat, so ``bias_perm`` was a
      choice (the identity where it fits). Either way the captured layer spec
      is checked against ``bias_perm`` at every update.

  Examples:
    >>> import jax.numpy as jnp
    >>> params = {"attn": {"kernel": jnp.ones((4, 2, 3)), "bias": jnp.ones((3, 2))}}
    >>> (layer,) = find_layers(params, rank=2)  # bias stored (head_dim, heads)
    >>> layer.input_axes, layer.output_axes, layer.bias_perm, layer.p, layer.out
    ((0,), (1, 2), (1, 0), 5, 6)
  """

  name: str
  kernel_path: tuple
  bias_path: tuple | None
  kernel_shape: tuple[int, ...]
  rank: int
  input_axes: tuple[int, ...]
  stack_axes: int = 0
  bias_shape: tuple[int, ...] | None = None
  bias_perm: tuple[int, ...] | None = None
  bias_perm_ambiguous: bool = False

  @property
  def has_bias(self) -> bool:
    return self.bias_path is not None

  @property
  def num_input_axes(self) -> int:
    return len(self.input_axes)

  @property
  def stack_shape(self) -> tuple[int, ...]:
    return self.kernel_shape[: self.stack_axes]

  @property
  def layer_kernel_shape(self) -> tuple[int, ...]:
    """The kernel shape of one copy of the layer (without stack axes)."""
    return self.kernel_shape[self.stack_axes :]

  @property
  def output_axes(self) -> tuple[int, ...]:
    n = len(self.layer_kernel_shape)
    return tuple(a for a in range(n) if a not in self.input_axes)

  @property
  def p_in(self) -> int:
    return math.prod(self.layer_kernel_shape[a] for a in self.input_axes)

  @property
  def p(self) -> int:
    return self.p_in + int(self.has_bias)

  @property
  def out(self) -> int:
    return math.prod(self.layer_kernel_shape[a] for a in self.output_axes)

  @property
  def exact(self) -> bool:
    return self.rank >= self.p

  @property
  def kernel_perm(self) -> tuple[int, ...]:
    """Transposes the kernel to ``(*stack, *inputs, *outputs)``."""
    s = self.stack_axes
    return tuple(range(s)) + tuple(s + a for a in self.input_axes + self.output_axes)


def over_stack(layer: Layer, fn, *args):
  """``fn`` on one copy of the layer, vmapped over its stack axes, if any.

  Every array in ``args`` has the layer's stack axes first.
  """
  if not layer.stack_axes:
    return fn(*args)
  n, size = layer.stack_axes, math.prod(layer.stack_shape)
  flat = jax.tree.map(lambda a: a.reshape((size,) + a.shape[n:]), args)
  out = jax.vmap(fn)(*flat)
  return jax.tree.map(lambda a: a.reshape(layer.stack_shape + a.shape[1:]), out)


# flax's attention modules (linen MultiHeadDotProductAttention, nnx
# MultiHeadAttention) name their input projections so; each is a DenseGeneral
# / LinearGeneral from the model width to (heads, head_dim).
ATTENTION_PROJECTIONS = ("query", "key", "value")


def default_input_axes(
  name: str, kernel_dims: tuple[int, ...], bias_dims: tuple[int, ...] | None
) -> tuple[int, ...]:
  """The kernel axes that meet the input, as far as the shapes tell.

  With a bias, the output axes are the kernel axes whose sizes are the
  bias's (the trailing ones when they fit, as flax lays out ``Dense`` and
  ``DenseGeneral``; otherwise the one set of axes that fits, as for an
  ``Einsum`` like ``"btd,ndh->bthn"``). Without one: the leading axis of
  flax's attention projections (``query``/``key``/``value``, kernel
  ``(d, heads, head_dim)``), else every axis but the last. The captured
  layer spec is checked against this at every update; where it differs the
  error gives the ``input_axes=`` to pass.

  Examples:
    >>> default_input_axes("Dense_0", (8, 4), (4,))
    (0,)
    >>> default_input_axes("einsum", (2, 4, 3), (3, 2))  # kernel (heads, d, head_dim)
    (1,)
    >>> default_input_axes("attention/query", (16, 2, 8), None)
    (0,)
    >>> default_input_axes("attention/out", (2, 8, 16), None)
    (0, 1)
  """
  ndim = len(kernel_dims)
  if bias_dims is None:
    if ndim >= 3 and name.rsplit("/", 1)[-1] in ATTENTION_PROJECTIONS:
      return (0,)
    return tuple(range(ndim - 1))
  n_out = max(min(len(bias_dims), ndim - 1), 1)
  trailing = tuple(range(ndim - n_out))
  if (
    len(bias_dims) != n_out
    or sorted(kernel_dims[ndim - n_out :]) == sorted(bias_dims)
    or _stack_hint(kernel_dims, bias_dims)
  ):  # stacked copies: the error says so
    return trailing
  fits = [
    out
    for out in itertools.combinations(range(ndim), n_out)
    if sorted(kernel_dims[a] for a in out) == sorted(bias_dims)
  ]
  if len(fits) != 1:
    return trailing  # no one layout fits: the update's check names the fix
  return tuple(a for a in range(ndim) if a not in fits[0])


def _bias_perm(out_dims: tuple[int, ...], bias_dims: tuple[int, ...]):
  """``(perm, ambiguous)`` taking the bias's axes to the kernel's output order."""
  if len(bias_dims) != len(out_dims) or len(out_dims) > 6:
    return None, False  # reshaped, not transposed
  identity = tuple(range(len(out_dims)))
  perms = [
    q for q in itertools.permutations(identity) if tuple(bias_dims[i] for i in q) == out_dims
  ]
  if identity in perms:
    return identity, len(perms) > 1
  return (perms[0], len(perms) > 1) if perms else (None, False)


def _matches(name: str, rule: LayerFilter) -> bool:
  if callable(rule):
    return bool(rule(name))
  return any(re.search(pattern, name) for pattern in rule)


def selected(name: str, include: LayerFilter | None, exclude: LayerFilter) -> bool:
  """Whether layer ``name`` is preconditioned: included (or no ``include``)
  and not excluded."""
  if include is not None and not _matches(name, include):
    return False
  return not _matches(name, exclude)


def _lookup(table: Mapping[str, Any] | None, name: str):
  """The value of the last regex in ``table`` found in ``name``, or ``None``."""
  value = None
  for pattern, v in (table or {}).items():
    if re.search(pattern, name):
      value = v
  return value


def _layer_rank(rank: RankRule, name: str, p: int) -> int:
  r = rank(name, p) if callable(rank) else rank
  if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
    raise ValueError(
      f"layer {name!r}: rank({name!r}, {p}) returned {r!r}; the rank rule must "
      "return an integer >= 1"
    )
  return min(int(r), p)


def _stack_hint(kernel_shape: tuple[int, ...], bias_shape: tuple[int, ...]) -> int:
  """The number of leading axes kernel and bias share such that the rest is a
  plain layer (bias = the kernel's trailing axes), or 0."""
  for k in range(1, min(len(kernel_shape) - 1, len(bias_shape))):
    rest = bias_shape[k:]
    if (
      kernel_shape[:k] == bias_shape[:k]
      and rest
      and kernel_shape[len(kernel_shape) - len(rest) :] == rest
    ):
      return k
  return 0


def find_layers(
  tree: Any,
  *,
  rank: RankRule,
  exclude: LayerFilter = (),
  input_axes: Mapping[str, int | Sequence[int]] | None = None,
  include: LayerFilter | None = None,
  stack_axes: Mapping[str, int] | None = None,
) -> list[Layer]:
  """The preconditioned layers of a parameter (or gradient) tree, by name.

  A layer is preconditioned when ``include`` (if given) and not ``exclude``
  match its name (regexes searched in the name, or predicates). Its rank is
  ``rank``, or ``rank(name, p)`` for a callable, capped at ``p``.

  The leading ``stack_axes[name]`` kernel axes (regex search on the name;
  default 0) index stacked copies of the layer. Of the remaining axes, those
  that meet the input are ``input_axes[name]`` (an int ``n``: the leading
  ``n``; a tuple: those axes) or by default :func:`default_input_axes`.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  by_path = {tuple(path): leaf for path, leaf in leaves}
  names = {path: _unboxed(path) for path in by_path}
  layers = []
  for path, leaf in by_path.items():
    node = names[path]
    if not node or key_name(node[-1]) != "kernel" or getattr(leaf, "ndim", 0) < 2:
      continue
    name = path_name(node[:-1])
    if not selected(name, include, exclude):
      continue
    bias_path = next(
      (
        q
        for q in by_path
        if names[q][:-1] == node[:-1] and names[q] and key_name(names[q][-1]) == "bias"
      ),
      None,
    )
    stack = _lookup(stack_axes, name) or 0
    if (
      isinstance(stack, bool)
      or not isinstance(stack, numbers.Integral)
      or not (0 <= int(stack) <= leaf.ndim - 2)
    ):
      raise ValueError(
        f"layer {name!r}: stack_axes={stack!r} must be an integer between 0 "
        f"and {leaf.ndim - 2} for a kernel of shape {tuple(leaf.shape)}"
      )
    stack = int(stack)
    ndim = leaf.ndim - stack
    axes = _lookup(input_axes, name)
    if axes is None:
      bias_dims = None if bias_path is None else tuple(by_path[bias_path].shape[stack:])
      axes = default_input_axes(name, tuple(leaf.shape[stack:]), bias_dims)
    if isinstance(axes, numbers.Integral):
      if not 1 <= int(axes) < ndim:
        raise ValueError(
          f"layer {name!r}: input_axes={axes} must be between 1 and "
          f"{ndim - 1} for a kernel of shape {tuple(leaf.shape)}"
          + (f" with {stack} stack axes" if stack else "")
        )
      axes = tuple(range(axes))
    axes = tuple(int(a) % ndim if -ndim <= a < ndim else a for a in axes)
    if (
      not axes
      or len(set(axes)) != len(axes)
      or len(axes) >= ndim
      or any(not 0 <= a < ndim for a in axes)
    ):
      raise ValueError(
        f"layer {name!r}: input_axes={axes} must be distinct axes of the "
        f"{ndim}-axis kernel {tuple(leaf.shape[stack:])}, leaving at least "
        "one output axis"
      )
    axes = tuple(sorted(axes))
    out_axes = tuple(a for a in range(ndim) if a not in axes)
    out_dims = tuple(leaf.shape[stack + a] for a in out_axes)
    bias_shape = bias_perm = None
    ambiguous = False
    if bias_path is not None:
      bias_shape = tuple(by_path[bias_path].shape)
      bias_perm, ambiguous = _bias_perm(out_dims, bias_shape[stack:])
      reshaped = len(bias_shape) - stack != len(out_dims)
      if bias_shape[:stack] != tuple(leaf.shape[:stack]) or (
        math.prod(bias_shape[stack:]) != math.prod(out_dims) or (not reshaped and bias_perm is None)
      ):
        hint = "pass input_axes= and stack_axes= that describe the layer"
        stacked = _stack_hint(tuple(leaf.shape), bias_shape)
        if not stack and stacked:
          hint = f"it looks stacked by nn.scan/nn.vmap: pass stack_axes={{{name!r}: {stacked}}}"
        raise ValueError(
          f"layer {name!r}: the bias of shape {bias_shape} does not match the "
          f"outputs {out_dims} of the kernel {tuple(leaf.shape)} (input axes {axes}"
          + (f", {stack} stack axes" if stack else "")
          + f"); {hint}, or exclude it with exclude=[{name!r}]"
        )
    p = math.prod(leaf.shape[stack + a] for a in axes) + int(bias_path is not None)
    layers.append(
      Layer(
        name,
        path,
        bias_path,
        tuple(leaf.shape),
        _layer_rank(rank, name, p),
        axes,
        stack,
        bias_shape,
        bias_perm,
        ambiguous,
      )
    )
  return sorted(layers, key=lambda layer: layer.name)


def activation_table(activations: Any) -> dict[str, LayerInputs]:
  """Maps each layer name to its :class:`LayerInputs` in an activation tree."""
  leaves = jax.tree_util.tree_flatten_with_path(
    activations, is_leaf=lambda x: isinstance(x, LayerInputs)
  )[0]
  table = {}
  for path, leaf in leaves:
    if not isinstance(leaf, LayerInputs):
      where = f"activations[{path_name(path)!r}]" if path else "activations"
      what = (
        f"a {tuple(leaf.shape)} array" if hasattr(leaf, "shape") else f"a {type(leaf).__name__}"
      )
      raise TypeError(
        f"{where} is {what}, not LayerInputs: pass the "
        "activations that nysact_optax.capture_activations returns (a dict "
        "from layer path to LayerInputs)"
      )
    table[path_name(path)] = leaf
  return table
