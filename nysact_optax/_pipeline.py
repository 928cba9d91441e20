"""The statistics -> factors pipeline that every NysAct transformation shares.

:class:`Factors` holds the settings of one configuration and does, per
``update``, what both :func:`nysact_optax.scale_by_nysact` (the inverse
apply) and :func:`nysact_optax.scale_by_nysact_adam` (Adam in the factors'
eigenbasis) need before they use the factors: check the inputs
(:mod:`._validation`), draw the sketches and take each layer's statistics
every ``T_cov`` steps (:mod:`._statistics`), fold them into the EMA, and
refresh the factors every ``T_inv`` steps (:mod:`._nystrom`). Both periodic
steps run under ``lax.cond``: one compile. The sketches are drawn in one
``cond``, each layer's statistics taken in its own (see :func:`_when`), and
the state updated in a third. The layers are grouped once per update.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from nysact_optax import _batch, _distributed, _nystrom, _statistics, _tree, _validation
from nysact_optax._accumulate import GradsWithStatistics
from nysact_optax._options import Options
from nysact_optax._state import (
  NysActConfig,
  NysActLayerState,
  ScaleByNysActState,
  init_layer_state,
)

__all__ = ["Factorise", "Factors", "stable_factors"]


def _periodic(count, every, fn, operand):
  """``fn(operand)`` when ``count % every == 0``, else ``operand``; one compile."""
  if every == 1:
    return fn(operand)
  return lax.cond(count % every == 0, fn, lambda x: x, operand)


def _when(count, every, fn, *operands):
  """``fn(*operands)`` when ``count % every == 0``, else zeros of its type.

  The statistics run as one such ``cond`` per layer, apart from the ``cond``
  that folds them into the state: XLA then schedules each layer's statistics
  beside the backward pass, where its input dies, instead of keeping every
  layer's input alive into one late branch (on XLA:CPU that lifetime was the
  whole cost of a step without statistics: ``docs/results.md``).
  """
  if every == 1:
    return fn(*operands)

  def skip(*ops):
    # The statistics vary over the manual axes their inputs vary over.
    leaves = jax.tree.leaves(ops)
    zeros = jax.tree.map(lambda o: jnp.zeros(o.shape, o.dtype), jax.eval_shape(fn, *ops))
    if not leaves:
      return zeros
    like = max(leaves, key=lambda a: len(getattr(jax.typeof(a), "vma", ())))
    return jax.tree.map(lambda z: _distributed.varying_like(z, like), zeros)

  return lax.cond(count % every == 0, fn, skip, *operands)


def _accumulate(ls: NysActLayerState, key, y, stat_decay, axis_name, dtype) -> NysActLayerState:
  """One layer's statistics ``y`` into its EMA, unless they are non-finite.

  A skipped update leaves ``cov``, ``stat_count`` and the sketch as they
  were, so the layer's bias-corrected estimate is unchanged.
  """
  y = _distributed.replicate(y)  # factors stay replicated on a mesh
  if axis_name is not None:
    y = lax.pmean(y, axis_name)
  cov = (stat_decay * ls.cov + (1.0 - stat_decay) * y).astype(dtype)
  ok = jnp.isfinite(cov).all((-2, -1))  # per stacked copy
  return ls._replace(
    sketch_key=jnp.where(ok[..., None], key, ls.sketch_key),
    cov=jnp.where(ok[..., None, None], cov, ls.cov),
    stat_count=ls.stat_count + ok.astype(jnp.int32),
    stat_skips=ls.stat_skips + (~ok).astype(jnp.int32),
  )


Factorise = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]


def stable_factors(
  c_hat, sketch, *, exact: bool, rank: int, width
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(U, lam, damping_scale)`` of one layer's bias-corrected statistics:
  the stable Nyström factorisation (:func:`nysact_optax._nystrom.nystrom_stable`),
  or the exact eigendecomposition in exact mode; no damping, scale 1.

  Any factorisation :class:`Factors` takes has this signature: ``c_hat``
  (p x r, rows past ``width`` zero-padded), the sketch matrix (``None`` in
  exact mode), whether the layer is in exact mode and its sketch width.
  """
  del rank
  scale = jnp.ones((), c_hat.dtype)
  if exact:
    return (*_nystrom.exact_eigh(c_hat), scale)
  return (*_nystrom.nystrom_stable(c_hat, sketch, p=width), scale)


