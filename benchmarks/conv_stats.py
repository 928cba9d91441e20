"""Patch-free convolution statistics against explicit im2col.

For a 3x3 convolution (SAME padding) with ``C`` input channels on
``B x H x W`` inputs, NysAct needs ``Y = A^T (A S) / n`` where ``A`` is the
im2col patch matrix (n = B H W rows, p = 9 C columns) and ``S`` a p x r
sketch. Two ways:

* ``im2col``: ``A = benchmarks._reference.conv_patches(x, spec)``, then
  ``A^T (A S) / n`` (what the reference code does);
* ``im2col_slices``: the same formula with the patch matrix built from ``k*k``
  shifted slices of the padded input (often faster than XLA's patch
  extraction on CPU; a stronger baseline, so the reported speedup is against
  the faster of the two im2col variants);
* ``patch_free``: ``nysact_optax.linalg.sketched_covariance``: ``A S``
  is a convolution of ``x`` with ``S`` as an r-channel kernel and ``A^T Z``
  that convolution's kernel-gradient (written as a canonical convolution of
  the transposed input with ``Z`` as kernel), so ``A`` never exists.

Three suites of configurations: the grid (``--channels`` x ``--sizes``,
stride 1, the one the speed target is checked on), strided convolutions
(``--strided-channels`` x ``--strided-sizes``, stride 2) and few-channel
inputs (``--few-channels`` x ``--few-sizes``, e.g. images at 32x32 and
224x224, strides 1 and 2), where the library builds the small patch matrix
itself, chunk by chunk, instead of the convolution form.

NysAct computes its statistics inside ``lax.cond`` (only every T_cov steps).
With ``--in-cond-max-elems`` > 0, configurations with at most that many input
elements are also timed with the same function inside a ``lax.cond`` (taken
branch), which is how the optimizer runs it (XLA:CPU emits the plain kernel-gradient
form of ``A^T Z`` as a naive loop inside a conditional's branch; the library
writes it as a canonical convolution for that reason).

Time: best of several runs of the AOT-compiled function (compile excluded).
Memory: XLA's compiled memory analysis (``temp_size_in_bytes``: scratch the
program needs besides its arguments and outputs). Both results are checked
equal (relative error) on every configuration.

Usage: ``python -m benchmarks.conv_stats`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from benchmarks import _common, _reference
from benchmarks import results as bresults
from benchmarks import targets as targets_mod
from nysact_optax import ConvSpec, LayerInputs
from nysact_optax.linalg import Sketch, sketched_covariance


def _spec(k: int, stride: int = 1) -> ConvSpec:
  return ConvSpec(
    kernel_size=(k, k),
    strides=(stride, stride),
    padding="SAME",
    input_dilation=(1, 1),
    kernel_dilation=(1, 1),
  )


def patch_free(x, s, *, spec, has_bias):
  return sketched_covariance(LayerInputs([x], spec), Sketch(s), has_bias)


def im2col(x, s, *, spec, has_bias):
  a = _reference.conv_patches(x, spec)
  if has_bias:
    a = jnp.concatenate([a, jnp.ones_like(a[:, :1])], axis=1)
  hi = jax.lax.Precision.HIGHEST
  return jnp.matmul(a.T, jnp.matmul(a, s, precision=hi), precision=hi) / a.shape[0]


def im2col_slices(x, s, *, spec, has_bias):
  """im2col from ``k*k`` shifted (strided) slices (SAME padding, square kernel)."""
  k, st = spec.kernel_size[0], spec.strides[0]
  h, w, c = x.shape[1:]
  oh, ow = -(-h // st), -(-w // st)  # SAME
  pads = jax.lax.padtype_to_pads((h, w), (k, k), (st, st), "SAME")
  xp = jnp.pad(x, [(0, 0), *pads, (0, 0)])
  cols = [
    xp[:, i : i + (oh - 1) * st + 1 : st, j : j + (ow - 1) * st + 1 : st, :]
    for i in range(k)
    for j in range(k)
  ]
  a = jnp.stack(cols, axis=3).reshape(-1, k * k * c)  # columns (kh, kw, c)
  if has_bias:
    a = jnp.concatenate([a, jnp.ones_like(a[:, :1])], axis=1)
  hi_p = jax.lax.Precision.HIGHEST
  return jnp.matmul(a.T, jnp.matmul(a, s, precision=hi_p), precision=hi_p) / a.shape[0]


def _memory(compiled) -> dict[str, int | None]:
  try:
    m = compiled.memory_analysis()
  except Exception:
    m = None
  if m is None:
    return {"temp_bytes": None}
  return {
    "temp_bytes": int(m.temp_size_in_bytes),
    "argument_bytes": int(m.argument_size_in_bytes),
    "output_bytes": int(m.output_size_in_bytes),
    "generated_code_bytes": int(m.generated_code_size_in_bytes),
  }


def measure(method, x, s, *, spec, has_bias, repeats, once_above, in_cond=False):
  if in_cond:

    def f(pred, x, s):
      return jax.lax.cond(
        pred,
        lambda x, s: method(x, s, spec=spec, has_bias=has_bias),
        lambda x, s: jnp.zeros((s.shape[0], s.shape[1]), jnp.float32),
        x,
        s,
      )

    args = (jnp.asarray(True), x, s)
  else:
    f = lambda x, s: method(x, s, spec=spec, has_bias=has_bias)
    args = (x, s)
  t0 = time.perf_counter()
  compiled = jax.jit(f).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  out = []
  run = lambda: out.append(jax.block_until_ready(compiled(*args)))
  first = _common.time_fn(run, repeats=1)[0]
  times = (
    [first]
    if first > once_above
    else _common.time_fn(run, repeats=repeats, min_time=0.3, max_repeats=30)
  )
  return {
    "min_s": min(times),
    "median_s": _common.median(times),
    "runs": len(times),
    "compile_s": compile_s,
    **_memory(compiled),
  }, out[-1]


def evaluate_targets(rows, kernel: int) -> list[dict[str, Any]]:
  """The project's target (>= 5x for >= 64 channels) against each baseline."""
  big = [r for r in rows if r["channels"] >= 64 and r["suite"] == "grid"]
  targets = []
  if big:
    worst = min(big, key=lambda r: r["speedup_vs_conv_patches"])
    targets.append(
      {
        "target": (
          f"patch-free >= {targets_mod.CONV_SPEEDUP:g}x faster than im2col "
          "(conv_patches then A^T (A S)) for "
          f"{kernel}x{kernel} conv with >= 64 channels (worst configuration)"
        ),
        "value": worst["speedup_vs_conv_patches"],
        "limit": targets_mod.CONV_SPEEDUP,
        "pass": worst["speedup_vs_conv_patches"] >= targets_mod.CONV_SPEEDUP,
        "worst_config": {"channels": worst["channels"], "size": worst["size"]},
        "geometric_mean_speedup": float(
          np.exp(np.mean([np.log(r["speedup_vs_conv_patches"]) for r in big]))
        ),
      }
    )
    worst = min(big, key=lambda r: r["speedup"])
    targets.append(
      {
        "target": (
          f"same against the faster im2col (conv_patches or {kernel}x{kernel} "
          "shifted slices) (worst configuration)"
        ),
        "value": worst["speedup"],
        "limit": targets_mod.CONV_SPEEDUP,
        "pass": worst["speedup"] >= targets_mod.CONV_SPEEDUP,
        "worst_config": {"channels": worst["channels"], "size": worst["size"]},
        "geometric_mean_speedup": float(np.exp(np.mean([np.log(r["speedup"]) for r in big]))),
      }
    )
  big_cond = [r for r in big if "speedup_in_cond" in r]
  if big_cond:
    worst = min(big_cond, key=lambda r: r["speedup_in_cond"])
    targets.append(
      {
        "target": (
          "same against the faster im2col, both inside lax.cond as the optimizer "
          "runs them (configurations up to --in-cond-max-elems)"
        ),
        "value": worst["speedup_in_cond"],
        "limit": targets_mod.CONV_SPEEDUP,
        "pass": worst["speedup_in_cond"] >= targets_mod.CONV_SPEEDUP,
        "worst_config": {"channels": worst["channels"], "size": worst["size"]},
        "geometric_mean_speedup": float(
          np.exp(np.mean([np.log(r["speedup_in_cond"]) for r in big_cond]))
        ),
      }
    )
  return targets


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--channels", default="16,32,64,128,256")
  parser.add_argument("--sizes", default="8,16,32,64", help="input height = width")
  parser.add_argument("--strided-channels", default="16,64,256", help="stride 2 ('' for none)")
  parser.add_argument("--strided-sizes", default="16,64")
  parser.add_argument("--few-channels", default="1,3", help="strides 1 and 2 ('' for none)")
  parser.add_argument("--few-sizes", default="32,224")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--rank", type=int, default=10)
  parser.add_argument("--kernel", type=int, default=3)
  parser.add_argument("--bias", action="store_true", help="append the bias column")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--once-above", type=float, default=3.0)
  parser.add_argument(
    "--in-cond-max-elems",
    type=int,
    default=16 * 32 * 32 * 64,
    help="also time inside lax.cond when batch*H*W*C <= this (0: never)",
  )
  parser.add_argument(
    "--blas-threads",
    type=int,
    default=0,
    help="OpenBLAS threads for jax's LAPACK calls (0: the machine's default, as users run)",
  )
  parser.add_argument("--out", default=str(_common.RESULTS_DIR / "conv_stats.json"))
  parser.add_argument("--plot", default=None)
  args = parser.parse_args(argv)
  blas = _common.limit_blas_threads(args.blas_threads)

  ints = lambda text: [int(v) for v in text.split(",") if v]
  jobs = [("grid", c, h, 1) for c in ints(args.channels) for h in ints(args.sizes)]
  jobs += [
    ("strided", c, h, 2) for c in ints(args.strided_channels) for h in ints(args.strided_sizes)
  ]
  jobs += [
    ("few-channel", c, h, st)
    for c in ints(args.few_channels)
    for h in ints(args.few_sizes)
    for st in (1, 2)
  ]
  rows = []
  t_start = time.perf_counter()
  for suite, c, h, stride in tqdm(jobs, unit="config", file=sys.stderr):
    spec = _spec(args.kernel, stride)
    kx, ks = jax.random.split(jax.random.PRNGKey(c * 1000 + h))
    x = jax.random.normal(kx, (args.batch, h, h, c), jnp.float32)
    p = args.kernel**2 * c + int(args.bias)
    rows_n = args.batch * (-(-h // stride)) ** 2  # SAME: ceil(h / stride) per axis
    s = jax.random.normal(ks, (p, args.rank), jnp.float32) / np.sqrt(p)
    jax.block_until_ready((x, s))
    pf, y_pf = measure(
      patch_free,
      x,
      s,
      spec=spec,
      has_bias=args.bias,
      repeats=args.repeats,
      once_above=args.once_above,
    )
    ic, y_ic = measure(
      im2col, x, s, spec=spec, has_bias=args.bias, repeats=args.repeats, once_above=args.once_above
    )
    sl, y_sl = measure(
      im2col_slices,
      x,
      s,
      spec=spec,
      has_bias=args.bias,
      repeats=args.repeats,
      once_above=args.once_above,
    )
    rel = float(jnp.linalg.norm(y_pf - y_ic) / jnp.linalg.norm(y_ic))
    rel_sl = float(jnp.linalg.norm(y_sl - y_ic) / jnp.linalg.norm(y_ic))
    best = min((ic, sl), key=lambda m: m["min_s"])
    del y_pf, y_ic, y_sl
    extra = {}
    if args.batch * h * h * c <= args.in_cond_max_elems:
      for name, method in (
        ("patch_free_in_cond", patch_free),
        ("im2col_in_cond", im2col),
        ("im2col_slices_in_cond", im2col_slices),
      ):
        extra[name], _ = measure(
          method,
          x,
          s,
          spec=spec,
          has_bias=args.bias,
          repeats=args.repeats,
          once_above=args.once_above,
          in_cond=True,
        )
      best_in_cond = min(extra["im2col_in_cond"]["min_s"], extra["im2col_slices_in_cond"]["min_s"])
      extra["speedup_in_cond"] = best_in_cond / extra["patch_free_in_cond"]["min_s"]
    del x
    rows.append(
      {
        "suite": suite,
        "stride": stride,
        "channels": c,
        "size": h,
        "batch": args.batch,
        "p": p,
        "rows_n": rows_n,
        "patch_free": pf,
        "im2col": ic,
        "im2col_slices": sl,
        **extra,
        "speedup": best["min_s"] / pf["min_s"],
        "speedup_vs_conv_patches": ic["min_s"] / pf["min_s"],
        "temp_ratio": (
          best["temp_bytes"] / pf["temp_bytes"]
          if best.get("temp_bytes") and pf.get("temp_bytes")
          else None
        ),
        "patch_matrix_bytes": 4 * rows_n * args.kernel**2 * c,
        "relative_difference": rel,
        "relative_difference_slices": rel_sl,
      }
    )

  targets = evaluate_targets(rows, args.kernel)
  method = (
    "best-of-N wall time of AOT-compiled jitted functions (compile "
    "excluded); memory = compiled.memory_analysis().temp_size_in_bytes"
  )
  results = {
    "rows": rows,
    "targets": targets,
    "wall_s": time.perf_counter() - t_start,
    "load_average_at_end": _common.load_average(),
  }
  rec = bresults.record(
    "conv_stats", config=bresults.config_of(args, method), metrics=results, blas=blas
  )
  bresults.save(args.out, rec, plot=plot, plot_path=getattr(args, "plot", None))
  print("times in ms (best of runs), XLA temp memory in MiB; speedup = faster im2col / patch-free")
  print(
    f"{'C':>5}{'HxW':>9}{'stride':>7}{'p':>6}{'patches':>9}{'slices':>9}{'free':>8}{'speedup':>9}"
    f"{'MiB patches':>12}{'slices':>8}{'free':>7}{'rel.diff':>10}"
  )
  for r in rows:
    mb = lambda b: b / 2**20 if b is not None else float("nan")
    print(
      f"{r['channels']:>5}{r['size']:>5}x{r['size']:<3}{r['stride']:>7}{r['p']:>6}"
      f"{1e3 * r['im2col']['min_s']:9.2f}{1e3 * r['im2col_slices']['min_s']:9.2f}"
      f"{1e3 * r['patch_free']['min_s']:8.2f}{r['speedup']:9.2f}"
      f"{mb(r['im2col']['temp_bytes']):12.1f}{mb(r['im2col_slices']['temp_bytes']):8.1f}"
      f"{mb(r['patch_free']['temp_bytes']):7.1f}{r['relative_difference']:10.1e}"
    )
  cond_rows = [r for r in rows if "patch_free_in_cond" in r]
  if cond_rows:
    print("\ninside lax.cond (as the optimizer runs it):")
    print(
      f"{'C':>5}{'HxW':>9}{'stride':>7}{'patches':>9}{'slices':>9}{'free':>9}{'speedup':>9}"
      f"{'free top-level':>16}"
    )
    for r in cond_rows:
      print(
        f"{r['channels']:>5}{r['size']:>5}x{r['size']:<3}{r['stride']:>7}"
        f"{1e3 * r['im2col_in_cond']['min_s']:9.2f}{1e3 * r['im2col_slices_in_cond']['min_s']:9.2f}"
        f"{1e3 * r['patch_free_in_cond']['min_s']:9.2f}"
        f"{r['speedup_in_cond']:9.2f}{1e3 * r['patch_free']['min_s']:16.2f}"
      )
  for t in targets:
    print(
      ("PASS " if t["pass"] else "MISS ") + f"{t['target']}: {t['value']:.2f}x "
      f"(geometric mean {t['geometric_mean_speedup']:.2f}x)"
    )
  return rec


def plot(results: dict[str, Any], path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [r for r in results["metrics"]["rows"] if r.get("suite", "grid") == "grid"]
  sizes = sorted({r["size"] for r in rows})
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  for h in sizes:
    sub = sorted((r for r in rows if r["size"] == h), key=lambda r: r["channels"])
    cs = [r["channels"] for r in sub]
    axes[0].loglog(
      cs,
      [min(r["im2col"]["min_s"], r["im2col_slices"]["min_s"]) for r in sub],
      "--o",
      ms=4,
      base=2,
      label=f"im2col (faster) {h}x{h}",
    )
    axes[0].loglog(
      cs, [r["patch_free"]["min_s"] for r in sub], "-s", ms=4, base=2, label=f"patch-free {h}x{h}"
    )
    axes[1].semilogx(cs, [r["speedup"] for r in sub], "-o", base=2, label=f"{h}x{h}")
    axes[2].loglog(
      cs,
      [(r["im2col_slices"]["temp_bytes"] or np.nan) / 2**20 for r in sub],
      "--o",
      ms=4,
      base=2,
      label=f"im2col {h}x{h}",
    )
    axes[2].loglog(
      cs,
      [(r["patch_free"]["temp_bytes"] or np.nan) / 2**20 for r in sub],
      "-s",
      ms=4,
      base=2,
      label=f"patch-free {h}x{h}",
    )
  axes[0].set_title("time (best of runs)")
  axes[0].set_ylabel("seconds")
  axes[1].axhline(
    targets_mod.CONV_SPEEDUP,
    color="g",
    ls="--",
    lw=0.8,
    label=f"target {targets_mod.CONV_SPEEDUP:g}x",
  )
  axes[1].set_title("speedup of patch-free over the faster im2col")
  axes[2].set_title("XLA temp memory")
  axes[2].set_ylabel("MiB")
  for ax in axes:
    ax.set_xlabel("input channels C")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
  s, m = results["config"], results["machine"]
  fig.suptitle(
    f"{s['kernel']}x{s['kernel']} conv statistics (stride-1 grid), batch {s['batch']}, rank "
    f"{s['rank']}; {m['cpu_model']} ({m['cpus_usable']} cpus), jax "
    f"{results['versions']['jax']}",
    fontsize=9,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
