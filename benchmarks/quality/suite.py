"""The training-quality protocol as resumable pieces: one JSON per run.

Stages, in priority order (each reads what the earlier ones wrote):

1. ``tune``: every optimizer on a validation split carved from the training
   set, one seed, over its learning-rate grid (same grid size for all).
2. ``test``: every optimizer at its best validation learning rate, several
   seeds, on the test set.
3. ``ablate``: NysAct on the validation split, at the default's tuned
   learning rate, one design choice changed at a time: rank, sketch, sketch
   refresh, Nyström variant, damping, statistics/inverse periods; seed 0 of
   each first, then more seeds (``Preset.ablation_seeds``) of the choices
   that set the defaults.
   The preconditioner's error against the exact damped inverse is tracked.
4. ``best``: the best ablation setting on the test set, several seeds.
5. ``lm``: the character transformer on the KJV Bible, SGD/AdamW/NysAct,
   tuned on a validation stream, then seeds on held-out books.
6. ``resnet``: ResNet-20 on Fashion-MNIST, tune + test as in 1-2.
8. ``adam`` (issue 25: Adam in the activation eigenbasis, ``nysact_adam``):
   its default, exact mode and orthogonalised variant, the gradient-basis
   control (one-sided SOAP) and the orthogonalised variant's identity
   control tuned on the 300-step LM's validation stream beside the earlier
   optimizers; the second-moment policy and the rank on the validation
   stream (3 seeds); then the tests: the 300-step LM, the LM at 5x the
   tokens and the ViT at the LM-tuned settings, the CNN and ResNet-20 with
   their own grids (the identity control of the default is AdamW: rank 0
   equals it exactly, ``tests/test_adam.py``).
7. ``tf`` (issue 13: transformers and grafting): NysAct's grafted mode
   (``nysact-graft``), its identity-direction control (``graft-identity``)
   and Muon tuned on the 300-step LM validation stream beside the earlier
   optimizers; then, at the settings tuned there, the LM at 5x the token
   budget (``lm5_test``) and a ViT on Fashion-MNIST (``vit_test``), paired
   seeds; the grafted mode tuned and tested on the CNN and ResNet-20 (the
   regression check); SGD-momentum and plain NysAct on the two transformer
   tasks last.

A run whose JSON exists is skipped, so the suite can be stopped and started
again; ``--deadline`` stops launching new runs after a UTC time. All runs of
one invocation share one process, so runs that differ only in learning rate
or seed reuse one compilation. ``python -m benchmarks.quality.summary``
rebuilds the tables and plots from whatever has finished.

Presets: ``cpu`` is the reduced protocol for a 2-core machine (a narrower
CNN, a third of an epoch per run, 5 CNN seeds and 3 of the others; run it
with ``benchmarks/quality/run_cpu.sh``: one worker pinned to each core);
``full`` is the issue's protocol (the models at their default sizes, several
epochs, 5 seeds for the CNN), meant for one call on a GPU machine
(``benchmarks/quality/run_gpu.sh``); ``smoke`` is a few steps on digits.

Usage (from the repository root)::

  python -m benchmarks.quality.suite --preset cpu --stages tune,test,ablate
  python -m benchmarks.quality.suite --preset cpu --dry-run   # list the runs
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import signal
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

from benchmarks import optimizers, results
from benchmarks.quality import train

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results" / "quality"
_STALE_S = 3 * 3600  # a lock older than this is from a process that died
STAGES = ("tune", "test", "ablate", "best", "lm", "resnet", "tf", "adam", "peers")


@dataclasses.dataclass(frozen=True)
class Preset:
  """Sizes of one version of the protocol."""

  cnn: train.RunConfig
  grids: dict[str, tuple[float, ...]]
  seeds: int
  resnet: train.RunConfig | None = None
  resnet_seeds: int = 3
  lm: train.RunConfig | None = None
  lm_grids: dict[str, tuple[float, ...]] | None = None
  lm_seeds: int = 3
  resnet_optimizers: tuple[str, ...] = ("sgd", "adamw", "kfac", "nysact", "foof")
  ablation_seeds: int = 1  # seeds of each ablation on the validation split
  lm_long: train.RunConfig | None = None  # stage tf: the LM at a longer budget
  vit: train.RunConfig | None = None  # stage tf: the ViT on Fashion-MNIST
  tf_seeds: int = 3


# The damping of K-FAC and NysAct is tuned too: at the best learning rate of
# the grid (run at train.DAMPING), a tenth and ten times that damping.
DAMPING_GRIDS = {"kfac": (0.01, 1.0), "nysact-reference": (0.1, 10.0)}
# Tested at the learning rate and damping tuned for another label: NysAct's
# default took sketch_refresh="fixed" from the ablations after its tuning ran
# with "reference" (as the ablations take the tuned lr of their base).
TUNED_AS = {"nysact": "nysact-reference"}

# The optimizers compared: label -> (family, RunConfig overrides), defined
# with the step-time ones in benchmarks.optimizers.
OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = optimizers.QUALITY

GRIDS = {
  "sgd": (0.03, 0.1, 0.3),
  "adamw": (3e-4, 1e-3, 3e-3),
  "kfac": (0.01, 0.03, 0.1),
  "nysact-reference": (0.03, 0.1, 0.3),
  "nysact-shifted": (0.03, 0.1, 0.3),
  "foof": (0.03, 0.1, 0.3),
}

# Ablations: label -> RunConfig overrides of ABLATION_BASE at its tuned lr.
ABLATION_BASE = "nysact-shifted"
ABLATIONS: dict[str, dict[str, Any]] = {
  **{f"rank{r}": {"nysact": (("rank", r),)} for r in (1, 5, 20, 50)},
  "rank10": {},  # the base itself: a copy of its tuning run
  "subcolumns": {"nysact": (("sketch", "subcolumns"),)},
  "fixed": {"nysact": (("sketch_refresh", "fixed"),)},
  "stable": {"nysact": (("nystrom", "stable"),)},
  "fixed_stable": {"nysact": (("nystrom", "stable"), ("sketch_refresh", "fixed"))},
  "stable_subcolumns": {"nysact": (("nystrom", "stable"), ("sketch", "subcolumns"))},
  "damping0.1": {"damping": 0.1},
  "damping10": {"damping": 10.0},
  "periods1_10": {"nysact": (("cov_update_every", 1), ("inv_update_every", 10))},
  "periods10_100": {"nysact": (("cov_update_every", 10), ("inv_update_every", 100))},
}
# rank10 is the base; periods5_50 and damping1 are the base too.
ABLATION_ORDER = (
  "rank10",
  "fixed",
  "stable",
  "subcolumns",
  "rank1",
  "rank5",
  "rank20",
  "rank50",
  "damping0.1",
  "damping10",
  "periods1_10",
  "periods10_100",
  "fixed_stable",
  "stable_subcolumns",
)
# The ablation equal to the library's current defaults ("nysact" in ``test``).
DEFAULT_ABLATION = "fixed_stable"
# The choices that set the library's defaults: run with more seeds first.
ABLATION_KEY = ("rank10", "stable", "fixed", "subcolumns", "fixed_stable", "stable_subcolumns")

_CNN_CPU = train.RunConfig(
  task="fmnist_cnn",
  steps=300,
  batch_size=64,
  eval_every=25,
  eval_size=1000,
  model=(("features", (8, 16, 16)), ("hidden", 64)),
  track_layer="Dense_0",
)
_CNN_FULL = train.RunConfig(
  task="fmnist_cnn",
  steps=4690,
  batch_size=128,
  eval_every=469,
  eval_size=10000,
  track_layer="Dense_0",
)  # 10 epochs of 60000 (469 steps of 128 per epoch)
_RESNET_FULL = train.RunConfig(
  task="fmnist_resnet",
  steps=4690,
  batch_size=128,
  eval_every=469,
  eval_size=10000,
)
_RESNET_CPU = train.RunConfig(
  task="fmnist_resnet",
  steps=200,
  batch_size=64,
  eval_every=25,
  eval_size=1000,
)
_LM_CPU = train.RunConfig(
  task="char_lm",
  steps=300,
  batch_size=16,
  eval_every=25,
  eval_size=256,
  model=(("num_layers", 2), ("width", 128), ("context", 64)),
  augment=False,
)  # 300 x 16 x 64 = 307k tokens
_LM_FULL = train.RunConfig(
  task="char_lm",
  steps=5000,
  batch_size=32,
  eval_every=500,
  eval_size=256,
  model=(("num_layers", 4), ("width", 256), ("context", 128)),
  augment=False,
)  # 5000 x 32 x 128 = 20.5M tokens
LM_GRIDS = {
  "sgd": (0.1, 0.3, 1.0),
  "adamw": (1e-3, 3e-3, 1e-2),
  "nysact-reference": (0.1, 0.3, 1.0),
  "foof": (0.1, 0.3, 1.0),
  # Stage tf, cut to one point each on the contended 2-core machine:
  # Muon at the validation-tuned 0.05 (Adam 2.5e-3), the
  # grafted mode at the probe's best 1e-2 (3e-3: 3.179, 3e-2: 3.573
  # validation bits/char in the probe), the per-leaf grouping
  # at the same lr. A grid of one point is "tuned" once that run
  # exists (its value is still recorded). The identity control was
  # first tested at 1e-2 untuned (those runs are kept as
  # graft-identity-lr0.01); its grid found 3e-3.
  "muon": (0.05,),
  "nysact-graft": (1e-2,),
  "graft-identity": (3e-3, 1e-2, 3e-2),
  "nysact-graft-leaf": (1e-2,),
  "nysact-graft-reldamp": (1e-2,),
}
# Stage tf: the new labels tuned on the 300-step LM; the grafted mode on the
# CNN and ResNet-20 (an AdamW-like lr range: its steps have RMSProp's norm).
# Only the runs needed to decide something: the grafted mode's lr (the
# probe's) and the leaf-or-layer grouping; the control and Muon are tested
# at the lrs above without a validation run.
TF_LM_TUNED = ("nysact-graft", "nysact-graft-leaf")
GRAFT_IMAGE_GRID = {"nysact-graft": (3e-3, 1e-2, 3e-2)}
# Compared on the transformer tasks at the LM-tuned settings, in this order
# of priority (a cut-off leaves the first ones complete).
TF_FIRST = ("adamw", "muon", "nysact-graft", "graft-identity")
TF_VIT = ("adamw", "muon", "nysact-graft")  # the ViT's targets; the control later
TF_LATER = ("sgd", "nysact")
_LM_LONG_CPU = dataclasses.replace(_LM_CPU, steps=1500, eval_every=125)  # 1.54M tokens: 5x
_VIT_CPU = train.RunConfig(
  task="fmnist_vit",
  steps=200,
  batch_size=32,
  eval_every=100,
  eval_size=1000,
)  # patches of 4, width 128, depth 4 (the model's defaults); 6400 images: a
# ninth of an epoch, all that 9 runs could take on the contended 2-core machine
_VIT_FULL = train.RunConfig(
  task="fmnist_vit",
  steps=3750,
  batch_size=32,
  eval_every=375,
  eval_size=10000,
)  # 2 epochs

PRESETS = {
  "smoke": Preset(
    cnn=train.RunConfig(
      task="digits", steps=20, batch_size=32, eval_every=10, eval_size=360, track_layer="Dense_1"
    ),
    grids={"sgd": (0.1,), "foof": (0.1,)},
    seeds=1,
  ),
  # K-FAC is left out of ResNet-20 on the CPU: kfac-jax's convolution
  # curvature made 30 steps of it take over 10 minutes on one core.
  "cpu": Preset(
    cnn=_CNN_CPU,
    grids=GRIDS,
    seeds=5,
    resnet=_RESNET_CPU,
    lm=_LM_CPU,
    lm_grids=LM_GRIDS,
    lm_seeds=3,
    ablation_seeds=3,
    resnet_optimizers=("sgd", "adamw", "nysact", "foof"),
    lm_long=_LM_LONG_CPU,
    vit=_VIT_CPU,
    tf_seeds=3,
  ),
  "full": Preset(
    cnn=_CNN_FULL,
    grids=GRIDS,
    seeds=5,
    resnet=_RESNET_FULL,
    resnet_seeds=3,
    lm=_LM_FULL,
    lm_grids=LM_GRIDS,
    lm_seeds=3,
    ablation_seeds=3,
    lm_long=dataclasses.replace(_LM_FULL, steps=25000, eval_every=2500),
    vit=_VIT_FULL,
    tf_seeds=3,
  ),
}


@dataclasses.dataclass(frozen=True)
class Run:
  stage: str
  name: str
  cfg: train.RunConfig | None  # None: depends on results not yet there
  copy_from: pathlib.Path | None = None  # an identical finished run

  def path(self, root: pathlib.Path) -> pathlib.Path:
    return root / self.stage / f"{self.name}.json"


def _fmt(lr: float) -> str:
  return f"{lr:g}"


def _cfg(base: train.RunConfig, label: str, **kw) -> train.RunConfig:
  """``label``'s config on ``base`` with ``kw``; NysAct keyword arguments in
  ``kw`` are merged with the label's (``kw`` wins)."""
  family, over = OPTIMIZERS[label]
  nysact = tuple(kw.pop("nysact", ()))
  nysact += tuple(kv for kv in over.get("nysact", ()) if kv[0] not in dict(nysact))
  return dataclasses.replace(base, optimizer=family, **{**over, **kw, "nysact": nysact})


