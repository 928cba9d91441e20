"""Train-step time and optimizer-state memory of NysAct against SGD, AdamW and
K-FAC on three models.

Models (``benchmarks.models``) and data (``benchmarks.data``):

* ``cnn``: :class:`FashionCNN` on Fashion-MNIST;
* ``resnet20``: :class:`ResNet20` (BatchNorm) on Fashion-MNIST;
* ``transformer``: :class:`CharTransformer` (4 layers, width 256, context 128)
  on the King James Bible.

Every optimizer runs the same model, the same batches in the same order, and
its timed step is one jitted call doing one forward, one backward and one
update (K-FAC: ``kfac_jax.Optimizer.step``, which also does its own
curvature-estimation pass on curvature steps; for the optax optimizers one
``jax.jit`` of loss-gradient-update with donated buffers). All optimizers of a
model live in one process and are timed interleaved: in each round every
optimizer runs one block of ``--steps`` consecutive steps (a multiple of 50, so
that a block holds whole inverse periods of every optimizer: amortised time),
the order shuffled per round. A block is timed from a ready state to
``block_until_ready`` of its last step. Warm-up steps (which compile) are
excluded from the blocks; their excess over the steady step is reported as
compile time. An optional last pass times one block step by step to split
each optimizer's time into its phases (plain step, statistics step, inverse
step).

Usage (from the repository root)::

  python -m benchmarks.step_time                       # everything, ~60 min on 2 cores
  python -m benchmarks.step_time --models cnn --rounds 2 --optimizers sgd,nysact_g10
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import nysact_optax
from benchmarks import _common, data as bdata, models

from tqdm.auto import tqdm

INVERSE_PERIOD = 50  # NysAct's and K-FAC's T_inv at equal periods
COV_PERIOD = 5


# --------------------------------------------------------------------------
# Tasks: model + initial variables + a fixed list of device batches
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Task:
  name: str
  description: str
  model: nn.Module
  params: Any
  model_state: Any  # batch_stats, or None
  batches: list[tuple[jax.Array, jax.Array]]
  tokens_per_example: int  # loss = mean over batch * tokens

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.batches[0][0].shape)


def _image_batches(batch_size: int, n_batches: int, source: str, seed: int):
  if source == "synthetic":
    rng = np.random.default_rng(seed)
    x = rng.random((batch_size * n_batches, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, batch_size * n_batches).astype(np.int32)
  else:
    x, y = bdata.load_fashion_mnist("train")
  it = bdata.classification_batches(x, y, batch_size, seed=seed)
  return [tuple(jax.device_put(a) for a in next(it)) for _ in range(n_batches)]


def build_task(name: str, batch_size: int, *, source: str = "real",
               n_batches: int = 10, seed: int = 0) -> Task:
  key = jax.random.PRNGKey(seed)
  if name in ("cnn", "resnet20"):
    batches = _image_batches(batch_size, n_batches, source, seed)
    model = models.FashionCNN() if name == "cnn" else models.ResNet20()
    variables = model.init(key, batches[0][0])
    desc = (
        "FashionCNN (3 conv + 2 dense) on Fashion-MNIST 28x28x1"
        if name == "cnn" else
        "ResNet-20 (BatchNorm, 1x1-conv shortcuts) on Fashion-MNIST 28x28x1"
    )
    tokens = 1
  elif name == "transformer":
    context = 128
    if source == "synthetic":
      vocab, stream = 73, np.random.default_rng(seed).integers(0, 73, 200_000).astype(np.uint8)
    else:
      ds = bdata.load_kjv_chars()
      vocab, stream = ds.vocab_size, ds.train
    it = bdata.char_lm_batches(stream, batch_size, context, seed=seed)
    batches = [tuple(jax.device_put(a) for a in next(it)) for _ in range(n_batches)]
    model = models.CharTransformer(vocab_size=vocab, num_layers=4, width=256,
                                   num_heads=4, context=context)
    variables = model.init(key, batches[0][0])
    desc = ("decoder-only char transformer (4 layers, width 256, 4 heads, "
            f"context {context}, vocab {vocab}) on the KJV Bible")
    tokens = context
  else:
    raise ValueError(f"unknown model {name!r}")
  variables = dict(variables)
  return Task(
      name=name, description=desc, model=model,
      params=variables["params"], model_state=variables.get("batch_stats"),
      batches=batches, tokens_per_example=tokens,
  )


def make_loss(task: Task, *, capture: bool, register_kfac: bool = False):
  """``loss(params, model_state, batch) -> (loss, (new_model_state, acts))``."""
  apply = task.model.apply
  if capture:
    apply = nysact_optax.capture_activations(apply)
  has_state = task.model_state is not None

  def loss(params, model_state, batch):
    x, y = batch
    variables = {"params": params}
    acts = None
    if has_state:
      variables["batch_stats"] = model_state
      out = apply(variables, x, mutable=["batch_stats"])
      (logits, mutated), acts = out if capture else (out, None)
      new_state = mutated["batch_stats"]
    else:
      out = apply(variables, x)
      logits, acts = out if capture else (out, None)
      new_state = None
    if register_kfac:
      import kfac_jax
      # kfac-jax's convention: weight * sum(losses) / batch_size; our loss is
      # the mean over batch * tokens.
      kfac_jax.register_softmax_cross_entropy_loss(
          logits, y, weight=1.0 / task.tokens_per_example)
    value = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return value, (new_state, acts)

  return loss


def _copy(tree):
  return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)


# --------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------


class Runner:
  """One optimizer on one task: ``init``, ``step(batch)``, ``ready()``."""

  name: str
  family: str
  periods: tuple[int, int] | None  # (T_cov, T_inv) or None
  can_sample = False

  def phase(self, count: int) -> str:
    if self.periods is None:
      return "plain"
    cov, inv = self.periods
    if count % inv == 0:
      return "inverse"
    if count % cov == 0:
      return "statistics"
    return "plain"


class OptaxRunner(Runner):

  def __init__(self, name: str, family: str, task: Task,
               tx: optax.GradientTransformation, *, needs_activations: bool,
               periods: tuple[int, int] | None = None, config: dict | None = None,
               trace_context=None):
    self.name, self.family, self.task, self.tx = name, family, task, tx
    self.periods = periods
    self.config = config or {}
    loss = make_loss(task, capture=needs_activations)
    context = trace_context or contextlib.nullcontext

    def step(params, model_state, opt_state, batch):
      with context():  # active while jax traces this function
        (value, (model_state, acts)), grads = jax.value_and_grad(loss, has_aux=True)(
            params, model_state, batch)
        extra = {"activations": acts} if needs_activations else {}
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        return optax.apply_updates(params, updates), model_state, opt_state, value

    self._step = jax.jit(step, donate_argnums=(0, 1, 2))
    self.count = 0

  def init(self):
    self.params = _copy(self.task.params)
    self.model_state = _copy(self.task.model_state)
    self.opt_state = self.tx.init(self.params)
    self.count = 0
    self.loss = None

  def step(self, batch):
    self.params, self.model_state, self.opt_state, self.loss = self._step(
        self.params, self.model_state, self.opt_state, batch)
    self.count += 1

  def ready(self):
    jax.block_until_ready((self.params, self.opt_state, self.loss))

  @property
  def can_sample(self) -> bool:
    return self.family == "nysact"

  def set_count(self, count: int) -> None:
    """Moves NysAct's step counter (only its branch choice depends on it)."""
    first = self.opt_state[0]
    first = first._replace(count=jnp.asarray(count, first.count.dtype))
    self.opt_state = (first,) + tuple(self.opt_state[1:])
    self.count = count

  def state_bytes(self) -> dict[str, int]:
    total = _common.tree_bytes(self.opt_state)
    out = {"total": total}
    if self.family == "nysact":
      # chain(scale_by_nysact, [add_decayed_weights], trace, scale_by_lr)
      out["preconditioner"] = _common.tree_bytes(self.opt_state[0])
      out["momentum"] = total - out["preconditioner"]
    return out

  def hlo_text(self, batch) -> str:
    return self._step.lower(self.params, self.model_state, self.opt_state, batch).as_text()


