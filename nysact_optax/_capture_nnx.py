"""Capturing layer inputs from ``flax.nnx`` modules during the forward pass.

NNX has no method interceptor. While a captured call runs, ``__call__`` of
the NNX classes of :data:`nysact_optax._kinds.KINDS` (``nnx.Linear``,
``nnx.LinearGeneral``, ``nnx.Conv``, ``nnx.Einsum``) is wrapped (class
attribute, reference-counted, restored on exit and on exceptions) so that
each of those layers sows its input into a private ``Variable`` type,
through the same ``__captures__`` protocol that ``nnx.capture`` sets up.
Only the layer instances of the captured model carry that ``Variable``
type, so other models (and other threads) are untouched, and an enclosing
``nnx.capture`` of the user keeps its own intermediates. The sown values
are module state, so they flow through NNX's lifted transforms
(``nnx.remat``, ...) like any other.

``nnx.MultiHeadAttention`` is covered through its ``LinearGeneral``
projections (``query``, ``key``, ``value``, ``out``).

With the user's ``nnx.capture`` either order works. Outside ours it sets up
``__captures__`` first and we add our type to it; the captured call is a
method bound to the model, so ``nnx.capture`` finds the model as it does for
``model.__call__``. Inside ours it would replace our type, so
``capture_nnx(nnx.capture(f, *types))`` is run as
``nnx.capture(capture_nnx(f), *types)`` with the results reordered.

Layers under ``nnx.scan`` (``nnx.RNN`` included) run on copies of the model's
layers that the scan rebuilds in its body, whose state must leave each step
with the structure it entered with. While a capture runs, each covered layer
carries its path as a static attribute (which the copies keep), and
``jax.lax.scan`` (which ``nnx.scan`` calls) is wrapped: inside its body the
layers hand their inputs to the scan instead of sowing or recording them,
the body returns them as extra outputs, and after the scan they reach the
capture or the recorder stacked on a new leading axis, as the linen capture
does for ``nn.scan``: a layer whose weights the scan shares across steps
(a recurrent cell's projections) sees every step's input rows.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import types
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from flax import nnx
from flax.core import tracers

from nysact_optax import _kinds, _record
from nysact_optax._layers import LayerInputs, Unsupported

__all__ = ["capture_nnx", "is_nnx"]


def _layer_types() -> tuple[type, ...]:
  return tuple(cls for cls, _ in _kinds.classes("nnx"))


class _LayerInputsVar(nnx.Intermediate):
  """The private ``Variable`` type the wrapped layers sow their inputs into."""


def is_nnx(fn: Any) -> bool:
  """Whether ``fn`` is an ``nnx.Module``, a method bound to one, or what
  ``nnx.capture`` returns.

  Examples:
    >>> from flax import nnx
    >>> layer = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> is_nnx(layer), is_nnx(nnx.capture(layer, nnx.Intermediate)), is_nnx(len)
    (True, True, False)
  """
  return (
    isinstance(fn, nnx.Module)
    or (inspect.ismethod(fn) and isinstance(fn.__self__, nnx.Module))
    or _nnx_capture_parts(fn) is not None
  )


def _nnx_capture_parts(fn: Any) -> dict[str, Any] | None:
  """``fn``, ``var_types``, ``init``, ``method_outputs`` and
  ``module_instance`` of a function made by ``nnx.capture``, else ``None``."""
  code = getattr(fn, "__code__", None)
  if code is None or code is not _NNX_CAPTURE_CODE:
    return None
  parts = inspect.getclosurevars(fn).nonlocals
  names = ("fn", "var_types", "init", "method_outputs", "module_instance")
  if not all(n in parts for n in names):  # a flax we do not know: say what works
    raise TypeError(
      "capture_activations cannot look inside this flax version's "
      "nnx.capture; put nnx.capture outside instead: "
      "nnx.capture(nysact_optax.capture_activations(model), ...)"
    )
  return {n: parts[n] for n in names}


def _nnx_capture_code():
  """The code object of the functions ``nnx.capture`` returns."""
  return getattr(nnx.capture(lambda module: None), "__code__", None)


_NNX_CAPTURE_CODE = _nnx_capture_code()


def _kind(layer: nnx.Module) -> _kinds.LayerKind:
  kind = _kinds.kind_of(layer, _kinds.classes("nnx"))
  if kind is None:  # only covered layers are wrapped or walked
    raise TypeError(f"{type(layer).__name__} is not a covered layer")
  return kind


def _ours(layer: nnx.Module) -> bool:
  return any(type(v) is _LayerInputsVar for v in getattr(layer, "__captures__", ()))


# Static attributes a covered layer carries while a capture runs (the copies
# that NNX transforms make keep them): its path for the recorder of
# nysact_optax.value_and_grad, and (capture id, path) for capture_activations.
RECORD_MARK = "_nysact_recorded_path"
_CAPTURE_MARK = "_nysact_captured_path"


class _Thread(threading.local):
  """Per thread: the running captures (by id), the entries of each running
  scan body (innermost last), and how many captures wrap ``jax.lax.scan``."""

  def __init__(self) -> None:
    self.captures: dict[int, _CaptureFrame] = {}
    self.scans: list[list[_Entry]] = []
    self.depth = 0


class _CaptureFrame:
  """The inputs that scans hand to one :func:`capture_nnx` call, by path."""

  def __init__(self) -> None:
    self.trace = tracers.current_trace()
    self.calls: dict[tuple[Any, ...], list[LayerInputs]] = {}


class _Entry(NamedTuple):
  """One call of a layer inside a scan body: where its inputs go (``None``:
  the recorder; else the id of a capture), its path, the call and the inputs."""

  capture: int | None
  path: tuple[Any, ...]
  call: _record.Call
  inputs: list[Any]


_THREAD = _Thread()


def _wrap(call: Callable[..., Any]) -> Callable[..., Any]:
  @functools.wraps(call)
  def __call__(self, inputs, *args, **kwargs):
    recorder = _record.active()
    path = None
    if recorder is not None:  # a copy made by an NNX transform has the mark
      path = recorder.nnx_paths.get(id(self), getattr(self, RECORD_MARK, None))
    ours = _ours(self)
    if ours or path is not None:
      spec = _record.spec_of(self, _kind(self), args, kwargs)
      one = _record.Call(spec, tuple(self.kernel.shape))
      xs = [] if isinstance(spec, Unsupported) else [jax.lax.stop_gradient(inputs)]
      mark = getattr(self, _CAPTURE_MARK, None) if ours else None
      if _THREAD.scans and (path is not None or mark is not None):  # out as scan outputs
        if path is not None:
          _THREAD.scans[-1].append(_Entry(None, path, one, xs))
        if mark is not None:
          _THREAD.scans[-1].append(_Entry(mark[0], mark[1], one, xs))
      else:
        if recorder is not None and path is not None:  # nysact_optax.value_and_grad
          recorder.add(path, [one], xs)
        if ours:  # capture_activations
          self.sow(_LayerInputsVar, "inputs", LayerInputs(xs, spec, one.kernel_shape))
    return call(self, inputs, *args, **kwargs)

  __call__._nysact_original = call  # type: ignore[attr-defined]
  return __call__


def _deliver(entries: list[_Entry]) -> None:
  """Hands the inputs of layers that ran inside a scan body (stacked by the
  scan) to the enclosing scan body, the recorder or the capture."""
  if _THREAD.scans:
    _THREAD.scans[-1].extend(entries)
    return
  recorder = _record.active()
  for entry in entries:
    if entry.capture is None:
      if recorder is not None:
        recorder.add(entry.path, [entry.call], entry.inputs)
      continue
    frame = _THREAD.captures.get(entry.capture)
    if frame is None:  # that capture has ended
      continue
    if tracers.current_trace() != frame.trace:
      name = "/".join(map(str, entry.path))
      raise ValueError(
        f"layer {name!r} runs under nnx.scan inside a further JAX transform "
        "(nnx.jit, nnx.remat, nnx.vmap, ...) inside the captured call, where "
        "capture_activations cannot hand its inputs out; capture inside that "
        "transform instead"
      )
    frame.calls.setdefault(entry.path, []).append(
      LayerInputs(entry.inputs, entry.call.spec, entry.call.kernel_shape)
    )


def _collecting_scan(scan: Callable[..., Any]) -> Callable[..., Any]:
  """``jax.lax.scan`` whose body, while a capture runs in this thread, also
  returns the inputs of the covered layers that ran in it, stacked."""

  @functools.wraps(scan)
  def collecting_scan(f, init, xs=None, *args, **kwargs):
    if not _THREAD.depth:
      return scan(f, init, xs, *args, **kwargs)
    found: list[_Entry] = []

    def body(carry, x):
      _THREAD.scans.append([])
      try:
        carry, y = f(carry, x)
      finally:
        entries = _THREAD.scans.pop()
      found[:] = [e._replace(inputs=[]) for e in entries]  # the last trace's
      return carry, (y, [e.inputs for e in entries])

    carry, (ys, stacked) = scan(body, init, xs, *args, **kwargs)
    _deliver([e._replace(inputs=list(x)) for e, x in zip(found, stacked, strict=True)])
    return carry, ys

  collecting_scan._nysact_original = scan  # type: ignore[attr-defined]
  return collecting_scan


_LOCK = threading.Lock()
_DEPTH = [0]


@contextlib.contextmanager
def wrapped_layer_classes():
  """Wraps ``__call__`` of the covered classes, and ``jax.lax.scan``, while
  any capture runs."""
  with _LOCK:
    if _DEPTH[0] == 0:
      for cls in _layer_types():
        setattr(cls, "__call__", _wrap(cls.__dict__["__call__"]))  # noqa: B010
      jax.lax.scan = _collecting_scan(jax.lax.scan)
    _DEPTH[0] += 1
  _THREAD.depth += 1
  try:
    yield
  finally:
    _THREAD.depth -= 1
    with _LOCK:
      _DEPTH[0] -= 1
      if _DEPTH[0] == 0:
        for cls in _layer_types():
          setattr(cls, "__call__", cls.__dict__["__call__"]._nysact_original)  # noqa: B010
        jax.lax.scan = getattr(jax.lax.scan, "_nysact_original", jax.lax.scan)


@contextlib.contextmanager
def marked(layers: list[tuple[tuple, nnx.Module]], name: str, value: Callable[[tuple], Any]):
  """Sets the static attribute ``name`` of each layer to ``value(path)`` while
  the block runs (the copies NNX's transforms make keep it); removes it on
  exit."""
  for path, layer in layers:
    setattr(layer, name, value(path))
  try:
    yield
  finally:
    for _, layer in layers:
      if name in vars(layer):
        delattr(layer, name)


def covered(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
  return [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, _layer_types())]


def input_axes_of(model: nnx.Module) -> dict[str, tuple[int, ...]]:
  """The kernel input axes of every covered layer of an NNX model, by path.

  Read off the live modules (an ``nnx.Einsum``'s equation, an
  ``nnx.LinearGeneral``'s ``axis``), so that the optimizer's layouts are
  exact at ``init`` even where the parameter shapes cannot tell (a bias-free
  ``Einsum`` whose contracted axis is not leading). Layers whose equation is
  only given at call time, or that cannot be preconditioned, are left out.

  Examples:
    >>> from flax import nnx
    >>> layer = nnx.Einsum("btd,ndh->btnh", (2, 4, 3), rngs=nnx.Rngs(0))
    >>> input_axes_of(layer)
    {'': (1,)}
  """
  axes = {}
  for path, layer in covered(model):
    kind = _kind(layer)
    if kind.name == "einsum" and not getattr(layer, "einsum_str", None):
      continue
    spec = _record.spec_of(layer, kind)
    if not isinstance(spec, Unsupported):
      axes["/".join(map(str, path))] = tuple(spec.kernel_input_axes)
  return axes


@contextlib.contextmanager
def _sowing_into(layers: list[tuple[tuple, nnx.Module]]):
  """Adds our ``Variable`` type to each layer's ``__captures__``; on exit
  removes it again, leaving any captures of an enclosing ``nnx.capture``."""
  had = {}
  for _, layer in layers:
    had[id(layer)] = hasattr(layer, "__captures__")
    existing = tuple(getattr(layer, "__captures__", ()))
    setattr(layer, "__captures__", nnx.data(existing + (_LayerInputsVar({}),)))  # noqa: B010
  try:
    yield
  finally:
    for _, layer in layers:
      rest = tuple(v for v in getattr(layer, "__captures__", ()) if type(v) is not _LayerInputsVar)
      if had[id(layer)]:
        setattr(layer, "__captures__", nnx.data(rest))  # noqa: B010
      elif hasattr(layer, "__captures__"):
        delattr(layer, "__captures__")


def _collect(
  layers: list[tuple[tuple, nnx.Module]], frame: _CaptureFrame
) -> nnx.State | LayerInputs:
  flat = {}
  for path, layer in layers:
    var = next(v for v in getattr(layer, "__captures__") if type(v) is _LayerInputsVar)  # noqa: B009
    calls = (*var.get_value().get("inputs", ()), *frame.calls.get(path, ()))
    if not calls:  # the layer did not run
      continue
    flat[path] = _record.layer_inputs(
      "/".join(map(str, path)),
      [_record.Call(c.spec, c.kernel_shape) for c in calls],
      [x for c in calls for x in c.inputs],
    )
  if () in flat:  # the model is itself a layer: its name is ""
    root = flat.pop(())
    if not flat:
      return root
    flat[("",)] = root
  return nnx.from_flat_state(flat)


def _with_activations(fn: Callable[..., Any], model: nnx.Module | None) -> Callable[..., Any]:
  """``fn`` also returning activations; ``model=None``: the first argument."""

  def call(*args, **kwargs):
    layers = covered(model if model is not None else args[0])
    frame = _CaptureFrame()
    key = id(frame)
    mark = lambda path: (key, path)
    _THREAD.captures[key] = frame
    try:
      with wrapped_layer_classes(), _sowing_into(layers), marked(layers, _CAPTURE_MARK, mark):
        outputs = fn(*args, **kwargs)
        activations = _collect(layers, frame)
    finally:
      del _THREAD.captures[key]
    return outputs, activations

  return call


def _bound(call: Callable[..., Any], model: nnx.Module, like: Any) -> types.MethodType:
  """``call`` as a method bound to ``model``, so that ``nnx.capture`` around
  it finds the model (it looks for a Module or a bound method)."""

  def captured(self, *args, **kwargs):
    del self  # call knows the model
    return call(*args, **kwargs)

  captured.__name__ = captured.__qualname__ = getattr(like, "__name__", type(like).__name__)
  captured.__doc__ = getattr(like, "__doc__", None)
  captured._nysact_capture = True  # type: ignore[attr-defined]
  return types.MethodType(captured, model)


def _is_ours(fn: Any) -> bool:
  return getattr(getattr(fn, "__func__", None), "_nysact_capture", False)


def _around_nnx_capture(parts: dict[str, Any]) -> Callable[..., Any]:
  """``capture_activations(nnx.capture(f, *types))``: runs as
  ``nnx.capture(capture_activations(f), *types)`` (whose capture would
  otherwise replace ours) and returns ``((f's outputs, *states), activations)``."""
  model = parts["module_instance"]
  core = _with_activations(parts["fn"], model)
  if model is not None:
    core = _bound(core, model, parts["fn"])
  swapped = nnx.capture(
    core, *parts["var_types"], init=parts["init"], method_outputs=parts["method_outputs"]
  )

  @functools.wraps(parts["fn"])
  def wrapped(*args, **kwargs):
    result = swapped(*args, **kwargs)
    if not parts["var_types"]:  # nnx.capture then returns the outputs alone
      return result
    (outputs, activations), *states = result
    return (outputs, *states), activations

  return wrapped


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

  With ``nnx.capture`` either order works. ``nnx.capture(capture_nnx(model),
  nnx.Intermediate)(x)`` returns ``((y, activations), intermediates)``, as
  ``nnx.capture`` does for any function; ``capture_nnx(nnx.capture(model,
  nnx.Intermediate))(x)`` returns ``((y, intermediates), activations)``, as
  this function does for any function.

  Args:
    fn: an ``nnx.Module``, a method bound to one, or what ``nnx.capture``
      returns for either (or for a function whose first argument is the
      model).

  Returns:
    ``f(*args, **kwargs) -> (fn(*args, **kwargs), activations)``; for a
    module or a bound method, a method bound to the model (which
    ``nnx.capture`` accepts).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(5, 4, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    >>> y, acts = capture_nnx(model)(jnp.ones((3, 5)))
    >>> acts["layers"][2].inputs[0].shape
    (3, 4)
    >>> (y, inter), acts = capture_nnx(nnx.capture(model, nnx.Intermediate))(jnp.ones((3, 5)))
    >>> acts["layers"][0].inputs[0].shape
    (3, 5)
  """
  parts = _nnx_capture_parts(fn)
  if _is_ours(fn) or (parts is not None and _is_ours(parts["fn"])):
    raise TypeError(
      f"{fn!r} already returns activations: call capture_activations once "
      "(nnx.capture may go inside or outside it)"
    )
  if parts is not None:
    return _around_nnx_capture(parts)
  if not is_nnx(fn):
    raise TypeError(
      f"capture_nnx needs an nnx.Module, a method bound to one or what "
      f"nnx.capture returns, got {fn!r}"
    )
  model = fn if isinstance(fn, nnx.Module) else getattr(fn, "__self__")  # noqa: B009
  return _bound(_with_activations(fn, model), model, fn)
