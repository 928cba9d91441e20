"""The one optimizer factory of the benchmarks: every optimizer that
``step_time`` (and ``memory``) times and the quality suite trains is built
here.

* :func:`optax_optimizer`: SGD with momentum, AdamW, Muon
  (``optax.contrib.muon``), NysAct (:func:`nysact_optax.nysact`, including
  the exact mode FOOF ``rank=10**9``, the ``reference`` / ``shifted``
  variants, ``graft="rmsprop"`` and its per-leaf grouping) and the
  identity-direction control of the grafted mode;
* :func:`kfac_optimizer`: ``kfac_jax.Optimizer`` with
  :func:`dense_general_kfac_block`, the fix of kfac-jax 0.0.8's block for
  ``DenseGeneral`` kernels (attention projections).

Labels (the names the harnesses use) with their settings:

* :data:`STEP_TIME`: ``sgd``, ``adamw``, ``kfac_5_50``, ``kfac_default``,
  ``nysact_g10`` ... ``foof``: constant learning rates, no weight decay
  unless said (:func:`step_time_optax`, :func:`step_time_kfac`);
* :data:`QUALITY`: ``sgd``, ``adamw``, ``kfac``, ``nysact``,
  ``nysact-reference``, ``nysact-shifted``, ``foof``, ``muon``
  (``optax.contrib.muon`` defaults), ``muon-moonlight`` and ``muon-keller``
  (Muon as its authors run it), ``soap`` (two-sided, :mod:`benchmarks.soap`),
  ``nysact-graft``, ``nysact-graft-leaf``, ``nysact-graft-reldamp``,
  ``graft-identity``: a family and the overrides of the quality run's
  config (:class:`benchmarks.quality.train.RunConfig`), whose defaults per
  family are :data:`QUALITY_WEIGHT_DECAY` and :data:`QUALITY_DAMPING`.

Where the two harnesses build the same family differently, both stay
reachable through arguments (the committed results of each must stay
reproducible):

* SGD: step time uses ``optax.sgd`` alone (no weight decay); the quality
  runs chain ``add_decayed_weights`` (coupled L2, 5e-4) in front of it:
  ``weight_decay`` chooses.
* AdamW: step time ``weight_decay=1e-4``, quality ``1e-2``.
* NysAct: step time leaves ``weight_decay``, ``damping`` and ``seed`` at the
  library's defaults (``None`` here: not passed), quality passes them.
* K-FAC: step time always installs the ``DenseGeneral`` block fix, no
  ``l2_reg`` and no norm constraint; the quality runs install the fix on the
  character LM only (``dense_general_fix``), with ``l2_reg`` = the weight
  decay and ``norm_constraint`` 1e-2.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

import nysact_optax

FAMILIES = (
  "sgd",
  "adamw",
  "muon",
  "muon-moonlight",
  "muon-keller",
  "soap",
  "nysact",
  "graft-identity",
  "nysact-adam",
  "adam-orth",
  "kfac",
)
# Step time: NysAct's and K-FAC's periods at equal T_cov, T_inv.
COV_PERIOD = 5
INVERSE_PERIOD = 50

# Quality runs: defaults per family (a RunConfig may override each).
QUALITY_WEIGHT_DECAY = {
  "sgd": 5e-4,
  "adamw": 1e-2,
  "kfac": 5e-4,
  "nysact": 5e-4,
  "muon": 1e-2,
  "muon-moonlight": 1e-2,
  "muon-keller": 1e-2,
  "soap": 1e-2,
  "graft-identity": 1e-2,
  "nysact-adam": 1e-2,
  "adam-orth": 1e-2,
}
# K-FAC's fixed damping: 1e-3 (kfac-jax's usual start for adaptive damping)
# collapses to chance at the first inverse refresh with a fixed damping; 0.1
# trained on digits (the suite also tries 0.01 and 1.0 at the tuned lr).
QUALITY_DAMPING = {"nysact": 1.0, "kfac": 0.1}
# Muon: the Adam learning rate of its non-matrix parameters over its own.
MUON_ADAM_RATIO = 0.05
# Muon as its authors run it: the layers that get AdamW besides embeddings,
# biases and norms (the benchmarks' models name their head ``head`` and the
# ViT's patch embedding, a Dense, ``patch_embed``).
MUON_EXCLUDE = ("^head$", "^patch_embed$")
MOONLIGHT_RMS = 0.2  # consistent_rms: the update RMS matched to AdamW's


def _muon_layout(params):
  """Muon's authors' layout: hidden matrices by their own axes (see
  :func:`nysact_optax.muon_dimension_numbers`), the rest to AdamW."""
  return nysact_optax.muon_dimension_numbers(params, exclude=MUON_EXCLUDE)


def _rms() -> optax.GradientTransformation:
  """The layer-wise RMSProp norm NysAct's grafted mode (and its control) use."""
  return optax.scale_by_rms(decay=0.999, eps=1e-8, eps_in_sqrt=False, bias_correction=True)


