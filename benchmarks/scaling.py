"""How NysAct's per-layer costs grow with the layer's input width ``p``.

One dense layer alone: ``n`` input rows of width ``p`` (``A``, n x p), ``o``
outputs (gradient ``G``, p x o). For each ``p`` (doubling) and rank ``r``:

* ``statistics``: draw the sketch ``S`` (p x r), ``Y = A^T (A S) / n``, EMA
  update of the p x r state (what a statistics step does per layer);
* ``inverse``: draw ``S`` again and factorise: ``nystrom_shifted`` (the paper's
  method, the default) and ``nystrom_stable``;
* ``apply``: the factored preconditioner ``G -> P G``, O(p r o).

Beside them, the costs NysAct avoids (FOOF / exact mode):

* ``exact_statistics``: ``A^T A / n`` (p x p);
* ``exact_eigh``: ``eigh`` of the p x p covariance (what exact mode does);
* ``exact_cholesky_inverse``: ``(C + rho I)^{-1}`` by Cholesky and two
  triangular solves;
* ``dense_apply``: ``P G`` with a dense p x p ``P`` (the reference code's apply).

Each timing is the best of several runs of an AOT-compiled function (compile
excluded); runs longer than ``--once-above`` seconds are timed once. The
cubic ops are capped (``--max-eigh-p``, ``--max-cholesky-p``). Log-log fits
give the exponent of ``p`` over the whole range and over ``p >= --fit-from``.

Usage: ``python -m benchmarks.scaling`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from benchmarks import _common
from benchmarks import results as bresults
from benchmarks import targets as targets_mod
from nysact_optax import DenseSpec, LayerInputs, linalg

RHO = 1.0
BETA = 0.95

NYSTROM_OPS = ("statistics", "inverse", "inverse_stable", "apply")
EXACT_OPS = ("exact_statistics", "exact_eigh", "exact_cholesky_inverse", "dense_apply")


def _ops(p: int, r: int, n: int, o: int, sketch: str):
  """(name, function, argument-builder) for every op at this size."""
  key = jax.random.PRNGKey(0)

  def stats(k, x, cov):
    s = linalg.draw_sketch(k, p, r, sketch)
    y = linalg.sketched_covariance(LayerInputs([x], DenseSpec()), s, False)
    return BETA * cov + (1.0 - BETA) * y

  def refresh(k, cov):
    s = linalg.draw_sketch(k, p, r, sketch).matrix
    return linalg.nystrom_shifted(cov, s, RHO)

  def refresh_stable(k, cov):
    s = linalg.draw_sketch(k, p, r, sketch, orthonormal=True).matrix
    return linalg.nystrom_stable(cov, s)

  def apply(g, u, lam):
    return linalg.precondition(g, u, lam, RHO)

  def x_():
    return jax.random.normal(key, (n, p), jnp.float32)

  def cov_():
    x = x_()
    s = linalg.draw_sketch(key, p, r, sketch)
    return linalg.sketched_covariance(LayerInputs([x], DenseSpec()), s, False)

  def g_():
    return jax.random.normal(jax.random.PRNGKey(1), (p, o), jnp.float32)

  def factors_():
    u = jnp.linalg.qr(jax.random.normal(key, (p, r), jnp.float32))[0]
    lam = jnp.linspace(10.0, 0.1, r, dtype=jnp.float32)
    return u, lam

  return {
    "statistics": (stats, lambda: (key, x_(), jnp.zeros((p, r), jnp.float32))),
    "inverse": (refresh, lambda: (key, cov_())),
    "inverse_stable": (refresh_stable, lambda: (key, cov_())),
    "apply": (apply, lambda: (g_(),) + factors_()),
  }


def _exact_ops(p: int, n: int, o: int):
  key = jax.random.PRNGKey(0)
  hi = jax.lax.Precision.HIGHEST

  def exact_stats(x):
    return jnp.matmul(x.T, x, precision=hi) / x.shape[0]

  def exact_eigh(c):
    return linalg.exact_eigh(c)

  def chol_inverse(c):
    c = c + RHO * jnp.eye(c.shape[0], dtype=c.dtype)
    chol = jax.scipy.linalg.cho_factor(c, lower=True)
    return jax.scipy.linalg.cho_solve(chol, jnp.eye(c.shape[0], dtype=c.dtype))

  def dense_apply(pmat, g):
    return jnp.matmul(pmat, g, precision=hi)

  def x_():
    return jax.random.normal(key, (n, p), jnp.float32)

  def cov_():
    # A covariance of the right kind (PSD, rank <= n) without an O(n p^2) host copy.
    return jax.jit(exact_stats)(x_())

  def g_():
    return jax.random.normal(jax.random.PRNGKey(1), (p, o), jnp.float32)

  return {
    "exact_statistics": (exact_stats, lambda: (x_(),)),
    "exact_eigh": (exact_eigh, lambda: (cov_(),)),
    "exact_cholesky_inverse": (chol_inverse, lambda: (cov_(),)),
    "dense_apply": (dense_apply, lambda: (cov_(), g_())),
  }


def time_op(
  fn, make_args, *, repeats: int, once_above: float, min_time: float = 0.5
) -> dict[str, Any]:
  args = make_args()
  jax.block_until_ready(args)
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  run = lambda: jax.block_until_ready(compiled(*args))  # noqa: F821 - args is deleted after use
  first = _common.time_fn(run, repeats=1)[0]
  if first > once_above:
    times = [first]
  else:
    times = _common.time_fn(run, repeats=repeats, min_time=min_time, max_repeats=100)
  del args
  return {
    "min_s": min(times),
    "median_s": _common.median(times),
    "runs": len(times),
    "first_run_s": first,
    "compile_s": compile_s,
  }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--p-min", type=int, default=256)
  parser.add_argument("--p-max", type=int, default=16384)
  parser.add_argument("--ranks", default="10,50")
  parser.add_argument("--rows", type=int, default=512, help="n, input rows per statistics update")
  parser.add_argument("--out-features", type=int, default=512, help="o, layer outputs")
  parser.add_argument("--sketch", choices=("gaussian", "subcolumns"), default="gaussian")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument(
    "--min-time",
    type=float,
    default=0.5,
    help="repeat each op until this many seconds (up to 100 runs; best is kept)",
  )
  parser.add_argument(
    "--once-above", type=float, default=2.0, help="time once when a run takes longer than this (s)"
  )
  parser.add_argument("--max-eigh-p", type=int, default=4096)
  parser.add_argument("--max-cholesky-p", type=int, default=8192)
  parser.add_argument(
    "--max-exact-p", type=int, default=16384, help="cap for exact_statistics and dense_apply"
  )
  parser.add_argument("--no-exact", action="store_true", help="skip the p x p baselines")
  parser.add_argument("--fit-from", type=int, default=2048)
  parser.add_argument(
    "--blas-threads",
    type=int,
    default=0,
    help="OpenBLAS threads for jax's LAPACK calls (0: the machine's default, as users run)",
  )
  parser.add_argument("--out", default=str(_common.RESULTS_DIR / "scaling.json"))
  parser.add_argument("--plot", default=None)
  args = parser.parse_args(argv)
  blas = _common.limit_blas_threads(args.blas_threads)

  ps = []
  p = args.p_min
  while p <= args.p_max:
    ps.append(p)
    p *= 2
  ranks = [int(r) for r in args.ranks.split(",")]
  caps = {
    "exact_statistics": args.max_exact_p,
    "exact_eigh": args.max_eigh_p,
    "exact_cholesky_inverse": args.max_cholesky_p,
    "dense_apply": args.max_exact_p,
  }

  jobs = []
  for p in ps:
    for r in ranks:
      for op in NYSTROM_OPS:
        jobs.append((op, r, p))
    if not args.no_exact:
      for op in EXACT_OPS:
        if p <= caps[op]:
          jobs.append((op, None, p))

  rows: list[dict[str, Any]] = []
  t_start = time.perf_counter()
  for op, r, p in tqdm(jobs, unit="op", file=sys.stderr):
    if r is None:
      fn, make = _exact_ops(p, args.rows, args.out_features)[op]
    else:
      fn, make = _ops(p, r, args.rows, args.out_features, args.sketch)[op]
    res = time_op(
      fn, make, repeats=args.repeats, once_above=args.once_above, min_time=args.min_time
    )
    rows.append({"op": op, "rank": r, "p": p, **res})

  fits = {}
  for op in NYSTROM_OPS + EXACT_OPS:
    for r in ranks if op in NYSTROM_OPS else [None]:
      pts = [(x["p"], x["min_s"]) for x in rows if x["op"] == op and x["rank"] == r]
      if len(pts) < 2:
        continue
      name = op if r is None else f"{op}/r{r}"
      fits[name] = {
        "all": _common.loglog_fit([a for a, _ in pts], [b for _, b in pts]),
        f"p>={args.fit_from}": _common.loglog_fit(
          [a for a, _ in pts if a >= args.fit_from], [b for a, b in pts if a >= args.fit_from]
        ),
      }
  targets = []
  for name, f in fits.items():
    op = name.split("/")[0]
    if op in ("inverse", "apply"):
      exps = [v["exponent"] for v in f.values() if v]
      worst = max(exps)
      targets.append(
        {
          "target": f"{name}: fitted exponent in p <= {targets_mod.SCALING_EXPONENT} "
          "(worst of the fits)",
          "value": worst,
          "limit": targets_mod.SCALING_EXPONENT,
          "pass": worst <= targets_mod.SCALING_EXPONENT,
        }
      )
  method = (
    "one dense layer; best-of-N wall time of an AOT-compiled jitted "
    "function on ready inputs (compile excluded); fits on min_s"
  )
  results = {
    "rows": rows,
    "fits": fits,
    "targets": targets,
    "wall_s": time.perf_counter() - t_start,
    "load_average_at_end": _common.load_average(),
  }
  rec = bresults.record(
    "scaling", config=bresults.config_of(args, method), metrics=results, blas=blas
  )
  bresults.save(args.out, rec, plot=plot, plot_path=getattr(args, "plot", None))
  print(f"{'op':<28}{'fit all':>9}{'fit p>=' + str(args.fit_from):>13}")
  for name, f in fits.items():
    vals = [f"{v['exponent']:.2f}" if v else "-" for v in f.values()]
    print(f"{name:<28}{vals[0]:>9}{vals[1]:>13}")
  header = "".join(f"{p:>10}" for p in ps)
  print(f"\nbest time (ms) by p\n{'op':<28}{header}")
  for name in fits:
    op, _, rk = name.partition("/r")
    r = int(rk) if rk else None
    cells = {x["p"]: x["min_s"] for x in rows if x["op"] == op and x["rank"] == r}
    print(
      f"{name:<28}" + "".join(f"{1e3 * cells[p]:10.2f}" if p in cells else f"{'-':>10}" for p in ps)
    )
  for t in targets:
    print(("PASS " if t["pass"] else "MISS ") + f"{t['target']}: {t['value']:.3f}")
  return rec


def plot(results: dict[str, Any], path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows, fits = results["metrics"]["rows"], results["metrics"]["fits"]
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
  panels = [
    ("statistics", "exact_statistics"),
    ("inverse", "inverse_stable", "exact_eigh", "exact_cholesky_inverse"),
    ("apply", "dense_apply"),
  ]
  titles = ["statistics update", "inverse refresh", "preconditioner apply"]
  styles = {10: "-o", 50: "-s", None: "--^"}
  for ax, ops, title in zip(axes, panels, titles):
    for op in ops:
      ranks = sorted({x["rank"] for x in rows if x["op"] == op}, key=lambda v: v or 0)
      for r in ranks:
        pts = sorted((x["p"], x["min_s"]) for x in rows if x["op"] == op and x["rank"] == r)
        name = op if r is None else f"{op}/r{r}"
        exp = fits.get(name, {}).get("all")
        label = f"{name} (p^{exp['exponent']:.2f})" if exp else name
        ax.loglog(
          [a for a, _ in pts], [b for _, b in pts], styles.get(r, "-o"), label=label, ms=4, base=2
        )
    ax.set_xlabel("input width p")
    ax.set_ylabel("seconds (best of runs)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  s, m = results["config"], results["machine"]
  fig.suptitle(
    f"one layer: n={s['rows']} rows, o={s['out_features']} outputs, "
    f"{s['sketch']} sketch; {m['cpu_model']} ({m['cpus_usable']} cpus), "
    f"jax {results['versions']['jax']}",
    fontsize=9,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