def _factors(cov, sketch, count, width, *, group, factorise, stat_decay):
  """``(U, lam, damping_scale)`` of one batch entry of a group (padded rows 0)."""
  correction = 1.0 - jnp.asarray(stat_decay, cov.dtype) ** count
  c_hat = cov / jnp.where(count > 0, correction, 1.0)
  return factorise(c_hat, sketch, exact=group.exact, rank=group.rank, width=width)


@dataclasses.dataclass(frozen=True)
class Factors:
  """Per-layer Nyström factors of the activation covariance, kept up to date.

  Built once by a transformation from its validated :class:`Options`; its
  :meth:`init` and :meth:`update` are the transformation's first half.

  Attributes:
    caller: the transformation's name, for error messages.
    options: the statistics -> factors settings.
    factorise: the factorisation of a refresh (:func:`stable_factors`'s
      signature): the inverse apply's depends on its damping.
    orthonormal: whether Gaussian sketches are orthonormalised (the stable
      Nyström method wants them so).
  """

  caller: str
  options: Options
  factorise: Factorise = stable_factors
  orthonormal: bool = True

  def _sketch_rank(self, name: str, p: int) -> int:
    rank = self.options.rank
    return (rank(name, p) if callable(rank) else rank) + self.options.oversample

  def layers(self, tree: Any) -> list[_tree.Layer]:
    """The preconditioned layers of a params or updates tree; a layer's
    ``rank`` is its sketch width (``rank + oversample``, capped at ``p``)."""
    o = self.options
    return _tree.find_layers(
      tree,
      rank=self._sketch_rank if o.oversample else o.rank,
      exclude=o.exclude,
      input_axes=o.input_axes,
      include=o.include,
      stack_axes=o.stack_axes,
    )

  def width(self, layer: _tree.Layer) -> int:
    """The layer's basis width: the top ``rank`` of its ``rank + oversample``
    sketched columns, all of them in exact mode."""
    if layer.exact or not self.options.oversample:
      return layer.rank
    rank = self.options.rank
    return min(rank(layer.name, layer.p) if callable(rank) else rank, layer.p)

  def basis(self, layer: _tree.Layer, state: ScaleByNysActState) -> jax.Array:
    """The layer's basis ``U`` (``(*stack, p, width)``): the top columns of
    its factors (the factorisations sort them ascending)."""
    return state.layers[layer.name].basis[..., -self.width(layer) :]

  def config(self, layers: Sequence[_tree.Layer]) -> NysActConfig:
    o = self.options
    return NysActConfig(
      o.sketch,
      o.sketch_refresh,
      self.orthonormal,
      o.dtype.name,
      o.cov_update_every,
      tuple(layers),
      o.stats_precision,
    )

  def init(self, params: Any) -> ScaleByNysActState:
    """Zero statistics and factors (``P = I / damping``) for every layer."""
    layers = self.layers(params)
    base = jax.random.PRNGKey(self.options.seed)
    return ScaleByNysActState(
      count=jnp.zeros([], jnp.int32),
      layers={
        layer.name: init_layer_state(layer, jax.random.fold_in(base, i), self.options.dtype)
        for i, layer in enumerate(layers)
      },
      config=self.config(layers),
    )

  def refreshes(self, count: jax.Array) -> jax.Array:
    """Whether the update at ``count`` refreshes the factors."""
    return count % self.options.inv_update_every == 0

  def _inputs(self, layers, activations, statistics):
    """The checked activations table (``None`` when ``statistics`` are given)."""
    if statistics is None:
      o = self.options
      return _validation.check_activations(layers, activations, o.include, o.exclude)
    if activations is not None:
      raise ValueError(
        f"{self.caller}.update got both activations= and statistics=: pass "
        "statistics= (from nysact_optax.sketched_statistics) when "
        "accumulating micro-batches, activations= otherwise"
      )
    _validation.check_statistics(layers, statistics)
    return None

  def update(
    self, updates: Any, state: ScaleByNysActState, *, activations=None, statistics=None
  ) -> tuple[list[_tree.Layer], ScaleByNysActState]:
    """The layers of ``updates`` and the state after this step's statistics
    and refresh (``count`` incremented)."""
    if isinstance(updates, GradsWithStatistics):
      raise TypeError(
        f"{self.caller}.update got gradients that carry statistics (from "
        "nysact_optax.value_and_grad(..., statistics_for=...)): apply them with "
        "nysact_optax.apply_gradients(state, grads=grads), or pass "
        "tx.update(grads.grads, opt_state, params, statistics=grads.statistics)"
      )
    o = self.options
    layers = self.layers(updates)
    _validation.check_state(layers, state)
    inputs = self._inputs(layers, activations, statistics)
    config, every = state.config, o.cov_update_every

    keys = _statistics.next_keys(
      layers, {name: ls.sketch_key for name, ls in state.layers.items()}, config
    )
    groups = _batch.group_layers(layers)
    batches, sketches = _when(
      state.count, every, lambda k: _statistics.sketches_of(groups, k, config), keys
    )
    if inputs is not None:
      statistics = {
        layer.name: _when(
          state.count,
          every,
          lambda s, x, layer=layer: _statistics.statistics(
            [layer], {layer.name: s}, {layer.name: x}, config
          )[layer.name],
          sketches[layer.name],
          inputs[layer.name],
        )
        for layer in layers
      }

    def statistics_step(layer_states):
      new = dict(layer_states)
      for layer in layers:
        with jax.named_scope(f"nysact/accumulate/{layer.name}"):
          y = jnp.asarray(statistics[layer.name], o.dtype)
          new[layer.name] = _accumulate(
            layer_states[layer.name], keys[layer.name], y, o.stat_decay, o.axis_name, o.dtype
          )
      # T_inv is a multiple of T_cov: every refresh falls on a statistics
      # step, and reuses its sketches.
      return _periodic(
        state.count,
        o.inv_update_every,
        lambda ls: self._refresh(ls, groups, batches, config),
        new,
      )

    layer_states = _periodic(state.count, every, statistics_step, state.layers)
    new_state = ScaleByNysActState(
      count=optax.safe_increment(state.count), layers=layer_states, config=state.config
    )
    return layers, new_state

  def _refresh(self, layer_states, groups, batches, config):
    """Every layer's factors from its EMA, one vmapped call per group;
    non-finite ones keep the previous factors."""
    if self.options.sketch_refresh != "fixed":  # a skipped update kept a layer's old key
      keys = {
        layer.name: layer_states[layer.name].sketch_key
        for group in groups
        for layer in group.layers
      }
      batches, _ = _statistics.sketches_of(groups, keys, config)
    one = functools.partial(_factors, factorise=self.factorise, stat_decay=self.options.stat_decay)
    new = dict(layer_states)
    dtype = self.options.dtype
    for group, sketch in zip(groups, batches, strict=True):
      with jax.named_scope(f"nysact/factors/{group.name}"):
        states = [layer_states[layer.name] for layer in group.layers]
        cov, basis = group.stack([(ls.cov, ls.basis) for ls in states], pad_axis=0)
        eigvals, scale, count, failures = group.stack(
          [(ls.eigvals, ls.damping_scale, ls.stat_count, ls.failures) for ls in states]
        )
        s = None if sketch is None else sketch.matrix
        u, lam, new_scale = jax.vmap(
          functools.partial(one, group=group), in_axes=(0, None if s is None else 0, 0, 0)
        )(cov, s, count, jnp.asarray(group.widths, jnp.int32))
        ok = jnp.isfinite(u).all((-2, -1)) & jnp.isfinite(lam).all(-1)  # per copy
        basis = jnp.where(ok[..., None, None], u, basis).astype(dtype)
        vectors = (
          jnp.where(ok[..., None], lam, eigvals).astype(dtype),
          jnp.where(ok, new_scale, scale).astype(dtype),
          failures + (~ok).astype(jnp.int32),
        )
        for layer, ls, b, (lam, scale, fails) in zip(
          group.layers,
          states,
          group.split(basis, pad_axis=0),
          group.split(vectors),
          strict=True,
        ):
          new[layer.name] = ls._replace(basis=b, eigvals=lam, damping_scale=scale, failures=fails)
    return new
