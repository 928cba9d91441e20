"""NysAct's optimizer state: the per-layer factors and the static settings.

The state is a pytree of arrays (sketches are stored as PRNG keys) plus one
leaf-free node, :class:`NysActConfig`, that carries the settings and layer
layouts the statistics need. :func:`nysact_optax.sketched_statistics` reads
them from the state, so the user never repeats them, and a state can only be
combined (``jax.tree.map``, ``lax.cond``) with one of the same configuration.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nysact_optax._tree import Layer

__all__ = [
  "NysActConfig",
  "NysActLayerState",
  "ScaleByNysActState",
  "find_nysact_state",
  "init_layer_state",
  "nysact_states_with_path",
]


@dataclasses.dataclass(frozen=True)
class NysActConfig:
  """The static settings of a NysAct state (a pytree node with no leaves).

  Attributes:
    sketch: ``"gaussian"`` or ``"subcolumns"``.
    sketch_refresh: ``"fixed"`` or ``"reference"``.
    orthonormal: whether Gaussian sketches are orthonormalised (stable Nyström).
    stats_dtype: the dtype name of the statistics and factors.
    cov_update_every: the statistics period ``T_cov``.
    layers: the :class:`~nysact_optax._tree.Layer` layouts, by name order.
    precision: the ``jax.lax.Precision`` of the statistics' products
      (``precision=`` of :func:`nysact_optax.scale_by_nysact`).
  """

  sketch: str
  sketch_refresh: str
  orthonormal: bool
  stats_dtype: str
  cov_update_every: int
  layers: tuple[Layer, ...]
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @property
  def dtype(self) -> jnp.dtype:
    return jnp.dtype(self.stats_dtype)


jax.tree_util.register_static(NysActConfig)


class NysActLayerState(NamedTuple):
  """Nyström factors of one layer; ``p`` is its input width (+1 with a bias).

  A layer stacked by ``nn.scan``/``nn.vmap`` (``stack_axes``) has one set of
  factors per copy: every field gets the kernel's stack axes first.

  Attributes:
    sketch_key: PRNG key of the layer's current sketch ``S`` (uint32[2]); the
      sketch itself is redrawn from it, never stored.
    cov: EMA of the sketched covariance ``A^T A S / n`` (p x r; p x p in
      exact mode).
    basis: orthonormal Nyström basis ``U`` (p x r; p x p in exact mode).
    eigvals: Nyström eigenvalues ``lam >= 0`` (r).
    damping_scale: the layer's damping is ``damping * damping_scale``: 1,
      or with ``relative_damping=True`` the mean eigenvalue of its
      covariance at the last refresh.
    stat_count: how many statistics updates entered ``cov``, ``k`` in the
      layer's bias correction ``1 - stat_decay^k``.
    failures: how many inverse refreshes produced non-finite factors and were
      discarded (the previous factors were kept).
    stat_skips: how many statistics updates were skipped because the layer's
      new statistics were non-finite (non-finite activations, or overflow);
      ``cov``, ``stat_count`` and the sketch were left as they were.

  Examples:
    >>> import jax, jax.numpy as jnp, nysact_optax
    >>> tx = nysact_optax.scale_by_nysact(rank=2)
    >>> state = tx.init({"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}})
    >>> jax.tree.map(jnp.shape, state.layers["dense"])  # p = 4 inputs + 1 for the bias
    NysActLayerState(sketch_key=(2,), cov=(5, 2), basis=(5, 2), eigvals=(2,),
                     damping_scale=(), stat_count=(), failures=(), stat_skips=())
  """

  sketch_key: jax.Array
  cov: jax.Array
  basis: jax.Array
  eigvals: jax.Array
  damping_scale: jax.Array
  stat_count: jax.Array
  failures: jax.Array
  stat_skips: jax.Array


class ScaleByNysActState(NamedTuple):
  """State of :func:`nysact_optax.scale_by_nysact`.

  Attributes:
    count: number of updates so far (int32).
    layers: per-layer :class:`NysActLayerState`, keyed by layer path
      (e.g. ``"Block_0/Conv_1"``).
    config: the static :class:`NysActConfig` (no arrays).

  Examples:
    >>> import jax.numpy as jnp, nysact_optax
    >>> state = nysact_optax.scale_by_nysact().init({"dense": {"kernel": jnp.ones((4, 3))}})
    >>> int(state.count), list(state.layers), state.config.sketch
    (0, ['dense'], 'gaussian')
  """

  count: jax.Array  # type: ignore[assignment]  # optax's field name; shadows tuple.count
  layers: dict[str, NysActLayerState]
  config: NysActConfig


def init_layer_state(layer: Layer, key: jax.Array, dtype: Any) -> NysActLayerState:
  """Zero statistics and factors (``P = I / damping``) for one layer."""
  p, r, stack = layer.p, layer.rank, layer.stack_shape
  if stack:  # one sketch per stacked copy
    key = jax.random.split(key, math.prod(stack)).reshape(stack + key.shape)
  return NysActLayerState(
    sketch_key=key,
    cov=jnp.zeros(stack + (p, r), dtype),
    basis=jnp.zeros(stack + (p, r), dtype),
    eigvals=jnp.zeros(stack + (r,), dtype),
    damping_scale=jnp.ones(stack, dtype),
    stat_count=jnp.zeros(stack, jnp.int32),
    failures=jnp.zeros(stack, jnp.int32),
    stat_skips=jnp.zeros(stack, jnp.int32),
  )


def nysact_states_with_path(opt_state: Any) -> list[tuple[tuple, ScaleByNysActState]]:
  """Every :class:`ScaleByNysActState` in an optimizer state, with its path."""
  found = optax.tree_utils.tree_get_all_with_path(opt_state, "ScaleByNysActState")
  return [(tuple(path), state) for path, state in found]


def find_nysact_state(opt_state: Any) -> ScaleByNysActState:
  """The one :class:`ScaleByNysActState` inside an optimizer state.

  Looks through chains, ``optax.inject_hyperparams``, ``optax.MultiSteps``
  and other wrappers (with ``optax.tree_utils``).

  Raises:
    ValueError: if there is none, or more than one.

  Examples:
    >>> import jax.numpy as jnp, nysact_optax
    >>> tx = nysact_optax.nysact(0.1)
    >>> state = tx.init({"dense": {"kernel": jnp.ones((3, 2))}})
    >>> sorted(nysact_optax.find_nysact_state(state).layers)
    ['dense']
  """
  found = nysact_states_with_path(opt_state)
  if len(found) != 1:
    where = [jax.tree_util.keystr(path) or "the root" for path, _ in found]
    raise ValueError(
      f"expected exactly one ScaleByNysActState in the optimizer state, found "
      f"{len(found)}{f' (at {where})' if where else ''}: pass the state of a "
      "transformation built with nysact_optax.nysact or "
      f"nysact_optax.scale_by_nysact, got a {type(opt_state).__name__}"
    )
  return found[0][1]
