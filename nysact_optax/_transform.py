"""NysAct's preconditioner as an optax gradient transformation: ``scale_by_nysact``.

One ``update`` runs the shared statistics -> factors pipeline
(:class:`nysact_optax._pipeline.Factors`), then applies ``P`` to each layer's
gradient matrix (:mod:`._apply`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from nysact_optax import _apply, _nystrom, _options, _tree
from nysact_optax._pipeline import Factorise, Factors
from nysact_optax._state import NysActLayerState, ScaleByNysActState

__all__ = ["NysActLayerState", "ScaleByNysActState", "scale_by_nysact"]

_HIGHEST = jax.lax.Precision.HIGHEST


def _inverse_factorisation(damping, nystrom: str, relative_damping: bool) -> Factorise:
  """The refresh's factorisation (:func:`nysact_optax._pipeline.stable_factors`'s
  signature) of the inverse apply: ``nystrom``'s method at ``damping`` (times
  the layer's mean eigenvalue with ``relative_damping``)."""
  method = {"shifted": _nystrom.nystrom_shifted, "stable": _nystrom.nystrom_stable}[nystrom]

  def factorise(c_hat, sketch, *, exact, rank, width):
    scale = jnp.ones((), c_hat.dtype)
    if relative_damping:  # tr(C) / p, estimated by tr(S^T C S) / r (the sketch is I when exact)
      mean = jnp.trace(c_hat if exact else jnp.matmul(sketch.T, c_hat, precision=_HIGHEST))
      scale = jnp.maximum(mean / rank, jnp.finfo(c_hat.dtype).tiny)
    if exact:
      return (*_nystrom.exact_eigh(c_hat), scale)
    return (*method(c_hat, sketch, damping * scale, p=width), scale)

  return factorise


@_options.documented
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
  options = _options.Options.build(locals())
  factorise = _inverse_factorisation(damping, nystrom, relative_damping)
  factors = Factors("scale_by_nysact", options, factorise, orthonormal=nystrom == "stable")

  def apply(g, b, u, lam, scale):  # one copy of a layer: P [g; b]
    return _apply.precondition_parts(
      g, b, u, lam, damping * scale, precision=options.apply_precision
    )

  def update_fn(updates, state, params=None, *, activations=None, statistics=None, **extra_args):
    del params, extra_args
    layers, state = factors.update(updates, state, activations=activations, statistics=statistics)

    def precondition(layer, parts):
      ls = state.layers[layer.name]
      return (_tree.over_stack(layer, apply, *parts, ls.basis, ls.eigvals, ls.damping_scale),), None

    (updates,), _ = _apply.map_layers(
      precondition,
      layers,
      [updates],
      [updates],
      dtype=options.dtype,
      parts=True,
      scope="nysact/apply",
    )
    return updates, state

  return optax.GradientTransformationExtraArgs(factors.init, update_fn)
