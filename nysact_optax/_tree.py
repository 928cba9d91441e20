"""Finding the preconditioned layers in a parameter tree, and their shapes.

A layer is a node of the tree that holds a ``kernel`` leaf with two or more
axes (and optionally a ``bias`` leaf beside it). Its name is the '/'-joined
path to that node, e.g. ``"Block_0/Conv_1"``, which is also the path of the
module in ``flax.linen`` and of the captured activations.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from nysact_optax._layers import LayerInputs

__all__ = ["Layer", "activation_table", "find_layers", "key_name", "path_name"]

LayerFilter = Sequence[str] | Callable[[str], bool]


def key_name(key: Any) -> str:
  """The plain name of one pytree path entry (dict key, attribute, index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_name(path: Sequence[Any]) -> str:
  return "/".join(key_name(k) for k in path)


@dataclasses.dataclass(frozen=True)
class Layer:
  """Static facts about one preconditioned layer.

  Attributes:
    name: '/'-joined module path.
    kernel_path: pytree path of the kernel leaf.
    bias_path: pytree path of the bias leaf, or ``None``.
    kernel_shape: shape of the kernel.
    num_input_axes: leading kernel axes that meet the input.
    rank: the sketch width ``r`` (``== p`` in exact mode).
  """

  name: str
  kernel_path: tuple
  bias_path: tuple | None
  kernel_shape: tuple[int, ...]
  num_input_axes: int
  rank: int

  @property
  def has_bias(self) -> bool:
    return self.bias_path is not None

  @property
  def p_in(self) -> int:
    return math.prod(self.kernel_shape[: self.num_input_axes])

  @property
  def p(self) -> int:
    return self.p_in + int(self.has_bias)

  @property
  def out(self) -> int:
    return math.prod(self.kernel_shape[self.num_input_axes :])

  @property
  def exact(self) -> bool:
    return self.rank >= self.p


def _matches(name: str, rule: LayerFilter) -> bool:
  if callable(rule):
    return bool(rule(name))
  return any(re.search(pattern, name) for pattern in rule)


def find_layers(
    tree: Any,
    *,
    rank: int,
    exclude: LayerFilter = (),
    input_axes: Mapping[str, int] | None = None,
) -> list[Layer]:
  """The preconditioned layers of a parameter (or gradient) tree, by name.

  The number of kernel axes that meet the input is, unless ``input_axes``
  names the layer (regex search on its name): all axes but the bias's
  (``DenseGeneral`` with ``features=(heads, dim)``), or all but the last when
  there is no bias (``Dense``, ``Conv``).
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  by_path = {tuple(path): leaf for path, leaf in leaves}
  layers = []
  for path, leaf in by_path.items():
    if not path or key_name(path[-1]) != "kernel" or getattr(leaf, "ndim", 0) < 2:
      continue
    name = path_name(path[:-1])
    if _matches(name, exclude):
      continue
    bias_path = next(
        (q for q in by_path if q[:-1] == path[:-1] and key_name(q[-1]) == "bias"),
        None,
    )
    n_in = None
    for pattern, n in (input_axes or {}).items():
      if re.search(pattern, name):
        n_in = n
    if n_in is None:
      n_out = by_path[bias_path].ndim if bias_path is not None else 1
      n_in = leaf.ndim - max(n_out, 1)
    if not 1 <= n_in < leaf.ndim:
      raise ValueError(
          f"layer {name!r}: input_axes={n_in} must be between 1 and "
          f"{leaf.ndim - 1} for a kernel of shape {tuple(leaf.shape)}"
      )
    p = math.prod(leaf.shape[:n_in]) + int(bias_path is not None)
    layers.append(
        Layer(name, path, bias_path, tuple(leaf.shape), n_in, min(rank, p))
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
      what = (f"a {tuple(leaf.shape)} array" if hasattr(leaf, "shape")
              else f"a {type(leaf).__name__}")
      raise TypeError(
          f"{where} is {what}, not LayerInputs: pass the "
          "activations that nysact_optax.capture_activations returns (a dict "
          "from layer path to LayerInputs)"
      )
    table[path_name(path)] = leaf
  return table