def _orthogonalised_rms(rms: float) -> optax.GradientTransformation:
  """Each leaf's update (input axes leading, outputs last, as a ``p x o``
  matrix with the bias alone) orthogonalised by optax's Newton-Schulz
  iteration, scaled to RMS about ``rms``."""

  def update_fn(updates, state, params=None):
    del params

    def one(u):
      m = u.reshape(-1, u.shape[-1]) if u.ndim > 1 else u.reshape(1, -1)
      muon = optax.contrib.scale_by_muon(
        beta=0.0, nesterov=False, weight_dimension_numbers=optax.contrib.MuonDimensionNumbers()
      )
      o, _ = muon.update(m, muon.init(m))
      return (o * (rms * math.sqrt(max(m.shape)))).reshape(u.shape)

    return jax.tree.map(one, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def optax_optimizer(
  family: str,
  learning_rate: optax.ScalarOrSchedule,
  *,
  momentum: float = 0.9,
  weight_decay: float | None = None,
  damping: float | None = None,
  seed: int | None = None,
  nysact: Mapping[str, Any] | None = None,
  adam_ratio: float | None = None,
) -> optax.GradientTransformation:
  """An optax optimizer of ``family`` (all but ``kfac``).

  ``weight_decay``/``damping``/``seed`` ``None``: not passed (the family's own
  default; SGD: no decay term at all). ``nysact``: keyword arguments of
  :func:`nysact_optax.nysact` (NysAct) or its ``exclude``/``include`` (the
  identity control); ``graft_group="leaf"`` grafts per leaf instead of per
  layer. ``adam_ratio``: Muon's Adam lr over its lr (default
  :data:`MUON_ADAM_RATIO`).
  """
  lr = learning_rate
  wd = weight_decay
  if family == "sgd":
    # quality: coupled L2 in front of momentum SGD; step time: optax.sgd alone
    if wd is None:
      return optax.sgd(lr, momentum=momentum)
    parts = [optax.add_decayed_weights(wd)] if wd else []
    return optax.chain(*parts, optax.sgd(lr, momentum=momentum))
  if family == "adamw":
    return optax.adamw(lr, weight_decay=1e-4 if wd is None else wd)
  if family == "muon":
    ratio = MUON_ADAM_RATIO if adam_ratio is None else adam_ratio
    adam_lr = (lambda t: ratio * lr(t)) if callable(lr) else ratio * lr
    wd = 0.0 if wd is None else wd
    return optax.contrib.muon(lr, adam_learning_rate=adam_lr, weight_decay=wd, adam_weight_decay=wd)
  if family in ("muon-moonlight", "muon-keller"):
    # Muon on the hidden matrices only (Keller Jordan; Moonlight, arXiv
    # 2502.16982): AdamW on embeddings, head, biases and norms; decoupled
    # weight decay on both parts. Moonlight: consistent_rms=0.2, one lr for
    # both; Keller: width scaling sqrt(max(1, out/in)), its own Adam lr.
    wd = 0.0 if wd is None else wd
    if family == "muon-moonlight":
      adam_lr, rms = lr, MOONLIGHT_RMS
    else:
      ratio = MUON_ADAM_RATIO if adam_ratio is None else adam_ratio
      adam_lr, rms = (lambda t: ratio * lr(t)) if callable(lr) else ratio * lr, None
    return optax.contrib.muon(
      lr,
      adam_learning_rate=adam_lr,
      weight_decay=wd,
      adam_weight_decay=wd,
      muon_weight_dimension_numbers=_muon_layout,
      consistent_rms=rms,
    )
  if family == "soap":
    from benchmarks import soap

    return soap.soap(lr, weight_decay=1e-2 if wd is None else wd)
  kw = dict(nysact or {})
  if family == "nysact":
    extra = {
      k: v for k, v in (("weight_decay", wd), ("damping", damping), ("seed", seed)) if v is not None
    }
    if kw.pop("graft_group", "layer") == "leaf":  # the grouping ablation
      direction = nysact_optax.scale_by_nysact(
        **{k: v for k, v in extra.items() if k != "weight_decay"},
        **{k: v for k, v in kw.items() if k != "graft"},
      )
      return optax.chain(
        nysact_optax.graft(
          direction, _rms(), mask=nysact_optax.preconditioned_mask(direction), group="leaf"
        ),
        optax.ema(momentum, debias=True),
        optax.add_decayed_weights(wd or 0.0),
        optax.scale_by_learning_rate(lr),
      )
    return nysact_optax.nysact(lr, momentum=momentum, **extra, **kw)
  if family == "nysact-adam":
    # ``basis="gradients"`` (the one-sided SOAP control) is the same
    # transformation in exact mode fed G G^T as its statistics: the trainer
    # computes them (benchmarks.quality.train), the optimizer is unchanged.
    kw.pop("basis", None)
    extra = {k: v for k, v in (("weight_decay", wd), ("seed", seed)) if v is not None}
    return nysact_optax.nysact_adam(lr, **extra, **kw)
  if family == "adam-orth":
    # The orthogonalised mode's identity-basis control: Adam, then each
    # layer's step orthogonalised as Muon does, at Adam's RMS (the same
    # consistent-RMS scale as nysact_adam(orthogonalise=True)), decoupled
    # weight decay; optax's own pieces.
    mask = nysact_optax.preconditioned_mask(
      nysact_optax.scale_by_nysact(**{k: v for k, v in kw.items() if k in ("exclude", "include")})
    )
    return optax.chain(
      optax.scale_by_adam(),
      optax.masked(_orthogonalised_rms(0.2), mask),
      optax.add_decayed_weights(wd or 0.0),
      optax.scale_by_learning_rate(lr),
    )
  if family == "graft-identity":
    # NysAct's grafted mode with the identity for its direction: the same
    # groups (NysAct's layers; the rest get RMSProp's step), momentum and
    # decay, no preconditioner.
    mask = nysact_optax.preconditioned_mask(
      nysact_optax.scale_by_nysact(**{k: v for k, v in kw.items() if k in ("exclude", "include")})
    )
    return optax.chain(
      nysact_optax.graft(optax.identity(), _rms(), mask=mask),
      optax.ema(momentum, debias=True),
      optax.add_decayed_weights(wd or 0.0),
      optax.scale_by_learning_rate(lr),
    )
  raise ValueError(f"{family!r} is not an optax family; choose from {FAMILIES[:-1]}")


def dense_general_kfac_block():
  """kfac-jax's repeated-dense block, fixed for DenseGeneral kernels.

  kfac-jax 0.0.8 tags flax's attention projections (kernels ``(d, heads,
  head_dim)`` and ``(heads, head_dim, d)``) as ``repeated_dense`` but its
  block assumes the kernel's last axis is the only output axis (and the
  input's last axis the only input axis), which fails with a broadcasting
  error. This block reads the input/output split off the shapes and flattens
  both sides, which is K-FAC's usual dense block for these layers; plain
  ``Dense`` layers get exactly kfac-jax's own computation.
  """
  import kfac_jax

  base = kfac_jax.curvature_blocks.RepeatedDenseKroneckerFactored

  class DenseGeneralKroneckerFactored(base):
    def __init__(
      self,
      layer_tag_eq,
      use_masking: bool = True,
      parameters_specs=None,
      parameters_concat_axis: int = 0,
    ):
      self._layer_tag_eq = layer_tag_eq
      kernel = tuple(self.parameters_shapes[0])
      x_shape = tuple(self.inputs_shapes[0])
      n_in = next(
        (n for n in range(1, len(kernel)) if x_shape[len(x_shape) - n :] == kernel[:n]),
        len(kernel) - 1,
      )
      self._n_in = n_in
      letters = "abcdefgh"[: len(kernel)]
      specs = [f"{letters} -> ({letters[:n_in]})({letters[n_in:]})"]
      if len(self.parameters_shapes) == 2:
        b = letters[: len(kernel) - n_in]
        specs.append(f"{b} -> 1({b})")
      super().__init__(
        layer_tag_eq,
        use_masking=use_masking,
        parameters_specs=specs,
        parameters_concat_axis=parameters_concat_axis,
      )

    def update_curvature_matrix_estimate(
      self, state, estimation_data, ema_old, ema_new, identity_weight, batch_size
    ):
      del identity_weight
      state = state.copy()
      [x] = estimation_data.primals.inputs
      [dy] = estimation_data.tangents.outputs
      kernel = self.parameters_shapes[0]
      p_in = math.prod(kernel[: self._n_in])
      rows = x.shape[: x.ndim - self._n_in]
      x = x.reshape(rows + (p_in,))
      dy = dy.reshape(rows + (-1,))
      if self._use_masking:
        mask = 1.0 - jnp.all(dy == 0.0, axis=-1, keepdims=True)
        x = x * mask
        total = jnp.sum(mask)
      else:
        total = math.prod(dy.shape[:-1])
      x = x.reshape([-1, x.shape[-1]])
      dy = dy.reshape([-1, dy.shape[-1]])
      if self.number_of_parameters == 2:
        x = jnp.concatenate([x, jnp.ones_like(x[:, :1])], axis=1)
      input_stats = jnp.einsum("ay,az->yz", x, x) / batch_size
      output_stats = jnp.einsum("ay,az->yz", dy, dy) / batch_size
      state.factors[0].update(input_stats, ema_old, ema_new)
      state.factors[1].update(output_stats, ema_old, ema_new)
      state.average_repeats.update(total / batch_size, ema_old, ema_new)
      return state

  return DenseGeneralKroneckerFactored


def kfac_optimizer(
  value_and_grad_func: Callable,
  *,
  has_state: bool,
  cov_every: int,
  inv_every: int,
  l2_reg: float = 0.0,
  norm_constraint: float | None = None,
  dense_general_fix: bool = True,
):
  """``kfac_jax.Optimizer`` with fixed hyperparameters passed to each
  ``step`` (no adaptive lr, momentum or damping), no burn-in, one device."""
  import kfac_jax

  extra = {}
  if dense_general_fix:
    extra["layer_tag_to_block_ctor"] = {"repeated_dense": dense_general_kfac_block()}
  if norm_constraint is not None:
    extra["norm_constraint"] = norm_constraint
  return kfac_jax.Optimizer(
    value_and_grad_func=value_and_grad_func,
    l2_reg=l2_reg,
    value_func_has_state=has_state,
    curvature_update_period=cov_every,
    inverse_update_period=inv_every,
    num_burnin_steps=0,
    multi_device=False,
    **extra,
  )


# --------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepTimeLabel:
  """One optimizer of the step-time benchmark."""

  family: str
  help: str
  learning_rate: float = 0.05
  weight_decay: float | None = None
  nysact: tuple[tuple[str, Any], ...] = ()  # nysact_optax.nysact kwargs
  kfac_periods: tuple[int, int] | None = None
  kfac_hyper: tuple[float, float, float] = (1e-3, 0.9, 0.1)  # lr, momentum, damping

  @property
  def periods(self) -> tuple[int, int] | None:
    """(T_cov, T_inv) of a curvature optimizer, else ``None``."""
    if self.family == "kfac":
      return self.kfac_periods
    if self.family in ("nysact", "nysact-adam"):
      kw = dict(self.nysact)
      return kw["cov_update_every"], kw["inv_update_every"]
    return None


def _nys(rank: int, sketch: str | None = None, **more: Any) -> tuple[tuple[str, Any], ...]:
  kw: dict[str, Any] = {"cov_update_every": COV_PERIOD, "inv_update_every": INVERSE_PERIOD}
  if sketch is not None:
    kw["sketch"] = sketch
  kw["rank"] = rank
  kw.update(more)
  return tuple(kw.items())


STEP_TIME: dict[str, StepTimeLabel] = {
  "sgd": StepTimeLabel("sgd", "optax.sgd(0.05, momentum=0.9)"),
  "adamw": StepTimeLabel(
    "adamw", "optax.adamw(1e-3, weight_decay=1e-4)", learning_rate=1e-3, weight_decay=1e-4
  ),
  "kfac_5_50": StepTimeLabel(
    "kfac",
    "kfac_jax.Optimizer, curvature every 5, inverses every 50 steps",
    kfac_periods=(COV_PERIOD, INVERSE_PERIOD),
  ),
  "kfac_default": StepTimeLabel(
    "kfac",
    "kfac_jax.Optimizer at its defaults: curvature every step, inverses every 5",
    kfac_periods=(1, 5),
  ),
  "nysact_g10": StepTimeLabel(
    "nysact",
    "nysact(0.05, rank=10, sketch='gaussian'), T_cov=5, T_inv=50",
    nysact=_nys(10, "gaussian"),
  ),
  "nysact_g50": StepTimeLabel(
    "nysact", "nysact(0.05, rank=50, sketch='gaussian')", nysact=_nys(50, "gaussian")
  ),
  "nysact_s10": StepTimeLabel(
    "nysact", "nysact(0.05, rank=10, sketch='subcolumns')", nysact=_nys(10, "subcolumns")
  ),
  "nysact_s50": StepTimeLabel(
    "nysact", "nysact(0.05, rank=50, sketch='subcolumns')", nysact=_nys(50, "subcolumns")
  ),
  "foof": StepTimeLabel(
    "nysact",
    "nysact(0.05, rank=10**9): exact mode (FOOF), eigh of every p x p covariance",
    nysact=_nys(10**9),
  ),
  "nysact_g10_fixed": StepTimeLabel(
    "nysact",
    "nysact(0.05, rank=10, sketch_refresh='fixed')",
    nysact=_nys(10, "gaussian", sketch_refresh="fixed"),
  ),
  "nysact_g10_stable": StepTimeLabel(
    "nysact",
    "nysact(0.05, rank=10, nystrom='stable')",
    nysact=_nys(10, "gaussian", nystrom="stable"),
  ),
  # The library as a user gets it (issue 14's zoo): every default.
  "nysact": StepTimeLabel("nysact", "nysact(0.05): the library defaults", nysact=_nys(10)),
  "nysact_graft": StepTimeLabel(
    "nysact",
    "nysact(1e-3, graft='rmsprop', weight_decay=1e-4): the grafted mode, against AdamW",
    learning_rate=1e-3,
    weight_decay=1e-4,
    nysact=_nys(10, graft="rmsprop"),
  ),
  # Issue 25: Adam in the activation eigenbasis at its defaults (rank 32,
  # statistics every 5 steps, refresh every 10), and its orthogonalised
  # variant, against AdamW and Muon (Adam at 0.05x on the other leaves).
  "muon": StepTimeLabel(
    "muon", "optax.contrib.muon(0.05, adam_learning_rate=2.5e-3)", weight_decay=0.0
  ),
  "nysact_adam": StepTimeLabel(
    "nysact-adam",
    "nysact_adam(1e-3, weight_decay=1e-4): the library defaults, against AdamW",
    learning_rate=1e-3,
    weight_decay=1e-4,
    nysact=(("cov_update_every", 5), ("inv_update_every", 10)),
  ),
  "nysact_adam_orth": StepTimeLabel(
    "nysact-adam",
    "nysact_adam(1e-3, orthogonalise=True): against Muon",
    learning_rate=1e-3,
    weight_decay=1e-4,
    nysact=(("cov_update_every", 5), ("inv_update_every", 10), ("orthogonalise", True)),
  ),
}
# The zoo's selection: the library defaults against the peers a user would pick.
STEP_TIME_ZOO = ("sgd", "adamw", "nysact", "nysact_graft")
# Issue 25's cost comparison: nysact_adam against AdamW and Muon.
STEP_TIME_ADAM = ("adamw", "muon", "nysact_adam", "nysact_adam_orth")
# The step-time benchmark's default selection.
STEP_TIME_DEFAULT = (
  "sgd",
  "adamw",
  "kfac_5_50",
  "kfac_default",
  "nysact_g10",
  "nysact_g50",
  "nysact_s10",
  "nysact_s50",
  "foof",
)


def step_time_optax(label: str) -> optax.GradientTransformation:
  """The optax optimizer of a step-time label (not K-FAC)."""
  spec = STEP_TIME[label]
  if spec.family == "kfac":
    raise ValueError(f"{label!r} is K-FAC: use step_time_kfac")
  return optax_optimizer(
    spec.family,
    spec.learning_rate,
    momentum=0.9,
    weight_decay=spec.weight_decay,
    nysact=dict(spec.nysact),
  )


def step_time_kfac(label: str, value_and_grad_func: Callable, *, has_state: bool):
  """The ``kfac_jax.Optimizer`` of a step-time K-FAC label (its fixed lr,
  momentum and damping: ``STEP_TIME[label].kfac_hyper``)."""
  cov, inv = STEP_TIME[label].kfac_periods
  return kfac_optimizer(value_and_grad_func, has_state=has_state, cov_every=cov, inv_every=inv)


# Quality labels: (family, overrides of the run's config).
QUALITY: dict[str, tuple[str, dict[str, Any]]] = {
  "sgd": ("sgd", {}),
  "adamw": ("adamw", {}),
  "kfac": ("kfac", {}),
  # The library's defaults (nystrom="stable", sketch_refresh="fixed").
  "nysact": ("nysact", {}),
  # The defaults while the study ran, before the last ablation result.
  "nysact-reference": ("nysact", {"nysact": (("sketch_refresh", "reference"),)}),
  # The paper's method, the defaults before the ablations: their base.
  "nysact-shifted": (
    "nysact",
    {"nysact": (("nystrom", "shifted"), ("sketch_refresh", "reference"))},
  ),
  "foof": ("nysact", {"nysact": (("rank", 10**9),)}),
  # Issue 13. Muon: optax.contrib.muon defaults (no dimension numbers: every
  # 2-D leaf to Muon, every other leaf to Adam), Adam at 0.05 x its lr on the
  # non-matrix parameters (the tuned 0.05 / 2.5e-3), decoupled
  # weight decay 1e-2 on both.
  "muon": ("muon", {}),
  # Issue 29: the peers at full strength. Muon as its authors run it
  # (benchmarks.optimizers._muon_layout): Moonlight's recipe (one lr,
  # consistent RMS 0.2) and Keller Jordan's (width scaling, a Muon lr and
  # an Adam lr: the run config's adam_lr); two-sided SOAP (benchmarks.soap,
  # b1 = b2 = 0.95, refresh every 10, max_precond_dim 10000).
  "muon-moonlight": ("muon-moonlight", {}),
  "muon-keller": ("muon-keller", {}),
  "soap": ("soap", {}),
  # NysAct's direction grafted onto the layer-wise RMSProp norm, debiased
  # EMA momentum, decoupled weight decay 1e-2 (as AdamW's).
  "nysact-graft": ("nysact", {"nysact": (("graft", "rmsprop"),), "weight_decay": 1e-2}),
  # The same with one graft group per leaf (kernel, bias) instead of per layer.
  "nysact-graft-leaf": (
    "nysact",
    {"nysact": (("graft", "rmsprop"), ("graft_group", "leaf")), "weight_decay": 1e-2},
  ),
  # The grafted mode with the damping relative to each layer's scale
  # (damping x tr(C)/p, the scale_by_nysact option of issue 13's item 3).
  "nysact-graft-reldamp": (
    "nysact",
    {"nysact": (("graft", "rmsprop"), ("relative_damping", True)), "weight_decay": 1e-2},
  ),
  # The control: the same graft with an identity direction.
  "graft-identity": ("graft-identity", {}),
  # Issue 25: Adam in the eigenbasis of the activation covariance (the
  # library's defaults), its exact mode, its orthogonalised variant, the
  # second-moment policy and the rank ablations, the gradient-basis
  # control (one-sided SOAP: the same optimizer in exact mode with G G^T as
  # its statistics) and the orthogonalised variant's identity control.
  "nysact-adam": ("nysact-adam", {}),
  "nysact-adam-exact": ("nysact-adam", {"nysact": (("rank", 10**9),)}),
  "nysact-adam-orth": ("nysact-adam", {"nysact": (("orthogonalise", True),)}),
  "nysact-adam-orth-exact": (
    "nysact-adam",
    {"nysact": (("orthogonalise", True), ("rank", 10**9))},
  ),
  "nysact-adam-rotate": ("nysact-adam", {"nysact": (("second_moment", "rotate"),)}),
  "nysact-adam-r8": ("nysact-adam", {"nysact": (("rank", 8),)}),
  "nysact-adam-r16": ("nysact-adam", {"nysact": (("rank", 16),)}),
  "nysact-adam-r64": ("nysact-adam", {"nysact": (("rank", 64),)}),
  "nysact-adam-os16": ("nysact-adam", {"nysact": (("oversample", 16),)}),
  "nysact-adam-cov1": ("nysact-adam", {"nysact": (("cov_update_every", 1),)}),
  "soap-1s": ("nysact-adam", {"nysact": (("rank", 10**9), ("basis", "gradients"))}),
  "adam-orth": ("adam-orth", {}),
}


def quality_optax(
  family: str,
  learning_rate: optax.ScalarOrSchedule,
  *,
  momentum: float = 0.9,
  weight_decay: float | None = None,
  damping: float | None = None,
  seed: int = 0,
  nysact: Mapping[str, Any] | None = None,
  adam_ratio: float | None = None,
) -> optax.GradientTransformation:
  """A quality run's optax optimizer: the family's quality defaults
  (:data:`QUALITY_WEIGHT_DECAY`, :data:`QUALITY_DAMPING`) where ``None``."""
  wd = QUALITY_WEIGHT_DECAY[family] if weight_decay is None else weight_decay
  if damping is None:
    damping = QUALITY_DAMPING.get(family)
  return optax_optimizer(
    family,
    learning_rate,
    momentum=momentum,
    weight_decay=wd,
    damping=damping if family == "nysact" else None,
    seed=seed if family in ("nysact", "nysact-adam") else None,
    nysact=nysact,
    adam_ratio=adam_ratio,
  )


def needs_activations(family: str) -> bool:
  """Whether ``update`` takes NysAct's ``activations``."""
  return family in ("nysact", "nysact-adam")