def _dense_general_kfac_block():
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

    def __init__(self, layer_tag_eq, use_masking: bool = True,
                 parameters_specs=None, parameters_concat_axis: int = 0):
      self._layer_tag_eq = layer_tag_eq
      kernel = tuple(self.parameters_shapes[0])
      x_shape = tuple(self.inputs_shapes[0])
      n_in = next(
          (n for n in range(1, len(kernel)) if x_shape[len(x_shape) - n:] == kernel[:n]),
          len(kernel) - 1,
      )
      self._n_in = n_in
      letters = "abcdefgh"[: len(kernel)]
      specs = [f"{letters} -> ({letters[:n_in]})({letters[n_in:]})"]
      if len(self.parameters_shapes) == 2:
        b = letters[: len(kernel) - n_in]
        specs.append(f"{b} -> 1({b})")
      super().__init__(layer_tag_eq, use_masking=use_masking,
                       parameters_specs=specs,
                       parameters_concat_axis=parameters_concat_axis)

    def update_curvature_matrix_estimate(self, state, estimation_data, ema_old,
                                         ema_new, identity_weight, batch_size):
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


class KfacRunner(Runner):
  """``kfac_jax.Optimizer`` (fixed lr, momentum and damping; no adaptivity)."""

  family = "kfac"

  def __init__(self, name: str, task: Task, *, cov_every: int, inv_every: int,
               learning_rate=1e-3, momentum=0.9, damping=0.1):
    import kfac_jax

    self.name, self.task = name, task
    self.periods = (cov_every, inv_every)
    self.config = {"curvature_update_period": cov_every,
                   "inverse_update_period": inv_every,
                   "estimation_mode": "ggn_curvature_prop (kfac-jax default)",
                   "damping": damping, "learning_rate": learning_rate,
                   "momentum": momentum, "num_burnin_steps": 0}
    loss = make_loss(task, capture=False, register_kfac=True)
    self.has_state = task.model_state is not None
    if self.has_state:
      def value(params, model_state, batch):
        v, (ms, _) = loss(params, model_state, batch)
        return v, ms
    else:
      def value(params, batch):
        return loss(params, None, batch)[0]
    self.opt = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(value, has_aux=self.has_state),
        l2_reg=0.0,
        value_func_has_state=self.has_state,
        curvature_update_period=cov_every,
        inverse_update_period=inv_every,
        num_burnin_steps=0,
        multi_device=False,
        layer_tag_to_block_ctor={"repeated_dense": _dense_general_kfac_block()},
    )
    self.hyper = tuple(jnp.asarray(v, jnp.float32) for v in (learning_rate, momentum, damping))
    self.rngs = list(jax.random.split(jax.random.PRNGKey(1), 64))

  def init(self):
    self.params = _copy(self.task.params)
    self.model_state = _copy(self.task.model_state)
    batch = self.task.batches[0]
    rng = jax.random.PRNGKey(0)
    if self.has_state:
      self.opt_state = self.opt.init(self.params, rng, batch, self.model_state)
    else:
      self.opt_state = self.opt.init(self.params, rng, batch)
    self.count = 0
    self.loss = None

  def step(self, batch):
    lr, mom, damp = self.hyper
    kw = dict(batch=batch, learning_rate=lr, momentum=mom, damping=damp,
              global_step_int=self.count)
    rng = self.rngs[self.count % len(self.rngs)]
    if self.has_state:
      self.params, self.opt_state, self.model_state, stats = self.opt.step(
          self.params, self.opt_state, rng, func_state=self.model_state, **kw)
    else:
      self.params, self.opt_state, stats = self.opt.step(
          self.params, self.opt_state, rng, **kw)
    self.loss = stats["loss"]
    self.count += 1

  def ready(self):
    jax.block_until_ready((self.params, self.opt_state, self.loss))

  can_sample = True

  def set_count(self, count: int) -> None:
    """Moves K-FAC's step counter: the host-side one picks the compiled
    variant (curvature update or not), the state's one the inverse refresh."""
    state = self.opt_state.copy()
    state.step_counter = jnp.asarray(count, state.step_counter.dtype)
    self.opt_state = state
    self.count = count

  def state_bytes(self) -> dict[str, int]:
    total = _common.tree_bytes(self.opt_state)
    momentum = _common.tree_bytes(self.opt_state.velocities)
    return {"total": total, "momentum": momentum, "preconditioner": total - momentum}

  def blocks(self) -> list[str]:
    return [type(b).__name__ for b in self.opt._estimator.blocks]


