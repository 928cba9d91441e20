"""One training-quality run: a task, an optimizer, a learning rate, a seed -> one JSON.

Tasks (data from ``benchmarks.data``, models from ``benchmarks.models``):

* ``digits``: the demo's two-conv CNN on scikit-learn's 8x8 digits (smoke task);
* ``fmnist_cnn``: :class:`FashionCNN` on Fashion-MNIST, random crop (pad 2) and
  horizontal flip;
* ``fmnist_resnet``: :class:`ResNet20` (BatchNorm) on Fashion-MNIST, same
  augmentation;
* ``fmnist_vit``: :class:`ViT` (patches of 4, width 128, depth 4) on
  Fashion-MNIST, same augmentation;
* ``char_lm``: :class:`CharTransformer` on the King James Bible, validation loss
  in bits per character on held-out books at a fixed token budget.

Optimizers: ``sgd`` (momentum), ``adamw``, ``kfac`` (kfac-jax), ``nysact``
(:func:`nysact_optax.nysact`; ``graft=rmsprop`` among ``--nysact`` options
gives the grafted mode), ``muon`` (``optax.contrib.muon``: Newton-Schulz
orthogonalised momentum on 2-D kernels, Adam at ``--adam-lr`` on the other
parameters) and ``graft-identity`` (the control of NysAct's grafted mode:
the same graft, EMA momentum and decoupled weight decay with an identity
direction, i.e. layer-wise RMSProp-normalised momentum SGD).

``--split val`` trains on the training set minus a validation split carved
from it (the last 10000 images of a fixed permutation; for the LM, 10% of
the training books' stream) and evaluates on that split; ``--split test``
trains on the whole training set and evaluates on the test set (LM: on the
held-out books).

Every optimizer follows the same learning-rate schedule: linear warm-up over
``--warmup`` of the steps, then cosine decay to 0, scaled by ``--lr``. The
peak learning rate is an argument of the compiled step, so runs that differ
only in ``--lr`` or ``--seed`` share one compilation when they run in one
process (see :mod:`benchmarks.quality.suite`).

The JSON holds the configuration, the curves (evaluation metric against
steps and against training wall-clock, which excludes evaluation and the
first, compiling step), the final metric on the whole evaluation set, and
for NysAct the error of the preconditioner against the exact damped inverse
of the same statistics for one probe layer.

Usage (from the repository root)::

  python -m benchmarks.quality.train --task digits --optimizer nysact --lr 0.1 \\
      --steps 200 --out /tmp/run.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import nysact_optax
from benchmarks import _reference, optimizers, results, tasks
from nysact_optax import linalg

OPTIMIZERS = optimizers.FAMILIES
TASKS = tuple(tasks.QUALITY_TASKS)
# Defaults per optimizer family (benchmarks.optimizers); every one can be
# overridden in a RunConfig.
WEIGHT_DECAY = optimizers.QUALITY_WEIGHT_DECAY
DAMPING = optimizers.QUALITY_DAMPING
VALIDATION_SIZE = tasks.VALIDATION_SIZE
Data = tasks.Data
augment = tasks.augment


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything that defines one run (what the JSON's ``config`` holds).

  ``nysact`` holds keyword arguments of :func:`nysact_optax.nysact` beyond
  the defaults (``rank``, ``sketch``, ``sketch_refresh``, ``nystrom``,
  ``cov_update_every``, ``inv_update_every``, ``stat_decay``); ``model``
  holds keyword arguments of the task's model (e.g. ``features``).
  """

  task: str = "fmnist_cnn"
  optimizer: str = "nysact"
  lr: float = 0.1
  seed: int = 0
  steps: int = 500
  batch_size: int = 128
  split: str = "test"
  warmup: float = 0.05
  momentum: float = 0.9
  weight_decay: float | None = None
  damping: float | None = None
  nysact: tuple[tuple[str, Any], ...] = ()
  kfac_periods: tuple[int, int] = (5, 50)
  kfac_norm_constraint: float | None = 1e-2
  model: tuple[tuple[str, Any], ...] = ()
  augment: bool = True
  train_limit: int | None = None
  eval_limit: int | None = None
  eval_every: int = 100
  eval_size: int = 2000
  track_layer: str | None = None
  adam_lr: float | None = None  # muon: the peak lr of its Adam parameters

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["nysact"] = dict(self.nysact)
    out["model"] = dict(self.model)
    out["weight_decay"] = self.resolved_weight_decay
    out["damping"] = self.resolved_damping
    return out

  @classmethod
  def from_json(cls, config: dict[str, Any]) -> RunConfig:
    """The run's config from a result JSON's ``config`` (inverse of :meth:`to_json`)."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in config.items() if k in names}
    for key in ("nysact", "model"):
      kw[key] = tuple(
        (k, tuple(v) if isinstance(v, list) else v) for k, v in (kw.get(key) or {}).items()
      )
    if kw.get("kfac_periods") is not None:
      kw["kfac_periods"] = tuple(kw["kfac_periods"])
    return cls(**kw)

  @property
  def resolved_weight_decay(self) -> float:
    return WEIGHT_DECAY[self.optimizer] if self.weight_decay is None else self.weight_decay

  @property
  def resolved_damping(self) -> float | None:
    return DAMPING.get(self.optimizer) if self.damping is None else self.damping

  def compile_key(self) -> tuple:
    """What the compiled step depends on (not the lr, the seed or the data)."""
    return (
      self.task,
      self.optimizer,
      self.batch_size,
      self.momentum,
      self.resolved_weight_decay,
      self.resolved_damping,
      self.nysact,
      self.kfac_periods,
      self.kfac_norm_constraint,
      self.model,
      self.track_layer,
      self.steps,
      self.warmup,
      self.adam_ratio,
    )

  @property
  def adam_ratio(self) -> float | None:
    """Muon: its Adam learning rate over its (peak) learning rate."""
    if self.optimizer not in ("muon", "muon-keller"):
      return None
    return (self.adam_lr if self.adam_lr is not None else 0.05 * self.lr) / self.lr


# --------------------------------------------------------------------------
# Data, model, loss: benchmarks.tasks, read through the run's config
# --------------------------------------------------------------------------


def _context(cfg: RunConfig) -> int | None:
  return dict(cfg.model).get("context", 64) if cfg.task == "char_lm" else None


def load_data(cfg: RunConfig) -> Data:
  """The training and evaluation arrays of ``cfg.task`` for ``cfg.split``
  (cached: runs of one process share them)."""
  return tasks.load_data(cfg.task, cfg.split, cfg.train_limit, cfg.eval_limit, _context(cfg))


def train_batches(cfg: RunConfig, d: Data) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  return tasks.train_batches(
    cfg.task,
    d,
    batch_size=cfg.batch_size,
    seed=cfg.seed,
    augmented=cfg.augment,
    context=_context(cfg) or 64,
  )


def make_model(cfg: RunConfig, d: Data) -> tuple[nn.Module, int]:
  """The model and the number of tokens per example (1 for images)."""
  vocab = d.num_classes if cfg.task == "char_lm" else None
  return tasks.make_model(cfg.task, vocab_size=vocab, **dict(cfg.model))


def _has_state(cfg: RunConfig) -> bool:
  return tasks.has_state(cfg.task)


def make_loss(
  cfg: RunConfig, model: nn.Module, tokens: int, *, capture: bool, register_kfac: bool = False
):
  """``loss(params, model_state, x, y) -> (loss, (model_state, activations))``."""
  return tasks.make_loss(
    model, stateful=_has_state(cfg), tokens=tokens, capture=capture, register_kfac=register_kfac
  )


def make_eval(cfg: RunConfig, model: nn.Module):
  """Jitted ``(params, model_state, x, y) -> (sum of losses, correct, count)``."""
  return tasks.make_eval(model, stateful=_has_state(cfg))


def schedule(cfg: RunConfig) -> optax.Schedule:
  """Warm-up then cosine decay to 0, with peak 1 (the peak lr scales it)."""
  warm = max(1, round(cfg.warmup * cfg.steps))
  return optax.warmup_cosine_decay_schedule(
    0.0, 1.0, warmup_steps=warm, decay_steps=max(cfg.steps, warm + 1), end_value=0.0
  )


def make_tx(cfg: RunConfig, seed: int) -> optax.GradientTransformation:
  """The optax optimizer with peak learning rate 1 (scaled in the step)."""
  if cfg.optimizer == "kfac":
    raise ValueError(f"{cfg.optimizer!r} is not an optax optimizer here")
  return optimizers.quality_optax(
    cfg.optimizer,
    schedule(cfg),
    momentum=cfg.momentum,
    weight_decay=cfg.resolved_weight_decay,
    damping=cfg.resolved_damping,
    seed=seed,
    nysact=dict(cfg.nysact),
    adam_ratio=cfg.adam_ratio,
  )


# --------------------------------------------------------------------------
# Trainers: init / step / evaluate, with compiled functions shared by key
# --------------------------------------------------------------------------

_COMPILED: dict[tuple, Any] = {}


# The commit record of every run's header is taken once per process, when
# this module is imported (the code the process loaded; see
# benchmarks.results.commit_record).
results.commit_record()


def gradient_statistics(opt_state, grads) -> dict[str, jax.Array]:
  """``G G^T`` of every layer (``G``: its ``p x o`` gradient matrix, input
  axes leading, the bias as the last row), the statistics of the
  gradient-basis control: an exact-mode ``nysact_adam`` fed these instead of
  the activations' is one-sided SOAP (the eigenbasis of the EMA of
  ``G G^T``)."""
  out = {}
  for layer in nysact_optax.find_nysact_state(opt_state).config.layers:
    node = grads
    for key in layer.name.split("/"):
      node = node[key]
    g = node["kernel"].reshape(layer.p_in, -1)
    if layer.has_bias:
      g = jnp.concatenate([g, node["bias"].reshape(1, -1)])
    out[layer.name] = g @ g.T
  return out


class OptaxTrainer:
  """SGD, AdamW or NysAct: one jitted step with the peak lr as an argument."""

  def __init__(self, cfg: RunConfig, model: nn.Module, tokens: int):
    self.cfg = cfg
    needs = optimizers.needs_activations(cfg.optimizer)
    gradient_basis = dict(cfg.nysact).get("basis") == "gradients"
    self.tx = make_tx(cfg, cfg.seed)
    key = ("optax",) + cfg.compile_key()
    if key not in _COMPILED:
      loss = make_loss(cfg, model, tokens, capture=needs)
      tx = self.tx  # update_fn does not depend on the seed (only init does)
      track = cfg.track_layer if needs else None

      def step(params, model_state, opt_state, x, y, lr):
        (value, (model_state, acts)), grads = jax.value_and_grad(loss, has_aux=True)(
          params, model_state, x, y
        )
        extra = {"activations": acts} if needs else {}
        if gradient_basis:
          extra = {"statistics": gradient_statistics(opt_state, grads)}
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        updates = jax.tree_util.tree_map(lambda u: lr * u, updates)
        probe = acts[track] if track else None
        return optax.apply_updates(params, updates), model_state, opt_state, value, probe

      _COMPILED[key] = jax.jit(step, donate_argnums=(0, 1, 2))
    self._step = _COMPILED[key]
    self.lr = jnp.asarray(cfg.lr, jnp.float32)

  def init(self, params, model_state, batch):
    del batch
    self.params, self.model_state = params, model_state
    self.opt_state = self.tx.init(params)

  def step(self, x, y):
    self.params, self.model_state, self.opt_state, loss, probe = self._step(
      self.params, self.model_state, self.opt_state, x, y, self.lr
    )
    return loss, probe

  def nysact_state(self):
    if not optimizers.needs_activations(self.cfg.optimizer):
      return None
    return nysact_optax.find_nysact_state(self.opt_state)


class KfacTrainer:
  """``kfac_jax.Optimizer`` with fixed momentum and damping, the schedule's lr,
  curvature every ``T_cov`` and inverses every ``T_inv`` steps, and the
  usual KL-style norm constraint (no adaptive lr, momentum or damping)."""

  def __init__(self, cfg: RunConfig, model: nn.Module, tokens: int):
    self.cfg = cfg
    self.sched = schedule(cfg)
    self.has_state = _has_state(cfg)
    key = ("kfac",) + cfg.compile_key()
    if key not in _COMPILED:
      loss = make_loss(cfg, model, tokens, capture=False, register_kfac=True)
      if self.has_state:

        def value(params, model_state, batch):
          v, (ms, _) = loss(params, model_state, *batch)
          return v, ms
      else:

        def value(params, batch):
          return loss(params, None, *batch)[0]

      cov, inv = cfg.kfac_periods
      # The DenseGeneral block fix on the LM only (as the committed runs had
      # it); step_time installs it on every model.
      _COMPILED[key] = optimizers.kfac_optimizer(
        jax.value_and_grad(value, has_aux=self.has_state),
        has_state=self.has_state,
        cov_every=cov,
        inv_every=inv,
        l2_reg=cfg.resolved_weight_decay,
        norm_constraint=cfg.kfac_norm_constraint,
        dense_general_fix=cfg.task == "char_lm",
      )
    self.opt = _COMPILED[key]
    self.count = 0

  def init(self, params, model_state, batch):
    self.params, self.model_state = params, model_state
    rng = jax.random.PRNGKey(self.cfg.seed)
    batch = tuple(jnp.asarray(b) for b in batch)
    if self.has_state:
      self.opt_state = self.opt.init(params, rng, batch, model_state)
    else:
      self.opt_state = self.opt.init(params, rng, batch)
    self.rng = jax.random.PRNGKey(self.cfg.seed + 1)

  def step(self, x, y):
    lr = jnp.asarray(self.cfg.lr * float(self.sched(self.count)), jnp.float32)
    kw = dict(
      batch=(x, y),
      learning_rate=lr,
      momentum=jnp.asarray(self.cfg.momentum, jnp.float32),
      damping=jnp.asarray(self.cfg.resolved_damping, jnp.float32),
      global_step_int=self.count,
    )
    self.rng, rng = jax.random.split(self.rng)
    if self.has_state:
      self.params, self.opt_state, self.model_state, stats = self.opt.step(
        self.params, self.opt_state, rng, func_state=self.model_state, **kw
      )
    else:
      self.params, self.opt_state, stats = self.opt.step(self.params, self.opt_state, rng, **kw)
    self.count += 1
    return stats["loss"], None

  def nysact_state(self):
    return None


# --------------------------------------------------------------------------
# Preconditioner error against the exact damped inverse (NysAct only)
# --------------------------------------------------------------------------


class ErrorTracker:
  """The exact EMA of one layer's covariance, kept beside NysAct's sketches.

  It follows the optimizer's schedule exactly: on statistics steps the exact
  ``A^T A / n`` of the same batch enters an EMA with the same decay; on
  inverse steps the bias-corrected EMA is snapshotted. At a checkpoint the
  factors in the optimizer state (refreshed on the last inverse step) are
  compared with the exact damped inverse of that snapshot, so the error is
  the approximation's alone, not staleness.
  """

  def __init__(self, cfg: RunConfig, layer: str):
    kw = dict(cfg.nysact)
    self.layer = layer
    self.cov_every = kw.get("cov_update_every", 5)
    self.inv_every = kw.get("inv_update_every", 50)
    self.decay = kw.get("stat_decay", 0.95)
    self.rho = cfg.resolved_damping
    self.ema = None
    self.k = 0
    self.snapshot = None
    self.has_bias = None
    self._stats = None

  def observe(self, count: int, probe, has_bias: bool) -> None:
    """``count``: the optimizer's step index of the batch that made ``probe``."""
    if count % self.cov_every:
      return
    if self._stats is None:
      spec = probe.spec

      @jax.jit
      def stats(inputs, eye):
        layer = nysact_optax.LayerInputs(inputs, spec)
        return linalg.sketched_covariance(layer, linalg.Sketch(eye), has_bias)

      p_in = spec.input_width(probe.inputs[0].shape)
      self._eye = jnp.eye(p_in + int(has_bias), dtype=jnp.float32)
      self._stats = stats
    y = np.asarray(self._stats(probe.inputs, self._eye), np.float64)
    self.ema = (
      (1 - self.decay) * y if self.ema is None else self.decay * self.ema + (1 - self.decay) * y
    )
    self.k += 1
    if count % self.inv_every == 0:
      self.snapshot = self.ema / (1 - self.decay**self.k)

  def error(self, layer_state) -> dict[str, float] | None:
    if self.snapshot is None:
      return None
    try:
      return self._error(layer_state)
    except np.linalg.LinAlgError:  # non-finite statistics after a divergence
      return {
        "rel_fro": float("nan"),
        "rel_op": float("nan"),
        "rel_top10": float("nan"),
        "p": int(self.snapshot.shape[0]),
        "cov_top_eig": float("nan"),
        "cov_trace": float("nan"),
        "failed": True,
      }

  def _error(self, layer_state) -> dict[str, float]:
    if not np.all(np.isfinite(self.snapshot)):
      raise np.linalg.LinAlgError("non-finite exact statistics")
    c = 0.5 * (self.snapshot + self.snapshot.T)
    lam, v = np.linalg.eigh(c)
    lam = np.maximum(lam, 0.0)
    # relative_damping=True scales the damping per layer (damping_scale is 1
    # otherwise); both sides use the optimizer's rho.
    rho = self.rho * float(layer_state.damping_scale)
    p_exact = (v / (lam + rho)) @ v.T
    u = np.asarray(layer_state.basis, np.float64)
    mu = np.asarray(layer_state.eigvals, np.float64)
    p_nys = np.asarray(_reference.dense_preconditioner(u, mu, rho), np.float64)
    diff = p_nys - p_exact
    if not np.all(np.isfinite(diff)):
      raise np.linalg.LinAlgError("non-finite preconditioner")
    # Error on the directions that carry the statistics: P applied to C's top
    # eigenvectors (where preconditioning differs from plain SGD).
    top = v[:, ::-1][:, : min(10, len(lam))]
    return {
      "rel_fro": float(np.linalg.norm(diff) / np.linalg.norm(p_exact)),
      "rel_op": float(np.linalg.norm(diff, 2) / np.linalg.norm(p_exact, 2)),
      "rel_top10": float(np.linalg.norm(diff @ top) / np.linalg.norm(p_exact @ top)),
      "p": int(c.shape[0]),
      "cov_top_eig": float(lam[-1]),
      "cov_trace": float(lam.sum()),
    }


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


