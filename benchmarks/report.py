"""Tables from the JSON files in ``benchmarks/results/``.

``python -m benchmarks report`` prints the tables that ``benchmarks/README.md``
quotes (each with the command and machine that produced it) and writes them
as markdown to ``benchmarks/results/report.md``; missing result files are
skipped. Every table goes through :class:`benchmarks.tables.Table`; the
step-time targets are re-evaluated from the stored measurements with the
limits of :mod:`benchmarks.targets`.
"""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Sequence
from typing import Any

from benchmarks import _common, results, targets
from benchmarks.tables import Block, Table, markdown, show


def _machine(r: dict[str, Any]) -> str:
  m = r.get("machine") or {}
  v = r.get("versions") or {}
  blas = (r.get("threads") or {}).get("blas") or []
  threads = sorted({b.get("num_threads") for b in blas if b.get("user_api") == "blas"} - {None})
  load = m.get("load_average_at_start")
  parts = [
    f"{m.get('cpu_model')}, {m.get('cpus_usable')} usable cpus",
    f"{m.get('device_kind')}",
    f"jax {v.get('jax')}, flax {v.get('flax')}, optax {v.get('optax')}, "
    f"kfac-jax {v.get('kfac-jax')}",
  ]
  if threads:
    parts.append(f"OpenBLAS threads {threads}")
  if load:
    parts.append(f"load average at start {load[0]:.1f}")
  return "; ".join(parts)


def _ms(x):
  return "-" if x is None else f"{1e3 * x:.1f}"


def _head(r: dict[str, Any], extra: str = "") -> str:
  return f"Command: `{r['command']}`  \nMachine: {_machine(r)}{extra}."


def step_time_md(r: dict[str, Any]) -> list[Block]:
  m = r["metrics"]
  out: list[Block] = [
    _head(
      r,
      f"; wall time {m['wall_s'] / 60:.0f} min"
      + (
        f", load average at end {m['load_average_at_end'][0]:.1f}"
        if m.get("load_average_at_end")
        else ""
      ),
    )
  ]
  for model, res in m["models"].items():
    out.append(
      f"**{model}**: {res['description']}; batch {tuple(res['batch_shape'])}, "
      f"{res['param_count']:,} params ({res['param_bytes'] / 2**20:.2f} MiB)."
    )
    t = Table(
      [
        "optimizer",
        "ms/step (median of rounds)",
        "x SGD (median of per-round ratios)",
        "per-round ratios",
        "plain / stats / inverse step ms",
        "compile s",
        "state / param bytes",
      ],
      align="lrrllrr",
    )
    for name, o in res["optimizers"].items():
      ph = o.get("phase_step_s_median") or {}
      phases = " / ".join(_ms(ph.get(k)) for k in ("plain", "statistics", "inverse"))
      rounds = ", ".join(f"{x:.2f}" for x in o.get("ratio_to_sgd_per_round", []))
      ratio = o.get("ratio_to_sgd_median")
      mark = "" if o.get("timing", "whole blocks") == "whole blocks" else " (sampled)"
      t.add(
        f"{name}{mark}",
        _ms(o.get("step_s_median")),
        "-" if ratio is None else f"{ratio:.3f}",
        rounds,
        phases,
        f"{o.get('compile_s', float('nan')):.1f}",
        f"{o['state_over_param_bytes']:.3f}",
      )
    out.append(t)
  return out


def targets_md(r: dict[str, Any]) -> list[Block]:
  stored = r["metrics"].get("targets", [])
  if r.get("benchmark") == "step_time":
    stored = targets.step_time(r["metrics"]["models"])  # the limits of benchmarks/targets.py
  t = Table(["target", "variant", "measured", "limit", "", "notes"], align="llrrll")
  for x in stored:
    value = "-" if x["value"] is None else f"{x['value']:.3f}"
    notes = []
    if x.get("per_round"):
      notes.append("rounds " + ", ".join(f"{v:.2f}" for v in x["per_round"]))
    if x.get("ratio_of_fastest_blocks"):
      notes.append(f"fastest/fastest {x['ratio_of_fastest_blocks']:.3f}")
    if x.get("geometric_mean_speedup"):
      w = x["worst_config"]
      notes.append(
        f"geometric mean {x['geometric_mean_speedup']:.2f}, worst at "
        f"{w['channels']} ch {w['size']}x{w['size']}"
      )
    t.add(
      x["target"],
      x.get("variant", ""),
      value,
      x["limit"],
      "pass" if x["pass"] else "**miss**",
      "; ".join(notes),
    )
  return [t]


def scaling_md(r: dict[str, Any]) -> list[Block]:
  rows, fits = r["metrics"]["rows"], r["metrics"]["fits"]
  ps = sorted({x["p"] for x in rows})
  s = r["config"]
  fit_key = next((k for k in next(iter(fits.values())) if k != "all"), None)
  t = Table(["op", *(f"p={p}" for p in ps), "exponent (all p)", f"exponent ({fit_key})"])
  for name, f in fits.items():
    op, _, rk = name.partition("/r")
    rank = int(rk) if rk else None
    cells = {x["p"]: x["min_s"] for x in rows if x["op"] == op and x["rank"] == rank}
    a = f["all"]["exponent"] if f.get("all") else None
    b = f[fit_key]["exponent"] if f.get(fit_key) else None
    t.add(
      name,
      *(_ms(cells.get(p)) if p in cells else "-" for p in ps),
      "-" if a is None else f"{a:.2f}",
      "-" if b is None else f"{b:.2f}",
    )
  return [
    _head(
      r,
      f"; n = {s['rows']} rows, o = {s['out_features']} outputs, {s['sketch']} "
      "sketch; best-of-runs seconds, compile excluded",
    ),
    t,
    "(times in ms)",
  ]