def load_runs(root: pathlib.Path, stage: str) -> list[dict[str, Any]]:
  out = []
  for f in sorted((root / stage).glob("*.json")):
    try:
      r = results.read(f)
    except (json.JSONDecodeError, ValueError):
      continue
    r["_name"] = f.stem
    out.append(r)
  return out


def score(result: dict[str, Any]) -> float:
  """Higher is better: accuracy, or minus bits per character."""
  f = result["metrics"]["final"]
  if f.get("diverged"):
    return float("-inf")
  if result["metrics"].get("metric") == "bits_per_char":
    return -(f.get("bits_per_char") or float("inf"))
  return f.get("eval_accuracy") or float("-inf")


# A grid whose best learning rate is at its edge grows past that edge (1, 3,
# 10, 30, ... steps), at most this many times, for every optimizer alike.
MAX_GRID_EXTENSIONS = 2


def _half_decade(lr: float, up: bool) -> float:
  """The next value of the 1-3-10 ladder above (or below) ``lr``."""
  k = math.floor(math.log10(lr) + 1e-9)
  ladder = [m * 10.0**e for e in (k - 1, k, k + 1) for m in (1, 3)]
  nxt = [v for v in ladder if (v > lr * 1.01 if up else v < lr / 1.01)]
  return float(f"{(min(nxt) if up else max(nxt)):.3g}")