OPTIMIZERS = (
    "sgd", "adamw", "kfac_5_50", "kfac_default",
    "nysact_g10", "nysact_g50", "nysact_s10", "nysact_s50", "foof",
)
OPTIMIZER_HELP = {
    "sgd": "optax.sgd(0.05, momentum=0.9)",
    "adamw": "optax.adamw(1e-3, weight_decay=1e-4)",
    "kfac_5_50": "kfac_jax.Optimizer, curvature every 5, inverses every 50 steps",
    "kfac_default": "kfac_jax.Optimizer at its defaults: curvature every step, inverses every 5",
    "nysact_g10": "nysact(0.05, rank=10, sketch='gaussian'), T_cov=5, T_inv=50",
    "nysact_g50": "nysact(0.05, rank=50, sketch='gaussian')",
    "nysact_s10": "nysact(0.05, rank=10, sketch='subcolumns')",
    "nysact_s50": "nysact(0.05, rank=50, sketch='subcolumns')",
    "foof": "nysact(0.05, rank=10**9): exact mode (FOOF), eigh of every p x p covariance",
    "nysact_g10_fixed": "nysact(0.05, rank=10, sketch_refresh='fixed')",
    "nysact_g10_stable": "nysact(0.05, rank=10, nystrom='stable')",
}


