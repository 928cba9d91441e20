"""Layers batched into groups: one vmapped sketch draw and factorisation each.

XLA:CPU compiles each copy of the sketch draw and of the factorisation on its
own: about 0.4 s per threefry hash and 0.5 s per Nyström factorisation, per
layer, in every step function. Layers of one rank share one vmapped copy
instead, their ``p x r`` arrays zero-padded to the group's widest ``p``.
Zero rows change neither factorisation: every product with them adds exact
zeros, the sketch is zero there (:func:`nysact_optax._sketch.draw_sketches`),
and so are the factors' rows, which are cut off again. A group takes in a
narrower layer only while its padded rows stay within :data:`WASTE` times the
rows it holds, or within :data:`SMALL` rows in all, so padding at most doubles
the factorisation's ``p``-sized work (its ``r x r`` LAPACK calls do not
grow) beyond a few thousand rows. Exact-mode layers (``p x p``,
no sketch) are grouped by equal ``p``, without padding.

A layer stacked by ``stack_axes`` brings one batch entry per copy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from nysact_optax import _sketch
from nysact_optax._sketch import Sketch
from nysact_optax._tree import Layer

if TYPE_CHECKING:
  from nysact_optax._state import NysActConfig

__all__ = ["SMALL", "WASTE", "Group", "draw", "group_layers", "layer_sketches"]

# A group's padded rows are at most WASTE times the rows its layers hold, or
# at most SMALL in all.
WASTE = 2.0
SMALL = 4096


@dataclasses.dataclass(frozen=True)
class Group:
  """Layers of one rank whose factors are computed in one vmapped call.

  Attributes:
    layers: the layers, widest first.
    width: the padded ``p`` (the widest layer's).
    rank: the shared sketch width ``r`` (``== width`` in exact mode).
    exact: exact mode (``rank >= p``): every layer has ``p == width``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from nysact_optax._tree import find_layers
    >>> widths = (6000, 2000, 200, 100)
    >>> params = {f"d{i}": {"kernel": jnp.ones((k, 4))} for i, k in enumerate(widths)}
    >>> [(g.width, [l.name for l in g.layers]) for g in group_layers(find_layers(params, rank=3))]
    [(6000, ['d0', 'd1']), (200, ['d2', 'd3'])]
  """

  layers: tuple[Layer, ...]
  width: int
  rank: int
  exact: bool

  @property
  def name(self) -> str:
    return f"{'exact' if self.exact else 'rank'}{self.rank}_p{self.width}"

  @property
  def copies(self) -> tuple[int, ...]:
    """The batch entries of each layer (its stacked copies)."""
    return tuple(math.prod(layer.stack_shape) for layer in self.layers)

  @property
  def widths(self) -> tuple[int, ...]:
    """``p`` of every batch entry."""
    return tuple(
      layer.p for layer, n in zip(self.layers, self.copies, strict=True) for _ in range(n)
    )

  def stack(self, arrays: Sequence[Any], pad_axis: int | None = None) -> Any:
    """One batch from per-layer pytrees whose leaves carry the layer's stack
    axes first; ``pad_axis`` (of one copy's leaf) is zero-padded from ``p``
    to ``width``."""

    def one(layer, n, tree):
      def leaf(a):
        a = a.reshape((n,) + a.shape[layer.stack_axes :])
        if pad_axis is None or layer.p == self.width:
          return a
        pads = [(0, 0)] * a.ndim
        pads[1 + pad_axis] = (0, self.width - layer.p)
        return jnp.pad(a, pads)

      return jax.tree.map(leaf, tree)

    parts = [one(*item) for item in zip(self.layers, self.copies, arrays, strict=True)]
    if len(parts) == 1:
      return parts[0]
    return jax.tree.map(lambda *a: jnp.concatenate(a), *parts)

  def split(self, batch: Any, pad_axis: int | None = None) -> list[Any]:
    """Inverse of :meth:`stack`: per-layer pytrees, stack axes restored and
    ``pad_axis`` cut back to each layer's ``p``."""
    out, start = [], 0
    for layer, n in zip(self.layers, self.copies, strict=True):

      def leaf(a, layer=layer, n=n, start=start):
        a = a[start : start + n]
        if pad_axis is not None and layer.p != self.width:
          a = jax.lax.slice_in_dim(a, 0, layer.p, axis=1 + pad_axis)
        return a.reshape(layer.stack_shape + a.shape[1:])

      out.append(jax.tree.map(leaf, batch))
      start += n
    return out


def group_layers(
  layers: Sequence[Layer], waste: float = WASTE, small: int = SMALL
) -> tuple[Group, ...]:
  """The layers in groups (:class:`Group`), each layer in exactly one.

  Nyström layers of one rank are taken widest first; a group is closed when
  the next layer would push its padded rows above both ``waste`` times its
  real rows and ``small``. The order is deterministic: the same layers give the same groups, so
  the statistics and the factors always agree on every layer's sketch.
  """
  exact: dict[int, list[Layer]] = {}
  nystrom: dict[int, list[Layer]] = {}
  for layer in layers:
    (exact.setdefault(layer.p, []) if layer.exact else nystrom.setdefault(layer.rank, [])).append(
      layer
    )
  groups = [Group(tuple(ls), p, p, True) for p, ls in exact.items()]
  for rank, members in nystrom.items():
    current: list[Layer] = []
    entries = rows = 0
    for layer in sorted(members, key=lambda layer: -layer.p):
      n = math.prod(layer.stack_shape)
      padded = (entries + n) * (current[0].p if current else layer.p)
      if current and padded > max(waste * (rows + n * layer.p), small):
        groups.append(Group(tuple(current), current[0].p, rank, False))
        current, entries, rows = [], 0, 0
      current.append(layer)
      entries, rows = entries + n, rows + n * layer.p
    if current:
      groups.append(Group(tuple(current), current[0].p, rank, False))
  return tuple(groups)


def draw(group: Group, keys: Mapping[str, jax.Array], config: NysActConfig) -> Sketch | None:
  """The group's sketches from its layers' keys (stack axes first), one batch
  entry per layer copy, padded to the group's width; ``None`` in exact mode."""
  if group.exact:
    return None
  batch = group.stack([keys[layer.name] for layer in group.layers])
  return _sketch.draw_sketches(
    batch,
    group.widths,
    group.width,
    group.rank,
    config.sketch,
    orthonormal=config.orthonormal,
    dtype=config.dtype,
  )


def layer_sketches(
  groups: Sequence[Group], sketches: Sequence[Sketch | None], dtype: Any
) -> dict[str, Sketch]:
  """Every layer's sketch(es), stack axes first, from the groups' batches
  (the identity for an exact-mode layer)."""
  out = {}
  for group, batch in zip(groups, sketches, strict=True):
    if batch is None:
      for layer in group.layers:
        eye = jnp.eye(layer.p, dtype=dtype)
        out[layer.name] = Sketch(jnp.broadcast_to(eye, layer.stack_shape + eye.shape))
      continue
    matrices = group.split(batch.matrix, pad_axis=0)
    indices = group.split(batch.indices) if batch.indices is not None else [None] * len(matrices)
    for layer, m, i in zip(group.layers, matrices, indices, strict=True):
      out[layer.name] = Sketch(m, i)
  return out
