"""Adam in the eigenbasis of the activation covariance: ``scale_by_nysact_adam``.

Per preconditioned layer, with gradient matrix ``G`` (p x o) and the
orthonormal basis ``U`` (p x r) of the layer's Nyström factors (the same
statistics -> factors pipeline as :func:`nysact_optax.scale_by_nysact`,
:class:`nysact_optax._pipeline.Factors`)::

  R = U^T G                       rotated part (r x o)
  C = G - U R                     complement, plain coordinates (p x o)
  v_R, v_C <- Adam second moments of R and C
  m <- Adam first moment of G     (plain coordinates: m_R = U^T m, m_C = m - U m_R)
  D = U (a_R - U^T a_C) + a_C,    a = m_hat / (sqrt(v_hat) + eps) per part

i.e. ``D = U a_R + (I - U U^T) a_C``. The first moment is linear, so it is
kept once, in plain coordinates: at a basis refresh ``U_old -> U_new`` it
moves with the basis exactly (``m_R = U_new^T M``, ``m_C = M - U_new m_R``
with ``M = U_old m_R + m_C``), at no cost and with no rounding. The rotated
second moment is kept as it is by default (SOAP's choice; ``"rotate"``
maps it through ``(U_new^T U_old)^2``). In exact mode (``rank >= p``) the
basis is complete: there is no complement and ``D = U a_R``. Leaves that are
not preconditioned get Adam. This is a one-sided eigenvalue-corrected
preconditioner (EKFAC; SOAP's one-sided variant) whose basis comes from the
activations through a Nyström sketch.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from nysact_optax import _apply, _options, _tree
from nysact_optax._pipeline import Factors
from nysact_optax._state import ScaleByNysActState

__all__ = ["ScaleByNysActAdamState", "scale_by_nysact_adam"]

_HIGHEST = lax.Precision.HIGHEST


class ScaleByNysActAdamState(NamedTuple):
  """State of :func:`nysact_optax.scale_by_nysact_adam`.

  Attributes:
    count: number of updates so far (int32), Adam's bias-correction step.
    mu: first moment of every leaf, in plain coordinates (the params' tree).
    nu: second moment: Adam's for leaves that are not preconditioned, the
      complement's ``v_C`` for a layer's kernel and bias (zero in exact mode).
    nu_rotated: each layer's rotated second moment ``v_R`` (``(*stack, r, o)``).
    factors: the layers' Nyström factors, a
      :class:`nysact_optax.ScaleByNysActState` (found by
      :func:`nysact_optax.find_nysact_state`, read by
      :func:`nysact_optax.diagnostics` and
      :func:`nysact_optax.sketched_statistics`).

  Examples:
    >>> import jax, jax.numpy as jnp, nysact_optax
    >>> tx = nysact_optax.scale_by_nysact_adam(rank=2)
    >>> state = tx.init({"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}})
    >>> state.nu_rotated["dense"].shape, state.factors.layers["dense"].basis.shape
    ((2, 3), (5, 2))
  """

  count: jax.Array  # type: ignore[assignment]  # optax's field name; shadows tuple.count
  mu: optax.Updates
  nu: optax.Updates
  nu_rotated: dict[str, jax.Array]
  factors: ScaleByNysActState


def _muon_orthogonalise(d: jax.Array) -> jax.Array:
  """optax's Newton-Schulz orthogonalisation of one ``p x o`` matrix.

  It is reached through ``optax.contrib.scale_by_muon`` (no momentum, the
  matrix as one 2-D leaf) because optax exposes the iteration only there:
  this way its coefficients, step count and normalisation are exactly
  optax's and follow its releases, where a copy would drift.
  """
  muon = optax.contrib.scale_by_muon(
    beta=0.0, nesterov=False, weight_dimension_numbers=optax.contrib.MuonDimensionNumbers()
  )
  out, _ = muon.update(d, muon.init(d))
  return out


def _rotated_step(g, m, v_c, v_r, u, *, b1, b2, eps, bc1, bc2, exact, orthogonalise, rms):
  """One layer copy: the new ``(m, v_c, v_r)`` and the step ``D`` (all ``p x o``
  but ``v_r``: ``r x o``)."""
  mm = lambda a, b: jnp.matmul(a, b, precision=_HIGHEST)
  r_g = mm(u.T, g)
  m = b1 * m + (1.0 - b1) * g
  v_r = b2 * v_r + (1.0 - b2) * jnp.square(r_g)
  m_r = mm(u.T, m)
  a_r = (m_r / bc1) / (jnp.sqrt(v_r / bc2) + eps)
  if exact:  # a complete basis: no complement
    d = mm(u, a_r)
  else:
    c = g - mm(u, r_g)
    v_c = b2 * v_c + (1.0 - b2) * jnp.square(c)
    m_c = m - mm(u, m_r)
    a_c = (m_c / bc1) / (jnp.sqrt(v_c / bc2) + eps)
    d = mm(u, a_r - mm(u.T, a_c)) + a_c
  if orthogonalise:
    p, o = d.shape
    d = _muon_orthogonalise(d) * (rms * np.sqrt(max(p, o)))
  return m, v_c, v_r, d


def _rotate_second_moment(v_r, u_old, u_new):
  """``v_R`` carried to the new basis: ``(U_new^T U_old)^2 v_R``."""
  q = jnp.matmul(u_new.T, u_old, precision=_HIGHEST)
  return jnp.matmul(jnp.square(q), v_r, precision=_HIGHEST)


def _rotate_on_refresh(factors, layers, old, new, nu_rotated):
  """Every layer's ``v_R`` carried to its new basis when this step refreshed it."""
  return lax.cond(
    factors.refreshes(old.count),
    lambda v: {
      layer.name: _tree.over_stack(
        layer,
        _rotate_second_moment,
        v[layer.name],
        factors.basis(layer, old),
        factors.basis(layer, new),
      )
      for layer in layers
    },
    lambda v: v,
    nu_rotated,
  )


def _no_layer(name: str) -> bool:
  return False


@_options.documented(table=_options.ADAM_SETTINGS)
def scale_by_nysact_adam(
  *,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  rank: _tree.RankRule = 32,
  oversample: int = 0,
  second_moment: str = "keep",
  orthogonalise: bool = False,
  consistent_rms: float = 0.2,
  sketch: str = "gaussian",
  stat_decay: float = 0.95,
  cov_update_every: int = 5,
  inv_update_every: int = 10,
  seed: int = 0,
  exclude: _tree.LayerFilter = (),
  input_axes: Mapping[str, int | Sequence[int]] | None = None,
  include: _tree.LayerFilter | None = None,
  stack_axes: Mapping[str, int] | None = None,
  stats_dtype: Any = "float32",
  axis_name: str | None = None,
  model: Any = None,
  precision: Any = "highest",
) -> optax.GradientTransformationExtraArgs:
  r"""Adam in the eigenbasis of each layer's activation covariance.

  Each preconditioned layer's gradient matrix ``G`` is split by the
  orthonormal basis ``U`` (p x r) of the Nyström factors of its
  input-activation covariance into a rotated part ``U^T G`` and the
  complement ``(I - U U^T) G``; each part gets Adam (the rotated one in
  rotated coordinates), and the step is mapped back:

  .. math::
    D = U \frac{\hat m_R}{\sqrt{\hat v_R} + \epsilon}
      + (I - U U^\top) \frac{\hat m_C}{\sqrt{\hat v_C} + \epsilon}.

  The first moment is kept in plain coordinates, so it moves with the basis
  at every refresh. With ``rank >= p`` (exact mode) the basis is the full
  eigenbasis and there is no complement. Leaves that are not the kernel or
  bias of a layer (embeddings, norm scales, excluded layers) get Adam.
  ``orthogonalise=True`` replaces each layer's step by its Newton-Schulz
  orthogonalisation, scaled to Adam's RMS.

  The statistics, sketches, periods and factorisation are those of
  :func:`nysact_optax.scale_by_nysact` (the stable Nyström method, a sketch
  held fixed). No inverse is applied, so there is no damping.

  Args:

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``activations=`` (or ``statistics=``) as ``scale_by_nysact``'s does.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, nysact_optax
    >>> model = nn.Dense(3)
    >>> x = jax.random.normal(jax.random.PRNGKey(1), (8, 5))
    >>> params = model.init(jax.random.PRNGKey(0), x)["params"]
    >>> tx = nysact_optax.scale_by_nysact_adam(rank=2)
    >>> state = tx.init(params)
    >>> (_, grads), acts = nysact_optax.value_and_grad(
    ...   lambda p: jnp.sum(model.apply({"params": p}, x) ** 2))(params)
    >>> updates, state = tx.update(grads, state, params, activations=acts)
    >>> updates["kernel"].shape, int(state.count)
    ((5, 3), 1)

  References:
    Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam",
    arXiv:2409.11321; George et al., "Fast Approximate Natural Gradient
    Descent in a Kronecker-factored Eigenbasis", NeurIPS 2018.
  """
  options = _options.Options.build(locals(), _options.ADAM_SETTINGS)
  if isinstance(rank, numbers.Integral) and rank == 0:  # no layer: Adam on every leaf
    options = dataclasses.replace(options, rank=1, include=_no_layer)
  factors = Factors("scale_by_nysact_adam", options)
  dtype = options.dtype
  step = functools.partial(
    _rotated_step, b1=b1, b2=b2, eps=eps, orthogonalise=orthogonalise, rms=consistent_rms
  )

  def init_fn(params):
    fstate = factors.init(params)
    return ScaleByNysActAdamState(
      count=jnp.zeros([], jnp.int32),
      mu=optax.tree.zeros_like(params),
      nu=optax.tree.zeros_like(params),
      nu_rotated={
        layer.name: jnp.zeros(layer.stack_shape + (factors.width(layer), layer.out), dtype)
        for layer in fstate.config.layers
      },
      factors=fstate,
    )

  def update_fn(updates, state, params=None, *, activations=None, statistics=None, **extra_args):
    del params, extra_args
    layers, fstate = factors.update(
      updates, state.factors, activations=activations, statistics=statistics
    )
    count = optax.safe_increment(state.count)
    bc1, bc2 = (1.0 - jnp.asarray(b, dtype) ** count for b in (b1, b2))
    # Adam on every leaf; the layers' kernels and biases are replaced below
    # (XLA drops the plain computation of those).
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    adam = jax.tree.map(
      lambda m, v: (m / bc1.astype(m.dtype)) / (jnp.sqrt(v / bc2.astype(v.dtype)) + eps), mu, nu
    )
    nu_rotated = state.nu_rotated
    if second_moment == "rotate" and layers:
      nu_rotated = _rotate_on_refresh(factors, layers, state.factors, fstate, nu_rotated)

    def rotated(layer, g, m, v_c):
      one = functools.partial(step, bc1=bc1, bc2=bc2, exact=layer.exact)
      args = (g, m, v_c, nu_rotated[layer.name], factors.basis(layer, fstate))
      m, v_c, v_r, d = _tree.over_stack(layer, one, *args)
      return (m, v_c, d), v_r

    (mu, nu, out), nu_rotated = _apply.map_layers(
      rotated,
      layers,
      [updates, state.mu, state.nu],
      [mu, nu, adam],
      dtype=dtype,
      scope="nysact/adam",
    )
    return out, ScaleByNysActAdamState(count, mu, nu, nu_rotated, fstate)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