def tune_name(task: str, label: str, lr: float | None, damping: float | None = None) -> str:
  """The name of a tuning run (``lr`` ``None``: not known yet)."""
  d = "" if damping is None else f"__d{_fmt(damping)}"
  return f"{task}__{label}__lr{'?' if lr is None else _fmt(lr)}{d}__s0"


def _tuning_runs(root: pathlib.Path, stage: str, task: str, label: str) -> list[dict[str, Any]]:
  """The finished tuning runs of ``label`` on ``task``, damping runs included."""
  prefix = f"{task}__{label}__lr"
  return [r for r in load_runs(root, stage) if r["_name"].startswith(prefix)]


def _grid(runs: list[dict[str, Any]], grid: Sequence[float]) -> tuple[list[float], bool]:
  """:func:`lr_grid` of the tuning runs ``runs``."""
  by_lr = {_fmt(r["config"]["lr"]): r for r in runs if "__d" not in r["_name"]}
  lrs = sorted(grid)
  while True:
    if not all(_fmt(lr) in by_lr for lr in lrs):
      return lrs, False
    best = max(lrs, key=lambda lr: score(by_lr[_fmt(lr)]))
    if len(lrs) - len(grid) >= MAX_GRID_EXTENSIONS or len(lrs) < 2:
      return lrs, True
    if best == lrs[-1]:
      lrs.append(_half_decade(best, up=True))
    elif best == lrs[0]:
      lrs.insert(0, _half_decade(best, up=False))
    else:
      return lrs, True


