"""Capturing layer inputs from ``flax.nnx`` modules during the forward pass.

NNX has no method interceptor. While a captured call runs, ``__call__`` of
``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Conv`` and ``nnx.Einsum`` is
wrapped (class attribute, reference-counted, restored on exit and on
exceptions) so that each of those layers ``sow``s its input into a private
``Variable`` type, through the same ``__captures__`` protocol that
``nnx.capture`` sets up. Only the layer instances of the captured model carry
that ``Variable`` type, so other models (and other threads) are untouched, and
an enclosing ``nnx.capture`` of the user keeps its own intermediates. The
sown values are module state, so they flow through NNX's lifted transforms
(``nnx.remat``, ...) like any other.

``nnx.MultiHeadAttention`` is covered through its ``LinearGeneral``
projections (``query``, ``key``, ``value``, ``out``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from nysact_optax._layers import (
    DenseSpec, EinsumSpec, LayerInputs, LayerSpec, Unsupported, conv_spec_of,
)

__all__ = ["capture_nnx", "is_nnx"]

_LAYER_TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Einsum)


class _LayerInputsVar(nnx.Intermediate):
  """The private ``Variable`` type the wrapped layers sow their inputs into."""


def is_nnx(fn: Any) -> bool:
  """Whether ``fn`` is an ``nnx.Module`` or a method bound to one."""
  return isinstance(fn, nnx.Module) or (
      inspect.ismethod(fn) and isinstance(fn.__self__, nnx.Module)
  )


def _spec_of(layer: nnx.Module, einsum_str: str | None) -> LayerSpec:
  """The spec of one covered NNX layer, read off its attributes."""
  if isinstance(layer, nnx.Einsum):
    equation = (einsum_str or layer.einsum_str or "").replace(" ", "")
    return EinsumSpec(equation)
  if isinstance(layer, nnx.LinearGeneral):
    if layer.batch_axis:
      raise NotImplementedError(
          f"LinearGeneral with batch_axis={dict(layer.batch_axis)!r} has one "
          "kernel per batch index; exclude it with exclude=[...]"
      )
    return DenseSpec(tuple(int(a) for a in layer.axis))
  if isinstance(layer, nnx.Linear):
    return DenseSpec((-1,))
  return conv_spec_of(layer)  # nnx.Conv: the same options as flax.linen.Conv


def _ours(layer: nnx.Module) -> bool:
  return any(type(v) is _LayerInputsVar for v in getattr(layer, "__captures__", ()))


def _wrap(call: Callable[..., Any]) -> Callable[..., Any]:
  @functools.wraps(call)
  def __call__(self, inputs, *args, **kwargs):
    if _ours(self):
      einsum_str = kwargs.get("einsum_str", args[0] if args else None)
      einsum_str = einsum_str if isinstance(self, nnx.Einsum) else None
      try:
        spec = _spec_of(self, einsum_str)
        calls = [jax.lax.stop_gradient(inputs)]
      except NotImplementedError as e:  # the optimizer raises unless excluded
        spec, calls = Unsupported(str(e)), []
      entry = LayerInputs(calls, spec, tuple(self.kernel.shape))
      self.sow(_LayerInputsVar, "inputs", entry)
    return call(self, inputs, *args, **kwargs)

  __call__._nysact_original = call
  return __call__


_LOCK = threading.Lock()
_DEPTH = [0]


@contextlib.contextmanager
def _wrapped_layer_classes():
  """Wraps ``__call__`` of the covered classes while any capture runs."""
  with _LOCK:
    if _DEPTH[0] == 0:
      for cls in _LAYER_TYPES:
        cls.__call__ = _wrap(cls.__dict__["__call__"])
    _DEPTH[0] += 1
  try:
    yield
  finally:
    with _LOCK:
      _DEPTH[0] -= 1
      if _DEPTH[0] == 0:
        for cls in _LAYER_TYPES:
          cls.__call__ = cls.__dict__["__call__"]._nysact_original


def _covered(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
  return [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, _LAYER_TYPES)]


@contextlib.contextmanager
def _sowing_into(layers: list[tuple[tuple, nnx.Module]]):
  """Adds our ``Variable`` type to each layer's ``__captures__``; on exit
  removes it again, leaving any captures of an enclosing ``nnx.capture``."""
  had = {}
  for _, layer in layers:
    had[id(layer)] = hasattr(layer, "__captures__")
    existing = tuple(getattr(layer, "__captures__", ()))
    layer.__captures__ = nnx.data(existing + (_LayerInputsVar({}),))
  try:
    yield
  finally:
    for _, layer in layers:
      rest = tuple(
          v for v in getattr(layer, "__captures__", ()) if type(v) is not _LayerInputsVar
      )
      if had[id(layer)]:
        layer.__captures__ = nnx.data(rest)
      elif hasattr(layer, "__captures__"):
        delattr(layer, "__captures__")


def _collect(layers: list[tuple[tuple, nnx.Module]]) -> nnx.State | LayerInputs:
  flat = {}
  for path, layer in layers:
    var = next(v for v in layer.__captures__ if type(v) is _LayerInputsVar)
    calls = var.get_value().get("inputs", ())
    if not calls:  # the layer did not run
      continue
    specs = {(c.spec, c.kernel_shape) for c in calls}
    if len(specs) > 1:
      raise ValueError(
          f"layer {'/'.join(map(str, path))!r} was called with several "
          f"configurations: {sorted(map(str, specs))}"
      )
    flat[path] = LayerInputs(
        [x for c in calls for x in c.inputs], calls[0].spec, calls[0].kernel_shape
    )
  if () in flat:  # the model is itself a layer: its name is ""
    root = flat.pop(())
    if not flat:
      return root
    flat[("",)] = root
  return nnx.State.from_flat_path(flat)


def capture_nnx(fn: nnx.Module | Callable[..., Any]) -> Callable[..., Any]:
  """Wraps an ``nnx.Module`` (or a bound method) to also return layer inputs.

  The returned function has the call signature of ``fn`` and returns
  ``(outputs, activations)``. ``activations`` is an ``nnx.State`` that mirrors
  ``nnx.state(model, nnx.Param)``: each ``nnx.Linear``, ``nnx.LinearGeneral``
  (so ``nnx.MultiHeadAttention``'s projections), ``nnx.Conv`` and
  ``nnx.Einsum`` that ran holds a :class:`LayerInputs` at its module path. A
  layer called several times contributes every call; a module shared at
  several paths appears once, at the path ``nnx.state`` gives it. Inputs are
  ``stop_gradient``-ed. Call it on the model your loss function receives
  (inside ``nnx.grad``/``nnx.jit`` that is the traced copy).

  Args:
    fn: an ``nnx.Module``, or a method bound to one.

  Returns:
    ``f(*args, **kwargs) -> (fn(*args, **kwargs), activations)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(5, 4, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    >>> y, acts = capture_nnx(model)(jnp.ones((3, 5)))
    >>> acts["layers"][2].inputs[0].shape
    (3, 4)
  """
  if not is_nnx(fn):
    raise TypeError(f"capture_nnx needs an nnx.Module or a bound method, got {fn!r}")
  model = fn if isinstance(fn, nnx.Module) else fn.__self__

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    layers = _covered(model)
    with _wrapped_layer_classes(), _sowing_into(layers):
      outputs = fn(*args, **kwargs)
      activations = _collect(layers)
    return outputs, activations

  return wrapped
