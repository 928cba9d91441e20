"""The one result schema of the benchmarks: a header, then ``config``,
``metrics`` and (where any) ``curves``.

Every results JSON written by a benchmark script goes through :func:`write`
(or :func:`record` + :func:`save` when the record is needed before it is
written, e.g. to plot it). The header says where and how a result was made:

* ``schema``: :data:`SCHEMA` (the version of this layout);
* ``benchmark``: which script wrote it (``python -m benchmarks <suite>``);
* ``machine``: :func:`benchmarks._common.machine_info` (CPU, cores, devices);
* ``commit``: ONE commit record, taken once per process when this module is
  first used (the code the process loaded): the repository's ``HEAD``,
  whether ``nysact_optax/`` or ``benchmarks/`` had uncommitted changes, and a
  hash of the library's sources as imported;
* ``versions``: jax, jaxlib, flax, optax, kfac-jax, numpy, nysact-optax;
* ``threads``: ``XLA_FLAGS``, the OMP/OpenBLAS/MKL thread variables, the
  CPUs the process may run on and whether it was pinned to fewer than all,
  and the BLAS libraries' thread counts (when the script limited them);
* ``command``: the command as typed from the repository root;
* ``utc``: when the record was made.

Results written before this layout (``benchmarks/results/`` up to issue 17)
were converted in place by :mod:`benchmarks.convert_results`, which uses
:func:`upgrade`; :func:`read` applies the same upgrade to any old-layout file
it meets, so older copies elsewhere stay readable.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from benchmarks import _common

SCHEMA = 1
HEADER_KEYS = ("schema", "benchmark", "machine", "commit", "versions", "threads", "command", "utc")
BODY_KEYS = ("config", "metrics", "curves")
THREAD_ENV = ("XLA_FLAGS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "kfac-jax", "numpy", "nysact-optax")
_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
  try:
    return subprocess.run(
      ["git", "-C", str(_ROOT), *args], capture_output=True, text=True, check=True, timeout=20
    ).stdout.strip()
  except Exception:
    return None


@functools.lru_cache(maxsize=1)
def commit_record() -> dict[str, Any]:
  """The commit this process runs (taken once, at the first call: a long
  suite that outlives a commit still records the code it loaded)."""
  import nysact_optax

  lib = pathlib.Path(nysact_optax.__file__).resolve().parent
  digest = hashlib.sha256()
  for f in sorted(lib.glob("*.py")):
    digest.update(f.read_bytes())
  status = _git("status", "--porcelain", "--", "nysact_optax", "benchmarks")
  return {
    "commit": _git("rev-parse", "HEAD"),
    "uncommitted_changes": None if status is None else bool(status),
    "nysact_optax_sha256": digest.hexdigest()[:16],
    "nysact_optax_path": str(lib),
    "taken_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }


def versions() -> dict[str, str | None]:
  """The installed versions of the libraries a result depends on."""
  return {name: _common.package_version(name) for name in LIBRARIES}


def thread_settings(blas: Any = None) -> dict[str, Any]:
  """Thread-related environment, CPU affinity and (given) BLAS thread counts."""
  try:
    cpus = sorted(os.sched_getaffinity(0))
  except AttributeError:
    cpus = None
  total = os.cpu_count()
  return {
    **{name: os.environ.get(name) for name in THREAD_ENV},
    "cpu_affinity": cpus,
    "pinned": None if cpus is None or total is None else len(cpus) < total,
    "blas": blas,
  }


def command_line() -> str:
  """The command as a user would type it from the repository root."""
  return _common.command_line()


def header(benchmark: str, *, blas: Any = None, command: str | None = None) -> dict[str, Any]:
  """The fields every results JSON starts with."""
  return {
    "schema": SCHEMA,
    "benchmark": benchmark,
    "machine": _common.machine_info(),
    "commit": commit_record(),
    "versions": versions(),
    "threads": thread_settings(blas),
    "command": command or command_line(),
    "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }


def record(
  benchmark: str,
  *,
  config: Mapping[str, Any],
  metrics: Mapping[str, Any],
  curves: Any = None,
  blas: Any = None,
  command: str | None = None,
) -> dict[str, Any]:
  """A result in the one schema: header, ``config``, ``metrics``, ``curves``."""
  out = {
    **header(benchmark, blas=blas, command=command),
    "config": dict(config),
    "metrics": dict(metrics),
  }
  if curves is not None:
    out["curves"] = curves
  return out


def save(
  path: str | os.PathLike,
  rec: Mapping[str, Any],
  *,
  plot: Callable[[Mapping[str, Any], str], None] | None = None,
  plot_path: str | os.PathLike | None = None,
  quiet: bool = False,
) -> pathlib.Path:
  """Writes ``rec`` (checked against the schema) and, given ``plot``, its PNG
  (``plot_path``, default: ``path`` with ``.png``)."""
  missing = [k for k in (*HEADER_KEYS, "config", "metrics") if k not in rec]
  if missing:
    raise ValueError(f"result record lacks {missing}")
  out = _common.write_json(path, rec)
  png = None
  if plot is not None:
    png = str(plot_path or out.with_suffix(".png"))
    plot(rec, png)
  if not quiet:
    print(f"wrote {out}" + (f" and {png}" if png else ""), file=sys.stderr)
  return out


def write(
  path: str | os.PathLike,
  benchmark: str,
  *,
  config: Mapping[str, Any],
  metrics: Mapping[str, Any],
  curves: Any = None,
  blas: Any = None,
  plot: Callable[[Mapping[str, Any], str], None] | None = None,
  plot_path: str | os.PathLike | None = None,
  quiet: bool = False,
) -> dict[str, Any]:
  """:func:`record` then :func:`save`; returns the record."""
  rec = record(benchmark, config=config, metrics=metrics, curves=curves, blas=blas)
  save(path, rec, plot=plot, plot_path=plot_path, quiet=quiet)
  return rec


def has_header(rec: Mapping[str, Any]) -> bool:
  return rec.get("schema") == SCHEMA and all(k in rec for k in (*HEADER_KEYS, "config", "metrics"))


def read(path: str | os.PathLike) -> dict[str, Any]:
  """A results JSON in the current layout (old layouts upgraded in memory)."""
  path = pathlib.Path(path)
  rec = json.loads(path.read_text())
  return rec if has_header(rec) else upgrade(rec, path.name)


# --------------------------------------------------------------------------
# Upgrading results written before this layout
# --------------------------------------------------------------------------

# Quality runs up to issue 17 carried two commit records: ``code`` (taken
# when benchmarks.quality.train was imported, i.e. when the process started,
# from the checkout the library was imported from) and ``machine.code``
# (``HEAD`` when the run's JSON was written, minutes to hours later in a
# long suite). They disagree where commits landed while a suite ran.
COMMIT_NOTE = (
  "commit: taken when the process that ran this started (the code it loaded; "
  "short hash as recorded); commit_at_write: HEAD of the repository when the JSON "
  "was written (later commits may have landed while a long suite ran)"
)


def _old_commit(code: Mapping[str, Any] | None) -> dict[str, Any] | None:
  if not code:
    return None
  if "git_commit" in code:  # quality/train.py's CODE_VERSION
    return {
      "commit": code.get("git_commit"),
      "uncommitted_changes": None,
      "nysact_optax_sha256": code.get("nysact_optax_sha256"),
    }
  return {
    "commit": code.get("commit"),
    "uncommitted_changes": code.get("nysact_optax_uncommitted_changes"),
  }


def _old_header(
  benchmark: str,
  machine: Mapping[str, Any] | None,
  command: str | None,
  process_code: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  machine = dict(machine) if machine else None
  write_code = utc = vers = blas = None
  if machine is not None:
    write_code = machine.pop("code", None)
    utc = machine.pop("date_utc", None)
    vers = machine.pop("versions", None)
    blas = machine.pop("blas", None)
  out: dict[str, Any] = {
    "schema": SCHEMA,
    "benchmark": benchmark,
    "machine": machine,
    "commit": None,
    "versions": vers,
    "threads": {
      **dict.fromkeys(THREAD_ENV),
      "cpu_affinity": None,
      "pinned": None,
      "blas": blas,
      "note": "not recorded before issue 17 (blas: as recorded)",
    },
    "command": command,
    "utc": utc,
  }
  if process_code is not None:
    out["commit"] = _old_commit(process_code)
    if write_code is not None:
      out["commit_at_write"] = _old_commit(write_code)
      out["commit_note"] = COMMIT_NOTE
  else:
    out["commit"] = _old_commit(write_code)
  return out


def upgrade(rec: Mapping[str, Any], name: str = "") -> dict[str, Any]:
  """The current layout of an old-layout result (``name``: its file name,
  which tells the benchmark where the file does not). Unknown header fields
  are ``None``."""
  rec = dict(rec)
  if has_header(rec):
    return rec
  stem = pathlib.Path(name).stem
  if "benchmark" in rec and "settings" in rec:  # _common.results_header's layout
    head = _old_header(rec.pop("benchmark"), rec.pop("machine", None), rec.pop("command", None))
    config = {**rec.pop("settings"), "method": rec.pop("method", None)}
    return {**head, "config": config, "metrics": rec}
  if "final" in rec and "config" in rec:  # one quality run (quality/train.py)
    head = _old_header("quality-run", rec.pop("machine", None), None, rec.pop("code", None))
    config = rec.pop("config")
    curves = {
      "eval": rec.pop("curve", []),
      "preconditioner_error": rec.pop("preconditioner_error", []),
    }
    return {**head, "config": config, "metrics": rec, "curves": curves}
  if "ratio_to_adamw" in rec:  # quality/step_cost.py
    head = _old_header("step-cost", rec.pop("machine", None), None, rec.pop("code", None))
    config = {k: rec.pop(k) for k in ("task", "block", "rounds") if k in rec}
    return {**head, "config": config, "metrics": rec}
  if stem == "communication" or ("devices" in rec and "models" in rec):
    head = _old_header("communication", None, None)
    head["versions"] = {"jax": rec.pop("jax", None)}
    head["machine_note"] = "machine and commit were not recorded by this run"
    config = {k: rec.pop(k) for k in ("devices", "rank", "cov_update_every") if k in rec}
    return {**head, "config": config, "metrics": rec}
  if stem == "summary":  # quality/summary.py's aggregate
    head = _old_header("quality-summary", None, None)
    head["machine_note"] = "an aggregate of the runs under runs/; see each run's header"
    return {**head, "config": {"runs": "runs"}, "metrics": rec}
  raise ValueError(f"unknown result layout in {name or 'a record'}: keys {sorted(rec)[:8]}")


def config_of(
  args: Any, method: str | None = None, *, drop: tuple[str, ...] = ("out", "plot")
) -> dict[str, Any]:
  """A script's ``config``: its parsed arguments (less the output paths) and,
  given, a sentence on its method."""
  out = {k: v for k, v in vars(args).items() if k not in drop}
  if method is not None:
    out["method"] = method
  return out