def lr_grid(
  root: pathlib.Path, stage: str, task: str, label: str, grid: Sequence[float]
) -> tuple[list[float], bool]:
  """The learning rates to tune ``label`` on and whether they have all
  finished: ``grid``, extended past an edge while the best finished run is
  there (up to :data:`MAX_GRID_EXTENSIONS` values)."""
  return _grid(_tuning_runs(root, stage, task, label), grid)


def _best_of_grid(runs: list[dict[str, Any]], grid: Sequence[float]) -> dict[str, Any] | None:
  """The best run of the learning-rate grid (damping runs aside), once it
  has finished."""
  lrs, complete = _grid(runs, grid)
  if not complete:
    return None
  done = {_fmt(lr) for lr in lrs}
  return max(
    (r for r in runs if "__d" not in r["_name"] and _fmt(r["config"]["lr"]) in done), key=score
  )


def best_lr(
  root: pathlib.Path, stage: str, task: str, label: str, grid: Sequence[float]
) -> float | None:
  """The learning rate of the best run of ``label``'s :func:`lr_grid`, once
  that has finished (else ``None``); its damping runs use it."""
  best = _best_of_grid(_tuning_runs(root, stage, task, label), grid)
  return None if best is None else best["config"]["lr"]


def best_run(
  root: pathlib.Path, stage: str, task: str, label: str, grid: Sequence[float]
) -> dict[str, Any] | None:
  """The config of the best tuning run of ``label`` on ``task`` (its ``lr``
  and ``damping``), once its :func:`lr_grid` and, for the labels of
  :data:`DAMPING_GRIDS`, the damping runs at the grid's best learning rate
  have finished (else ``None``)."""
  runs = _tuning_runs(root, stage, task, label)
  best = _best_of_grid(runs, grid)
  if best is None:
    return None
  lr = best["config"]["lr"]
  names = {tune_name(task, label, lr, d) for d in DAMPING_GRIDS.get(label, ())}
  damped = [r for r in runs if r["_name"] in names]
  if len(damped) < len(names):
    return None  # its damping runs have not finished
  return max([best, *damped], key=score)["config"]


def best_ablation(root: pathlib.Path, task: str) -> str | None:
  """The best ablation setting (highest mean score over its finished seeds),
  once seed 0 of every ablation has finished."""
  runs = [r for r in load_runs(root, "ablate") if r["_name"].startswith(task + "__")]
  if {r["_name"].split("__")[1] for r in runs if r["_name"].endswith("__s0")} < set(ABLATION_ORDER):
    return None
  by_label: dict[str, list[float]] = {}
  for r in runs:
    by_label.setdefault(r["_name"].split("__")[1], []).append(score(r))
  return max(by_label, key=lambda k: sum(by_label[k]) / len(by_label[k]))


def _tune_test(preset_cfg, grids, seeds, stage_tune, stage_test, root, labels) -> Iterator[Run]:
  task = preset_cfg.task
  tuned = list(dict.fromkeys(TUNED_AS.get(label, label) for label in labels))
  lrs = {label: grids[label] for label in tuned if label in grids}

  def tune_run(label, lr):
    return Run(
      stage_tune, tune_name(task, label, lr), _cfg(preset_cfg, label, lr=lr, split="val", seed=0)
    )

  # Interleave labels so that a cut-off leaves every optimizer tuned alike.
  for i in range(max(len(v) for v in lrs.values())):
    for label, grid in lrs.items():
      if i < len(grid):
        yield tune_run(label, grid[i])
  for label, grid in lrs.items():  # past the grid's edge, where the best is
    for lr in lr_grid(root, stage_tune, task, label, grid)[0]:
      if lr not in grid:
        yield tune_run(label, lr)
  for label in (l for l in DAMPING_GRIDS if l in lrs):  # damping, at the best lr
    lr = best_lr(root, stage_tune, task, label, lrs[label])
    for damping in DAMPING_GRIDS[label]:
      yield Run(
        stage_tune,
        tune_name(task, label, lr, damping),
        None
        if lr is None
        else _cfg(preset_cfg, label, lr=lr, damping=damping, split="val", seed=0),
      )
  tested = [label for label in labels if TUNED_AS.get(label, label) in lrs]
  best = {
    label: best_run(
      root, stage_tune, task, TUNED_AS.get(label, label), lrs[TUNED_AS.get(label, label)]
    )
    for label in tested
  }
  for seed in range(seeds):
    for label in tested:
      cfg = None
      if best[label] is not None:
        over = (
          {"damping": best[label]["damping"]} if TUNED_AS.get(label, label) in DAMPING_GRIDS else {}
        )
        cfg = _cfg(preset_cfg, label, lr=best[label]["lr"], split="test", seed=seed, **over)
      yield Run(stage_test, f"{task}__{label}__s{seed}", cfg)


TF_LM_GRIDS_UNTUNED = ("muon",)


