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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from nysact_optax import _batch, _covariance, _statistics, _tree, _validation
from nysact_optax._layers import ConvSpec, LayerInputs
from nysact_optax._state import find_nysact_state

__all__ = ["GradsWithStatistics", "sketched_statistics"]


class GradsWithStatistics(NamedTuple):
  """Gradients with the sketched statistics of the batch they came from.

  What :func:`nysact_optax.value_and_grad` and :func:`nysact_optax.grad`
  return in place of the gradients when given ``statistics_for=``: the
  gradients, and the ``p x r`` :func:`sketched_statistics` of each
  preconditioned layer, so that a jitted function that computes gradients
  can return them to a separately jitted update without returning the
  activations. It is a pytree (a ``NamedTuple``): it crosses ``jax.jit``
  boundaries, and both fields are batch means, so averaging it over
  micro-batches (``jax.tree.map``) or replicas (``lax.pmean``) averages
  each the way the update needs.

  :func:`nysact_optax.apply_gradients` and
  :meth:`nysact_optax.TrainState.apply_gradients` take it as ``grads=``;
  elsewhere pass its fields, ``tx.update(grads.grads, opt_state, params,
  statistics=grads.statistics)``.

  Attributes:
    grads: the gradients, as ``jax.grad`` returns them.
    statistics: ``{layer path: (*stack, p, r) array}``, as
      :func:`sketched_statistics` returns them.

  Examples:
    >>> import jax.numpy as jnp, nysact_optax
    >>> g = nysact_optax.GradsWithStatistics({"kernel": jnp.ones((3, 2))}, {"": jnp.ones((4, 2))})
    >>> grads, statistics = g
    >>> grads["kernel"].shape, statistics[""].shape
    ((3, 2), (4, 2))
  """

  grads: Any
  statistics: dict[str, jax.Array]


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


# The split form (value_and_grad(..., statistics_for=...)) takes the
# statistics of a batch of more than CHUNK_EXAMPLES examples over chunks of at
# most that many, one after the other, so that an evaluation of a whole test
# set through the gradient function needs the statistics' temporaries of one
# chunk, not of the test set.
CHUNK_EXAMPLES = 1024


def _row_axis(layer: Any, inputs: Any) -> int | None:
  """The axis of the layer's inputs that counts examples (the first after the
  stack axes), or ``None`` where that axis is not a row axis."""
  axis = len(layer.stack_shape)
  for x in inputs.inputs:
    ndim = x.ndim - axis
    if ndim < 1:
      return None
    if isinstance(inputs.spec, ConvSpec):
      if ndim <= inputs.spec.num_input_axes:  # an unbatched convolution input
        return None
    elif not hasattr(inputs.spec, "axis") or 0 in {a % ndim for a in inputs.spec.axis}:
      return None
  return axis


def chunked_statistics(
  opt_state: Any, activations: Any, chunk: int | None = None
) -> dict[str, jax.Array]:
  """:func:`sketched_statistics` taken over chunks of at most ``chunk``
  examples (default :data:`CHUNK_EXAMPLES`), one after the other.

  Every row of ``A`` belongs to one example, so the statistics of the batch
  are the example-weighted mean of the chunks'. Chunking applies where every
  input of every preconditioned layer has the same number of examples along
  its first axis after the stack axes (a batch axis that is not contracted)
  and no input is explicitly sharded; otherwise, and for batches of at most
  ``chunk`` examples, this is :func:`sketched_statistics`.
  """
  chunk = CHUNK_EXAMPLES if chunk is None else chunk
  state = find_nysact_state(opt_state)
  table = _tree.activation_table(activations)
  layers = [layer for layer in state.config.layers if layer.name in table]
  axes = {layer.name: _row_axis(layer, table[layer.name]) for layer in layers}
  sizes = {x.shape[a] for name, a in axes.items() if a is not None for x in table[name].inputs}
  chunkable = all(a is not None for a in axes.values()) and len(sizes) == 1
  chunkable = chunkable and not any(
    _covariance._explicitly_sharded(x) for layer in layers for x in table[layer.name].inputs
  )
  n = next(iter(sizes)) if chunkable else 0
  if n <= chunk:
    return sketched_statistics(opt_state, activations)
  k = -(-n // chunk)  # chunks of c examples, and a remainder of fewer than k
  c, rest = n // k, n % k

  rows = {name: a for name, a in axes.items() if a is not None}  # all of them here

  def part(start: Any, size: int) -> dict[str, Any]:
    return {
      layer.name: LayerInputs(
        [lax.dynamic_slice_in_dim(x, start, size, rows[layer.name]) for x in inputs.inputs],
        inputs.spec,
        inputs.kernel_shape,
      )
      for layer in layers
      for inputs in [table[layer.name]]
    }

  def add(i, total):
    y = sketched_statistics(opt_state, part(i * c, c))
    return jax.tree.map(jnp.add, total, y)

  zeros = {name: jnp.zeros_like(ls.cov) for name, ls in state.layers.items()}
  total = jax.tree.map(lambda t: t * (c / n), lax.fori_loop(0, k, add, zeros))
  if rest:
    y = sketched_statistics(opt_state, part(k * c, rest))
    total = jax.tree.map(lambda t, y: t + y * (rest / n), total, y)
  return total
