"""NysAct's preconditioner as an optax gradient transformation: ``scale_by_nysact``.

One ``update`` runs the shared statistics -> factors pipeline
(:class:`nysact_optax._pipeline.Factors`), then applies ``P`` to each layer's
gradient matrix (:mod:`._apply`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import optax

from nysact_optax import _apply, _tree
from nysact_optax._pipeline import Factors
from nysact_optax._state import NysActLayerState, ScaleByNysActState

__all__ = ["NysActLayerState", "ScaleByNysActState", "scale_by_nysact"]


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
      does, which averages statistics of different sketches. The default
      was chosen by a paired-seed ablation (docs: "Choosing
      hyperparameters").
    nystrom: ``"stable"`` (default), the stable Nyström approximation of
      ``A`` (Tropp et al. 2017; a Gaussian sketch is orthonormalised); or
      ``"shifted"``, the paper's factorisation of ``A + rho I`` shifted by
      ``|lambda_min| + rho``, whose eigenvalues come out below the
      covariance's (all 0 when ``rho`` is comparable to them, so that
      ``P = I / rho``). The default was chosen by the same ablation.
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
      A100/H100 to TF32. The factorisation's products always run at
      ``HIGHEST``. The default, ``"highest"``, keeps ``P`` positive
      definite at large ``lam_max / rho``, where a bf16 apply turns it
      indefinite; both products are thin (``r`` columns) beside the
      layer's own, so it costs little. Measurements: docs, "Mixed
      precision".

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
  factors, apply_precision = Factors.create(
    "scale_by_nysact",
    rank=rank,
    sketch=sketch,
    damping=damping,
    stat_decay=stat_decay,
    cov_update_every=cov_update_every,
    inv_update_every=inv_update_every,
    seed=seed,
    sketch_refresh=sketch_refresh,
    nystrom=nystrom,
    exclude=exclude,
    input_axes=input_axes,
    include=include,
    stack_axes=stack_axes,
    stats_dtype=stats_dtype,
    axis_name=axis_name,
    relative_damping=relative_damping,
    model=model,
    precision=precision,
  )

  def update_fn(updates, state, params=None, *, activations=None, statistics=None, **extra_args):
    del params, extra_args
    layers, state = factors.update(updates, state, activations=activations, statistics=statistics)
    updates = _precondition_all(
      updates, layers, state.layers, damping, factors.dtype, apply_precision
    )
    return updates, state

  return optax.GradientTransformationExtraArgs(factors.init, update_fn)