def _transfer(
  base: train.RunConfig,
  stage: str,
  labels: Sequence[str],
  seeds: Sequence[int],
  root: pathlib.Path,
  lm_grids: dict[str, tuple[float, ...]],
) -> Iterator[Run]:
  """``labels`` on ``base``'s test split at the settings tuned for them on
  the 300-step LM (``lm_tune``), seeds interleaved (paired seeds first)."""
  best = {}
  for label in labels:
    tuned = TUNED_AS.get(label, label)
    if tuned in TF_LM_TUNED or tuned not in TF_LM_GRIDS_UNTUNED:
      best[label] = best_run(root, "lm_tune", "char_lm", tuned, lm_grids[tuned])
    else:  # tested at its one lr without a validation run
      best[label] = {"lr": lm_grids[tuned][0], "damping": None, "adam_lr": None}
  for seed in seeds:
    for label in labels:
      cfg = None
      if best[label] is not None:
        over = {}
        if TUNED_AS.get(label, label) in DAMPING_GRIDS:
          over["damping"] = best[label]["damping"]
        if best[label].get("adam_lr") is not None:
          over["adam_lr"] = best[label]["adam_lr"]
        cfg = _cfg(base, label, lr=best[label]["lr"], split="test", seed=seed, **over)
      yield Run(stage, f"{base.task}__{label}__s{seed}", cfg)


def plan(preset: Preset, stages: Sequence[str], root: pathlib.Path) -> Iterator[Run]:
  """The runs of ``stages``, in order; configs that need earlier results are
  resolved lazily (the generator reads the results written so far)."""
  base = preset.cnn
  for stage in stages:
    if stage in ("tune", "test"):
      it = _tune_test(base, preset.grids, preset.seeds, "tune", "test", root, tuple(OPTIMIZERS))
      for run in it:
        if run.stage == stage:
          yield run
    elif stage == "ablate":
      # Seed 0 of every ablation first, then more seeds of the design choices
      # that set the defaults (ABLATION_KEY), then of the rest.
      order = [(label, 0) for label in ABLATION_ORDER]
      order += [(label, seed) for seed in range(1, preset.ablation_seeds) for label in ABLATION_KEY]
      order += [
        (label, seed)
        for seed in range(1, preset.ablation_seeds)
        for label in ABLATION_ORDER
        if label not in ABLATION_KEY
      ]
      for label, seed in order:
        lr = best_lr(root, "tune", base.task, ABLATION_BASE, preset.grids[ABLATION_BASE])
        over = dict(ABLATIONS.get(label, {}))
        cfg = None
        if lr is not None:
          cfg = _cfg(base, ABLATION_BASE, lr=lr, split="val", seed=seed, **over)
        copy = None
        if label == "rank10" and seed == 0 and lr is not None:
          copy = root / "tune" / f"{tune_name(base.task, ABLATION_BASE, lr)}.json"
        yield Run("ablate", f"{base.task}__{label}__s{seed}", cfg, copy)
    elif stage == "best":
      # The best ablation setting on the test set, at the ablations' lr (the
      # library's default, set from the ablations, is "nysact" in ``test``).
      best = best_ablation(root, base.task)
      lr = best_lr(root, "tune", base.task, ABLATION_BASE, preset.grids[ABLATION_BASE])
      for choice in [best]:
        for seed in range(preset.seeds):
          cfg = None
          if choice is not None and lr is not None:
            cfg = _cfg(
              base, ABLATION_BASE, lr=lr, split="test", seed=seed, **ABLATIONS.get(choice, {})
            )
          yield Run("best", f"{base.task}__nysact-{choice}__s{seed}", cfg)
    elif stage == "lm" and preset.lm is not None:
      yield from _tune_test(
        preset.lm,
        preset.lm_grids,
        preset.lm_seeds,
        "lm_tune",
        "lm_test",
        root,
        ("sgd", "adamw", "nysact", "nysact-reference", "foof"),
      )
    elif stage == "resnet" and preset.resnet is not None:
      yield from _tune_test(
        preset.resnet,
        preset.grids,
        preset.resnet_seeds,
        "resnet_tune",
        "resnet_test",
        root,
        preset.resnet_optimizers,
      )
    elif stage == "tf" and preset.lm_long is not None and preset.lm is not None:
      grids = preset.lm_grids or LM_GRIDS
      yield from _tune_test(
        preset.lm, {k: grids[k] for k in TF_LM_TUNED}, 0, "lm_tune", "lm_test", root, TF_LM_TUNED
      )
      yield from _tune_test(
        preset.lm,
        {"nysact-graft-reldamp": grids["nysact-graft-reldamp"]},
        0,
        "lm_tune",
        "lm_test",
        root,
        ("nysact-graft-reldamp",),
      )
      # The machine's load left a run of the 5x LM 10-15 min: the paired
      # seeds run first at the 300-step budget of lm_test (beside its AdamW,
      # SGD and NysAct runs), then seed 0 of the ViT and of the 5x LM, then
      # the other seeds.
      yield from _transfer(preset.lm, "lm_test", TF_FIRST[1:], range(preset.tf_seeds), root, grids)
      # The control's validation grid (its first tests ran at 1e-2 untuned).
      yield from _tune_test(
        preset.lm,
        {"graft-identity": (3e-3, 1e-2, 3e-2)},
        0,
        "lm_tune",
        "lm_test",
        root,
        ("graft-identity",),
      )
      # Then the ViT's seed 0, the CNN check (short runs), the ViT's other
      # seeds, the 5x LM seed by seed, ResNet-20 (the longest image runs).
      if preset.vit is not None:
        yield from _transfer(preset.vit, "vit_test", TF_VIT, [0], root, grids)
      yield from _tune_test(
        preset.cnn, GRAFT_IMAGE_GRID, preset.seeds, "tune", "test", root, ("nysact-graft",)
      )
      if preset.vit is not None:
        # Seed 0 put the grafted mode far below AdamW on the ViT at the
        # LM-tuned 1e-2: is that lr or the method? Its validation grid, as a
        # check only (the tests stay at the settings tuned on the LM).
        for lr in (3e-3, 1e-2, 3e-2):
          yield Run(
            "vit_tune",
            tune_name(preset.vit.task, "nysact-graft", lr),
            _cfg(preset.vit, "nysact-graft", lr=lr, split="val", seed=0),
          )
        yield from _transfer(preset.vit, "vit_test", TF_VIT, range(1, preset.tf_seeds), root, grids)
      for seed in range(preset.tf_seeds):
        yield from _transfer(preset.lm_long, "lm5_test", TF_FIRST, [seed], root, grids)
      if preset.resnet is not None:
        yield from _tune_test(
          preset.resnet,
          GRAFT_IMAGE_GRID,
          preset.resnet_seeds,
          "resnet_tune",
          "resnet_test",
          root,
          ("nysact-graft",),
        )
      seeds = range(preset.tf_seeds)
      if preset.vit is not None:
        yield from _transfer(preset.vit, "vit_test", ("graft-identity",), seeds, root, grids)
      yield from _transfer(preset.lm_long, "lm5_test", TF_LATER, seeds, root, grids)
      if preset.vit is not None:
        yield from _transfer(preset.vit, "vit_test", TF_LATER, seeds, root, grids)
    elif stage == "adam" and preset.lm_long is not None and preset.lm is not None:
      yield from _adam_stage(preset, root)
    elif stage == "peers" and preset.lm_long is not None and preset.lm is not None:
      yield from _peers_stage(preset, root)


