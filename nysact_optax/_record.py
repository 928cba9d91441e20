"""One covered layer, as both captures see it: its spec and its calls.

The linen capture (:mod:`nysact_optax._capture`) and the NNX capture
(:mod:`nysact_optax._capture_nnx`) find layers by different means
(``nn.intercept_methods`` against wrapped ``__call__``\\ s) and move the inputs
by different means (a ``sow``\\ n collection against a private ``Variable``
type), but decide the same things the same way, here:

- which spec a layer has (:func:`spec_of`, from the layer's kind and its
  attributes, which linen and NNX name alike or nearly so);
- that a layer NysAct cannot precondition becomes :class:`Unsupported` with
  the reason (the optimizer raises it unless the layer is excluded);
- that every call of one layer has one configuration (:func:`layer_inputs`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from nysact_optax._layers import (
  DenseSpec,
  EinsumSpec,
  LayerInputs,
  LayerSpec,
  Unsupported,
  conv_spec_of,
)

__all__ = ["KINDS", "Call", "int_axes", "layer_inputs", "spec_of"]

KINDS = ("einsum", "general", "dense", "conv")


def int_axes(axes: Any) -> tuple[int, ...]:
  """An int or a sequence of ints as a tuple of ints (``None``: empty)."""
  if axes is None:
    return ()
  if isinstance(axes, Mapping):  # nnx.LinearGeneral(batch_axis={axis: size})
    return tuple(int(a) for a in axes)
  if isinstance(axes, Sequence):
    return tuple(int(a) for a in axes)
  return (int(axes),)


def _general_spec(layer: Any) -> DenseSpec:
  for name in ("batch_dims", "batch_axis"):  # linen, NNX
    batch = getattr(layer, name, None)
    if int_axes(batch):
      shown = dict(batch) if isinstance(batch, Mapping) else batch
      raise NotImplementedError(
        f"{type(layer).__name__} with {name}={shown!r} has one kernel per "
        "batch index; exclude it with exclude=[...]"
      )
  return DenseSpec(int_axes(layer.axis))


def _spec(layer: Any, kind: str, einsum_str: str | None) -> LayerSpec:
  if kind == "einsum":
    return EinsumSpec((einsum_str or layer.einsum_str or "").replace(" ", ""))
  if kind == "general":
    return _general_spec(layer)
  if kind == "dense":
    return DenseSpec((-1,))
  if kind == "conv":
    return conv_spec_of(layer)  # linen and NNX Conv share their options
  raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def spec_of(layer: Any, kind: str, einsum_str: str | None = None) -> LayerSpec:
  """The spec of a covered layer, or :class:`Unsupported` with the reason.

  Args:
    layer: a ``flax.linen`` or ``flax.nnx`` layer of the given kind.
    kind: ``"einsum"`` (``nn.Einsum``, ``nnx.Einsum``), ``"general"``
      (``nn.DenseGeneral``, ``nnx.LinearGeneral``), ``"dense"``
      (``nn.Dense``, ``nnx.Linear``) or ``"conv"`` (``nn.Conv``, ``nnx.Conv``).
    einsum_str: the equation passed to this call of an einsum layer, if any.

  Returns:
    The layer's :class:`~nysact_optax.DenseSpec`,
    :class:`~nysact_optax.ConvSpec` or :class:`~nysact_optax.EinsumSpec`, or
    ``Unsupported(reason)`` for a layer that is not one matrix product.

  Examples:
    >>> import flax.linen as nn
    >>> spec_of(nn.DenseGeneral(4, axis=(-2, -1)), "general")
    DenseSpec(axis=(-2, -1))
    >>> spec_of(nn.Einsum((2, 3, 4), "btd,ndh->btnh"), "einsum")
    EinsumSpec(equation='btd,ndh->btnh')
    >>> spec_of(nn.DenseGeneral(4, batch_dims=0), "general").reason
    'DenseGeneral with batch_dims=0 has one kernel per batch index; exclude it with exclude=[...]'
  """
  try:
    return _spec(layer, kind, einsum_str)
  except NotImplementedError as e:  # the optimizer raises unless excluded
    return Unsupported(str(e))


class Call(NamedTuple):
  """What one call of a layer fixed: its spec and the kernel shape it saw."""

  spec: LayerSpec
  kernel_shape: tuple[int, ...] | None


def layer_inputs(path: str, calls: Sequence[Call], inputs: Sequence[Any]) -> LayerInputs:
  """The :class:`~nysact_optax.LayerInputs` of every call of one layer.

  Args:
    path: the layer's path, for the error message.
    calls: one :class:`Call` per call of the layer (at least one).
    inputs: the input arrays of those calls (none for an unsupported layer).

  Returns:
    ``LayerInputs(inputs, spec, kernel_shape)``.

  Raises:
    ValueError: the calls disagree on the spec or the kernel shape.

  Examples:
    >>> from nysact_optax import DenseSpec
    >>> layer_inputs("head", [Call(DenseSpec(), (4, 2))] * 2, ()).kernel_shape
    (4, 2)
    >>> layer_inputs("head", [Call(DenseSpec(), (4, 2)), Call(DenseSpec(), (3, 2))], ())
    Traceback (most recent call last):
    ...
    ValueError: layer 'head' was called with several configurations: ['(DenseSpec(axis=(-1,)), (3, 2))', '(DenseSpec(axis=(-1,)), (4, 2))']; use one module per configuration
  """
  distinct = set(calls)
  if len(distinct) > 1:
    raise ValueError(
      f"layer {path!r} was called with several configurations: "
      f"{sorted(str(tuple(c)) for c in distinct)}; use one module per "
      "configuration"
    )
  return LayerInputs(inputs, calls[0].spec, calls[0].kernel_shape)
