"""Capturing layer inputs from flax.linen modules during the forward pass.

The capture intercepts ``__call__`` of the linen classes of
:data:`nysact_optax._kinds.KINDS` with :func:`flax.linen.intercept_methods`
and ``sow``\\ s each input into a private collection, so it rides along the
ordinary forward pass (no extra pass). While a capture runs, flax's lifted
``scan`` and ``vmap`` carry that collection out (stacked on a new leading axis,
as ``variable_axes={"nysact_inputs": 0}`` would) unless the transform already
lists it, so layers under ``nn.RNN``, ``nn.scan`` and ``nn.vmap`` are
captured as written: a layer whose weights the scan shares across time steps
sees every step's input rows (an extra row axis), one whose weights it stacks
sees its own copy's (stack axes first). ``nn.remat`` passes every collection.

:func:`capture_activations` runs one apply so; while
:func:`nysact_optax.value_and_grad` traces the loss, every linen apply
inside it does (through ``flax.core.apply``), and hands its inputs to the
recorder. The layer's configuration is read off the module at trace time and
attached as static metadata. ``flax.nnx`` modules are handled in
:mod:`nysact_optax._capture_nnx`.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.core
import flax.linen as nn
import jax
from flax.core import lift
from flax.core import scope as flax_scope

from nysact_optax import _kinds, _record
from nysact_optax._layers import LayerInputs, Unsupported

__all__ = ["COLLECTION", "capture_activations", "recording_applies"]

COLLECTION = "nysact_inputs"


Calls = dict[tuple[str, ...], list[_record.Call]]


def layer_call(context: Any, args: tuple, kwargs: dict) -> tuple[Any, Any] | None:
  """``(spec, input)`` of an intercepted ``__call__`` of a covered layer,
  else ``None`` (other modules and methods)."""
  if context.method_name != "__call__":
    return None
  kind = _kinds.kind_of(context.module, _kinds.classes("linen"))
  if kind is None:
    return None
  x = args[0] if args else kwargs["inputs"]
  return _record.spec_of(context.module, kind, args[1:], kwargs), x


def kernel_shape(module: nn.Module) -> tuple[int, ...] | None:
  """The shape of a bound layer's kernel (after its call has created it)."""
  kernel = module.variables.get("params", {}).get("kernel")
  kernel = getattr(kernel, "value", kernel)  # nn.Partitioned and other boxes
  return None if kernel is None else tuple(kernel.shape)


class _Thread(threading.local):
  """Per thread: the calls of each running captured apply (innermost last),
  and whether the interceptor is installed."""

  frames: tuple[Calls, ...] = ()
  installed: int = 0


_THREAD = _Thread()


def _interceptor(next_fun, args, kwargs, context):
  frames = _THREAD.frames
  recorder = _record.active()
  found = layer_call(context, args, kwargs) if frames or recorder else None
  if found is None:
    return next_fun(*args, **kwargs)
  spec, x = found
  module = context.module
  if frames and not isinstance(spec, Unsupported):
    module.sow(COLLECTION, "inputs", jax.lax.stop_gradient(x))
  out = next_fun(*args, **kwargs)
  call = _record.Call(spec, kernel_shape(module))
  if frames:
    frames[-1].setdefault(tuple(module.path), []).append(call)
  elif recorder is not None:  # a bound module, outside any apply
    recorder.add(tuple(module.path), [call], [] if isinstance(spec, Unsupported) else [x])
  return out


# While a capture runs, flax's lifted scan and vmap carry our collection out.
_LOCK = threading.Lock()
_DEPTH = [0]


def _with_our_collection(split: Callable[..., Any]) -> Callable[..., Any]:
  @functools.wraps(split)
  def split_in_out_axes(variable_axes):
    if not any(flax_scope.in_filter(f, COLLECTION) for f in variable_axes):
      variable_axes = {**variable_axes, COLLECTION: 0}
    return split(variable_axes)

  split_in_out_axes._nysact_original = split  # type: ignore[attr-defined]
  return split_in_out_axes


@contextlib.contextmanager
def _lifted_transforms_carry_inputs() -> Iterator[None]:
  with _LOCK:
    if _DEPTH[0] == 0 and hasattr(lift, "_split_in_out_axes"):
      lift._split_in_out_axes = _with_our_collection(lift._split_in_out_axes)
    _DEPTH[0] += 1
  try:
    yield
  finally:
    with _LOCK:
      _DEPTH[0] -= 1
      original = getattr(lift._split_in_out_axes, "_nysact_original", None)
      if _DEPTH[0] == 0 and original is not None:
        lift._split_in_out_axes = original


@contextlib.contextmanager
def _intercepting() -> Iterator[None]:
  """The interceptor and the lifted-transform hook, once per thread."""
  with contextlib.ExitStack() as stack:
    if not _THREAD.installed:
      stack.enter_context(nn.intercept_methods(_interceptor))
      stack.enter_context(_lifted_transforms_carry_inputs())
    _THREAD.installed += 1
    try:
      yield
    finally:
      _THREAD.installed -= 1


@contextlib.contextmanager
def _frame() -> Iterator[Calls]:
  """Records the calls of the layers of one captured apply."""
  calls: Calls = {}
  outer = _THREAD.frames
  with _intercepting():
    _THREAD.frames = (*outer, calls)
    try:
      yield calls
    finally:
      _THREAD.frames = outer


def _sown_inputs(sown: Mapping[str, Any], path: tuple[str, ...]) -> tuple[Any, ...]:
  node = sown
  for name in path:
    node = node.get(name, {})
  # None: a lifted transform that lists the collection elsewhere dropped
  # them; the optimizer raises if it needs them.
  return tuple(node.get("inputs", ()))