def conv_md(r: dict[str, Any]) -> list[Block]:
  s = r["config"]
  t = Table(
    [
      "C",
      "HxW",
      "stride",
      "p",
      "im2col (conv_patches) ms",
      "im2col (slices) ms",
      "patch-free ms",
      "speedup vs faster im2col",
      "temp MiB im2col (slices)",
      "temp MiB patch-free",
      "in lax.cond: im2col best / patch-free ms",
    ],
    align="rlrrrrrrrrl",
  )
  mb = lambda b: "-" if b is None else f"{b / 2**20:.1f}"
  for x in r["metrics"]["rows"]:
    cond = "-"
    if "patch_free_in_cond" in x:
      best = min(x["im2col_in_cond"]["min_s"], x["im2col_slices_in_cond"]["min_s"])
      cond = f"{_ms(best)} / {_ms(x['patch_free_in_cond']['min_s'])}"
    t.add(
      x["channels"],
      f"{x['size']}x{x['size']}",
      x.get("stride", 1),
      x["p"],
      _ms(x["im2col"]["min_s"]),
      _ms(x["im2col_slices"]["min_s"]),
      _ms(x["patch_free"]["min_s"]),
      f"{x['speedup']:.2f}",
      mb(x["im2col_slices"].get("temp_bytes")),
      mb(x["patch_free"].get("temp_bytes")),
      cond,
    )
  return [
    _head(
      r,
      f"; batch {s['batch']}, rank {s['rank']}, {s['kernel']}x{s['kernel']} SAME; "
      "the stride-1 grid, then strided and few-channel inputs; best-of-runs ms, XLA temp MiB",
    ),
    t,
  ]


def profile_md(r: dict[str, Any]) -> list[Block]:
  models = r["metrics"]["models"]
  t = Table(
    [
      "model",
      "config",
      "variant",
      "update ms plain / stats / inverse",
      "amortised update ms",
      "% of fwd+bwd",
      "naive-loop convs",
    ],
    align="llllrrr",
  )
  for m, res in models.items():
    for e in res["configs"]:
      cfg = f"{e['config']['sketch']} r={e['config']['rank']}"
      for variant in [v for v in ("library", "patched_conv_stats") if v in e]:
        v = e[variant]
        u = v["update_s"]
        naive = len(e["naive_loop_convs"]) if variant == "library" else "-"
        t.add(
          f"{m} (fwd+bwd {_ms(res['fwd_bwd_s'])} ms)",
          cfg,
          variant,
          f"{_ms(u['plain'])} / {_ms(u['statistics'])} / {_ms(u['inverse'])}",
          _ms(v["update_amortised_s"]),
          f"{100 * v['update_amortised_over_fwd_bwd']:.1f}",
          naive,
        )
  slow = Table(
    ["model", "config", "layer", "input", "top-level ms", "in lax.cond ms"], align="llllrr"
  )
  for m, res in models.items():
    for e in res["configs"]:
      cfg = f"{e['config']['sketch']} r={e['config']['rank']}"
      for name, layer in e["layers"].items():
        if layer["in_cond_s"] > 2 * layer["top_level_s"]:
          slow.add(
            m,
            cfg,
            name,
            tuple(layer["input_shape"]),
            _ms(layer["top_level_s"]),
            _ms(layer["in_cond_s"]),
          )
  return [
    _head(r),
    t,
    "Per-layer statistics, top level vs inside `lax.cond` (layers slower by > 2x):",
    slow,
  ]


SECTIONS = (
  ("step_time.json", step_time_md),
  ("step_time.json", targets_md),
  ("step_time_nysact.json", step_time_md),
  ("step_time_nysact.json", targets_md),
  ("scaling.json", scaling_md),
  ("scaling.json", targets_md),
  ("conv_stats.json", conv_md),
  ("conv_stats.json", targets_md),
  ("profile_update.json", profile_md),
)


def sections(root: str | pathlib.Path = _common.RESULTS_DIR) -> list[tuple[str, list[Block]]]:
  """``(title, blocks)`` of every section whose result file exists."""
  root = pathlib.Path(root)
  out = []
  for fname, fn in SECTIONS:
    path = root / fname
    if path.exists():
      out.append((f"{fname}: {fn.__name__}", fn(results.read(path))))
  return out


def main(argv: Sequence[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--results", default=str(_common.RESULTS_DIR))
  parser.add_argument(
    "--markdown", default=None, help="markdown output (default: <results>/report.md; '-': none)"
  )
  parser.add_argument(
    "--plain", action="store_true", help="print the markdown instead of rich tables"
  )
  args = parser.parse_args(argv)
  parts = sections(args.results)
  md = "\n\n".join(f"<!-- {title} -->\n{markdown(blocks)}" for title, blocks in parts) + "\n"
  if args.plain:
    print(md)
  else:
    for title, blocks in parts:
      show([f"### {title}", *blocks])
  dest = args.markdown or str(pathlib.Path(args.results) / "report.md")
  if dest != "-":
    pathlib.Path(dest).write_text(md)
    print(f"wrote {dest}")
  return md


if __name__ == "__main__":
  main()
