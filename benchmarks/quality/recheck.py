"""Reruns recorded quality runs at the current code, seed for seed.

After a change that should not move training (a numerically equivalent
rewrite of the factorisation, say), this reruns the stored runs of one stage
with their exact configs and reports, per optimizer, the recorded and the
new final metric of every seed and their paired differences. An optimizer
whose code did not change (e.g. ``sgd``) measures what the machine and the
library versions alone move.

Usage::

  python -m benchmarks.quality.recheck --optimizers nysact,nysact-graft,sgd --workers 2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import multiprocessing
import os
import pathlib
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from benchmarks import results as bresults
from benchmarks.quality import suite, train


def _pin() -> None:
  """One core per worker process, also with one worker, as ``run_cpu.sh``
  ran the recorded runs: the thread count changes the round-off, and a
  300-step run's final accuracy moves by points with it."""
  if hasattr(os, "sched_setaffinity"):
    ident = multiprocessing.current_process()._identity
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[(ident[0] - 1) % len(cores)] if ident else cores[0]})


def _rerun(source: str, out_dir: str) -> tuple[str, float, float]:
  """``(source, recorded score, new score)`` of one recorded run, rerun."""
  old = bresults.read(source)
  cfg = train.RunConfig.from_json(old["config"])
  new = train.run(cfg, pathlib.Path(out_dir) / pathlib.Path(source).name)
  return source, suite.score(old), suite.score(new)


def _paired(old: Sequence[float], new: Sequence[float]) -> dict[str, Any]:
  d = [b - a for a, b in zip(old, new, strict=True)]
  n = len(d)
  mean = sum(d) / n
  sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else float("nan")
  return {
    "n": n,
    "recorded_mean": sum(old) / n,
    "new_mean": sum(new) / n,
    "difference_mean": mean,
    "difference_sd": sd,
    "t": mean / (sd / math.sqrt(n)) if n > 1 and sd > 0 else float("nan"),
  }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--runs", default=str(suite.RESULTS / "runs"))
  p.add_argument("--stage", default="test")
  p.add_argument("--task", default="fmnist_cnn")
  p.add_argument("--optimizers", default="nysact,nysact-graft,sgd")
  p.add_argument("--seeds", default="0,1,2,3,4")
  p.add_argument("--workers", type=int, default=1, help="processes, one core each")
  p.add_argument("--out", default=str(suite.RESULTS / "recheck.json"))
  args = p.parse_args(argv)
  labels = [x for x in args.optimizers.split(",") if x]
  seeds = [int(x) for x in args.seeds.split(",") if x]
  root = pathlib.Path(args.runs) / args.stage
  name = "{}__{}__s{}.json".format
  sources = [str(root / name(args.task, label, seed)) for label in labels for seed in seeds]
  missing = [s for s in sources if not pathlib.Path(s).exists()]
  if missing:
    raise SystemExit(f"no recorded run for {missing}")
  # Fresh interpreters (spawn: a forked jax is unsafe) that inherit one XLA
  # thread each from the environment, read when their jax starts.
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  )
  context = multiprocessing.get_context("spawn")
  with (
    tempfile.TemporaryDirectory() as out_dir,
    concurrent.futures.ProcessPoolExecutor(
      args.workers, mp_context=context, initializer=_pin
    ) as pool,
  ):
    done = list(pool.map(_rerun, sources, [out_dir] * len(sources)))  # in order
  per = {}
  for i, label in enumerate(labels):
    pairs = [(old, new) for _, old, new in done[i * len(seeds) : (i + 1) * len(seeds)]]
    per[label] = {
      "seeds": seeds,
      "recorded": [o for o, _ in pairs],
      "new": [n for _, n in pairs],
      **_paired([o for o, _ in pairs], [n for _, n in pairs]),
    }
  rec = bresults.record(
    "quality_recheck",
    config={"stage": args.stage, "task": args.task, "optimizers": labels, "seeds": seeds},
    metrics={"optimizers": per},
  )
  bresults.save(args.out, rec)
  print(f"{'optimizer':<16}{'recorded':>10}{'new':>10}{'new - recorded':>18}{'t':>7}")
  for label, r in per.items():
    print(
      f"{label:<16}{r['recorded_mean']:10.4f}{r['new_mean']:10.4f}"
      f"{r['difference_mean']:+11.4f} +- {r['difference_sd']:.4f}{r['t']:7.2f}"
    )
  return rec


if __name__ == "__main__":
  main(sys.argv[1:])
