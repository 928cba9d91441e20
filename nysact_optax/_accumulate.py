"""Gradient accumulation: sketched statistics of one micro-batch.

``optax.MultiSteps`` calls the inner ``update`` only on the micro-step that
emits an update, so NysAct would see the activations of that micro-batch
alone. Instead, compute each micro-batch's sketched statistics ``A_i^T A_i S /
n_i`` with :func:`sketched_statistics` (the sketch ``S`` is the one the next
``update`` draws, read off the optimizer state), average them like the
gradients, and pass the average as ``update(..., statistics=...)``. The
accumulators are ``p x r`` per layer, the size of the state's ``cov``;
activations are never kept beyond their micro-batch.

The statistics come from the same per-layer function as ``update``'s own
(:func:`nysact_optax._statistics.statistics`), with the settings and
layer layouts stored in the state, so both paths agree in every dtype, sketch
and layer kind.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from nysact_optax import _batch, _statistics, _validation
from nysact_optax._state import find_nysact_state

__all__ = ["sketched_statistics"]


def sketched_statistics(opt_state: Any, activations: Mapping[str, Any]) -> dict[str, jax.Array]:
  """The sketched covariance ``A^T A S / n`` of one micro-batch, per layer.

  ``S`` is the sketch the next ``update`` of the optimizer would draw, so the
  mean of these over ``k`` equal-sized micro-batches, passed as
  ``update(grads, opt_state, params, statistics=mean)``, gives the same
  result as ``activations=`` of one batch holding all ``k`` micro-batches.
  Everything else it needs (sketch, refresh, dtype, matmul precision,
  statistics period, the layers' layouts) is read from the optimizer state.

  Args:
    opt_state: the state of :func:`nysact_optax.nysact` or
      :func:`nysact_optax.scale_by_nysact` (possibly inside a chain or a
      wrapper), before the update the statistics are for.
    activations: one micro-batch's activations from
      :func:`nysact_optax.capture_activations`; layers the optimizer does not
      precondition (``exclude=``) are ignored.

  Returns:
    ``{layer path: (*stack, p, r) array}`` in the optimizer's ``stats_dtype``.
    On the steps that take no statistics (``count % cov_update_every != 0``)
    the result is zeros and nothing is computed.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, nysact_optax
    >>> model = nn.Dense(3)
    >>> params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 5)))["params"]
    >>> tx = nysact_optax.nysact(0.1, rank=2)
    >>> opt_state = tx.init(params)
    >>> apply = nysact_optax.capture_activations(model.apply)
    >>> def grads_and_stats(x):
    ...   def loss(p):
    ...     y, acts = apply({"params": p}, x)
    ...     return jnp.sum(y ** 2), acts
    ...   (_, acts), grads = jax.value_and_grad(loss, has_aux=True)(params)
    ...   return grads, nysact_optax.sketched_statistics(opt_state, acts)
    >>> micro = [grads_and_stats(jnp.full((4, 5), v)) for v in (1.0, 2.0)]
    >>> grads, stats = jax.tree.map(lambda *a: sum(a) / len(a), *micro)
    >>> stats[""].shape
    (6, 2)
    >>> updates, opt_state = tx.update(grads, opt_state, params, statistics=stats)
  """
  state = find_nysact_state(opt_state)
  config = state.config
  layers = config.layers
  _validation.check_state(layers, state)
  table = _validation.check_activations(layers, activations, extra_ok=True)

  def compute(_):
    with jax.named_scope("nysact/micro_batch_statistics"):
      keys = _statistics.next_keys(
        layers, {name: ls.sketch_key for name, ls in state.layers.items()}, config
      )
      _, sketches = _statistics.sketches_of(_batch.group_layers(layers), keys, config)
      return _statistics.statistics(layers, sketches, table, config)

  if config.cov_update_every == 1:
    return compute(None)
  zeros = {
    layer.name: jnp.zeros(layer.stack_shape + (layer.p, layer.rank), config.dtype)
    for layer in layers
  }
  return lax.cond(state.count % config.cov_update_every == 0, compute, lambda _: zeros, None)
