"""Markdown tables from the JSON files in ``benchmarks/results/``.

``python -m benchmarks.report`` prints the tables that ``benchmarks/README.md``
quotes (each with the command and machine that produced it); missing result
files are skipped.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

from benchmarks import _common


def _machine(m: dict[str, Any]) -> str:
  v = m.get("versions", {})
  blas = m.get("blas") or []
  threads = sorted({b.get("num_threads") for b in blas if b.get("user_api") == "blas"} - {None})
  load = m.get("load_average_at_start")
  parts = [f"{m['cpu_model']}, {m['cpus_usable']} usable cpus", f"{m['device_kind']}",
           f"jax {v.get('jax')}, flax {v.get('flax')}, optax {v.get('optax')}, "
           f"kfac-jax {v.get('kfac-jax')}"]
  if threads:
    parts.append(f"OpenBLAS threads {threads}")
  if load:
    parts.append(f"load average at start {load[0]:.1f}")
  return "; ".join(parts)


def _ms(x):
  return "-" if x is None else f"{1e3 * x:.1f}"


def step_time_md(r: dict[str, Any]) -> str:
  out = [f"Command: `{r['command']}`  ",
         f"Machine: {_machine(r['machine'])}; wall time {r['wall_s'] / 60:.0f} min"
         + (f", load average at end {r['load_average_at_end'][0]:.1f}"
            if r.get("load_average_at_end") else "") + ".", ""]
  for model, res in r["models"].items():
    out.append(f"**{model}**: {res['description']}; batch {tuple(res['batch_shape'])}, "
               f"{res['param_count']:,} params ({res['param_bytes'] / 2**20:.2f} MiB).")
    out.append("")
    out.append("| optimizer | ms/step (median of rounds) | x SGD (median of per-round ratios) "
               "| per-round ratios | plain / stats / inverse step ms | compile s "
               "| state / param bytes |")
    out.append("|---|---:|---:|---|---|---:|---:|")
    for name, o in res["optimizers"].items():
      ph = o.get("phase_step_s_median") or {}
      phases = " / ".join(_ms(ph.get(k)) for k in ("plain", "statistics", "inverse"))
      rounds = ", ".join(f"{x:.2f}" for x in o.get("ratio_to_sgd_per_round", []))
      ratio = o.get("ratio_to_sgd_median")
      mark = "" if o.get("timing", "whole blocks") == "whole blocks" else " (sampled)"
      out.append(
          f"| {name}{mark} | {_ms(o.get('step_s_median'))} | "
          f"{'-' if ratio is None else f'{ratio:.3f}'} | {rounds} | {phases} | "
          f"{o.get('compile_s', float('nan')):.1f} | {o['state_over_param_bytes']:.3f} |")
    out.append("")
  return "\n".join(out)


def targets_md(r: dict[str, Any]) -> str:
  out = ["| target | variant | measured | limit | | notes |", "|---|---|---:|---:|---|---|"]
  for t in r.get("targets", []):
    value = "-" if t["value"] is None else f"{t['value']:.3f}"
    notes = []
    if t.get("per_round"):
      notes.append("rounds " + ", ".join(f"{x:.2f}" for x in t["per_round"]))
    if t.get("ratio_of_fastest_blocks"):
      notes.append(f"fastest/fastest {t['ratio_of_fastest_blocks']:.3f}")
    if t.get("geometric_mean_speedup"):
      notes.append(f"geometric mean {t['geometric_mean_speedup']:.2f}, worst at "
                   f"{t['worst_config']['channels']} ch {t['worst_config']['size']}x{t['worst_config']['size']}")
    out.append(f"| {t['target']} | {t.get('variant', '')} | {value} | {t['limit']} | "
               f"{'pass' if t['pass'] else '**miss**'} | {'; '.join(notes)} |")
  return "\n".join(out)


def scaling_md(r: dict[str, Any]) -> str:
  rows, fits = r["rows"], r["fits"]
  ps = sorted({x["p"] for x in rows})
  s = r["settings"]
  fit_key = next((k for k in next(iter(fits.values())) if k != "all"), None)
  out = [f"Command: `{r['command']}`  ",
         f"Machine: {_machine(r['machine'])}; n = {s['rows']} rows, o = {s['out_features']} "
         f"outputs, {s['sketch']} sketch; best-of-runs seconds, compile excluded.", "",
         "| op | " + " | ".join(f"p={p}" for p in ps) + f" | exponent (all p) | exponent ({fit_key}) |",
         "|---|" + "---:|" * (len(ps) + 2)]
  for name, f in fits.items():
    op, _, rk = name.partition("/r")
    rank = int(rk) if rk else None
    cells = {x["p"]: x["min_s"] for x in rows if x["op"] == op and x["rank"] == rank}
    a = f["all"]["exponent"] if f.get("all") else None
    b = f[fit_key]["exponent"] if f.get(fit_key) else None
    out.append(f"| {name} | " + " | ".join(_ms(cells.get(p)) if p in cells else "-" for p in ps)
               + f" | {'-' if a is None else f'{a:.2f}'} | {'-' if b is None else f'{b:.2f}'} |")
  out.append("")
  out.append("(times in ms)")
  return "\n".join(out)


def conv_md(r: dict[str, Any]) -> str:
  s = r["settings"]
  out = [f"Command: `{r['command']}`  ",
         f"Machine: {_machine(r['machine'])}; batch {s['batch']}, rank {s['rank']}, "
         f"{s['kernel']}x{s['kernel']} SAME stride 1; best-of-runs ms, XLA temp MiB.", "",
         "| C | HxW | p | im2col (conv_patches) ms | im2col (slices) ms | patch-free ms "
         "| speedup vs faster im2col | temp MiB im2col (slices) | temp MiB patch-free "
         "| in lax.cond: im2col best / patch-free ms |",
         "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
  for x in r["rows"]:
    mb = lambda b: "-" if b is None else f"{b / 2**20:.1f}"
    cond = "-"
    if "patch_free_in_cond" in x:
      best = min(x["im2col_in_cond"]["min_s"], x["im2col_slices_in_cond"]["min_s"])
      cond = f"{_ms(best)} / {_ms(x['patch_free_in_cond']['min_s'])}"
    out.append(
        f"| {x['channels']} | {x['size']}x{x['size']} | {x['p']} | {_ms(x['im2col']['min_s'])} | "
        f"{_ms(x['im2col_slices']['min_s'])} | {_ms(x['patch_free']['min_s'])} | "
        f"{x['speedup']:.2f} | {mb(x['im2col_slices'].get('temp_bytes'))} | "
        f"{mb(x['patch_free'].get('temp_bytes'))} | {cond} |")
  return "\n".join(out)


def profile_md(r: dict[str, Any]) -> str:
  out = [f"Command: `{r['command']}`  ", f"Machine: {_machine(r['machine'])}.", "",
         "| model | config | variant | update ms plain / stats / inverse | amortised update ms "
         "| % of fwd+bwd | naive-loop convs |",
         "|---|---|---|---|---:|---:|---:|"]
  for m, res in r["models"].items():
    for e in res["configs"]:
      cfg = f"{e['config']['sketch']} r={e['config']['rank']}"
      for variant in [v for v in ("library", "patched_conv_stats") if v in e]:
        v = e[variant]
        u = v["update_s"]
        naive = len(e["naive_loop_convs"]) if variant == "library" else "-"
        out.append(f"| {m} (fwd+bwd {_ms(res['fwd_bwd_s'])} ms) | {cfg} | {variant} | "
                   f"{_ms(u['plain'])} / {_ms(u['statistics'])} / {_ms(u['inverse'])} | "
                   f"{_ms(v['update_amortised_s'])} | "
                   f"{100 * v['update_amortised_over_fwd_bwd']:.1f} | {naive} |")
  out += ["", "Per-layer statistics, top level vs inside `lax.cond` (layers slower by > 2x):", "",
          "| model | config | layer | input | top-level ms | in lax.cond ms |",
          "|---|---|---|---|---:|---:|"]
  for m, res in r["models"].items():
    for e in res["configs"]:
      cfg = f"{e['config']['sketch']} r={e['config']['rank']}"
      for name, l in e["layers"].items():
        if l["in_cond_s"] > 2 * l["top_level_s"]:
          out.append(f"| {m} | {cfg} | {name} | {tuple(l['input_shape'])} | "
                     f"{_ms(l['top_level_s'])} | {_ms(l['in_cond_s'])} |")
  return "\n".join(out)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--results", default=str(_common.RESULTS_DIR))
  args = parser.parse_args(argv)
  root = pathlib.Path(args.results)
  for fname, fn in (("step_time.json", step_time_md), ("step_time.json", targets_md),
                    ("step_time_nysact.json", step_time_md), ("step_time_nysact.json", targets_md),
                    ("scaling.json", scaling_md), ("scaling.json", targets_md),
                    ("conv_stats.json", conv_md), ("conv_stats.json", targets_md),
                    ("profile_update.json", profile_md)):
    path = root / fname
    if path.exists():
      print(f"<!-- {fname}: {fn.__name__} -->")
      print(fn(json.loads(path.read_text())))
      print()


if __name__ == "__main__":
  main()
