"""The NysAct optimizer: ``nysact``, a chain around :func:`scale_by_nysact`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import optax

from nysact_optax import _tree
from nysact_optax._transform import scale_by_nysact

__all__ = ["nysact"]


def nysact(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    rank: _tree.RankRule = 10,
    sketch: str = "gaussian",
    damping: float = 1.0,
    stat_decay: float = 0.95,
    cov_update_every: int = 5,
    inv_update_every: int = 50,
    seed: int = 0,
    sketch_refresh: str = "fixed",
    nystrom: str = "stable",
    exclude: _tree.LayerFilter = (),
    input_axes: Mapping[str, int | Sequence[int]] | None = None,
    include: _tree.LayerFilter | None = None,
    stack_axes: Mapping[str, int] | None = None,
    stats_dtype: Any = "float32",
    axis_name: str | None = None,
    relative_damping: bool = False,
    model: Any = None,
    precision: Any = "highest",
) -> optax.GradientTransformationExtraArgs:
  """The NysAct optimizer: precondition, weight decay, heavy-ball momentum, step.

  ``optax.chain(scale_by_nysact(...), add_decayed_weights(weight_decay),
  trace(momentum, nesterov), scale_by_learning_rate(learning_rate))``, the
  order of the authors' code: weight decay is added after preconditioning
  and is not preconditioned.

  Args:
    learning_rate: a float or an optax schedule.
    momentum: heavy-ball momentum (PyTorch style, ``m = mu m + d``).
    nesterov: use Nesterov momentum.
    weight_decay: coefficient of ``params`` added to the preconditioned
      gradient.
    rank, sketch, damping, stat_decay, cov_update_every, inv_update_every,
    seed, sketch_refresh, nystrom, exclude, input_axes, include, stack_axes,
    stats_dtype, axis_name, relative_damping, model, precision: see
    :func:`scale_by_nysact`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; pass ``activations=`` to
    its ``update``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import nysact_optax
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> x = jnp.ones((4, 3))
    >>> params = model.init(jax.random.PRNGKey(0), x)["params"]
    >>> tx = nysact_optax.nysact(0.1, weight_decay=5e-4)
    >>> opt_state = tx.init(params)
    >>> apply = nysact_optax.capture_activations(model.apply)
    >>> def loss(p):
    ...   y, acts = apply({"params": p}, x)
    ...   return jnp.mean(y ** 2), acts
    >>> (_, acts), grads = jax.value_and_grad(loss, has_aux=True)(params)
    >>> updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    >>> params = optax.apply_updates(params, updates)
  """
  # One chain shape whatever the values: a zero weight decay or momentum
  # keeps its (empty or zero) state, as optax's own aliases do, so that a
  # state saved with one setting restores into another.
  return optax.chain(
      scale_by_nysact(
          rank=rank, sketch=sketch, damping=damping, stat_decay=stat_decay,
          cov_update_every=cov_update_every, inv_update_every=inv_update_every,
          seed=seed, sketch_refresh=sketch_refresh, nystrom=nystrom,
          exclude=exclude, input_axes=input_axes, include=include,
          stack_axes=stack_axes, stats_dtype=stats_dtype, axis_name=axis_name,
          relative_damping=relative_damping, model=model, precision=precision,
      ),
      optax.add_decayed_weights(weight_decay),
      optax.trace(decay=momentum, nesterov=nesterov),
      optax.scale_by_learning_rate(learning_rate),
  )
