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
from flax.linen import linear as flax_linear

from nysact_optax._layers import (
    DenseSpec, EinsumSpec, LayerInputs, LayerSpec, Unsupported, conv_spec_of,
)

__all__ = ["capture_activations", "COLLECTION"]

COLLECTION = "nysact_inputs"


def _spec_of(module: nn.Module, call_args=(), call_kwargs=None) -> LayerSpec | None:
  """The spec of a covered module, or ``None`` for anything else."""
  if isinstance(module, nn.Einsum):
    equation = module.einsum_str
    if len(call_args) > 1:
      equation = call_args[1]
    equation = (call_kwargs or {}).get("einsum_str", None) or equation
    return EinsumSpec(equation.replace(" ", ""))
  if isinstance(module, nn.Dense):
    return DenseSpec((-1,))
  if isinstance(module, nn.DenseGeneral):
    if tuple(flax_linear._canonicalize_tuple(module.batch_dims)):
      raise NotImplementedError(
          f"DenseGeneral with batch_dims={module.batch_dims!r} has one kernel "
          "per batch index"
      )
    return DenseSpec(tuple(flax_linear._canonicalize_tuple(module.axis)))
  if isinstance(module, nn.Conv):
    return conv_spec_of(module)
  return None


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

  Given an ``nnx.Module`` (or a bound method of one), returns a function with
  the model's call signature; see :func:`nysact_optax._capture_nnx.capture_nnx`.

  Args:
    apply_fn: ``model.apply`` (or a partial of it), or an ``nnx.Module``.

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
    specs: dict[tuple[str, ...], tuple[LayerSpec, tuple[int, ...] | None]] = {}

    def interceptor(next_fun, call_args, call_kwargs, context):
      module = context.module
      spec = None
      if context.method_name == "__call__":
        try:
          spec = _spec_of(module, call_args, call_kwargs)
        except NotImplementedError as e:  # the optimizer raises unless excluded
          spec = Unsupported(str(e))
        if spec is not None and not isinstance(spec, Unsupported):
          x = call_args[0] if call_args else call_kwargs["inputs"]
          module.sow(COLLECTION, "inputs", jax.lax.stop_gradient(x))
      out = next_fun(*call_args, **call_kwargs)
      if spec is not None:
        kernel = module.variables.get("params", {}).get("kernel")
        kernel = getattr(kernel, "value", kernel)  # nn.Partitioned and other boxes
        entry = (spec, None if kernel is None else tuple(kernel.shape))
        path = tuple(module.path)
        if specs.setdefault(path, entry) != entry:
          raise ValueError(
              f"layer {'/'.join(path)!r} was called with two configurations: "
              f"{specs[path]} and {entry}"
          )
      return out

    mutable = kwargs.pop("mutable", False)
    user_mutable = mutable is not False
    ours = COLLECTION if mutable is False else flax_scope.union_filters(mutable, COLLECTION)
    with nn.intercept_methods(interceptor):
      outputs, variables = apply_fn(*args, mutable=ours, **kwargs)
    variables = dict(variables)
    sown = variables.pop(COLLECTION, {})
    activations: dict[str, LayerInputs] = {}
    for path, (spec, kernel_shape) in specs.items():
      node = sown
      for name in path:
        node = node.get(name, {})
      # No inputs: a lifted transform (nn.scan without the collection in
      # variable_axes) dropped them; the optimizer raises if it needs them.
      inputs = node.get("inputs", ())
      activations["/".join(path)] = LayerInputs(inputs, spec, kernel_shape)
    if user_mutable:
      outputs = (outputs, variables)
    return outputs, activations

  return wrapped
