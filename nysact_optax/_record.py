"""One covered layer, as both captures see it: its spec, its calls, and the
recorder of :func:`nysact_optax.value_and_grad`.

The linen capture (:mod:`nysact_optax._capture`) and the NNX capture
(:mod:`nysact_optax._capture_nnx`) find layers by different means
(``nn.intercept_methods`` against wrapped ``__call__``\\ s) and move the inputs
by different means (a ``sow``\\ n collection against a private ``Variable``
type), but decide the same things the same way, here:

- which spec a layer has (:func:`spec_of`, from the layer's entry in
  :data:`nysact_optax._kinds.KINDS`);
- that a layer NysAct cannot precondition becomes :class:`Unsupported` with
  the reason (the optimizer raises it unless the layer is excluded);
- that every call of one layer has one configuration (:func:`layer_inputs`);
- where the inputs go while :func:`nysact_optax.value_and_grad` runs (the
  :class:`Recorder` that :func:`active` returns).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
from flax.core import tracers

from nysact_optax._kinds import LayerKind
from nysact_optax._layers import LayerInputs, LayerSpec, Unsupported

__all__ = ["Call", "Recorder", "active", "layer_inputs", "recording", "spec_of"]


def spec_of(layer: Any, kind: LayerKind, args: tuple = (), kwargs: dict | None = None) -> LayerSpec:
  """The spec of a covered layer, or :class:`Unsupported` with the reason.

  Args:
    layer: a ``flax.linen`` or ``flax.nnx`` layer of the given kind.
    kind: its entry in :data:`nysact_optax._kinds.KINDS`.
    args: the positional arguments of the call after the input.
    kwargs: the keyword arguments of the call.

  Returns:
    The layer's :class:`~nysact_optax.DenseSpec`,
    :class:`~nysact_optax.ConvSpec` or :class:`~nysact_optax.EinsumSpec`, or
    ``Unsupported(reason)`` for a layer that is not one matrix product.

  Examples:
    >>> import flax.linen as nn
    >>> from nysact_optax._kinds import KINDS
    >>> einsum, general = KINDS[:2]
    >>> spec_of(nn.DenseGeneral(4, axis=(-2, -1)), general)
    DenseSpec(axis=(-2, -1))
    >>> spec_of(nn.Einsum((2, 3, 4), "btd,ndh->btnh"), einsum)
    EinsumSpec(equation='btd,ndh->btnh')
    >>> spec_of(nn.DenseGeneral(4, batch_dims=0), general).reason
    'DenseGeneral with batch_dims=0 has one kernel per batch index; exclude it with exclude=[...]'
  """
  try:
    return kind.spec(layer, args, kwargs or {})
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


class Recorder:
  """The inputs of the layers that run while one differentiated call traces.

  Inputs must be recorded at the trace of the differentiated function; the
  linen capture hands over inputs that flax's lifted transforms carried out
  (``nn.scan``, ``nn.remat``), the NNX capture those of layers that ran at
  that trace.
  """

  def __init__(self, nnx_paths: dict[int, tuple[Any, ...]]):
    self.trace = tracers.current_trace()
    self.nnx_paths = nnx_paths  # id(layer) -> its path in the NNX model
    self.calls: dict[tuple[Any, ...], list[Call]] = {}
    self.inputs: dict[tuple[Any, ...], list[jax.Array]] = {}

  def add(self, path: tuple[Any, ...], calls: Sequence[Call], xs: Sequence[Any]) -> None:
    """Records calls of the layer at ``path`` and their inputs (none for an
    unsupported layer, or where a transform dropped them)."""
    if tracers.current_trace() != self.trace:
      name = "/".join(map(str, path))
      raise ValueError(
        f"layer {name!r} runs under a JAX transform inside the loss "
        "(jax.vmap, jax.checkpoint, nnx.remat, nnx.jit, ...), where "
        "nysact_optax.value_and_grad cannot record its inputs. Wrap the "
        "model's apply with nysact_optax.capture_activations inside the loss "
        "instead and return its activations as aux"
      )
    self.calls.setdefault(path, []).extend(calls)
    self.inputs.setdefault(path, []).extend(jax.lax.stop_gradient(x) for x in xs)

  def activations(self, nnx_model: bool) -> Any:
    table = {
      path: layer_inputs("/".join(map(str, path)), calls, self.inputs.get(path, ()))
      for path, calls in self.calls.items()
    }
    if not nnx_model:
      return {"/".join(path): inputs for path, inputs in table.items()}
    from flax import nnx

    if () in table:  # the model is itself a layer
      root = table.pop(())
      if not table:
        return root
      table[("",)] = root
    return nnx.from_flat_state(table)


_ACTIVE = threading.local()


def active() -> Recorder | None:
  """The recorder of the innermost running :func:`value_and_grad`, if any."""
  stack = getattr(_ACTIVE, "stack", ())
  return stack[-1] if stack else None


@contextlib.contextmanager
def recording(recorder: Recorder) -> Iterator[Recorder]:
  """Makes ``recorder`` the :func:`active` one while the block runs."""
  stack = getattr(_ACTIVE, "stack", ())
  _ACTIVE.stack = (*stack, recorder)
  try:
    yield recorder
  finally:
    _ACTIVE.stack = stack
