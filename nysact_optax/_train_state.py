"""A ``flax.training.train_state.TrainState`` that passes activations on.

Flax's ``TrainState.apply_gradients(grads=...)`` calls ``tx.update(grads,
opt_state, params)`` with no way to add ``activations=``, which NysAct needs.
:class:`TrainState` is the same class with ``apply_gradients`` taking
``activations=`` (and ``statistics=``) and handing them to ``tx.update``;
everything else (``create``, ``replace``, fields added by subclasses such as
``batch_stats``, serialization, fp8's overwrite-with-gradient) is flax's.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import optax
from flax.training import train_state

from nysact_optax._accumulate import GradsWithStatistics
from nysact_optax._state import ScaleByNysActState

__all__ = ["TrainState", "apply_gradients"]


def _needs_activations(opt_state: Any) -> bool:
  """Whether ``opt_state`` holds a NysAct state with layers to precondition."""
  is_state = lambda x: isinstance(x, ScaleByNysActState)
  return any(is_state(s) and s.layers for s in jax.tree.leaves(opt_state, is_leaf=is_state))


class TrainState(train_state.TrainState):
  """Flax's ``TrainState`` whose ``apply_gradients`` takes ``activations=``.

  Use it in place of ``flax.training.train_state.TrainState`` (subclass it
  the same way, e.g. to add ``batch_stats``) and pass the activations that
  :func:`~nysact_optax.capture_activations` returns:
  ``state.apply_gradients(grads=grads, activations=acts)``. With any other
  optax optimizer the extra arguments are ignored, so one train step serves
  both.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, nysact_optax
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> x, y = jnp.ones((16, 4)), jnp.zeros((16,), jnp.int32)
    >>> state = nysact_optax.TrainState.create(
    ...     apply_fn=model.apply, params=model.init(jax.random.PRNGKey(0), x)["params"],
    ...     tx=nysact_optax.nysact(0.1, rank=4))
    >>> @jax.jit
    ... def train_step(state, x, y):
    ...   def loss_fn(params):
    ...     logits, acts = nysact_optax.capture_activations(state.apply_fn)({"params": params}, x)
    ...     return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), acts
    ...   (loss, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    ...   return state.apply_gradients(grads=grads, activations=acts), loss
    >>> state, loss = train_step(state, x, y)
    >>> int(state.step)
    1
  """

  def apply_gradients(self, *, grads, activations=None, statistics=None, **kwargs):
    """Updates ``step``, ``params`` and ``opt_state`` as flax's does, passing
    ``activations=`` and ``statistics=`` on to ``tx.update``.

    Args:
      grads: gradients with the structure of ``params``, or the
        :class:`~nysact_optax.GradsWithStatistics` of
        ``nysact_optax.value_and_grad(..., statistics_for=...)``.
      activations: what :func:`~nysact_optax.capture_activations` returned
        for the batch of these gradients.
      statistics: instead of ``activations``, averaged
        :func:`~nysact_optax.sketched_statistics` (gradient accumulation).
      **kwargs: other fields to ``replace`` (such as ``batch_stats``).

    Returns:
      The updated state, with the same ``tx``.

    Raises:
      ValueError: ``tx`` is NysAct and neither ``activations`` nor
        ``statistics`` was given.

    Examples:
      >>> import jax.numpy as jnp, nysact_optax
      >>> params = {"dense": {"kernel": jnp.ones((3, 2))}}
      >>> state = nysact_optax.TrainState.create(apply_fn=None, params=params,
      ...                                        tx=nysact_optax.nysact(0.1))
      >>> state.apply_gradients(grads=params)
      Traceback (most recent call last):
      ...
      ValueError: TrainState.apply_gradients(grads=...) needs activations=...: ...
    """
    grads, activations, statistics = _unpack(grads, activations, statistics)
    extra = _extra_args(
      self.opt_state,
      activations,
      statistics,
      "TrainState.apply_gradients(grads=...) needs activations=... with a "
      "NysAct optimizer: take the gradient with "
      "nysact_optax.value_and_grad(loss_fn, ...) in place of "
      "jax.value_and_grad(loss_fn, ...); it returns ((value, grads), "
      "activations). Pass them: state.apply_gradients(grads=grads, "
      "activations=activations)",
    )
    return _with_extra_args(self, grads, extra, kwargs, super().apply_gradients)


def _unpack(grads, activations, statistics):
  """``(grads, activations, statistics)`` with a
  :class:`~nysact_optax.GradsWithStatistics` ``grads`` split into its parts."""
  if not isinstance(grads, GradsWithStatistics):
    return grads, activations, statistics
  if activations is not None or statistics is not None:
    given = "activations=" if activations is not None else "statistics="
    raise ValueError(
      f"apply_gradients got grads= with statistics (from value_and_grad(..., "
      f"statistics_for=...)) and {given} as well: pass one"
    )
  return grads.grads, None, grads.statistics


def _extra_args(opt_state, activations, statistics, missing: str) -> dict[str, Any]:
  """The extra arguments given, or ``ValueError(missing)`` when a NysAct
  state needs them and neither was given."""
  extra = {"activations": activations, "statistics": statistics}
  extra = {k: v for k, v in extra.items() if v is not None}
  if not extra and _needs_activations(opt_state):
    raise ValueError(missing)
  return extra


def _with_extra_args(state, grads, extra, kwargs, apply):
  """``apply(grads=grads, **kwargs)`` on ``state`` with its ``tx.update``
  given ``**extra``; the result keeps the original ``tx``."""
  tx = state.tx
  with_extra = optax.with_extra_args_support(tx)  # other optimizers ignore them
  bound = optax.GradientTransformationExtraArgs(
    with_extra.init, functools.partial(with_extra.update, **extra)
  )
  new = apply.__func__(state.replace(tx=bound), grads=grads, **kwargs)
  return new.replace(tx=tx)


def apply_gradients(
  state: train_state.TrainState,
  *,
  grads: Any,
  activations: Any = None,
  statistics: Any = None,
  **kwargs: Any,
) -> train_state.TrainState:
  """``state.apply_gradients(grads=grads, **kwargs)`` for flax's own
  ``TrainState`` (or a subclass), with ``activations=`` passed to ``tx.update``.

  Flax's ``TrainState.apply_gradients`` cannot hand ``activations=`` to the
  optimizer; this function can, so that a linen train step keeps its
  ``TrainState`` class unchanged and swaps one line:
  ``state = nysact_optax.apply_gradients(state, grads=grads,
  activations=acts)``. Fields added by subclasses go in ``**kwargs`` as with
  flax (``batch_stats=...``). With any other optax optimizer the extra
  arguments are ignored.

  Args:
    state: a ``flax.training.train_state.TrainState`` (or subclass, or
      :class:`~nysact_optax.TrainState`).
    grads: gradients with the structure of ``state.params``, or the
      :class:`~nysact_optax.GradsWithStatistics` of
      ``nysact_optax.value_and_grad(..., statistics_for=...)`` (gradients
      and update in separate jitted functions).
    activations: what :func:`~nysact_optax.value_and_grad` or
      :func:`~nysact_optax.capture_activations` returned for this batch.
    statistics: instead of ``activations``, averaged
      :func:`~nysact_optax.sketched_statistics`.
    **kwargs: other fields to ``replace``.

  Returns:
    The updated state, of the same class and with the same ``tx``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, nysact_optax
    >>> from flax.training import train_state
    >>> model = nn.Dense(2)
    >>> x = jnp.ones((8, 3))
    >>> state = train_state.TrainState.create(
    ...     apply_fn=model.apply, params=model.init(jax.random.PRNGKey(0), x)["params"],
    ...     tx=nysact_optax.nysact(0.1, rank=2))
    >>> loss_fn = lambda params: jnp.mean(state.apply_fn({"params": params}, x) ** 2)
    >>> (loss, grads), acts = nysact_optax.value_and_grad(loss_fn)(state.params)
    >>> state = nysact_optax.apply_gradients(state, grads=grads, activations=acts)
    >>> int(state.step)
    1
  """
  grads, activations, statistics = _unpack(grads, activations, statistics)
  if isinstance(state, TrainState):
    return state.apply_gradients(
      grads=grads, activations=activations, statistics=statistics, **kwargs
    )
  extra = _extra_args(
    state.opt_state,
    activations,
    statistics,
    "nysact_optax.apply_gradients(state, grads=...) needs activations=... "
    "with a NysAct optimizer: take the gradient with "
    "nysact_optax.value_and_grad(loss_fn, ...), which returns ((value, "
    "grads), activations)",
  )
  return _with_extra_args(state, grads, extra, kwargs, state.apply_gradients)
