"""Sketched activation statistics ``Y = A^T A S / n`` of every layer, from its sketch.

Each layer kind's statistics of one call come from its entry in
:data:`nysact_optax._kinds.KINDS` (the math is in :mod:`nysact_optax._covariance`);
here they are summed over a layer's calls, vmapped over its stacked copies
and taken for every layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax import lax

from nysact_optax import _batch, _kinds, _sketch, _tree
from nysact_optax._layers import LayerInputs
from nysact_optax._sketch import Sketch

if TYPE_CHECKING:
  from nysact_optax._state import NysActConfig

__all__ = ["next_keys", "sketched_covariance", "sketches_of", "statistics"]


def sketched_covariance(
  layer: LayerInputs,
  sketch: Sketch,
  has_bias: bool,
  dtype: Any = jnp.float32,
  precision: lax.Precision = lax.Precision.HIGHEST,
) -> jax.Array:
  """``A^T A S / n`` over every call of the layer (``p x r``, in ``dtype``).

  Inputs of any float dtype (bf16, fp16) are cast to ``dtype`` before any
  product, so sums of squares cannot overflow or lose the low bits.

  Args:
    layer: the captured inputs of the layer.
    sketch: the sketch ``S`` (``p x r``, ``p = p_in + has_bias``).
    has_bias: whether a constant-1 column is appended to ``A``.
    dtype: the dtype of the computation and the result (float32 default).
    precision: the ``jax.lax.Precision`` of every product and convolution
      (``HIGHEST``: float32 products on TPU and GPU too).

  Returns:
    The sketched covariance, averaged over all rows of all calls.

  Examples:
    >>> import jax.numpy as jnp
    >>> from nysact_optax import DenseSpec, LayerInputs
    >>> from nysact_optax.linalg import Sketch
    >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    >>> s = Sketch(jnp.eye(3))
    >>> sketched_covariance(LayerInputs([x], DenseSpec()), s, has_bias=True)
    Array([[ 5.,  7.,  2.],
           [ 7., 10.,  3.],
           [ 2.,  3.,  1.]], dtype=float32)
  """
  stats = _kinds.statistics_of(layer.spec)
  total: jax.Array | None = None
  rows = 0
  for x in layer.inputs:
    y, n = stats(x, layer.spec, sketch, has_bias, dtype, precision)
    total, rows = (y if total is None else total + y), rows + n
  if total is None:
    raise ValueError(f"no inputs to compute statistics from (spec {layer.spec})")
  return total / rows


def next_keys(
  layers: Sequence[_tree.Layer], sketch_keys: Mapping[str, jax.Array], config: NysActConfig
) -> dict[str, jax.Array]:
  """Every layer's key for its next statistics update (stack axes first)."""
  return {
    layer.name: _tree.over_stack(
      layer,
      lambda k, layer=layer: _sketch.next_sketch_key(k, config.sketch_refresh, layer.exact),
      sketch_keys[layer.name],
    )
    for layer in layers
  }


def statistics(
  layers: Sequence[_tree.Layer],
  sketches: Mapping[str, Sketch],
  inputs: Mapping[str, LayerInputs],
  config: NysActConfig,
) -> dict[str, jax.Array]:
  """``Y = A^T A S / n`` of every layer, from its sketch(es).

  The one statistics step of the library: ``update(activations=...)`` and
  :func:`nysact_optax.sketched_statistics` both call it with the sketches of
  :func:`nysact_optax._batch.draw` (and :func:`sketches_of`), so the sketch,
  the dtype and the stacking cannot differ between them.

  Args:
    layers: the layers' layouts.
    sketches: each layer's sketch(es), stack axes first.
    inputs: each layer's captured inputs.
    config: the optimizer's static settings.

  Returns:
    Each layer's ``p x r`` statistics (stack axes first) in
    ``config.stats_dtype``, its products at ``config.precision``.
  """
  out = {}
  for layer in layers:
    with jax.named_scope(f"nysact/statistics/{layer.name}"):
      out[layer.name] = _tree.over_stack(
        layer,
        lambda s, x, layer=layer: sketched_covariance(
          x, s, layer.has_bias, config.dtype, config.precision
        ),
        sketches[layer.name],
        inputs[layer.name],
      )
  return out


def sketches_of(
  groups: Sequence[_batch.Group], keys: Mapping[str, jax.Array], config: NysActConfig
) -> tuple[list[Sketch | None], dict[str, Sketch]]:
  """Each group's sketch batch (from :func:`nysact_optax._batch.group_layers`)
  and each layer's sketch for the given keys: one vmapped draw per group."""
  batches = [_batch.draw(group, keys, config) for group in groups]
  return batches, _batch.layer_sketches(groups, batches, config.dtype)
