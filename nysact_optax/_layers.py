"""What a preconditioned layer is: its input spec and how its kernel is laid out.

A covered layer computes ``y = A @ K.reshape(p_in, o) (+ b)``, where ``A`` holds one
input row per output position. :class:`DenseSpec` and :class:`ConvSpec` say how
to obtain ``A`` (or products with it) from the raw layer input, and
:class:`LayerInputs` carries the raw inputs of every call of one layer, with
its spec as static pytree metadata, from the forward pass to the optimizer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax

__all__ = ["ConvSpec", "DenseSpec", "LayerInputs", "LayerSpec"]


@dataclasses.dataclass(frozen=True)
class DenseSpec:
  """A (general) dense layer: ``axis`` of the input are contracted with the
  leading kernel axes, in that order; every other input axis is a row axis.

  Attributes:
    axis: the contracted input axes (negative or non-negative).
  """

  axis: tuple[int, ...] = (-1,)

  @property
  def num_input_axes(self) -> int:
    return len(self.axis)

  def input_width(self, x_shape: Sequence[int]) -> int:
    return math.prod(x_shape[a] for a in self.axis)


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """A convolution with channels-last inputs ``(*batch, *spatial, c_in)`` and a
  kernel ``(*kernel_size, c_in // groups, o)``, as ``flax.linen.Conv`` lays out.

  ``padding`` is ``'SAME'``, ``'VALID'``, ``'CIRCULAR'``, ``'REFLECT'``,
  ``'CAUSAL'`` or a tuple of ``(low, high)`` pairs.
  """

  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  padding: str | tuple[tuple[int, int], ...]
  input_dilation: tuple[int, ...]
  kernel_dilation: tuple[int, ...]
  feature_group_count: int = 1

  @property
  def num_input_axes(self) -> int:
    return len(self.kernel_size) + 1

  def input_width(self, x_shape: Sequence[int]) -> int:
    return math.prod(self.kernel_size) * (x_shape[-1] // self.feature_group_count)


LayerSpec = DenseSpec | ConvSpec


@jax.tree_util.register_pytree_node_class
class LayerInputs:
  """The inputs of every call of one layer in a forward pass.

  A pytree whose leaves are the input arrays (one per call) and whose static
  metadata is the layer's :class:`DenseSpec` or :class:`ConvSpec`.
  :func:`nysact_optax.capture_activations` builds these; you rarely make one
  by hand, except to feed statistics from a custom layer.

  Attributes:
    inputs: tuple of input arrays, one per call of the layer.
    spec: how those inputs meet the kernel.
  """

  def __init__(self, inputs: Sequence[Any], spec: LayerSpec):
    self.inputs = tuple(inputs)
    self.spec = spec

  def tree_flatten(self):
    return self.inputs, self.spec

  @classmethod
  def tree_unflatten(cls, spec, inputs):
    return cls(inputs, spec)

  def __repr__(self) -> str:
    shapes = ", ".join(str(getattr(x, "shape", "?")) for x in self.inputs)
    return f"LayerInputs(inputs=[{shapes}], spec={self.spec})"
