"""Gradient accumulation: sketched statistics of one micro-batch.

``optax.MultiSteps`` calls the inner ``update`` only on the micro-step that
emits an update, so NysAct would see the activations of that micro-batch
alone. Instead, compute each micro-batch's sketched statistics ``A_i^T A_i S /
n_i`` with :func:`sketched_statistics` (the sketch ``S`` is the one the next
``update`` draws, read off the optimizer state), average them like the
gradients, and pass the average as ``update(..., statistics=...)``. The
accumulators are ``p x r`` per layer, the size of the state's ``cov``;
activations are never kept beyond their micro-batch.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from nysact_optax import _nystrom, _sketch, _statistics, _tree
from nysact_optax._layers import LayerInputs
from nysact_optax._transform import (
    SKETCH_REFRESH,
    ScaleByNysActState,
    statistics_sketch_key,
)

__all__ = ["find_nysact_state", "sketched_statistics"]


def find_nysact_state(opt_state: Any) -> ScaleByNysActState:
  """The one :class:`ScaleByNysActState` inside an optimizer state.

  Looks through chains, ``optax.inject_hyperparams`` and other wrappers.

  Raises:
    ValueError: if there is none, or more than one.

  Examples:
    >>> import jax.numpy as jnp, nysact_optax
    >>> tx = nysact_optax.nysact(0.1)
    >>> state = tx.init({"dense": {"kernel": jnp.ones((3, 2))}})
    >>> sorted(nysact_optax.find_nysact_state(state).layers)
    ['dense']
  """
  is_state = lambda x: isinstance(x, ScaleByNysActState)
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(s)]
  if len(found) != 1:
    raise ValueError(
        f"expected exactly one ScaleByNysActState in the optimizer state, found "
        f"{len(found)}: pass the state of a transformation built with "
        "nysact_optax.nysact or nysact_optax.scale_by_nysact"
    )
  return found[0]


def _has_bias(name: str, inputs: LayerInputs, p: int) -> bool:
  widths = {inputs.spec.input_width(x.shape) for x in inputs.inputs}
  if len(widths) == 1 and p - next(iter(widths)) in (0, 1):
    return p == next(iter(widths)) + 1
  raise ValueError(
      f"layer {name!r}: the captured inputs have {sorted(widths)} features, but "
      f"the optimizer state holds a covariance of width p={p} (features, +1 with "
      "a bias). Pass the activations of the model whose params initialised "
      "the optimizer."
  )


def sketched_statistics(
    opt_state: Any,
    activations: Mapping[str, Any],
    *,
    sketch: str = "gaussian",
    sketch_refresh: str = "fixed",
    nystrom: str = "stable",
    cov_update_every: int = 1,
) -> dict[str, jax.Array]:
  """The sketched covariance ``A^T A S / n`` of one micro-batch, per layer.

  ``S`` is the sketch the next ``update`` of the optimizer would draw, so the
  mean of these over ``k`` equal-sized micro-batches, passed as
  ``update(grads, opt_state, params, statistics=mean)``, gives the same
  result as ``activations=`` of one batch holding all ``k`` micro-batches.
  Pass the same ``sketch``, ``sketch_refresh``, ``nystrom`` and
  ``cov_update_every`` as to the optimizer. Layers stacked with
  ``stack_axes`` and ``nn.Einsum`` layers whose bias is stored in another
  order than the kernel's outputs are not supported on this path yet.

  Args:
    opt_state: the state of :func:`nysact_optax.nysact` or
      :func:`nysact_optax.scale_by_nysact` (possibly inside a chain), before
      the update the statistics are for.
    activations: one micro-batch's activations from
      :func:`nysact_optax.capture_activations`; layers the optimizer does not
      precondition (``exclude=``) are ignored.
    sketch: as for the optimizer.
    sketch_refresh: as for the optimizer.
    nystrom: as for the optimizer.
    cov_update_every: as for the optimizer; on the steps that take no
      statistics the result is zeros and nothing is computed.

  Returns:
    ``{layer path: (p, r) float32 array}``.

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
  for name, value, allowed in (
      ("sketch", sketch, _sketch.SKETCHES),
      ("sketch_refresh", sketch_refresh, SKETCH_REFRESH),
      ("nystrom", nystrom, _nystrom.NYSTROM_METHODS),
  ):
    if value not in allowed:
      raise ValueError(f"{name} must be one of {allowed}, got {name}={value!r}")
  if not isinstance(cov_update_every, numbers.Integral) or cov_update_every < 1:
    raise ValueError(
        f"cov_update_every must be an integer >= 1, got cov_update_every={cov_update_every!r}"
    )
  state = find_nysact_state(opt_state)
  table = _tree.activation_table(activations) if activations is not None else {}
  missing = sorted(set(state.layers) - set(table))
  if missing:
    raise ValueError(
        f"no activations were captured for layers {missing}, which the "
        "optimizer preconditions: pass the activations that "
        "nysact_optax.capture_activations returns for this model"
    )
  has_bias = {
      name: _has_bias(name, table[name], ls.cov.shape[0])
      for name, ls in state.layers.items()
  }

  def compute(_):
    stats = {}
    for name, ls in state.layers.items():
      with jax.named_scope(f"nysact/micro_batch_statistics/{name}"):
        p, r = ls.cov.shape
        s = _sketch.draw_sketch(
            statistics_sketch_key(ls, sketch_refresh), p, r, sketch,
            orthonormal=nystrom == "stable",
        )
        stats[name] = _statistics.sketched_covariance(table[name], s, has_bias[name])
    return stats

  if cov_update_every == 1:
    return compute(None)
  zeros = {name: jnp.zeros(ls.cov.shape, jnp.float32) for name, ls in state.layers.items()}
  return lax.cond(state.count % cov_update_every == 0, compute, lambda _: zeros, None)