def _run(
  apply_fn: Callable[..., Any], args: tuple, kwargs: dict
) -> tuple[Any, dict[tuple[str, ...], tuple[list[_record.Call], tuple[Any, ...]]]]:
  """``apply_fn(*args, **kwargs)`` and each layer's calls and inputs."""
  mutable = kwargs.pop("mutable", False)
  ours = COLLECTION if mutable is False else flax_scope.union_filters(mutable, COLLECTION)
  with _frame() as calls:
    outputs, variables = apply_fn(*args, mutable=ours, **kwargs)
  variables = dict(variables)
  sown = variables.pop(COLLECTION, {})
  found = {path: (layer_calls, _sown_inputs(sown, path)) for path, layer_calls in calls.items()}
  return ((outputs, variables) if mutable is not False else outputs), found


def _recording(core_apply: Callable[..., Any]) -> Callable[..., Any]:
  """``flax.core.apply`` whose applies, inside a loss that
  :func:`nysact_optax.value_and_grad` traces, hand their layers' inputs to
  its recorder (those of :func:`capture_activations` keep theirs)."""

  @functools.wraps(core_apply)
  def apply(fn, mutable=False, flags=None):
    inner = core_apply(fn, mutable=mutable, flags=flags)

    @functools.wraps(inner)
    def run(*args, **kwargs):
      recorder = _record.active()
      if recorder is None or _THREAD.frames:
        return inner(*args, **kwargs)
      captured = lambda *a, mutable, **kw: core_apply(fn, mutable=mutable, flags=flags)(*a, **kw)
      outputs, found = _run(captured, args, {**kwargs, "mutable": mutable})
      for path, (layer_calls, inputs) in found.items():
        recorder.add(path, layer_calls, inputs)
      return outputs

    return run

  apply._nysact_original = core_apply  # type: ignore[attr-defined]
  return apply


_APPLY_DEPTH = [0]


@contextlib.contextmanager
def recording_applies() -> Iterator[None]:
  """While :func:`nysact_optax.value_and_grad` traces a loss: every linen
  apply in it records its layers' inputs, and so does every layer of a
  bound module."""
  with _LOCK:
    if _APPLY_DEPTH[0] == 0:
      flax.core.apply = _recording(flax.core.apply)
    _APPLY_DEPTH[0] += 1
  try:
    with _intercepting():
      yield
  finally:
    with _LOCK:
      _APPLY_DEPTH[0] -= 1
      if _APPLY_DEPTH[0] == 0:
        flax.core.apply = getattr(flax.core.apply, "_nysact_original")  # noqa: B009


def capture_activations(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """Wraps a ``flax.linen`` ``Module.apply`` (or an ``nnx.Module``) to also
  return layer inputs.

  The wrapped function takes exactly the arguments of ``apply_fn`` (including
  ``mutable=``, ``rngs=`` and ``method=``) and returns ``(outputs,
  activations)``, where ``outputs`` is what ``apply_fn`` returns and
  ``activations`` maps each covered layer's path (as in
  ``variables['params']``) to a :class:`LayerInputs`. A layer called several
  times contributes every call. The inputs are ``stop_gradient``-ed and add no
  forward or backward pass; pass them to the optimizer's
  ``update(..., activations=activations)``.

  Layers under ``nn.scan``/``nn.vmap`` (``nn.RNN`` included) are captured as
  written: the transforms carry the inputs out on a new leading axis. Where
  the scan shares a layer's weights across steps, that axis is more input
  rows (the statistics cover every time step); where it stacks them
  (``variable_axes={"params": 0}``), it is the layer's stack axis
  (``stack_axes=``).

  Given an ``nnx.Module`` (or a bound method of one, or what ``nnx.capture``
  returns for either), returns a function with the model's call signature;
  see :func:`nysact_optax._capture_nnx.capture_nnx`. With flax's
  ``TrainState``, use :class:`nysact_optax.TrainState`, whose
  ``apply_gradients`` takes ``activations=``.

  Evaluate with the plain apply: jitted for its outputs alone, the captured
  apply compiles to the same program, but returned activations are
  materialised.

  Args:
    apply_fn: ``model.apply`` (or a partial of it), an ``nnx.Module``, a
      method bound to one, or what ``nnx.capture`` returns.

  Returns:
    A function with the same arguments returning ``(outputs, activations)``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
    >>> variables = model.init(jax.random.PRNGKey(0), jnp.ones((3, 5)))
    >>> y, acts = capture_activations(model.apply)(variables, jnp.ones((3, 5)))
    >>> sorted(acts), acts["layers_2"].inputs[0].shape
    (['layers_0', 'layers_2'], (3, 4))
  """

  from nysact_optax import _capture_nnx  # imports flax.nnx only when used

  if _capture_nnx.is_nnx(apply_fn):
    return _capture_nnx.capture_nnx(apply_fn)

  @functools.wraps(apply_fn)
  def wrapped(*args, **kwargs):
    try:
      outputs, found = _run(apply_fn, args, kwargs)
    except TypeError as e:
      if "'mutable'" not in str(e):
        raise
      raise TypeError(
        f"capture_activations took {apply_fn!r} for a flax.linen apply and "
        f"passed it mutable=, which it does not accept ({e}). Pass a linen "
        "model's apply (model.apply), an nnx.Module or a method bound to "
        "one; to combine with nnx.capture, use "
        "nnx.capture(capture_activations(model), ...)"
      ) from e
    activations: dict[str, LayerInputs] = {}
    for path, (layer_calls, inputs) in found.items():
      name = "/".join(path)
      activations[name] = _record.layer_inputs(name, layer_calls, inputs)
    return outputs, activations

  return wrapped