# Stage adam (issue 25).
ADAM_GRID = (1e-3, 3e-3, 1e-2)
ADAM_LM_TUNED = ("nysact-adam", "nysact-adam-exact", "nysact-adam-orth", "soap-1s", "adam-orth")
ADAM_ABLATIONS = (
  "nysact-adam-rotate",
  "nysact-adam-r16",
  "nysact-adam-r64",
  "nysact-adam-os16",
  "nysact-adam-cov1",
  "nysact-adam-r8",
)
ADAM_LONG = ("nysact-adam", "nysact-adam-exact", "nysact-adam-orth", "soap-1s")
ADAM_VIT = ("nysact-adam", "nysact-adam-orth")
ADAM_LONG_BASIS = ("nysact-adam-r64", "nysact-adam-os16")
ADAM_SEEDS = 3


def _adam_stage(preset: Preset, root: pathlib.Path) -> Iterator[Run]:
  """Stage adam, in order of priority (a cut-off leaves the first complete):
  tuning, the 300-step tests, the 5x-token tests of the default, exact
  mode and the orthogonalised variant, the ablations' seed 0, the ViT, rank
  64 and oversampling at 5x, the CNN and ResNet-20, the ablations' other
  seeds, the gradient-basis control at 5x."""
  assert preset.lm is not None and preset.lm_long is not None
  grids = {**(preset.lm_grids or LM_GRIDS), **dict.fromkeys(ADAM_LM_TUNED, ADAM_GRID)}
  tuned = {label: grids[label] for label in ADAM_LM_TUNED}
  yield from _tune_test(preset.lm, tuned, 0, "lm_tune", "lm_test", root, ADAM_LM_TUNED)
  seeds = range(ADAM_SEEDS)
  yield from _transfer(preset.lm, "lm_test", ADAM_LM_TUNED, seeds, root, grids)
  for seed in seeds:
    yield from _transfer(preset.lm_long, "lm5_test", ADAM_LONG[:3], [seed], root, grids)
  # The ablations at the default's tuned lr, paired seeds on the validation stream.
  lr = best_lr(root, "lm_tune", "char_lm", "nysact-adam", ADAM_GRID)

  def ablations(seed: int) -> Iterator[Run]:
    for label in ("nysact-adam", *ADAM_ABLATIONS):
      cfg = None if lr is None else _cfg(preset.lm, label, lr=lr, split="val", seed=seed)
      copy = None
      if label == "nysact-adam" and seed == 0 and lr is not None:
        copy = root / "lm_tune" / f"{tune_name('char_lm', label, lr)}.json"
      yield Run("lm_ablate", f"char_lm__{label}__s{seed}", cfg, copy)

  yield from ablations(0)
  if preset.vit is not None:
    yield from _transfer(preset.vit, "vit_test", ADAM_VIT, seeds, root, grids)
  # The default's gap to exact mode at 5x the tokens: the two ablations that
  # brought its basis closest to the exact eigenspace (benchmarks.basis_quality),
  # at the default's tuned lr.
  for label in ADAM_LONG_BASIS:
    for seed in seeds:
      cfg = None if lr is None else _cfg(preset.lm_long, label, lr=lr, split="test", seed=seed)
      yield Run("lm5_test", f"char_lm__{label}__s{seed}", cfg)
  yield from _tune_test(
    preset.cnn, {"nysact-adam": ADAM_GRID}, preset.seeds, "tune", "test", root, ("nysact-adam",)
  )
  if preset.resnet is not None:
    yield from _tune_test(
      preset.resnet,
      {"nysact-adam": ADAM_GRID},
      preset.resnet_seeds,
      "resnet_tune",
      "resnet_test",
      root,
      ("nysact-adam",),
    )
  for seed in seeds[1:]:
    yield from ablations(seed)
  yield from _transfer(preset.lm_long, "lm5_test", ADAM_LONG[3:], seeds, root, grids)


