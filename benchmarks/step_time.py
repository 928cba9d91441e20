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
import itertools
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import nysact_optax
from benchmarks import _common, optimizers, results, targets, tasks

INVERSE_PERIOD = optimizers.INVERSE_PERIOD  # NysAct's and K-FAC's T_inv at equal periods
COV_PERIOD = optimizers.COV_PERIOD
OPTIMIZERS = optimizers.STEP_TIME_ZOO
ZOO = ("digits", "cnn", "resnet20", "vgg32", "char_mlp", "transformer")
BATCH = {"digits": 64, "cnn": 128, "resnet20": 64, "vgg32": 64, "char_mlp": 256, "transformer": 8}
OPTIMIZER_HELP = {name: spec.help for name, spec in optimizers.STEP_TIME.items()}
Task = tasks.Task
build_task = tasks.build_task


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
  def __init__(
    self,
    name: str,
    family: str,
    task: Task,
    tx: optax.GradientTransformation,
    *,
    needs_activations: bool,
    periods: tuple[int, int] | None = None,
    config: dict | None = None,
    trace_context=None,
  ):
    self.name, self.family, self.task, self.tx = name, family, task, tx
    self.periods = periods
    self.config = config or {}
    loss = tasks.batch_loss(task, capture=needs_activations)
    context = trace_context or contextlib.nullcontext

    def step(params, model_state, opt_state, batch):
      with context():  # active while jax traces this function
        (value, (model_state, acts)), grads = jax.value_and_grad(loss, has_aux=True)(
          params, model_state, batch
        )
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
      self.params, self.model_state, self.opt_state, batch
    )
    self.count += 1

  def ready(self):
    jax.block_until_ready((self.params, self.opt_state, self.loss))

  @property
  def can_sample(self) -> bool:
    return optimizers.needs_activations(self.family)

  def set_count(self, count: int) -> None:
    """Moves NysAct's step counter (only its branch choice depends on it)."""
    is_nysact = lambda x: isinstance(x, nysact_optax.ScaleByNysActState)
    self.opt_state = jax.tree.map(
      lambda s: s._replace(count=jnp.asarray(count, s.count.dtype)) if is_nysact(s) else s,
      self.opt_state,
      is_leaf=is_nysact,
    )
    self.count = count

  def state_bytes(self) -> dict[str, int]:
    total = _common.tree_bytes(self.opt_state)
    out = {"total": total}
    if optimizers.needs_activations(self.family):
      # the preconditioner's state; the rest: momentum (and the graft's RMS)
      out["preconditioner"] = _common.tree_bytes(nysact_optax.find_nysact_state(self.opt_state))
      out["momentum"] = total - out["preconditioner"]
    return out

  def hlo_text(self, batch) -> str:
    return self._step.lower(self.params, self.model_state, self.opt_state, batch).as_text()


class KfacRunner(Runner):
  """``kfac_jax.Optimizer`` (fixed lr, momentum and damping; no adaptivity)."""

  family = "kfac"

  def __init__(self, name: str, task: Task):
    spec = optimizers.STEP_TIME[name]
    cov_every, inv_every = spec.kfac_periods
    learning_rate, momentum, damping = spec.kfac_hyper
    self.name, self.task = name, task
    self.periods = (cov_every, inv_every)
    self.config = {
      "curvature_update_period": cov_every,
      "inverse_update_period": inv_every,
      "estimation_mode": "ggn_curvature_prop (kfac-jax default)",
      "damping": damping,
      "learning_rate": learning_rate,
      "momentum": momentum,
      "num_burnin_steps": 0,
    }
    loss = tasks.batch_loss(task, capture=False, register_kfac=True)
    self.has_state = task.model_state is not None
    if self.has_state:

      def value(params, model_state, batch):
        v, (ms, _) = loss(params, model_state, batch)
        return v, ms
    else:

      def value(params, batch):
        return loss(params, None, batch)[0]

    self.opt = optimizers.step_time_kfac(
      name, jax.value_and_grad(value, has_aux=self.has_state), has_state=self.has_state
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
    kw = dict(batch=batch, learning_rate=lr, momentum=mom, damping=damp, global_step_int=self.count)
    rng = self.rngs[self.count % len(self.rngs)]
    if self.has_state:
      self.params, self.opt_state, self.model_state, stats = self.opt.step(
        self.params, self.opt_state, rng, func_state=self.model_state, **kw
      )
    else:
      self.params, self.opt_state, stats = self.opt.step(self.params, self.opt_state, rng, **kw)
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


def make_runner(name: str, task: Task) -> Runner:
  """The runner of a step-time label (:data:`benchmarks.optimizers.STEP_TIME`)."""
  if name not in optimizers.STEP_TIME:
    raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(OPTIMIZER_HELP)}")
  spec = optimizers.STEP_TIME[name]
  if spec.family == "kfac":
    return KfacRunner(name, task)
  nysact = optimizers.needs_activations(spec.family)
  return OptaxRunner(
    name,
    spec.family,
    task,
    optimizers.step_time_optax(name),
    needs_activations=nysact,
    periods=spec.periods if nysact else None,
    config=dict(spec.nysact) if nysact else None,
  )


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