def make_runner(name: str, task: Task) -> Runner:
  lr = 0.05
  if name == "sgd":
    return OptaxRunner(name, "sgd", task, optax.sgd(lr, momentum=0.9),
                       needs_activations=False)
  if name == "adamw":
    return OptaxRunner(name, "adamw", task, optax.adamw(1e-3, weight_decay=1e-4),
                       needs_activations=False)
  if name == "kfac_5_50":
    return KfacRunner(name, task, cov_every=COV_PERIOD, inv_every=INVERSE_PERIOD)
  if name == "kfac_default":
    return KfacRunner(name, task, cov_every=1, inv_every=5)
  if name.startswith("nysact_") or name == "foof":
    kw: dict[str, Any] = dict(cov_update_every=COV_PERIOD, inv_update_every=INVERSE_PERIOD)
    if name == "foof":
      kw["rank"] = 10**9
    else:
      parts = name.split("_")
      kw["sketch"] = {"g": "gaussian", "s": "subcolumns"}[parts[1][0]]
      kw["rank"] = int(parts[1][1:])
      if len(parts) > 2:
        kw[{"fixed": "sketch_refresh", "stable": "nystrom"}[parts[2]]] = parts[2]
    tx = nysact_optax.nysact(lr, momentum=0.9, **kw)
    return OptaxRunner(name, "nysact", task, tx, needs_activations=True,
                       periods=(COV_PERIOD, INVERSE_PERIOD), config=kw)
  raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(OPTIMIZER_HELP)}")


# --------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------


def run_block(runner: Runner, task: Task, steps: int, *, per_step: bool = False):
  """Runs ``steps`` steps; returns the block time or the per-step times."""
  n = len(task.batches)
  runner.ready()
  if per_step:
    times, phases = [], []
    for _ in range(steps):
      phases.append(runner.phase(runner.count))
      t0 = time.perf_counter()
      runner.step(task.batches[runner.count % n])
      runner.ready()
      times.append(time.perf_counter() - t0)
    return times, phases
  t0 = time.perf_counter()
  for _ in range(steps):
    runner.step(task.batches[runner.count % n])
  runner.ready()
  return time.perf_counter() - t0