# Stage peers (issue 29): the peers at full strength, in their own folders
# (runs/peers/<lm_tune|lm_test|lm5_test|vit_test>).
PEERS_GRIDS = {
  "muon-moonlight": (1e-3, 3e-3, 1e-2, 2e-2, 3e-2),
  "soap": (1e-3, 3e-3, 1e-2),
  "adamw": LM_GRIDS["adamw"],
}
KELLER_GRID = ((0.01, 0.02, 0.05), (1e-3, 3e-3, 1e-2))  # Muon lr x Adam lr
PEERS_TUNED = ("muon-moonlight", "soap", "muon-keller", "adamw")
# Earlier stages' runs copied beside the peers where the config is the same:
# AdamW (the target), optax.contrib.muon defaults (the old row) and the
# orthogonalised mode (the comparator).
PEERS_REUSED = ("adamw", "muon", "nysact-adam-orth")
PEERS_SEEDS = 3


def keller_name(task: str, lr: float, adam_lr: float, seed: int = 0) -> str:
  return f"{task}__muon-keller__lr{_fmt(lr)}__alr{_fmt(adam_lr)}__s{seed}"


def _keller_grid(
  root: pathlib.Path, stage: str, task: str
) -> tuple[list[tuple[float, float]], dict[str, Any] | None]:
  """Keller's 2-D grid (Muon lr x Adam lr), each axis extended past an edge
  where the best finished point is (up to :data:`MAX_GRID_EXTENSIONS` per
  axis): the points to run, and the best run once all have finished."""
  runs = {r["_name"]: r for r in _tuning_runs(root, stage, task, "muon-keller")}
  lrs, alrs = list(KELLER_GRID[0]), list(KELLER_GRID[1])
  while True:
    points = [(a, b) for a in lrs for b in alrs]
    names = [keller_name(task, a, b) for a, b in points]
    if not all(n in runs for n in names):
      return points, None
    best_name = max(names, key=lambda n: score(runs[n]))
    a, b = points[names.index(best_name)]
    grown = False
    for axis, v in ((lrs, a), (alrs, b)):
      base = KELLER_GRID[0] if axis is lrs else KELLER_GRID[1]
      if len(axis) - len(base) >= MAX_GRID_EXTENSIONS:
        continue
      if v == axis[-1]:
        axis.append(_half_decade(v, up=True))
        grown = True
      elif v == axis[0]:
        axis.insert(0, _half_decade(v, up=False))
        grown = True
    if not grown:
      return points, runs[best_name]["config"]


def _reused(run: Run, root: pathlib.Path, stage: str) -> Run:
  """``run`` with ``copy_from`` an earlier stage's run of the same name and
  the same config (every field of the new config equal), if there is one."""
  src = root / stage / f"{run.name}.json"
  if run.cfg is None or not src.exists():
    return run
  try:
    old = results.read(src)["config"]
  except (json.JSONDecodeError, ValueError, KeyError):
    return run
  new = json.loads(json.dumps(run.cfg.to_json()))
  if all(old.get(k) == v for k, v in new.items()):
    return dataclasses.replace(run, copy_from=src)
  return run


def _peers_stage(preset: Preset, root: pathlib.Path) -> Iterator[Run]:
  """Stage peers, in order of priority (a cut-off keeps the first complete):
  the 300-step LM validation grids of Moonlight's Muon, SOAP and Keller's
  Muon (AdamW's copied from ``lm_tune``, extended past an edge if its best
  is there), the 300-step tests (3 seeds), the 5x-token tests, the ViT at
  the LM-tuned settings; the earlier stages' AdamW, ``optax.contrib.muon``
  defaults and orthogonalised-mode tests copied beside them."""
  assert preset.lm is not None and preset.lm_long is not None
  lm, task = preset.lm, preset.lm.task
  tune, seeds = "peers/lm_tune", range(PEERS_SEEDS)

  def tune_run(label: str, lr: float) -> Run:
    run = Run(tune, tune_name(task, label, lr), _cfg(lm, label, lr=lr, split="val", seed=0))
    return _reused(run, root, "lm_tune")

  def keller_run(lr: float, adam_lr: float) -> Run:
    cfg = _cfg(lm, "muon-keller", lr=lr, adam_lr=adam_lr, split="val", seed=0)
    return Run(tune, keller_name(task, lr, adam_lr), cfg)

  one_d = {k: PEERS_GRIDS[k] for k in ("muon-moonlight", "soap", "adamw")}
  # Seed-0 grids, interleaved: Moonlight and SOAP first, then Keller's 3 x 3.
  for i in range(max(len(g) for g in one_d.values())):
    for label, grid in one_d.items():
      if i < len(grid):
        yield tune_run(label, grid[i])
  for label, grid in one_d.items():
    for lr in lr_grid(root, tune, task, label, grid)[0]:
      if lr not in grid:
        yield tune_run(label, lr)
  points, keller = _keller_grid(root, tune, task)
  for lr, adam_lr in points:
    yield keller_run(lr, adam_lr)
  best: dict[str, dict[str, Any] | None] = {
    label: best_run(root, tune, task, label, grid) for label, grid in one_d.items()
  }
  best["muon-keller"] = keller
  lm_grids = preset.lm_grids or LM_GRIDS
  reused_best = {
    "muon": {"lr": lm_grids["muon"][0]},
    "nysact-adam-orth": best_run(root, "lm_tune", task, "nysact-adam-orth", ADAM_GRID),
  }

  def tests(base: train.RunConfig, stage: str, old: str, labels, seeds) -> Iterator[Run]:
    for seed in seeds:
      for label in labels:
        b = best.get(label) or reused_best.get(label)
        cfg = None
        if b is not None:
          over = {"adam_lr": b["adam_lr"]} if b.get("adam_lr") is not None else {}
          cfg = _cfg(base, label, lr=b["lr"], split="test", seed=seed, **over)
        run = Run(stage, f"{base.task}__{label}__s{seed}", cfg)
        yield _reused(run, root, old) if label in PEERS_REUSED else run

  peers = ("muon-moonlight", "soap", "muon-keller")
  yield from tests(lm, "peers/lm_test", "lm_test", (*peers, *PEERS_REUSED), seeds)
  for seed in seeds:
    yield from tests(preset.lm_long, "peers/lm5_test", "lm5_test", peers, [seed])
  yield from tests(preset.lm_long, "peers/lm5_test", "lm5_test", PEERS_REUSED, seeds)
  if preset.vit is not None:
    yield from tests(preset.vit, "peers/vit_test", "vit_test", (*peers, *PEERS_REUSED), seeds)