def _minor_faults() -> int:
  """The process's minor page faults so far (0 where ``resource`` is missing).

  XLA:CPU allocates a step's temporaries afresh at every execution; above
  glibc's mmap threshold each first touch of a page is a fault, so a step
  that holds more memory pays for it in time as well.
  """
  try:
    import resource
  except ImportError:  # not a POSIX system
    return 0
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


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
  plan = [
    ("plain", base + 1, min(n_plain, cov - 1)),
    ("statistics", base + cov, 1 if cov < inv else 0),
    ("inverse", base + inv, 1),
  ]
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


@contextlib.contextmanager
def threading_mode(mode: str):
  """``"default"``: the machine's threading as it is; ``"pinned"``: the
  BLAS/LAPACK libraries (OpenBLAS, which jax's CPU LAPACK calls run in)
  limited to one thread for the block (XLA's own pool is left alone)."""
  if mode == "default":
    yield
    return
  if mode != "pinned":
    raise ValueError(f"threading mode must be 'default' or 'pinned', got {mode!r}")
  import scipy.linalg  # noqa: F401 - loads the OpenBLAS jax's LAPACK calls use
  import threadpoolctl

  with threadpoolctl.threadpool_limits(1, user_api="blas"):
    yield


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
      "timing": (
        "sampled phases (block predicted > --max-block-s): per round 4 plain, "
        "1 statistics, 1 inverse step, each synced; amortised = (40 plain + "
        "9 statistics + 1 inverse) / 50"
        if sampled
        else "whole blocks"
      ),
      "state_bytes": sb,
      "state_over_param_bytes": sb["total"] / param_bytes,
      "block_s_per_step": [],
      "round_order": [],
    }
    if isinstance(r, KfacRunner):
      blocks = r.blocks()
      result[name]["kfac_blocks"] = {b: blocks.count(b) for b in sorted(set(blocks))}
    bar.update(1)
  modes = list(args.threading)
  for name in names:
    result[name]["by_threading"] = {m: {"block_s_per_step": []} for m in modes}
  for rnd, mode in itertools.product(range(args.rounds), modes):
    order = list(names)
    rng.shuffle(order)
    first_mode = mode == modes[0]
    with threading_mode(mode):
      for pos, name in enumerate(order):
        bar.set_description(f"{task.name}: round {rnd + 1}/{args.rounds} {mode} {name}")
        r = runners[name]
        acc = result[name].setdefault("phases", {}) if r.can_sample else None
        if result[name]["timing"] == "whole blocks":
          faults = _minor_faults()
          dt = run_block(r, task, args.steps)
          faults = _minor_faults() - faults
          result[name]["by_threading"][mode]["block_s_per_step"].append(dt / args.steps)
          result[name]["by_threading"][mode].setdefault("page_faults_per_step", []).append(
            faults / args.steps
          )
          if first_mode:
            result[name]["block_s_per_step"].append(dt / args.steps)
          if r.can_sample and args.phase_samples and first_mode:
            # After the timed block: a few steps timed alone, for the phase split.
            for k, v in sample_phases(r, task, n_plain=2).items():
              acc.setdefault(k, []).extend(v)
        elif rnd < args.sampled_rounds and first_mode:
          ph = sample_phases(r, task)
          for k, v in ph.items():
            acc.setdefault(k, []).extend(v)
          result[name]["block_s_per_step"].append(amortised_from_phases(ph, r.periods))
        if first_mode:
          result[name]["round_order"].append(pos)
        bar.update(1)
  for _ in range(args.phase_blocks):
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
  for mode in modes:  # each threading mode against the same mode's SGD / AdamW blocks
    for name in names:
      mine = result[name]["by_threading"][mode]
      blocks = mine["block_s_per_step"]
      mine["step_s_median"] = _common.median(blocks) if blocks else None
      if mine.get("page_faults_per_step"):
        mine["page_faults_per_step_median"] = _common.median(mine["page_faults_per_step"])
      for base in ("sgd", "adamw"):
        if base in result and blocks:
          theirs = result[base]["by_threading"][mode]["block_s_per_step"]
          ratios = [a / b for a, b in zip(blocks, theirs)]
          mine[f"ratio_to_{base}_per_round"] = ratios
          mine[f"ratio_to_{base}_median"] = _common.median(ratios)
  for name in names:
    res = result[name]
    if "adamw" in result:
      res["ratio_to_adamw_median"] = res["by_threading"][modes[0]].get("ratio_to_adamw_median")
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
        with contextlib.suppress(KeyError):
          res["amortised_from_phase_medians_s"] = amortised_from_phases(raw, tuple(res["periods"]))
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


