"""Peak memory of one train step: NysAct against SGD-momentum and AdamW.

The step is the one ``benchmarks.step_time`` times (forward, backward and
update in one ``jax.jit`` with donated buffers, NysAct's statistics and
refresh under ``lax.cond``), on the same models and batches. Two measures:

* ``compiled``: XLA's memory analysis of the compiled executable (on every
  backend): argument, output, alias (donated) and temp bytes, and
  ``peak = argument + output - alias + temp``, an upper bound on what the
  step holds at once. The temp bytes cover the largest branch of each
  ``lax.cond``, so a NysAct step's figure holds its statistics and refresh
  steps too.
* ``device``: on a device with allocator statistics (GPU, TPU),
  ``jax.devices()[0].memory_stats()["peak_bytes_in_use"]`` after
  ``--steps`` steps (a statistics and a refresh step among them). The peak
  never falls within a process, so with ``--isolate`` (the default where the
  statistics exist) each optimizer runs in its own subprocess.

Usage (from the repository root)::

  python -m benchmarks.memory                       # ~3 min on the 2-core CPU
  python -m benchmarks.memory --models cnn --optimizers sgd,nysact_g10
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from benchmarks import _common, step_time, tasks
from benchmarks import results as bresults

OPTIMIZERS = ("sgd", "adamw", "nysact_g10", "nysact_g50")
MIB = 2.0**20


def device_peak_supported() -> bool:
  stats = jax.devices()[0].memory_stats()
  return bool(stats) and "peak_bytes_in_use" in stats


def measure_one(
  model: str, name: str, batch: int, steps: int, data: str, seed: int
) -> dict[str, Any]:
  """Compiled memory analysis (and the device peak) of one optimizer's step."""
  task = tasks.build_task(model, batch, source=data, seed=seed, n_batches=2)
  runner = step_time.make_runner(name, task)
  runner.init()
  args = (runner.params, runner.model_state, runner.opt_state, task.batches[0])
  t0 = time.perf_counter()
  compiled = runner._step.lower(*args).compile()
  out: dict[str, Any] = {
    "compile_s": time.perf_counter() - t0,
    "param_bytes": _common.tree_bytes(task.params),
    "state_bytes": runner.state_bytes()["total"],
  }
  analysis = compiled.memory_analysis()
  if analysis is not None:
    fields = (
      "argument_size_in_bytes",
      "output_size_in_bytes",
      "alias_size_in_bytes",
      "temp_size_in_bytes",
      "generated_code_size_in_bytes",
    )
    c = {f.replace("_size_in_bytes", "_bytes"): int(getattr(analysis, f, 0) or 0) for f in fields}
    c["peak_bytes"] = c["argument_bytes"] + c["output_bytes"] - c["alias_bytes"] + c["temp_bytes"]
    out["compiled"] = c
  if device_peak_supported():
    for _ in range(steps):  # count 0: statistics + refresh; 5: statistics
      runner.step(task.batches[runner.count % len(task.batches)])
    runner.ready()
    stats = jax.devices()[0].memory_stats()
    out["device"] = {
      k: int(v)
      for k, v in stats.items()
      if k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
    }
  return out


def _isolated(model, name, args) -> dict[str, Any]:
  cmd = [
    sys.executable,
    "-m",
    "benchmarks.memory",
    "--one",
    f"{model}:{name}",
    "--steps",
    str(args.steps),
    "--data",
    args.data,
    "--seed",
    str(args.seed),
    f"--batch-{model}",
    str(getattr(args, f"batch_{model}")),
  ]
  res = subprocess.run(cmd, capture_output=True, text=True, check=True)
  return json.loads(res.stdout.strip().splitlines()[-1])