def _past(deadline: str | None) -> bool:
  if not deadline:
    return False
  now = datetime.datetime.now(datetime.UTC)
  hh, mm = (int(v) for v in deadline.split(":"))
  return (now.hour, now.minute) >= (hh, mm)


def main(argv: Sequence[str] | None = None) -> list[pathlib.Path]:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  p.add_argument(
    "--stages",
    default="tune,test,ablate,best",
    help=f"comma-separated, in order; from {','.join(STAGES)}",
  )
  p.add_argument("--out-dir", default=str(RESULTS / "runs"))
  p.add_argument("--steps", type=int, default=None, help="override the preset's steps")
  p.add_argument("--seeds", type=int, default=None, help="override the preset's seeds")
  p.add_argument(
    "--only", default=None, help="comma-separated substrings: run only names containing one"
  )
  p.add_argument("--deadline", default=None, help="UTC HH:MM after which no run starts")
  p.add_argument("--max-runs", type=int, default=None)
  p.add_argument(
    "--cache-dir", default=None, help="persistent XLA compilation cache (speeds up restarts)"
  )
  p.add_argument(
    "--wait",
    action="store_true",
    help="when the remaining runs wait for another process's results, poll instead of exiting",
  )
  p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
  a = p.parse_args(argv)
  preset = PRESETS[a.preset]
  if a.steps:
    preset = dataclasses.replace(preset, cnn=dataclasses.replace(preset.cnn, steps=a.steps))
  if a.seeds:
    preset = dataclasses.replace(preset, seeds=a.seeds)
  stages = [s for s in a.stages.split(",") if s]
  for s in stages:
    if s not in STAGES:
      p.error(f"unknown stage {s!r}; choose from {STAGES}")
  if a.cache_dir:
    import jax

    jax.config.update("jax_compilation_cache_dir", a.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  # SIGTERM ends the run in progress cleanly (its lock is removed).
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  root = pathlib.Path(a.out_dir)
  only = [o for o in (a.only or "").split(",") if o]
  written: list[pathlib.Path] = []
  done = 0
  first_pass = True
  while True:  # passes over the plan until nothing is left that can run
    started, pending, stop = 0, 0, False
    for run in plan(preset, stages, root):
      if only and not any(o in run.name for o in only):
        continue
      path = run.path(root)
      lock = path.with_suffix(".running")
      if path.exists():
        if first_pass:
          print(f"[skip] {run.stage}/{run.name} (finished)", flush=True)
        continue
      if lock.exists() and time.time() - lock.stat().st_mtime < _STALE_S:
        pending += 1  # another process of the suite is on it
        continue
      if run.copy_from is not None and run.copy_from.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run.copy_from.read_text())
        print(f"[copy] {run.stage}/{run.name} <- {run.copy_from.name} (same config)", flush=True)
        continue
      if run.cfg is None:
        pending += 1
        continue
      if a.dry_run:
        print(f"[plan] {run.stage}/{run.name}: {run.cfg}", flush=True)
        continue
      if _past(a.deadline) or (a.max_runs is not None and done >= a.max_runs):
        print("[stop] deadline or --max-runs reached", flush=True)
        stop = True
        break
      started += 1
      path.parent.mkdir(parents=True, exist_ok=True)
      lock.write_text(str(os.getpid()))
      t0 = time.time()
      print(
        f"[run ] {run.stage}/{run.name} lr={run.cfg.lr} "
        f"({time.strftime('%H:%M:%S', time.gmtime())} UTC)",
        flush=True,
      )
      try:
        result = train.run(run.cfg, path, progress=lambda s: print("       " + s, flush=True))
      except Exception:
        err = traceback.format_exc()
        print(err, file=sys.stderr, flush=True)
        path.with_suffix(".failed.txt").write_text(err)
        continue
      finally:
        lock.unlink(missing_ok=True)
      done += 1
      written.append(path)
      f = result["metrics"]["final"]
      print(
        f"[done] {run.stage}/{run.name}: acc {f['eval_accuracy']:.4f} loss "
        f"{f['eval_loss']:.4f} diverged={f['diverged']} in {time.time() - t0:.0f}s "
        f"(train {result['metrics']['timing']['train_s']:.0f}s, first step "
        f"{result['metrics']['timing']['first_step_s']:.0f}s)",
        flush=True,
      )
      break  # re-plan: later runs may depend on this one
    first_pass = False
    if stop or a.dry_run or (not started and not pending):
      break
    if not started:
      if not a.wait:
        print(f"[end ] {pending} run(s) wait for results of other runs", flush=True)
        break
      time.sleep(20)
  return written


if __name__ == "__main__":
  main()
