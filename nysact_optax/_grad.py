"""Gradients and layer inputs in one call: ``nysact_optax.value_and_grad``.

:func:`capture_activations` wraps the model's apply, so its activations must
be threaded out of the loss through ``has_aux``. :func:`value_and_grad` and
:func:`grad` take the loss function as it is and record the inputs of every
covered layer that runs inside it, so that swapping ``jax.value_and_grad`` for
``nysact_optax.value_and_grad`` is the whole change to a train step's
gradient line:

- ``flax.linen`` layers (those of :data:`nysact_optax._kinds.KINDS`) of
  every apply inside the loss (``state.apply_fn``, a ``mutable=`` apply), as
  :func:`capture_activations` captures them, layers under ``nn.scan``,
  ``nn.RNN`` and ``nn.remat`` included;
- ``flax.nnx`` layers (``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Conv``,
  ``nnx.Einsum``) of an ``nnx.Module`` argument, through the wrapped
  ``__call__`` of :mod:`nysact_optax._capture_nnx`; an ``nnx.capture`` inside
  the loss keeps its own intermediates; layers under ``nnx.scan`` (``nnx.RNN``
  included) hand their inputs out of the scan stacked on a leading axis, as
  ``nn.scan``'s do. NNX arguments are differentiated with
  ``nnx.value_and_grad``.

The inputs are recorded where the loss itself is traced. A layer that runs
under a further JAX transform inside the loss that flax does not lift
(``jax.vmap`` around an apply, ``nnx.remat``, ``nnx.jit``) cannot hand its
inputs out that way; it raises and names :func:`capture_activations`.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax

from nysact_optax import _accumulate, _capture, _record
from nysact_optax._accumulate import GradsWithStatistics

__all__ = ["grad", "value_and_grad"]


def _nnx_argnums(args: Sequence[Any], argnums: int | Sequence[int]) -> list[int]:
  """The differentiated positions that hold an ``nnx.Module``."""
  if "flax.nnx" not in sys.modules:  # then no argument is one
    return []
  from flax import nnx

  nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
  return [i for i in nums if i < len(args) and isinstance(args[i], nnx.Module)]


def value_and_grad(
  fun: Callable[..., Any],
  argnums: int | Sequence[int] = 0,
  has_aux: bool = False,
  *,
  statistics_for: Any = None,
  **kwargs: Any,
) -> Callable[..., tuple[Any, Any]]:
  """``jax.value_and_grad`` that also returns the layer inputs NysAct needs.

  ``fun`` is the loss function as written for any optax optimizer: it calls
  the model (``state.apply_fn(...)``, ``model.apply(...)``, or an
  ``nnx.Module``) however it likes. The returned function returns ``(what
  jax.value_and_grad returns, activations)``: ``((value, grads),
  activations)``, or ``(((value, aux), grads), activations)`` with
  ``has_aux=True``. Pass the activations to the optimizer:
  ``tx.update(grads, opt_state, params, activations=activations)``,
  :func:`~nysact_optax.apply_gradients` (flax's ``TrainState``) or
  ``nnx.Optimizer.update(model, grads, activations=activations)``.

  With ``statistics_for=`` (the optimizer state, a ``TrainState`` or an
  ``nnx.Optimizer``), the activations are reduced to the optimizer's
  ``p x r`` sketched statistics per layer (:func:`~nysact_optax.sketched_statistics`)
  inside the call, and the returned function returns what
  ``jax.value_and_grad`` returns, ``(value, grads)``, with ``grads`` a
  :class:`~nysact_optax.GradsWithStatistics`. This is the form for gradients
  and update in separate jitted functions (Flax's mnist ``apply_model`` /
  ``update_model``): the statistics cross the boundary instead of the
  activations, which die inside the jitted function, and
  ``nysact_optax.apply_gradients(state, grads=grads)`` takes them.
  Build it inside the jitted function, from the state the update will be
  applied to: the statistics use that state's sketch and step count.

  Where ``argnums`` selects an ``nnx.Module``, the gradient is taken with
  ``nnx.value_and_grad`` (so ``grads`` is an ``nnx.State``), and the
  activations mirror ``nnx.state(model, nnx.Param)``; otherwise with
  ``jax.value_and_grad``, and the activations map each linen layer's path in
  ``variables['params']`` to its :class:`~nysact_optax.LayerInputs`.

  Args:
    fun: the loss function.
    argnums: which positional argument(s) to differentiate, as in
      ``jax.value_and_grad``.
    has_aux: whether ``fun`` returns ``(loss, aux)``.
    statistics_for: the optimizer state (of :func:`~nysact_optax.nysact`,
      :func:`~nysact_optax.nysact_adam`, or any chain holding one
      :class:`~nysact_optax.ScaleByNysActState`), or an object with an
      ``opt_state`` (a flax ``TrainState``, an ``nnx.Optimizer``), whose
      next update the gradients are for; see above.
    **kwargs: passed on to ``jax.value_and_grad`` (or
      ``nnx.value_and_grad``), e.g. ``allow_int``.

  Returns:
    ``f(*args, **kw) -> (jax.value_and_grad(fun, ...)(*args, **kw),
    activations)``; with ``statistics_for``, ``f(*args, **kw) -> (value,
    GradsWithStatistics(grads, statistics))``.

  Raises:
    ValueError: a covered layer runs under a further JAX transform inside
      ``fun`` (use :func:`~nysact_optax.capture_activations` there), or a
      layer is called with two configurations.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, nysact_optax
    >>> model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(1)])
    >>> x = jnp.ones((3, 5))
    >>> params = model.init(jax.random.PRNGKey(0), x)["params"]
    >>> def loss_fn(params):
    ...   return jnp.mean(model.apply({"params": params}, x) ** 2)
    >>> (loss, grads), acts = nysact_optax.value_and_grad(loss_fn)(params)
    >>> sorted(acts), acts["layers_2"].inputs[0].shape
    (['layers_0', 'layers_2'], (3, 4))
    >>> tx = nysact_optax.nysact(0.1, rank=2)
    >>> opt_state = tx.init(params)
    >>> updates, _ = tx.update(grads, opt_state, params, activations=acts)

    The split form: statistics in place of the activations.

    >>> grad_fn = nysact_optax.value_and_grad(loss_fn, statistics_for=opt_state)
    >>> loss, grads = jax.jit(grad_fn)(params)
    >>> grads.statistics["layers_0"].shape  # p x r: 5 inputs and the bias, rank 2
    (6, 2)
    >>> updates, opt_state = tx.update(
    ...     grads.grads, opt_state, params, statistics=grads.statistics)
  """

  @functools.wraps(fun)
  def call(*args, **call_kwargs):
    modules = _nnx_argnums(args, argnums)
    if len(modules) > 1:
      raise ValueError(
        f"nysact_optax.value_and_grad differentiates {len(modules)} nnx.Modules "
        f"(argnums={argnums!r}); the activations mirror one model: "
        "differentiate one, or capture each with capture_activations"
      )

    def inner(*inner_args, **inner_kwargs):
      with contextlib.ExitStack() as contexts:
        nnx_paths = {}
        if modules:
          from nysact_optax import _capture_nnx

          layers = _capture_nnx.covered(inner_args[modules[0]])
          nnx_paths = {id(layer): path for path, layer in layers}
          contexts.enter_context(_capture_nnx.wrapped_layer_classes())
          # the copies nnx.scan makes of the layers know their paths
          contexts.enter_context(
            _capture_nnx.marked(layers, _capture_nnx.RECORD_MARK, lambda path: path)
          )
        recorder = contexts.enter_context(_record.recording(_record.Recorder(nnx_paths)))
        contexts.enter_context(_capture.recording_applies())
        out = fun(*inner_args, **inner_kwargs)
      loss, aux = out if has_aux else (out, None)
      return loss, (aux, recorder.activations(bool(modules)))

    opt_state = None if statistics_for is None else _opt_state(statistics_for)
    if modules:
      from flax import nnx

      differentiate = nnx.value_and_grad(inner, argnums=argnums, has_aux=True, **kwargs)
    else:
      differentiate = jax.value_and_grad(inner, argnums=argnums, has_aux=True, **kwargs)
    (loss, (aux, activations)), grads = differentiate(*args, **call_kwargs)
    value = (loss, aux) if has_aux else loss
    if opt_state is None:
      return (value, grads), activations
    with jax.named_scope("nysact/split_step_statistics"):
      statistics = _accumulate.chunked_statistics(opt_state, activations)
    return value, GradsWithStatistics(grads, statistics)

  return call


def _opt_state(statistics_for: Any) -> Any:
  """The optimizer state that ``statistics_for=`` names: itself, or the
  ``opt_state`` of a flax ``TrainState`` or an ``nnx.Optimizer`` (its
  ``Variable``\\ s unwrapped)."""
  opt_state = statistics_for
  if not isinstance(statistics_for, tuple) and hasattr(statistics_for, "opt_state"):
    opt_state = statistics_for.opt_state
  if "flax.nnx" in sys.modules:
    from flax import nnx

    opt_state = nnx.pure(opt_state)
  return opt_state


def grad(
  fun: Callable[..., Any],
  argnums: int | Sequence[int] = 0,
  has_aux: bool = False,
  *,
  statistics_for: Any = None,
  **kwargs: Any,
) -> Callable[..., Any]:
  """``jax.grad`` that also returns the layer inputs NysAct needs.

  As :func:`value_and_grad`, returning ``(grads, activations)``, or
  ``((grads, aux), activations)`` with ``has_aux=True``. With
  ``statistics_for=``, what ``jax.grad`` returns, the gradients a
  :class:`~nysact_optax.GradsWithStatistics`: ``grads``, or ``(grads, aux)``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, nysact_optax
    >>> model = nn.Dense(2)
    >>> x = jnp.ones((4, 3))
    >>> params = model.init(jax.random.PRNGKey(0), x)["params"]
    >>> loss_fn = lambda p: jnp.sum(model.apply({"params": p}, x))
    >>> grads, acts = nysact_optax.grad(loss_fn)(params)
    >>> grads["kernel"].shape, acts[""].inputs[0].shape
    ((3, 2), (4, 3))
  """
  fn = value_and_grad(fun, argnums, has_aux, statistics_for=statistics_for, **kwargs)

  @functools.wraps(fun)
  def call(*args, **call_kwargs):
    if statistics_for is not None:
      value, grads = fn(*args, **call_kwargs)
      return (grads, value[1]) if has_aux else grads
    ((value, grads), activations) = fn(*args, **call_kwargs)
    return ((grads, value[1]) if has_aux else grads), activations

  return call
