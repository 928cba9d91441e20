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
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from nysact_optax import _batch, _distributed, _nystrom, _statistics, _tree, _validation
from nysact_optax._accumulate import GradsWithStatistics
from nysact_optax._state import (
  NysActConfig,
  NysActLayerState,
  ScaleByNysActState,
  init_layer_state,
)

__all__ = ["Factors"]


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


def _factors(cov, sketch, count, width, *, group, factorise, stat_decay, damping, relative_damping):
  """``(U, lam, damping_scale)`` of one batch entry of a group (padded rows 0)."""
  correction = 1.0 - jnp.asarray(stat_decay, cov.dtype) ** count
  c_hat = cov / jnp.where(count > 0, correction, 1.0)
  scale = jnp.ones((), cov.dtype)
  if group.exact:
    if relative_damping:  # the sketch is the identity: tr(C) / p
      scale = jnp.maximum(jnp.trace(c_hat) / group.rank, jnp.finfo(cov.dtype).tiny)
    u, lam = _nystrom.exact_eigh(c_hat)
    return u, lam, scale
  if relative_damping:  # tr(S^T C S) / r estimates tr(C) / p
    mean = jnp.trace(jnp.matmul(sketch.T, c_hat, precision=lax.Precision.HIGHEST))
    scale = jnp.maximum(mean / group.rank, jnp.finfo(cov.dtype).tiny)
  u, lam = factorise(c_hat, sketch, damping * scale, p=width)
  return u, lam, scale


def _model_input_axes(model: Any, input_axes):
  """``input_axes`` with the layouts of an NNX model's layers added (anchored
  regexes, before the user's entries, which win)."""
  from nysact_optax import _capture_nnx  # flax only when a model is given

  if not _capture_nnx.is_nnx(model) or not isinstance(model, _capture_nnx.nnx.Module):
    raise TypeError(
      f"model must be an nnx.Module (its layers' layouts are read from it), got "
      f"model={type(model).__name__}; for flax.linen models pass input_axes= "
      "where the error message asks for it"
    )
  found = {f"^{re.escape(name)}$": axes for name, axes in _capture_nnx.input_axes_of(model).items()}
  return {**found, **(input_axes or {})}


@dataclasses.dataclass(frozen=True)
class Factors:
  """Per-layer Nyström factors of the activation covariance, kept up to date.

  Built once by a transformation from its settings (already validated);
  its :meth:`init` and :meth:`update` are the transformation's first half.
  ``caller`` names the transformation in error messages.
  """

  caller: str
  rank: _tree.RankRule
  sketch: str
  damping: Any
  stat_decay: Any
  cov_update_every: int
  inv_update_every: int
  seed: Any
  sketch_refresh: str
  nystrom: str
  exclude: _tree.LayerFilter
  input_axes: Mapping[str, int | Sequence[int]] | None
  include: _tree.LayerFilter | None
  stack_axes: Mapping[str, int] | None
  dtype: Any
  axis_name: str | None
  relative_damping: bool
  stats_precision: jax.lax.Precision

  @classmethod
  def create(cls, caller: str, *, model: Any = None, stats_dtype: Any, precision: Any, **settings):
    """Validates every setting and resolves ``model=``, ``stats_dtype`` and
    ``precision`` (statistics half; the apply's is returned beside)."""
    _validation.validate_settings(
      stats_dtype=stats_dtype,
      precision=precision,
      **{k: settings[k] for k in _validation.SETTINGS if k in settings},
    )
    stats_precision, apply_precision = _validation.resolve_precision(precision)
    if model is not None:
      settings["input_axes"] = _model_input_axes(model, settings.get("input_axes"))
    factors = cls(
      caller=caller,
      dtype=jnp.dtype(stats_dtype),
      stats_precision=stats_precision,
      **settings,
    )
    return factors, apply_precision

  def layers(self, tree: Any) -> list[_tree.Layer]:
    """The preconditioned layers of a params or updates tree."""
    return _tree.find_layers(
      tree,
      rank=self.rank,
      exclude=self.exclude,
      input_axes=self.input_axes,
      include=self.include,
      stack_axes=self.stack_axes,
    )

  def config(self, layers: Sequence[_tree.Layer]) -> NysActConfig:
    return NysActConfig(
      self.sketch,
      self.sketch_refresh,
      self.nystrom == "stable",
      self.dtype.name,
      self.cov_update_every,
      tuple(layers),
      self.stats_precision,
    )

  def init(self, params: Any) -> ScaleByNysActState:
    """Zero statistics and factors (``P = I / damping``) for every layer."""
    layers = self.layers(params)
    base = jax.random.PRNGKey(self.seed)
    return ScaleByNysActState(
      count=jnp.zeros([], jnp.int32),
      layers={
        layer.name: init_layer_state(layer, jax.random.fold_in(base, i), self.dtype)
        for i, layer in enumerate(layers)
      },
      config=self.config(layers),
    )

  def refreshes(self, count: jax.Array) -> jax.Array:
    """Whether the update at ``count`` refreshes the factors."""
    return count % self.inv_update_every == 0

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
    layers = self.layers(updates)
    _validation.check_state(layers, state)
    config = self.config(layers)
    every = self.cov_update_every
    inputs = None
    if statistics is None:
      inputs = _validation.check_activations(layers, activations, self.include, self.exclude)
    elif activations is not None:
      raise ValueError(
        f"{self.caller}.update got both activations= and statistics=: pass "
        "statistics= (from nysact_optax.sketched_statistics) when "
        "accumulating micro-batches, activations= otherwise"
      )
    else:
      _validation.check_statistics(layers, statistics)

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
          y = jnp.asarray(statistics[layer.name], self.dtype)
          new[layer.name] = _accumulate(
            layer_states[layer.name],
            keys[layer.name],
            y,
            self.stat_decay,
            self.axis_name,
            self.dtype,
          )
      # T_inv is a multiple of T_cov: every refresh falls on a statistics
      # step, and reuses its sketches.
      return _periodic(
        state.count, self.inv_update_every, lambda ls: self._refresh(ls, groups, batches), new
      )

    layer_states = _periodic(state.count, every, statistics_step, state.layers)
    new_state = ScaleByNysActState(
      count=optax.safe_increment(state.count), layers=layer_states, config=state.config
    )
    return layers, new_state

  def _refresh(self, layer_states, groups, batches):
    """Every layer's factors from its EMA, one vmapped call per group;
    non-finite ones keep the previous factors."""
    config = self.config([layer for group in groups for layer in group.layers])
    if self.sketch_refresh != "fixed":  # a skipped update kept a layer's old key
      keys = {layer.name: layer_states[layer.name].sketch_key for layer in config.layers}
      batches, _ = _statistics.sketches_of(groups, keys, config)
    factorise = {"shifted": _nystrom.nystrom_shifted, "stable": _nystrom.nystrom_stable}
    one = functools.partial(
      _factors,
      factorise=factorise[self.nystrom],
      stat_decay=self.stat_decay,
      damping=self.damping,
      relative_damping=self.relative_damping,
    )
    new = dict(layer_states)
    dtype = self.dtype
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