def plot(results: dict[str, Any], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  models_out = results["metrics"]["models"]
  fig, axes = plt.subplots(1, len(models_out), figsize=(4.5 * len(models_out), 3.6), squeeze=False)
  for ax, (model, res) in zip(axes[0], models_out.items()):
    names = list(res["optimizers"])
    key = "device" if all("device" in res["optimizers"][n] for n in names) else "compiled"
    field = "peak_bytes_in_use" if key == "device" else "peak_bytes"
    vals = [res["optimizers"][n][key][field] / MIB for n in names]
    ax.bar(
      names, vals, color=["#888888" if not n.startswith("nysact") else "#1f77b4" for n in names]
    )
    ax.set_ylabel(f"peak MiB ({key})")
    ax.set_title(f"{model}, batch {tuple(res['batch_shape'])}", fontsize=9)
    ax.tick_params(axis="x", rotation=30)
  m = results["machine"]
  fig.suptitle(
    f"train-step peak memory; {m['device_kind']}, jax {results['versions']['jax']}", fontsize=9
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="cnn,resnet20,transformer")
  parser.add_argument(
    "--optimizers",
    default=",".join(OPTIMIZERS),
    help="any of benchmarks.step_time's optimax optimizers (sgd, adamw, nysact_*, foof)",
  )
  parser.add_argument("--batch-cnn", type=int, default=128)
  parser.add_argument("--batch-resnet20", type=int, default=64)
  parser.add_argument("--batch-transformer", type=int, default=8)
  parser.add_argument(
    "--steps",
    type=int,
    default=6,
    help="steps run before reading the device peak (>= 6: a statistics step after the first)",
  )
  parser.add_argument("--data", choices=("real", "synthetic"), default="real")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--isolate",
    choices=("auto", "yes", "no"),
    default="auto",
    help="one subprocess per optimizer (auto: where the device has a peak-memory statistic)",
  )
  parser.add_argument("--blas-threads", type=int, default=1)
  parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # model:optimizer
  parser.add_argument("--out", default=str(_common.RESULTS_DIR / "memory.json"))
  parser.add_argument("--plot", default=None)
  args = parser.parse_args(argv)
  batch = {
    "cnn": args.batch_cnn,
    "resnet20": args.batch_resnet20,
    "transformer": args.batch_transformer,
  }
  if args.one:
    model, name = args.one.split(":")
    print(json.dumps(measure_one(model, name, batch[model], args.steps, args.data, args.seed)))
    return {}
  blas = _common.limit_blas_threads(args.blas_threads)
  isolate = args.isolate == "yes" or (args.isolate == "auto" and device_peak_supported())
  names = [o for o in args.optimizers.split(",") if o]
  method = (
    "compiled: XLA memory_analysis() of the jitted, donated train step "
    "(peak = argument + output - alias + temp); device: memory_stats() "
    "peak_bytes_in_use after --steps steps" + (", one subprocess per optimizer" if isolate else "")
  )
  results: dict[str, Any] = {
    "isolated": isolate,
    "models": {},
  }
  t0 = time.perf_counter()
  for model in [m for m in args.models.split(",") if m]:
    task = tasks.build_task(model, batch[model], source=args.data, seed=args.seed, n_batches=1)
    res: dict[str, Any] = {
      "description": task.description,
      "batch_shape": list(task.batch_shape),
      "optimizers": {},
    }
    for name in names:
      print(f"{model}: {name}", file=sys.stderr, flush=True)
      if isolate:
        row = _isolated(model, name, args)
      else:
        row = measure_one(model, name, batch[model], args.steps, args.data, args.seed)
      res["optimizers"][name] = row
    base = res["optimizers"].get("sgd")
    for row in res["optimizers"].values():
      if base and "compiled" in row:
        row["compiled_peak_over_sgd"] = (
          row["compiled"]["peak_bytes"] / base["compiled"]["peak_bytes"]
        )
        row["compiled_temp_over_sgd"] = row["compiled"]["temp_bytes"] / max(
          base["compiled"]["temp_bytes"], 1
        )
      if base and "device" in row and "device" in base:
        row["device_peak_over_sgd"] = (
          row["device"]["peak_bytes_in_use"] / base["device"]["peak_bytes_in_use"]
        )
    results["models"][model] = res
  results["wall_s"] = time.perf_counter() - t0
  rec = bresults.record(
    "memory", config=bresults.config_of(args, method), metrics=results, blas=blas
  )
  bresults.save(args.out, rec, plot=plot, plot_path=getattr(args, "plot", None))
  for model, res in results["models"].items():
    print(f"\n{model}: batch {tuple(res['batch_shape'])}")
    print(
      f"  {'optimizer':<12}{'args MiB':>10}{'temp MiB':>10}{'peak MiB':>10}{'x SGD':>8}"
      f"{'device peak MiB':>17}"
    )
    for name, row in res["optimizers"].items():
      c = row.get("compiled", {})
      dev = row.get("device", {}).get("peak_bytes_in_use")
      print(
        f"  {name:<12}{c.get('argument_bytes', np.nan) / MIB:>10.2f}"
        f"{c.get('temp_bytes', np.nan) / MIB:>10.2f}{c.get('peak_bytes', np.nan) / MIB:>10.2f}"
        f"{row.get('compiled_peak_over_sgd', np.nan):>8.3f}"
        f"{'-' if dev is None else f'{dev / MIB:.2f}':>17}"
      )
  return rec


if __name__ == "__main__":
  main()