def plot(results: dict[str, Any], path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  models_out = results["metrics"]["models"]
  fig, axes = plt.subplots(len(models_out), 2, figsize=(13, 3.2 * len(models_out)), squeeze=False)
  for row, (model, res) in enumerate(models_out.items()):
    opts = res["optimizers"]
    names = list(opts)
    colors = [
      "#888888"
      if opts[n].get("config", {}).get("rank") is None and n not in ("foof",)
      else "#1f77b4"
      for n in names
    ]
    colors = ["#d62728" if n.startswith("kfac") else c for n, c in zip(names, colors)]
    colors = ["#9467bd" if n == "foof" else c for n, c in zip(names, colors)]
    ax = axes[row][0]
    modes = list(opts[names[0]].get("by_threading", {})) or [None]
    width = 0.8 / len(modes)
    for k, mode in enumerate(modes):
      src = [opts[n]["by_threading"][mode] if mode else opts[n] for n in names]
      vals = [s.get("ratio_to_sgd_median") or np.nan for s in src]
      lo = [min(s.get("ratio_to_sgd_per_round") or [np.nan]) for s in src]
      hi = [max(s.get("ratio_to_sgd_per_round") or [np.nan]) for s in src]
      err = np.array([[v - l for v, l in zip(vals, lo)], [h - v for v, h in zip(vals, hi)]])
      x = np.arange(len(names)) + (k - (len(modes) - 1) / 2) * width
      ax.bar(
        x,
        vals,
        width,
        color=colors,
        yerr=err,
        capsize=3,
        alpha=1.0 if k == 0 else 0.5,
        hatch=None if k == 0 else "//",
        label=f"{mode} threading" if mode else None,
      )
    ax.set_xticks(np.arange(len(names)), names)
    limit = targets.STEP_TIME_RATIO.get(model, targets.STEP_TIME_RATIO_DEFAULT)
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
    ax.axhline(
      targets.STATE_OVER_PARAMS,
      color="g",
      ls="--",
      lw=0.8,
      label=f"target {targets.STATE_OVER_PARAMS:.2f}x",
    )
    ax.set_yscale("log")
    ax.set_ylabel("optimizer state / param bytes")
    ax.set_title(f"{model}: optimizer state ({res['param_count']:,} params)")
    ax.tick_params(axis="x", rotation=45)
    ax.legend(fontsize=8)
  m = results["machine"]
  fig.suptitle(
    f"{m['cpu_model']} ({m['cpus_usable']} cpus), jax {results['versions']['jax']}, "
    f"{m['device_kind']}",
    fontsize=9,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    "--models",
    default=",".join(ZOO),
    help=f"comma-separated subset of {','.join(ZOO)} (default: all, the zoo)",
  )
  parser.add_argument(
    "--optimizers",
    default=",".join(OPTIMIZERS),
    help="comma-separated (default: the zoo's sgd,adamw,nysact,nysact_graft; the "
    "earlier full comparison: "
    + ",".join(optimizers.STEP_TIME_DEFAULT)
    + "); available: "
    + ", ".join(f"{k} ({v})" for k, v in OPTIMIZER_HELP.items()),
  )
  parser.add_argument(
    "--rounds", type=int, default=3, help="interleaved rounds (one block per optimizer each)"
  )
  parser.add_argument(
    "--steps",
    type=int,
    default=50,
    help="steps per timed block; a multiple of 50 (whole inverse periods)",
  )
  parser.add_argument(
    "--warmup",
    type=int,
    default=6,
    help="untimed steps before the rounds (compile; >= 6 so that a statistics "
    "step is seen; >= 2 for K-FAC's two compiled variants)",
  )
  parser.add_argument(
    "--max-block-s",
    type=float,
    default=240.0,
    help="NysAct/FOOF runs whose block is predicted longer than this are "
    "timed by sampled phases instead of whole blocks (0: never)",
  )
  parser.add_argument(
    "--sampled-rounds",
    type=int,
    default=1,
    help="rounds in which runs timed by sampled phases (K-FAC, FOOF when "
    "slow) are timed; their ratios use those rounds' SGD blocks",
  )
  parser.add_argument(
    "--phase-blocks",
    type=int,
    default=0,
    help="extra blocks timed step by step for the phase split of every "
    "optimizer, K-FAC included (0: none)",
  )
  parser.add_argument(
    "--no-phase-samples",
    dest="phase_samples",
    action="store_false",
    help="skip the few NysAct steps timed alone after each block "
    "(plain / statistics / inverse split)",
  )
  parser.add_argument(
    "--batch",
    default="",
    help="per-model batch sizes, e.g. cnn=128,transformer=8 (default: "
    + ",".join(f"{k}={v}" for k, v in BATCH.items())
    + "; transformer: sequences of 128 tokens)",
  )
  parser.add_argument(
    "--threading",
    default="default,pinned",
    help="threading modes, interleaved round by round in one process: 'default' "
    "(the machine's, as users run) and 'pinned' (OpenBLAS limited to one thread); "
    "ratios and targets use the first",
  )
  parser.add_argument(
    "--data",
    choices=("real", "synthetic"),
    default="real",
    help="real: Fashion-MNIST / KJV from the Debian packages",
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--blas-threads",
    type=int,
    default=0,
    help="cap OpenBLAS threads for the whole run (0, the default: leave as is; "
    "use --threading pinned to time a pinned run beside the default one)",
  )
  parser.add_argument("--out", default=str(_common.RESULTS_DIR / "step_time.json"))
  parser.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
  args = parser.parse_args(argv)
  args.threading = [m for m in args.threading.split(",") if m]
  for m in args.threading:
    if m not in ("default", "pinned"):
      parser.error(f"--threading: unknown mode {m!r} (default, pinned)")
  blas = _common.limit_blas_threads(args.blas_threads)
  if args.steps % INVERSE_PERIOD:
    parser.error(f"--steps must be a multiple of {INVERSE_PERIOD}")
  model_names = [m for m in args.models.split(",") if m]
  names = [o for o in args.optimizers.split(",") if o]
  for n in names:
    if n not in OPTIMIZER_HELP:
      parser.error(f"unknown optimizer {n!r}")
  batch = dict(BATCH)
  for item in filter(None, args.batch.split(",")):
    k, _, v = item.partition("=")
    if k not in BATCH or not v.isdigit():
      parser.error(f"--batch: expected model=size with a model of {sorted(BATCH)}, got {item!r}")
    batch[k] = int(v)

  method = (
    "one process; per model, every optimizer is built and warmed up, then "
    f"{args.rounds} rounds in a shuffled order of one block of {args.steps} "
    "steps each (timed from a ready state to block_until_ready; amortised "
    "over whole T_inv=50 periods); ratios are per round against the same "
    "round's SGD block, then the median over rounds. NysAct runs whose block "
    f"would exceed --max-block-s={args.max_block_s:g} s are timed by sampled "
    "phases instead (see each optimizer's 'timing'), in the first "
    f"{args.sampled_rounds} round(s) only."
  )
  metrics: dict[str, Any] = {"models": {}}
  total = (
    len(model_names) * len(names) * (1 + args.rounds * len(args.threading) + args.phase_blocks)
  )
  t_start = time.perf_counter()
  with tqdm(total=total, unit="block", file=sys.stderr) as bar:
    for model in model_names:
      task = build_task(model, batch[model], source=args.data, seed=args.seed)
      metrics["models"][model] = measure_task(task, names, args, bar)
      del task
  metrics["wall_s"] = time.perf_counter() - t_start
  metrics["load_average_at_end"] = _common.load_average()
  metrics["targets"] = targets.step_time(metrics["models"])
  rec = results.record(
    "step_time", config=results.config_of(args, method), metrics=metrics, blas=blas
  )
  results.save(args.out, rec, plot=plot, plot_path=args.plot)
  for model, res in metrics["models"].items():
    print(
      f"\n{model}: {res['description']}; batch {tuple(res['batch_shape'])}, "
      f"{res['param_count']:,} params"
    )
    modes = args.threading
    head = "".join(f"{m + ' ms':>12}{'x SGD':>7}{'x AdamW':>8}" for m in modes)
    print(f"  {'optimizer':<14}{head}{'faults/step':>12}{'compile s':>11}{'state/params':>14}")
    nan = float("nan")
    for name, o in res["optimizers"].items():
      cells = ""
      for m in modes:
        t = o["by_threading"][m]
        cells += (
          f"{1e3 * (t.get('step_s_median') or nan):12.1f}"
          f"{t.get('ratio_to_sgd_median') or nan:7.3f}{t.get('ratio_to_adamw_median') or nan:8.3f}"
        )
      faults = o["by_threading"][modes[0]].get("page_faults_per_step_median", nan)
      print(
        f"  {name:<14}{cells}{faults:12.0f}{o.get('compile_s', nan):11.1f}"
        f"{o['state_over_param_bytes']:14.3f}"
      )
  print()
  for t in metrics["targets"]:
    value = float("nan") if t["value"] is None else t["value"]
    print(("PASS " if t["pass"] else "MISS ") + f"{t['target']}: {value:.3f} ({t['variant']})")
  return rec


if __name__ == "__main__":
  main()
