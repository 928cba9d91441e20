"""Capturing layer inputs from flax.linen modules during the forward pass.

The capture intercepts ``__call__`` of ``nn.Dense``, ``nn.DenseGeneral``,
``nn.Conv`` and ``nn.Einsum`` with :func:`flax.linen.intercept_methods` and
``sow``s each input into a private collection, so it rides along the ordinary
forward pass (no extra pass) and through flax's lifted transforms
(``nn.remat``; ``nn.scan``/``nn.vmap`` when they list the collection in
``variable_axes``). The layer's configuration is read off the module at trace
time and attached as static metadata. ``flax.nnx`` modules are handled in
:mod:`nysact_optax._capture_nnx`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from flax.core import scope as flax_scope

from nysact_optax import _record
from nysact_optax._layers import LayerInputs, Unsupported

__all__ = ["COLLECTION", "capture_activations"]

COLLECTION = "nysact_inputs"

# Order matters where classes are related; see _record.spec_of for each kind.
_KINDS = (
  (nn.Einsum, "einsum"),
  (nn.Dense, "dense"),
  (nn.DenseGeneral, "general"),
  (nn.Conv, "conv"),
)


def _kind(module: nn.Module) -> str | None:
  return next((kind for cls, kind in _KINDS if isinstance(module, cls)), None)


def layer_call(context: Any, args: tuple, kwargs: dict) -> tuple[Any, Any] | None:
  """``(spec, input)`` of an intercepted ``__call__`` of a covered layer,
  else ``None`` (other modules and methods)."""
  module = context.module
  kind = _kind(module) if context.method_name == "__call__" else None
  if kind is None:
    return None
  einsum_str = kwargs.get("einsum_str") or (args[1] if kind == "einsum" and len(args) > 1 else None)
  x = args[0] if args else kwargs["inputs"]
  return _record.spec_of(module, kind, einsum_str), x


def kernel_shape(module: nn.Module) -> tuple[int, ...] | None:
  """The shape of a bound layer's kernel (after its call has created it)."""
  kernel = module.variables.get("params", {}).get("kernel")
  kernel = getattr(kernel, "value", kernel)  # nn.Partitioned and other boxes
  return None if kernel is None else tuple(kernel.shape)


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

  Layers under ``nn.scan``/``nn.vmap`` with stacked parameters are captured
  when the transform lists ``"nysact_inputs"`` in ``variable_axes`` beside
  ``"params"`` (same axis, 0); their inputs then carry the stack axis first.

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
    calls: dict[tuple[str, ...], list[_record.Call]] = {}

    def interceptor(next_fun, call_args, call_kwargs, context):
      found = layer_call(context, call_args, call_kwargs)
      if found is None:
        return next_fun(*call_args, **call_kwargs)
      spec, x = found
      module = context.module
      if not isinstance(spec, Unsupported):
        module.sow(COLLECTION, "inputs", jax.lax.stop_gradient(x))
      out = next_fun(*call_args, **call_kwargs)
      calls.setdefault(tuple(module.path), []).append(_record.Call(spec, kernel_shape(module)))
      return out

    mutable = kwargs.pop("mutable", False)
    user_mutable = mutable is not False
    ours = COLLECTION if mutable is False else flax_scope.union_filters(mutable, COLLECTION)
    with nn.intercept_methods(interceptor):
      try:
        outputs, variables = apply_fn(*args, mutable=ours, **kwargs)
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
    variables = dict(variables)
    sown = variables.pop(COLLECTION, {})
    activations: dict[str, LayerInputs] = {}
    for path, layer_calls in calls.items():
      node = sown
      for name in path:
        node = node.get(name, {})
      # No inputs: a lifted transform (nn.scan without the collection in
      # variable_axes) dropped them; the optimizer raises if it needs them.
      inputs = node.get("inputs", ())
      name = "/".join(path)
      activations[name] = _record.layer_inputs(name, layer_calls, inputs)
    if user_mutable:
      outputs = (outputs, variables)
    return outputs, activations

  return wrapped