def sample_phases(runner: Runner, task: Task, n_plain: int = 4) -> dict[str, list[float]]:
  """Times ``n_plain`` plain steps, one statistics and one inverse step.

  Only for runners whose step counter can be moved (NysAct): the counter jumps
  to the next multiple of T_inv, plus 1 (plain steps), plus T_cov (a
  statistics step), then to the next multiple of T_inv (statistics + inverse
  refresh). Each step is timed alone, from a ready state to a ready state.
  """
  cov, inv = runner.periods
  base = -(-runner.count // inv) * inv
  out: dict[str, list[float]] = {}
  n = len(task.batches)
  plan = [("plain", base + 1, min(n_plain, cov - 1)),
          ("statistics", base + cov, 1 if cov < inv else 0), ("inverse", base + inv, 1)]
  for phase, start, k in plan:
    if not k:
      continue
    runner.set_count(start)
    for _ in range(k):
      runner.ready()
      t0 = time.perf_counter()
      runner.step(task.batches[runner.count % n])
      runner.ready()
      out.setdefault(phase, []).append(time.perf_counter() - t0)
  return out


def amortised_from_phases(ph: dict[str, list[float]], periods: tuple[int, int]) -> float:
  cov, inv = periods
  n_inv, n_stats = 1, inv // cov - 1
  n_plain = inv - n_stats - n_inv
  total = 0.0
  for n, phase in ((n_plain, "plain"), (n_stats, "statistics"), (n_inv, "inverse")):
    if n:
      total += n * _common.median(ph[phase])
  return total / inv


def measure_task(task: Task, names: Sequence[str], args, bar) -> dict[str, Any]:
  rng = random.Random(args.seed)
  runners: dict[str, Runner] = {}
  result: dict[str, Any] = {}
  param_bytes = _common.tree_bytes(task.params)
  for name in names:
    bar.set_description(f"{task.name}: build+warm-up {name}")
    t0 = time.perf_counter()
    r = make_runner(name, task)
    r.init()
    init_s = time.perf_counter() - t0
    warm, warm_phases = run_block(r, task, args.warmup, per_step=True)
    runners[name] = r
    sb = r.state_bytes()
    # Predicted block time from the warm-up steps after the first (which compiles).
    later = [(t, ph) for t, ph in zip(warm[1:], warm_phases[1:])]
    plain = [t for t, ph in later if ph == "plain"] or [t for t, _ in later]
    stats = [t for t, ph in later if ph != "plain"] or plain
    predicted = args.steps * (0.8 * _common.median(plain) + 0.2 * max(stats)) if later else 0.0
    sampled = bool(r.can_sample and args.max_block_s > 0 and predicted > args.max_block_s)
    result[name] = {
        "description": OPTIMIZER_HELP[name],
        "config": getattr(r, "config", {}),
        "init_s": init_s,
        "warmup_step_s": warm,
        "predicted_block_s": predicted,
        "periods": list(r.periods) if r.periods else None,
        "timing": ("sampled phases (block predicted > --max-block-s): per round 4 plain, "
                   "1 statistics, 1 inverse step, each synced; amortised = (40 plain + "
                   "9 statistics + 1 inverse) / 50" if sampled else "whole blocks"),
        "state_bytes": sb,
        "state_over_param_bytes": sb["total"] / param_bytes,
        "block_s_per_step": [],
        "round_order": [],
    }
    if isinstance(r, KfacRunner):
      blocks = r.blocks()
      result[name]["kfac_blocks"] = {b: blocks.count(b) for b in sorted(set(blocks))}
    bar.update(1)
  for rnd in range(args.rounds):
    order = list(names)
    rng.shuffle(order)
    for pos, name in enumerate(order):
      bar.set_description(f"{task.name}: round {rnd + 1}/{args.rounds} {name}")
      r = runners[name]
      acc = result[name].setdefault("phases", {}) if r.can_sample else None
      if result[name]["timing"] == "whole blocks":
        dt = run_block(r, task, args.steps)
        result[name]["block_s_per_step"].append(dt / args.steps)
        if r.can_sample and args.phase_samples:
          # After the timed block: a few steps timed alone, for the phase split.
          for k, v in sample_phases(r, task, n_plain=2).items():
            acc.setdefault(k, []).extend(v)
      elif rnd < args.sampled_rounds:
        ph = sample_phases(r, task)
        for k, v in ph.items():
          acc.setdefault(k, []).extend(v)
        result[name]["block_s_per_step"].append(amortised_from_phases(ph, r.periods))
      result[name]["round_order"].append(pos)
      bar.update(1)
  for p in range(args.phase_blocks):
    for name in names:
      if result[name]["timing"] != "whole blocks":
        bar.update(1)
        continue
      bar.set_description(f"{task.name}: phases {name}")
      times, phases = run_block(runners[name], task, args.steps, per_step=True)
      ph = result[name].setdefault("phases", {})
      for t, kind in zip(times, phases):
        ph.setdefault(kind, []).append(t)
      bar.update(1)
  # Summaries
  sgd = result.get("sgd")
  for name in names:
    res = result[name]
    blocks = res["block_s_per_step"]
    res["step_s_median"] = _common.median(blocks) if blocks else None
    res["step_s_min"] = min(blocks) if blocks else None
    if sgd is not None and blocks:
      ratios = [a / b for a, b in zip(blocks, sgd["block_s_per_step"])]
      res["ratio_to_sgd_per_round"] = ratios
      res["ratio_to_sgd_median"] = _common.median(ratios)
      res["ratio_to_sgd_of_min"] = res["step_s_min"] / sgd["step_s_min"]
    raw = res.pop("phases", None)
    if res.get("step_s_median"):
      # Warm-up time beyond what each warm-up step costs once compiled.
      steady = res["step_s_median"]
      expected = {k: _common.median(v) for k, v in (raw or {}).items()}
      excess = 0.0
      for i, t in enumerate(res["warmup_step_s"]):
        excess += max(t - expected.get(runners[name].phase(i), steady), 0.0)
      res["compile_s"] = excess
    if raw:
      res["phase_step_s_median"] = {k: _common.median(v) for k, v in raw.items()}
      res["phase_counts"] = {k: len(v) for k, v in raw.items()}
      if res["periods"]:
        try:
          res["amortised_from_phase_medians_s"] = amortised_from_phases(raw, tuple(res["periods"]))
        except KeyError:
          pass
    r = runners[name]
    if r.loss is not None:
      res["last_loss"] = float(r.loss)
  return {
      "description": task.description,
      "batch_shape": list(task.batch_shape),
      "param_count": int(sum(x.size for x in jax.tree_util.tree_leaves(task.params))),
      "param_bytes": param_bytes,
      "model_state_bytes": _common.tree_bytes(task.model_state),
      "optimizers": result,
  }


def evaluate_targets(models_out: dict[str, Any]) -> list[dict[str, Any]]:
  """The project's targets, evaluated on the medians of interleaved rounds."""
  limits = {"cnn": 1.10, "transformer": 1.10, "resnet20": 1.20}
  out = []
  for model, res in models_out.items():
    opts = res["optimizers"]
    sgd = opts.get("sgd")
    kfac = opts.get("kfac_5_50")
    for name, o in opts.items():
      if o.get("config", {}).get("rank") is None or name == "foof":
        continue
      variant = "library as shipped"
      if sgd is not None and o.get("ratio_to_sgd_median") is not None:
        out.append({
            "variant": variant,
            "timing": o.get("timing"),
            "target": f"{model}: {name} amortised step <= {limits[model]:.2f}x SGD",
            "value": o["ratio_to_sgd_median"], "limit": limits[model],
            "per_round": o.get("ratio_to_sgd_per_round"),
            "ratio_of_fastest_blocks": o.get("ratio_to_sgd_of_min"),
            "pass": o["ratio_to_sgd_median"] <= limits[model],
        })
      if sgd is not None and kfac is not None and o.get("step_s_median"):
        ny = o["step_s_median"] - sgd["step_s_median"]
        kf = kfac["step_s_median"] - sgd["step_s_median"]
        # per-round overheads, to see the spread
        per_round = [
            (a - s) / (k - s) if k != s else float("nan")
            for a, s, k in zip(o["block_s_per_step"], sgd["block_s_per_step"],
                               kfac["block_s_per_step"])
        ]
        out.append({
            "variant": variant,
            "target": f"{model}: {name} overhead over SGD <= 1/5 of K-FAC(5,50)'s",
            "value": ny / kf if kf else None, "limit": 0.2,
            "per_round": per_round,
            "pass": (ny / kf if kf else float("inf")) <= 0.2,
        })
      ratio = o["state_over_param_bytes"]
      out.append({
          "variant": variant,
          "target": f"{model}: {name} optimizer state (with momentum) <= 1.15x param bytes",
          "value": ratio, "limit": 1.15, "pass": ratio <= 1.15,
      })
  return out


def plot(results: dict[str, Any], path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  models_out = results["models"]
  fig, axes = plt.subplots(len(models_out), 2, figsize=(13, 3.2 * len(models_out)),
                           squeeze=False)
  for row, (model, res) in enumerate(models_out.items()):
    opts = res["optimizers"]
    names = list(opts)
    colors = ["#888888" if opts[n].get("config", {}).get("rank") is None and n not in ("foof",)
              else "#1f77b4" for n in names]
    colors = ["#d62728" if n.startswith("kfac") else c for n, c in zip(names, colors)]
    colors = ["#9467bd" if n == "foof" else c for n, c in zip(names, colors)]
    ax = axes[row][0]
    vals = [opts[n].get("ratio_to_sgd_median") or np.nan for n in names]
    lo = [min(opts[n].get("ratio_to_sgd_per_round", [np.nan])) for n in names]
    hi = [max(opts[n].get("ratio_to_sgd_per_round", [np.nan])) for n in names]
    err = np.array([[v - l for v, l in zip(vals, lo)], [h - v for v, h in zip(vals, hi)]])
    ax.bar(names, vals, color=colors, yerr=err, capsize=3)
    limit = 1.20 if model == "resnet20" else 1.10
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(limit, color="g", ls="--", lw=0.8, label=f"target {limit:.2f}x")
    ax.set_yscale("log")
    ax.set_ylabel("step time / SGD (log)")
    ax.set_title(f"{model}: amortised step, batch {tuple(res['batch_shape'])}")
    ax.tick_params(axis="x", rotation=45)
    ax.legend(fontsize=8)
    ax = axes[row][1]
    vals = [opts[n]["state_over_param_bytes"] for n in names]
    ax.bar(names, vals, color=colors)
    ax.axhline(1.15, color="g", ls="--", lw=0.8, label="target 1.15x")
    ax.set_yscale("log")
    ax.set_ylabel("optimizer state / param bytes")
    ax.set_title(f"{model}: optimizer state ({res['param_count']:,} params)")
    ax.tick_params(axis="x", rotation=45)
    ax.legend(fontsize=8)
  m = results["machine"]
  fig.suptitle(f"{m['cpu_model']} ({m['cpus_usable']} cpus), jax {m['versions']['jax']}, "
               f"{m['device_kind']}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default="cnn,resnet20,transformer",
                      help="comma-separated subset of cnn,resnet20,transformer")
  parser.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                      help="comma-separated; available: " + ", ".join(
                          f"{k} ({v})" for k, v in OPTIMIZER_HELP.items()))
  parser.add_argument("--rounds", type=int, default=3,
                      help="interleaved rounds (one block per optimizer each)")
  parser.add_argument("--steps", type=int, default=50,
                      help="steps per timed block; a multiple of 50 (whole inverse periods)")
  parser.add_argument("--warmup", type=int, default=6,
                      help="untimed steps before the rounds (compile; >= 6 so that a statistics "
                           "step is seen; >= 2 for K-FAC's two compiled variants)")
  parser.add_argument("--max-block-s", type=float, default=240.0,
                      help="NysAct/FOOF runs whose block is predicted longer than this are "
                           "timed by sampled phases instead of whole blocks (0: never)")
  parser.add_argument("--sampled-rounds", type=int, default=1,
                      help="rounds in which runs timed by sampled phases (K-FAC, FOOF when "
                           "slow) are timed; their ratios use those rounds' SGD blocks")
  parser.add_argument("--phase-blocks", type=int, default=0,
                      help="extra blocks timed step by step for the phase split of every "
                           "optimizer, K-FAC included (0: none)")
  parser.add_argument("--no-phase-samples", dest="phase_samples", action="store_false",
                      help="skip the few NysAct steps timed alone after each block "
                           "(plain / statistics / inverse split)")
  parser.add_argument("--batch-cnn", type=int, default=128)
  parser.add_argument("--batch-resnet20", type=int, default=64)
  parser.add_argument("--batch-transformer", type=int, default=8,
                      help="sequences of 128 tokens per batch")
  parser.add_argument("--data", choices=("real", "synthetic"), default="real",
                      help="real: Fashion-MNIST / KJV from the Debian packages")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--blas-threads", type=int, default=1,
                      help="OpenBLAS threads for jax's LAPACK calls (0: leave as is)")
  parser.add_argument("--out", default=str(_common.RESULTS_DIR / "step_time.json"))
  parser.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
  args = parser.parse_args(argv)
  blas = _common.limit_blas_threads(args.blas_threads)
  if args.steps % INVERSE_PERIOD:
    parser.error(f"--steps must be a multiple of {INVERSE_PERIOD}")
  model_names = [m for m in args.models.split(",") if m]
  names = [o for o in args.optimizers.split(",") if o]
  for n in names:
    if n not in OPTIMIZER_HELP:
      parser.error(f"unknown optimizer {n!r}")
  batch = {"cnn": args.batch_cnn, "resnet20": args.batch_resnet20,
           "transformer": args.batch_transformer}

  results: dict[str, Any] = {
      **_common.results_header("step_time", args, blas, (
          "one process; per model, every optimizer is built and warmed up, then "
          f"{args.rounds} rounds in a shuffled order of one block of {args.steps} "
          "steps each (timed from a ready state to block_until_ready; amortised "
          "over whole T_inv=50 periods); ratios are per round against the same "
          "round's SGD block, then the median over rounds. NysAct runs whose block "
          f"would exceed --max-block-s={args.max_block_s:g} s are timed by sampled "
          "phases instead (see each optimizer's 'timing'), in the first "
          f"{args.sampled_rounds} round(s) only."
      )),
      "models": {},
  }
  total = len(model_names) * len(names) * (1 + args.rounds + args.phase_blocks)
  t_start = time.perf_counter()
  with tqdm(total=total, unit="block", file=sys.stderr) as bar:
    for model in model_names:
      task = build_task(model, batch[model], source=args.data, seed=args.seed)
      results["models"][model] = measure_task(task, names, args, bar)
      del task
  results["wall_s"] = time.perf_counter() - t_start
  results["load_average_at_end"] = _common.load_average()
  results["targets"] = evaluate_targets(results["models"])
  _common.write_results(args, results, plot)
  for model, res in results["models"].items():
    print(f"\n{model}: {res['description']}; batch {tuple(res['batch_shape'])}, "
          f"{res['param_count']:,} params")
    print(f"  {'optimizer':<14}{'ms/step':>9}{'x SGD':>8}{'compile s':>11}{'state/params':>14}")
    for name, o in res["optimizers"].items():
      ms = 1e3 * (o.get("step_s_median") or float("nan"))
      ratio = o.get("ratio_to_sgd_median") or float("nan")
      print(f"  {name:<14}{ms:9.1f}{ratio:8.3f}{o.get('compile_s', float('nan')):11.1f}"
            f"{o['state_over_param_bytes']:14.3f}")
  print()
  for t in results["targets"]:
    value = float("nan") if t["value"] is None else t["value"]
    print(("PASS " if t["pass"] else "MISS ") + f"{t['target']}: {value:.3f} ({t['variant']})")
  return results


if __name__ == "__main__":
  main()
