"""NysAct's preconditioner as an optax gradient transformation: ``scale_by_nysact``.

One ``update`` goes forward through the path's modules: check the inputs
(:mod:`._validation`), take the statistics every ``T_cov`` steps
(:mod:`._statistics`), refresh the factors every ``T_inv`` steps
(:mod:`._nystrom`), and apply ``P`` to each layer's gradient matrix
(:mod:`._apply`). Both periodic steps run under ``lax.cond``: one compile.
The sketches are drawn in one ``cond``, each layer's statistics taken in its
own (see :func:`_when`), and the state updated in a third.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from nysact_optax import _apply, _batch, _distributed, _nystrom, _statistics, _tree, _validation
from nysact_optax._state import (
  NysActConfig,
  NysActLayerState,
  ScaleByNysActState,
  init_layer_state,
)

__all__ = ["NysActLayerState", "ScaleByNysActState", "scale_by_nysact"]


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
  layer's input alive into one late branch. On XLA:CPU that lifetime was the
  whole cost of a step without statistics (ResNet-20: 185 against 80 MB of
  temporaries, SGD's 79, and 1.6x SGD's page faults per step).
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


def _update_statistics(layer_states, statistics, *, layers, config, keys, stat_decay, axis_name):
  """Every layer's new statistics into its EMA."""
  new = dict(layer_states)
  for layer in layers:
    with jax.named_scope(f"nysact/accumulate/{layer.name}"):
      y = jnp.asarray(statistics[layer.name], config.dtype)
      new[layer.name] = _accumulate(
        layer_states[layer.name], keys[layer.name], y, stat_decay, axis_name, config.dtype
      )
  return new


def _refresh(
  layer_states, groups, batches, *, config, factorise, stat_decay, damping, relative_damping
):
  """Every layer's factors from its EMA, one vmapped call per group;
  non-finite ones keep the previous factors."""
  if config.sketch_refresh != "fixed":  # a skipped update kept a layer's old key
    layers = [layer for group in groups for layer in group.layers]
    keys = {layer.name: layer_states[layer.name].sketch_key for layer in layers}
    groups, batches, _ = _statistics.sketches_of(layers, keys, config)
  new = dict(layer_states)
  dtype = config.dtype
  for group, sketch in zip(groups, batches, strict=True):
    with jax.named_scope(f"nysact/factors/{group.name}"):
      states = [layer_states[layer.name] for layer in group.layers]
      cov, basis = group.stack([(ls.cov, ls.basis) for ls in states], pad_axis=0)
      eigvals, scale, count, failures = group.stack(
        [(ls.eigvals, ls.damping_scale, ls.stat_count, ls.failures) for ls in states]
      )
      one = functools.partial(
        _factors,
        group=group,
        factorise=factorise,
        stat_decay=stat_decay,
        damping=damping,
        relative_damping=relative_damping,
      )
      s = None if sketch is None else sketch.matrix
      u, lam, new_scale = jax.vmap(one, in_axes=(0, None if s is None else 0, 0, 0))(
        cov, s, count, jnp.asarray(group.widths, jnp.int32)
      )
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