def _init_variables(model, cfg, x0):
  variables = dict(model.init(jax.random.PRNGKey(cfg.seed), x0))
  return variables["params"], variables.get("batch_stats")


def run(
  cfg: RunConfig,
  out: str | pathlib.Path | None = None,
  *,
  progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
  """Trains and evaluates one configuration; writes and returns the JSON dict."""
  t_setup = time.perf_counter()
  d = load_data(cfg)
  model, tokens = make_model(cfg, d)
  batches = train_batches(cfg, d)
  x0, y0 = next(batches)
  params, model_state = _init_variables(model, cfg, x0[:1])
  trainer = (
    KfacTrainer(cfg, model, tokens) if cfg.optimizer == "kfac" else OptaxTrainer(cfg, model, tokens)
  )
  trainer.init(params, model_state, (x0, y0))
  eval_key = ("eval", cfg.task, cfg.model)
  if eval_key not in _COMPILED:
    _COMPILED[eval_key] = make_eval(cfg, model)
  eval_fn = _COMPILED[eval_key]
  curve_n = min(cfg.eval_size, len(d.eval_x)) if cfg.eval_size else len(d.eval_x)
  chunk = _eval_chunk(curve_n, len(d.eval_x))
  tracker = None
  if cfg.track_layer and cfg.optimizer == "nysact":
    tracker = ErrorTracker(cfg, cfg.track_layer)
  has_bias = None
  if tracker is not None:
    node = params
    for name in cfg.track_layer.split("/"):
      node = node[name]
    has_bias = "bias" in node
  setup_s = time.perf_counter() - t_setup

  curve: list[dict[str, Any]] = []
  errors: list[dict[str, Any]] = []
  losses: list[Any] = []
  # Wall-clock of training alone: evaluation, error tracking and the steps
  # that may compile (0, 1, and K-FAC's first curvature step) are excluded;
  # a checkpoint reports the measured time scaled to all its steps.
  skip = {0, 1} | ({cfg.kfac_periods[0]} if cfg.optimizer == "kfac" else set())
  compile_steps: dict[int, float] = {}
  measured_s, measured_steps = 0.0, 0
  diverged = False
  x, y = x0, y0
  step_i = 0
  loss = None

  def checkpoint(step_done: int, train_s: float):
    m = evaluate_fixed(
      eval_fn, trainer.params, trainer.model_state, d.eval_x[:curve_n], d.eval_y[:curve_n], chunk
    )
    tl = float(np.mean([float(v) for v in losses])) if losses else None
    losses.clear()
    point = {
      "step": step_done,
      "train_s": train_s,
      "examples": step_done * cfg.batch_size,
      "eval_loss": m["loss"],
      "eval_accuracy": m["accuracy"],
      "train_loss": tl,
    }
    if tracker is not None:
      err = tracker.error(trainer.nysact_state().layers[cfg.track_layer])
      if err is not None:
        errors.append({"step": step_done, **err})
    curve.append(point)
    if progress:
      progress(f"step {step_done}: eval acc {m['accuracy']:.4f} loss {m['loss']:.4f}")

  t_mark, excluded = time.perf_counter(), 0.0
  while step_i < cfg.steps:
    if step_i in skip and loss is not None:
      jax.block_until_ready(loss)
    t0 = time.perf_counter()
    loss, probe = trainer.step(jnp.asarray(x), jnp.asarray(y))
    if step_i in skip:
      jax.block_until_ready(loss)
      compile_steps[step_i] = time.perf_counter() - t0
      excluded += compile_steps[step_i]
    else:
      measured_steps += 1
    if tracker is not None and step_i % tracker.cov_every == 0:
      jax.block_until_ready(loss)
      t1 = time.perf_counter()
      tracker.observe(step_i, probe, has_bias)
      excluded += time.perf_counter() - t1
    losses.append(loss)
    step_i += 1
    x, y = next(batches)
    if step_i % cfg.eval_every == 0 or step_i == cfg.steps:
      jax.block_until_ready(loss)
      measured_s += time.perf_counter() - t_mark - excluded
      train_s = measured_s * step_i / max(measured_steps, 1)
      finite = math.isfinite(float(loss))
      checkpoint(step_i, train_s)
      t_mark, excluded = time.perf_counter(), 0.0
      if not finite:
        diverged = True
        break
  first_step_s = compile_steps.get(0)
  train_s = measured_s * step_i / max(measured_steps, 1)

  final = evaluate_fixed(
    eval_fn,
    trainer.params,
    trainer.model_state,
    d.eval_x,
    d.eval_y,
    _eval_chunk(len(d.eval_x), len(d.eval_x)),
  )
  nys = trainer.nysact_state()
  failures = None
  if nys is not None:
    failures = {k: int(v.failures) for k, v in nys.layers.items()}
  metrics = {
    "data": d.description,
    "metric": "bits_per_char" if d.kind == "chars" else "accuracy",
    "final": {
      "eval_loss": final["loss"],
      "eval_accuracy": final["accuracy"],
      "bits_per_char": final["loss"] / math.log(2) if d.kind == "chars" else None,
      "eval_examples": len(d.eval_x),
      "steps_done": step_i,
      "diverged": diverged,
    },
    "curve_eval_examples": curve_n,
    "nysact_refresh_failures": failures,
    "timing": {
      "setup_s": setup_s,
      "first_step_s": first_step_s,
      "train_s": train_s,
      "train_s_per_step": measured_s / max(measured_steps, 1),
      "excluded_steps_s": {str(k): v for k, v in compile_steps.items()},
    },
    "param_count": int(sum(v.size for v in jax.tree_util.tree_leaves(params))),
  }
  result = results.record(
    "quality-run",
    config=cfg.to_json(),
    metrics=metrics,
    curves={"eval": curve, "preconditioner_error": errors},
  )
  if out is not None:
    results.save(out, result, quiet=True)
  return result


def _eval_chunk(n: int, total: int) -> int:
  """A chunk size dividing ``n`` (so every chunk has the same shape)."""
  for c in (
    1000,
    800,
    500,
    400,
    256,
    250,
    200,
    128,
    125,
    100,
    64,
    50,
    40,
    32,
    25,
    20,
    16,
    10,
    8,
    5,
    4,
    2,
    1,
  ):
    if c <= n and n % c == 0:
      return c
  return 1


def evaluate_fixed(eval_fn, params, model_state, x, y, chunk: int) -> dict[str, float]:
  """Mean loss and accuracy over ``x, y`` in chunks of ``chunk`` rows."""
  total, correct, count = 0.0, 0, 0
  for i in range(0, len(x), chunk):
    s, c, k = eval_fn(
      params, model_state, jnp.asarray(x[i : i + chunk]), jnp.asarray(y[i : i + chunk])
    )
    total, correct, count = total + float(s), correct + int(c), count + int(k)
  return {"loss": total / count, "accuracy": correct / count}


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _parse_kv(items: Sequence[str]) -> tuple[tuple[str, Any], ...]:
  out = []
  for item in items:
    k, _, v = item.partition("=")
    out.append((k, json.loads(v) if v[:1] in "[{0123456789-.tfn" else v))
  return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in out))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--task", choices=TASKS, default="fmnist_cnn")
  p.add_argument("--optimizer", choices=OPTIMIZERS, default="nysact")
  p.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--steps", type=int, default=500)
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--split", choices=("val", "test"), default="test")
  p.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of the steps")
  p.add_argument("--momentum", type=float, default=0.9)
  p.add_argument("--weight-decay", type=float, default=None)
  p.add_argument("--damping", type=float, default=None)
  p.add_argument(
    "--nysact",
    nargs="*",
    default=[],
    metavar="KEY=VALUE",
    help="extra nysact_optax.nysact kwargs, e.g. rank=20 sketch=subcolumns",
  )
  p.add_argument(
    "--model",
    nargs="*",
    default=[],
    metavar="KEY=VALUE",
    help="model kwargs, e.g. features=[16,32,32] hidden=128",
  )
  p.add_argument("--no-augment", action="store_true")
  p.add_argument("--train-limit", type=int, default=None)
  p.add_argument("--eval-limit", type=int, default=None, help="cap the evaluation set")
  p.add_argument("--eval-every", type=int, default=100)
  p.add_argument("--eval-size", type=int, default=2000)
  p.add_argument(
    "--track-layer",
    default=None,
    help="NysAct: layer whose preconditioner error is tracked (e.g. Dense_0)",
  )
  p.add_argument(
    "--adam-lr",
    type=float,
    default=None,
    help="muon: peak lr of the Adam parameters (default 0.05 x --lr)",
  )
  p.add_argument("--out", required=True, help="JSON path")
  a = p.parse_args(argv)
  cfg = RunConfig(
    task=a.task,
    optimizer=a.optimizer,
    lr=a.lr,
    seed=a.seed,
    steps=a.steps,
    batch_size=a.batch_size,
    split=a.split,
    warmup=a.warmup,
    momentum=a.momentum,
    weight_decay=a.weight_decay,
    damping=a.damping,
    nysact=_parse_kv(a.nysact),
    model=_parse_kv(a.model),
    augment=not a.no_augment,
    train_limit=a.train_limit,
    eval_limit=a.eval_limit,
    eval_every=a.eval_every,
    eval_size=a.eval_size,
    track_layer=a.track_layer,
    adam_lr=a.adam_lr,
  )
  result = run(cfg, a.out, progress=lambda s: print(s, file=sys.stderr, flush=True))
  f = result["metrics"]["final"]
  print(
    f"{cfg.task} {cfg.optimizer} lr={cfg.lr} seed={cfg.seed}: eval accuracy "
    f"{f['eval_accuracy']:.4f}, loss {f['eval_loss']:.4f}, train "
    f"{result['metrics']['timing']['train_s']:.1f}s -> {a.out}"
  )
  return result


if __name__ == "__main__":
  main()
