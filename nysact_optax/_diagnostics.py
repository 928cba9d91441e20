"""Per-layer health of a NysAct state: failure counters, spectrum, conditioning.

The preconditioner of a layer is ``P = U diag(1/(lam + rho)) U^T + (I - U
U^T)/rho``, so its eigenvalues are ``1/(lam_i + rho)`` and, when ``U`` has
fewer columns than rows (``r < p``), ``1/rho`` on the rest of the space. Its
condition number follows from the stored eigenvalues alone, without forming
``P``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from nysact_optax._state import find_nysact_state

__all__ = ["LayerDiagnostics", "diagnostics"]


class LayerDiagnostics(NamedTuple):
  """What :func:`diagnostics` reports for one layer (scalar arrays).

  Attributes:
    failures: factor refreshes discarded because they were non-finite (the
      previous factors, initially ``P = I / damping``, were kept).
    stat_skips: statistics updates skipped because the new statistics were
      non-finite (non-finite or overflowing activations).
    eig_min: smallest Nyström eigenvalue ``lam`` (of ``U diag(lam) U^T``, the
      approximate covariance). With ``nystrom="shifted"`` the eigenvalues
      usually come out below the covariance's, often clipped to 0 when
      ``damping`` is comparable to them (then ``P = I / damping`` in those
      directions).
      Zero before the first refresh.
    eig_max: largest Nyström eigenvalue ``lam``.
    condition_number: of ``P``: ``(eig_max + damping) / (eig_min + damping)``
      in exact mode (``r = p``), ``(eig_max + damping) / damping`` otherwise.

  Examples:
    >>> import jax.numpy as jnp, nysact_optax
    >>> state = nysact_optax.nysact(0.1, rank=2).init({"dense": {"kernel": jnp.ones((4, 3))}})
    >>> d = nysact_optax.diagnostics(state, damping=1.0)["dense"]  # before any update
    >>> float(d.eig_max), float(d.condition_number)  # P = I / damping
    (0.0, 1.0)
  """

  failures: jax.Array
  stat_skips: jax.Array
  eig_min: jax.Array
  eig_max: jax.Array
  condition_number: jax.Array


def diagnostics(state: Any, *, damping: Any) -> dict[str, LayerDiagnostics]:
  """Per-layer failure counters, eigenvalue range and condition number of ``P``.

  Works eagerly and under ``jax.jit``; the values are scalar arrays.

  Args:
    state: the state of :func:`nysact_optax.scale_by_nysact`, or any optax
      state holding exactly one (that of :func:`nysact_optax.nysact`, or one
      wrapped by ``optax.apply_if_finite``, ``optax.MultiSteps``,
      ``optax.inject_hyperparams``...).
    damping: the ``damping`` the optimizer uses (it is not stored in the
      state; under ``optax.inject_hyperparams`` read it from
      ``state.hyperparams["damping"]``).

  Returns:
    A dict from layer path to :class:`LayerDiagnostics`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import nysact_optax
    >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    >>> tx = nysact_optax.nysact(0.1, rank=2, damping=0.5)
    >>> state = tx.init(params)
    >>> d = nysact_optax.diagnostics(state, damping=0.5)["dense"]
    >>> int(d.failures), int(d.stat_skips), float(d.condition_number)
    (0, 0, 1.0)
  """
  nys = find_nysact_state(state)
  rho = jnp.asarray(damping, jnp.float32)
  report = {}
  for name, ls in nys.layers.items():
    lam = ls.eigvals
    # Per stacked copy for layers under nn.scan / nn.vmap (stack_axes=).
    eig_min, eig_max = jnp.min(lam, axis=-1), jnp.max(lam, axis=-1)
    p, r = ls.basis.shape[-2:]
    floor = eig_min if r >= p else jnp.zeros_like(eig_min)
    layer_rho = rho * ls.damping_scale  # relative_damping=True scales it per layer
    report[name] = LayerDiagnostics(
      failures=ls.failures,
      stat_skips=ls.stat_skips,
      eig_min=eig_min,
      eig_max=eig_max,
      condition_number=(eig_max + layer_rho) / (floor + layer_rho),
    )
  return report