def _precondition_all(updates, layers, layer_states, damping, dtype, precision):
  """``P G`` for every layer's kernel and bias; other leaves pass through."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
  position = {tuple(path): i for i, (path, _) in enumerate(flat)}
  leaves = [leaf for _, leaf in flat]
  for layer in layers:
    with jax.named_scope(f"nysact/apply/{layer.name}"):
      ls = layer_states[layer.name]
      kernel = leaves[position[layer.kernel_path]]
      bias = leaves[position[layer.bias_path]] if layer.has_bias else None
      g, b = _apply.to_parts(layer, kernel, bias, dtype)
      pk, pb = _tree.over_stack(
        layer,
        lambda g, b, u, lam, scale: _apply.precondition_parts(
          g, b, u, lam, damping * scale, precision=precision
        ),
        g,
        b,
        ls.basis,
        ls.eigvals,
        ls.damping_scale,
      )
      kernel, bias = _apply.from_parts(layer, pk, pb, kernel, bias)
      leaves[position[layer.kernel_path]] = kernel
      if layer.has_bias:
        leaves[position[layer.bias_path]] = bias
  return jax.tree_util.tree_unflatten(treedef, leaves)


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


def scale_by_nysact(
  *,
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
  r"""Preconditions each layer's gradient with a Nyström-approximated FOOF inverse.

  For a layer with input rows ``A`` (n x p, with a constant 1 appended when it
  has a bias) and gradient ``G`` (o x p, kernel and bias), NysAct keeps a
  rank-``r`` Nyström approximation ``U diag(lam) U^T`` of the EMA of the
  activation covariance ``A^T A / n`` and returns ``G P`` with

  .. math::
    P = U \operatorname{diag}(1/(\lambda + \rho)) U^\top + (I - U U^\top)/\rho.

  Statistics ``Y = A^T A S / n`` (``S`` a p x r sketch) enter an EMA every
  ``cov_update_every`` steps; the factors are refreshed every
  ``inv_update_every`` steps; both at step 0. When ``rank >= p`` the layer
  uses the exact damped inverse ``(A_ema + rho I)^{-1}`` (FOOF). Parameters
  that are not the kernel or bias of a layer pass through unchanged.

  Non-finite values never enter the state: a layer whose new statistics are
  non-finite skips that update (counted in ``stat_skips``), and a refresh
  with non-finite factors keeps the previous ones (counted in ``failures``);
  see :func:`nysact_optax.diagnostics`. A non-finite gradient gives a
  non-finite update, which ``optax.apply_if_finite`` can skip.

  Args:
    rank: sketch width ``r``, or a rule ``rank(layer_name, p) -> int``; capped
      at each layer's ``p``.
    sketch: ``"gaussian"`` (i.i.d. ``N(0, 1/p)``) or ``"subcolumns"``.
    damping: ``rho > 0``; also the eigenvalue shift of the paper's method
      (see ``relative_damping``).
    stat_decay: EMA factor ``beta`` in ``[0, 1)``, bias-corrected.
    cov_update_every: statistics period ``T_cov``.
    inv_update_every: factor-refresh period ``T_inv``, a multiple of
      ``T_cov``.
    seed: seed of the sketches.
    sketch_refresh: ``"fixed"`` (default) keeps one sketch per layer, so
      the EMA is exactly ``A_ema S`` (streaming Nyström); ``"reference"``
      draws a new sketch at every statistics update, as the authors' code
      does. ``"fixed"`` was higher in 9 of 11 paired seeds of the
      Fashion-MNIST CNN study (test: 83.1 +- 1.3 % against 82.1 +- 1.8 %,
      5 seeds; ``benchmarks/quality/README.md``).
    nystrom: ``"stable"`` (default), the stable Nyström approximation of
      ``A`` (Tropp et al. 2017; a Gaussian sketch is orthonormalised); or
      ``"shifted"``, the paper's factorisation of ``A + rho I`` shifted by
      ``|lambda_min| + rho``, whose eigenvalues come out below the
      covariance's (all 0 when ``rho`` is comparable to them, so that
      ``P = I / rho``). ``"stable"`` gave 83.0 +- 0.6 % against 79.9 +- 0.7 %
      validation accuracy on a Fashion-MNIST CNN (3 seeds each;
      ``benchmarks/quality/README.md``).
    exclude: regexes (searched in the layer path) or a predicate on the path
      of layers whose gradients pass through unchanged.
    input_axes: ``{path regex: n}`` for kernels whose leading ``n`` axes meet
      the input, where the default rule (all but the bias's axes, or all but
      the last without a bias) is wrong, e.g. a bias-free
      ``DenseGeneral(features=(heads, dim))``; or ``{path regex: (axes...)}``
      when the input axes are not leading (``nn.Einsum("btd,ndh->btnh")``).
    include: if given, regexes or a predicate: only layers it matches (and
      ``exclude`` does not) are preconditioned; the rest pass through.
    stack_axes: ``{path regex: n}`` for layers whose kernels carry ``n``
      leading axes of stacked copies (``nn.scan``/``nn.vmap`` over params);
      each copy gets its own statistics and factors.
    stats_dtype: dtype of the statistics, the factorisations and the state,
      ``"float32"`` (default) or ``"float64"`` (needs ``jax_enable_x64``).
      Activations and gradients of any float dtype (bf16, fp16) are cast to
      it; updates come back in the gradient's dtype.
    axis_name: under ``pmap``/``shard_map``, the mapped axis over which the
      sketched statistics are averaged (``lax.pmean``) before they enter the
      EMA, so every replica holds the same factors. Gradients are not
      averaged here: ``pmean`` them yourself, as with any optax optimizer.
      Not needed under ``jit`` with sharded arrays.
    relative_damping: if true, each layer's damping is ``damping`` times the
      mean eigenvalue of its covariance, ``tr(C) / p`` (estimated at every
      refresh from the sketch as ``tr(S^T C S) / r``), as some K-FAC
      variants scale theirs; ``P`` then shrinks by that mean too. If false
      (default), ``damping`` is the same absolute ``rho`` for every layer.
    model: an ``nnx.Module`` whose layers' kernel layouts (``nnx.Einsum``
      equations, ``nnx.LinearGeneral`` axes) are read now, so that no
      ``input_axes`` is needed for NNX models; ``input_axes`` entries still
      take precedence. Only static attributes are read; no array is kept.
    precision: the ``jax.lax.Precision`` (or its name: ``"highest"``,
      ``"high"``, ``"default"``, ...) of the statistics' products and
      convolutions and of the apply's products, or a pair
      ``(statistics, apply)``. It matters on accelerators only: at
      ``"default"`` a TPU rounds float32 operands to bf16 and an
      A100/H100 to TF32 (``"high"``: 3 bf16 passes on TPU, TF32 on GPU).
      The factorisation's products always run at ``HIGHEST``. The default,
      ``"highest"``, is chosen by emulating those roundings on CPU on the
      activations of the project's CNN and char transformer
      (``python -m benchmarks.precision``, ``benchmarks/README.md``): with
      the apply in bf16, ``P`` turned indefinite on layers with
      ``lam_max / rho`` from about 560 up (TF32: 5e4), and an
      exact-mode layer's error grew from 3e-7 to 6e-3; bf16 statistics
      raised the error up to 2.2x float32's (TF32: 1.0x on Nyström
      layers), bf16 factors up to 12x. Both products are thin (``r``
      columns) beside the layer's own, so ``HIGHEST`` costs little;
      ``("high", "highest")`` kept the Nyström layers within 1.1x of
      float32 (emulated TF32 and 3-pass bf16) at half the statistics' TPU
      cost (3 bf16 passes instead of 6).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the
    keyword ``activations`` from :func:`nysact_optax.capture_activations`,
    or instead ``statistics`` from :func:`nysact_optax.sketched_statistics`
    (accumulated over micro-batches).

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import nysact_optax
    >>> model = nn.Dense(3)
    >>> x = jnp.ones((4, 5))
    >>> params = model.init(jax.random.PRNGKey(0), x)["params"]
    >>> tx = nysact_optax.scale_by_nysact(rank=2)
    >>> state = tx.init(params)
    >>> state.layers[""].basis.shape
    (6, 2)
    >>> apply = nysact_optax.capture_activations(model.apply)
    >>> def loss(p):
    ...   y, acts = apply({"params": p}, x)
    ...   return jnp.sum(y ** 2), acts
    >>> (_, acts), grads = jax.value_and_grad(loss, has_aux=True)(params)
    >>> updates, state = tx.update(grads, state, params, activations=acts)
    >>> int(state.count), updates["kernel"].shape
    (1, (5, 3))

  References:
    Seung, Lee, Ko, "NysAct: A Scalable Preconditioned Gradient Descent using
    Nyström Approximation", IEEE BigData 2024; arXiv:2506.08360.
  """
  _validation.validate_settings(
    rank,
    sketch,
    damping,
    stat_decay,
    cov_update_every,
    inv_update_every,
    sketch_refresh,
    nystrom,
    seed,
    exclude,
    input_axes,
    stats_dtype,
    relative_damping,
    precision,
  )
  stats_precision, apply_precision = _validation.resolve_precision(precision)
  if model is not None:
    input_axes = _model_input_axes(model, input_axes)
  factorise = {
    "shifted": _nystrom.nystrom_shifted,
    "stable": _nystrom.nystrom_stable,
  }[nystrom]
  dtype = jnp.dtype(stats_dtype)

  def layers_of(tree):
    return _tree.find_layers(
      tree,
      rank=rank,
      exclude=exclude,
      input_axes=input_axes,
      include=include,
      stack_axes=stack_axes,
    )

  def config_of(layers):
    return NysActConfig(
      sketch,
      sketch_refresh,
      nystrom == "stable",
      dtype.name,
      cov_update_every,
      tuple(layers),
      stats_precision,
    )

  def init_fn(params):
    layers = layers_of(params)
    base = jax.random.PRNGKey(seed)
    return ScaleByNysActState(
      count=jnp.zeros([], jnp.int32),
      layers={
        layer.name: init_layer_state(layer, jax.random.fold_in(base, i), dtype)
        for i, layer in enumerate(layers)
      },
      config=config_of(layers),
    )

  def update_fn(updates, state, params=None, *, activations=None, statistics=None, **extra_args):
    del params, extra_args
    layers = layers_of(updates)
    _validation.check_state(layers, state)
    config = config_of(layers)
    inputs = None
    if statistics is None:
      inputs = _validation.check_activations(layers, activations, include, exclude)
    elif activations is not None:
      raise ValueError(
        "scale_by_nysact.update got both activations= and statistics=: pass "
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
      state.count,
      cov_update_every,
      lambda k: _statistics.sketches_of(layers, k, config)[1:],
      keys,
    )
    if inputs is not None:
      statistics = {
        layer.name: _when(
          state.count,
          cov_update_every,
          lambda s, x, layer=layer: _statistics.statistics(
            [layer], {layer.name: s}, {layer.name: x}, config
          )[layer.name],
          sketches[layer.name],
          inputs[layer.name],
        )
        for layer in layers
      }

    def statistics_step(layer_states):
      layer_states = _update_statistics(
        layer_states,
        statistics,
        layers=layers,
        config=config,
        keys=keys,
        stat_decay=stat_decay,
        axis_name=axis_name,
      )
      # T_inv is a multiple of T_cov: every refresh falls on a statistics
      # step, and reuses its sketches.
      return _periodic(
        state.count,
        inv_update_every,
        lambda ls: _refresh(
          ls,
          groups,
          batches,
          config=config,
          factorise=factorise,
          stat_decay=stat_decay,
          damping=damping,
          relative_damping=relative_damping,
        ),
        layer_states,
      )

    layer_states = _periodic(state.count, cov_update_every, statistics_step, state.layers)
    updates = _precondition_all(updates, layers, layer_states, damping, dtype, apply_precision)
    new_state = ScaleByNysActState(
      count=optax.safe_increment(state.count), layers=layer_states, config=state.config
    )
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
