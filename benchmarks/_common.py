"""Helpers shared by the benchmark scripts: machine description, JSON output,
timing and log-log fits."""

from __future__ import annotations

import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.lower().startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def package_version(module: str) -> str | None:
  """The installed version of ``module`` (a distribution name), or ``None``."""
  try:
    from importlib import metadata

    return metadata.version(module)
  except Exception:
    return None


def machine_info() -> dict[str, Any]:
  """What ran the benchmark: CPU, cores, accelerator, load. Library versions,
  the commit and the time are header fields of their own
  (:func:`benchmarks.results.header`)."""
  devices = jax.devices()
  try:
    affinity = len(os.sched_getaffinity(0))
  except AttributeError:
    affinity = os.cpu_count()
  try:
    load = os.getloadavg()
  except OSError:
    load = None
  return {
    "cpu_model": cpu_model(),
    "cpu_count": os.cpu_count(),
    "cpus_usable": affinity,
    "machine": platform.machine(),
    "system": f"{platform.system()} {platform.release()}",
    "python": sys.version.split()[0],
    "jax_backend": jax.default_backend(),
    "device_kind": devices[0].device_kind,
    "device_count": len(devices),
    "load_average_at_start": None if load is None else [round(x, 2) for x in load],
  }


def load_average() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def _clean(obj: Any, digits: int = 6) -> Any:
  if isinstance(obj, dict):
    return {str(k): _clean(v, digits) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_clean(v, digits) for v in obj]
  if isinstance(obj, (np.floating, float)):
    x = float(obj)
    if not math.isfinite(x):
      return None
    return float(f"{x:.{digits}g}")
  if isinstance(obj, np.integer):
    return int(obj)
  if isinstance(obj, np.ndarray):
    return _clean(obj.tolist(), digits)
  return obj


def write_json(path: str | os.PathLike, obj: Any) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(_clean(obj), indent=1) + "\n")
  return path


# Set by ``python -m benchmarks <suite>`` (benchmarks/__main__.py): the
# command prefix of the suite it dispatched to.
ENTRY: str | None = None


def command_line() -> str:
  """The command as a user would type it from the repository root."""
  if ENTRY is not None:
    return " ".join([ENTRY] + sys.argv[1:])
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  module = spec.name if spec is not None else "benchmarks." + pathlib.Path(sys.argv[0]).stem
  return " ".join(["python -m " + module] + sys.argv[1:])


def time_fn(
  fn: Callable[[], Any], *, repeats: int, min_time: float = 0.0, max_repeats: int | None = None
) -> list[float]:
  """Wall times of ``fn()`` (which must block until its result is ready).

  Runs at least ``repeats`` times, and more (up to ``max_repeats``) while the
  total is below ``min_time`` seconds.
  """
  times: list[float] = []
  total = 0.0
  while len(times) < repeats or (
    total < min_time and (max_repeats is None or len(times) < max_repeats)
  ):
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    times.append(dt)
    total += dt
  return times


def median(xs: Sequence[float]) -> float:
  return float(statistics.median(xs))


def loglog_fit(x: Sequence[float], y: Sequence[float]) -> dict[str, float] | None:
  """Least-squares fit ``log y = a log x + b``; returns the exponent ``a``."""
  pts = [(a, b) for a, b in zip(x, y) if a and b and b > 0]
  if len(pts) < 2:
    return None
  lx = np.log([a for a, _ in pts])
  ly = np.log([b for _, b in pts])
  a, b = np.polyfit(lx, ly, 1)
  return {
    "exponent": float(a),
    "prefactor": float(np.exp(b)),
    "points": len(pts),
    "x_min": float(min(p[0] for p in pts)),
    "x_max": float(max(p[0] for p in pts)),
  }


def tree_bytes(tree: Any) -> int:
  return int(sum(getattr(x, "nbytes", 0) for x in jax.tree_util.tree_leaves(tree)))


_BLAS_LIMITER = None


def limit_blas_threads(n: int) -> list[dict[str, Any]]:
  """Caps the threads of the BLAS/LAPACK libraries loaded in this process.

  jax's CPU LAPACK custom calls (eigh, cholesky, qr, svd, triangular solve)
  run in scipy's OpenBLAS. With two or more OpenBLAS threads beside XLA's own
  thread pool, on a loaded 2-core machine, a 256 x 256 ``eigh`` measured
  1.6-2.5 s instead of 30-60 ms with one thread, so the benchmarks pin it
  (``n <= 0`` leaves the libraries alone). Returns ``threadpoolctl``'s
  description of the libraries, recorded in every result file.
  """
  global _BLAS_LIMITER
  import scipy.linalg  # noqa: F401 - loads the OpenBLAS that jax's LAPACK calls use

  try:
    import threadpoolctl
  except ImportError:
    return [{"note": "threadpoolctl not installed; BLAS threads left as they are"}]
  if n > 0:
    _BLAS_LIMITER = threadpoolctl.threadpool_limits(n, user_api="blas")
  keep = ("user_api", "internal_api", "num_threads", "version")
  return [{k: lib.get(k) for k in keep} for lib in threadpoolctl.threadpool_info()]
