"""Muon's dimension numbers from each layer's own input and output axes.

``optax.contrib.muon`` orthogonalises a parameter as the matrix
``(reduction axes) x (output axes)`` given by its ``MuonDimensionNumbers``;
a leaf whose entry is ``None`` gets AdamW. Without dimension numbers it puts
every 2-D leaf on Muon and every other leaf on Adam, which on a flax
transformer sends the embeddings and the ``(heads, head_dim)`` attention
biases to Muon and the 3-D attention kernels to Adam: the opposite of how
Muon's authors run it (Keller Jordan's Muon; Liu et al. 2025, "Muon is
scalable for LLM training", arXiv 2502.16982): Newton-Schulz on the hidden
matrices, AdamW on the embeddings, the head and every vector.
:func:`muon_dimension_numbers` builds that table from the layers this
library finds (:func:`nysact_optax._tree.find_layers`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import optax

from nysact_optax._tree import LayerFilter, find_layers, path_name

__all__ = ["muon_dimension_numbers"]


def _is_leaf(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode) or x is None


def muon_dimension_numbers(
  params: Any,
  *,
  exclude: LayerFilter = (),
  input_axes: Mapping[str, int | Sequence[int]] | None = None,
  include: LayerFilter | None = None,
  stack_axes: Mapping[str, int] | None = None,
) -> Any:
  """The ``muon_weight_dimension_numbers`` tree of ``optax.contrib.muon``
  for ``params``, from each layer's own input and output axes.

  A layer is a node with a ``kernel`` leaf of two or more axes (``Dense``,
  ``DenseGeneral``, ``Einsum``, ``Conv``, flax's attention projections),
  found and laid out as :func:`nysact_optax.nysact` finds it: its input axes
  are ``input_axes[name]`` or the library's default (with a bias, the kernel
  axes whose sizes are not the bias's; flax's ``query``/``key``/``value``
  kernels ``(d, heads, head_dim)`` reduce over ``d``, an ``out`` kernel
  ``(heads, head_dim, d)`` over ``(heads, head_dim)``). Its kernel gets
  ``MuonDimensionNumbers(reduction_axis=<input axes>, output_axis=<the
  other axes>)``; leading ``stack_axes[name]`` axes (``nn.scan`` copies)
  are neither, so Muon treats each copy as its own matrix.

  Every other leaf gets ``None`` (AdamW in ``optax.contrib.muon``):
  biases, norm scales, embedding tables (``nn.Embed``'s ``embedding`` is
  not a ``kernel``), free parameters such as a learned position embedding,
  and the kernels of layers matched by ``exclude`` (regexes searched in the
  layer's '/'-joined name, or a predicate) or not matched by ``include``.

  The rule for the head and the input embedding: a ``Dense`` layer is a
  kernel like any other, so an LM head or classifier (a ``Dense`` onto the
  vocabulary or the classes) and a patch or input embedding that is a
  ``Dense`` get Muon **unless they are named in** ``exclude``. Nothing is
  guessed from sizes; Muon's authors give both to AdamW, so name them, e.g.
  ``exclude=["^head$"]`` for a model whose head module is called ``head``.

  ``params`` may be a parameter or gradient tree, or the tree optax passes
  to a callable ``muon_weight_dimension_numbers`` (``MaskedNode`` entries
  where another transformation owns the leaf; they get ``None``). To let
  optax call it on its own trees, pass a closure::

    optax.contrib.muon(lr, muon_weight_dimension_numbers=lambda p:
        muon_dimension_numbers(p, exclude=["^head$"]))

  Examples:
    >>> import jax.numpy as jnp
    >>> params = {
    ...   "embed": {"embedding": jnp.ones((10, 8))},
    ...   "attn": {"query": {"kernel": jnp.ones((8, 2, 4)), "bias": jnp.ones((2, 4))},
    ...            "out": {"kernel": jnp.ones((2, 4, 8)), "bias": jnp.ones((8,))}},
    ...   "head": {"kernel": jnp.ones((8, 10)), "bias": jnp.ones((10,))},
    ... }
    >>> dims = muon_dimension_numbers(params, exclude=["^head$"])
    >>> dims["attn"]["query"]["kernel"]
    MuonDimensionNumbers(reduction_axis=(0,), output_axis=(1, 2))
    >>> dims["attn"]["out"]["kernel"]
    MuonDimensionNumbers(reduction_axis=(0, 1), output_axis=(2,))
    >>> dims["attn"]["query"]["bias"], dims["embed"]["embedding"], dims["head"]["kernel"]
    (None, None, None)

  Returns:
    A tree of ``params``' structure whose leaves are
    ``optax.contrib.MuonDimensionNumbers`` or ``None``.
  """
  layers = find_layers(
    params,
    rank=1,
    exclude=exclude,
    input_axes=input_axes,
    include=include,
    stack_axes=stack_axes,
  )
  by_path: dict[str, optax.contrib.MuonDimensionNumbers] = {}
  for layer in layers:
    s = layer.stack_axes
    by_path[path_name(layer.kernel_path)] = optax.contrib.MuonDimensionNumbers(
      reduction_axis=tuple(s + a for a in layer.input_axes),
      output_axis=tuple(s + a for a in layer.output_axes),
    )

  def one(path: tuple, leaf: Any):
    if isinstance(leaf, optax.MaskedNode) or leaf is None:
      return None
    return by_path.get(path_name(path))

  return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_leaf)
