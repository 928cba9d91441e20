"""Tables and plots from whatever runs of the quality suite have finished.

Reads ``<runs>/<stage>/*.json`` (written by :mod:`benchmarks.quality.suite`)
and writes ``summary.md`` (markdown tables, the targets with their measured
figures), ``summary.json`` and PNG plots beside the runs folder.

Usage (from the repository root)::

  python -m benchmarks.quality.summary
  python -m benchmarks.quality.summary --runs benchmarks/results/quality/runs
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks import results
from benchmarks import targets as T
from benchmarks.quality import suite

LABELS = (
  "sgd",
  "adamw",
  "kfac",
  "muon",
  "nysact",
  "nysact-reference",
  "nysact-fixed_stable",
  "nysact-shifted",
  "foof",
  "nysact-graft",
  "nysact-graft-leaf",
  "graft-identity",
  "nysact-adam",
  "nysact-adam-exact",
  "nysact-adam-orth",
  "soap-1s",
  "adam-orth",
)
NAMES = {
  "sgd": "SGD-momentum",
  "adamw": "AdamW",
  "kfac": "K-FAC (kfac-jax)",
  "nysact": "NysAct (default)",
  "foof": "NysAct exact (FOOF)",
  "nysact-reference": "NysAct, reference sketch refresh",
  "nysact-fixed_stable": "NysAct, best ablation (stable, fixed sketch)",
  "nysact-shifted": "NysAct, shifted Nyström (the paper's)",
  "muon": "Muon, optax.contrib.muon defaults",
  "muon-moonlight": "Muon, authors' layout, Moonlight (consistent RMS 0.2)",
  "muon-keller": "Muon, authors' layout, Keller (width scaling, Muon lr / Adam lr)",
  "soap": "SOAP (two-sided)",
  "nysact-graft": 'NysAct graft="rmsprop"',
  "nysact-graft-leaf": "NysAct graft, one group per leaf",
  "graft-identity": "graft control: identity direction",
  "nysact-adam": "nysact_adam (default, rank 32)",
  "nysact-adam-exact": "nysact_adam exact mode",
  "nysact-adam-orth": "nysact_adam orthogonalised",
  "soap-1s": "gradient basis (one-sided SOAP)",
  "adam-orth": "orthogonalised Adam, identity basis",
  "nysact-adam-rotate": 'nysact_adam, second_moment="rotate"',
  "nysact-adam-r8": "nysact_adam rank 8",
  "nysact-adam-r16": "nysact_adam rank 16",
  "nysact-adam-r64": "nysact_adam rank 64",
  "nysact-adam-os16": "nysact_adam oversample 16",
  "nysact-adam-cov1": "nysact_adam statistics every step",
}
# Issue 25: each nysact_adam label minus each peer, seed by seed.
ADAM_MODES = ("nysact-adam", "nysact-adam-exact", "nysact-adam-orth")
ADAM_PEERS = (
  "adamw",
  "muon",
  "muon-moonlight",
  "muon-keller",
  "soap",
  "nysact-graft",
  "soap-1s",
  "adam-orth",
  "nysact-adam-exact",
)


def adam_paired(runs: list[dict[str, Any]], lm: bool) -> tuple[list[str], dict[str, Any]]:
  """Per seed: each nysact_adam mode minus each peer (bits/char or points;
  negative is better on the LM, positive on images)."""
  by = collections.defaultdict(dict)
  for r in runs:
    by[_label(r["_name"])][r["config"]["seed"]] = _value(r)
  scale = 1.0 if lm else 100.0
  lines = [
    "| mode - peer | per seed | mean ± sd | better on |",
    "|---|---|---|---|",
  ]
  stats: dict[str, Any] = {}
  for mode in (m for m in ADAM_MODES if m in by):
    for peer in (p for p in ADAM_PEERS if p in by and p != mode):
      seeds = sorted(set(by[mode]) & set(by[peer]))
      if not seeds:
        continue
      d = [scale * (by[mode][k] - by[peer][k]) for k in seeds]
      better = sum((x < 0) if lm else (x > 0) for x in d)
      mean, sd = _mean_std(d)
      stats[f"{mode} - {peer}"] = {"seeds": seeds, "diffs": d, "mean": mean, "std": sd}
      fmt = "{:+.3f}" if lm else "{:+.2f}"
      lines.append(
        f"| {NAMES.get(mode, mode)} - {NAMES.get(peer, peer)} | "
        f"{', '.join(fmt.format(x) for x in d)} | {fmt.format(mean)} ± {abs(sd):.3f} | "
        f"{better}/{len(d)} |"
      )
  return lines, stats


def adam_ablation_table(runs: list[dict[str, Any]]) -> list[str]:
  """The LM ablations of nysact_adam (validation bits/char, paired seeds)."""
  by = collections.defaultdict(dict)
  for r in runs:
    by[_label(r["_name"])][r["config"]["seed"]] = _value(r)
  base = by.get("nysact-adam", {})
  lines = [
    "| setting | validation bits/char per seed | mean | minus the default, per seed |",
    "|---|---|---|---|",
  ]
  for label, vals in by.items():
    seeds = sorted(vals)
    diffs = [vals[k] - base[k] for k in seeds if k in base]
    lines.append(
      f"| {NAMES.get(label, label)} | {', '.join(f'{vals[k]:.3f}' for k in seeds)} | "
      f"{_mean_std([vals[k] for k in seeds])[0]:.3f} | "
      f"{', '.join(f'{x:+.3f}' for x in diffs) if label != 'nysact-adam' else '—'} |"
    )
  return lines


def _label(name: str) -> str:
  return name.split("__")[1]


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
  a = np.asarray([x for x in xs if x is not None], float)
  if a.size == 0:
    return float("nan"), float("nan")
  return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def _pct(x: float) -> str:
  return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.2f}"


def _is_lm(r: dict[str, Any]) -> bool:
  return r["metrics"].get("metric") == "bits_per_char"


def _value(r: dict[str, Any]) -> float:
  f = r["metrics"]["final"]
  return f["bits_per_char"] if _is_lm(r) else f["eval_accuracy"]


def tune_table(runs: list[dict[str, Any]], lm: bool = False) -> list[str]:
  by = collections.defaultdict(dict)
  for r in runs:
    # The damping runs (``__d<damping>``) are told apart by damping.
    damping = r["config"].get("damping") if "__d" in r["_name"] else None
    adam_lr = r["config"].get("adam_lr") if "__alr" in r["_name"] else None
    by[_label(r["_name"])][(r["config"]["lr"], damping or 0.0, adam_lr or 0.0)] = r
  metric = "validation bits/char" if lm else "validation accuracy %"
  lines = [f"| optimizer | learning rate: {metric} | chosen |", "|---|---|---|"]
  for label in [l for l in LABELS if l in by] + [l for l in by if l not in LABELS]:
    cells = []
    for key in sorted(by[label]):
      r = by[label][key]
      v = _value(r)
      s = ((f"{v:.3f}" if v is not None else "n/a") if lm else _pct(v)) + (
        " (diverged)" if r["metrics"]["final"]["diverged"] else ""
      )
      cells.append(f"{_lr(r, key[1] != 0.0)}: {s}")
    best = max(by[label].values(), key=suite.score)
    lines.append(
      f"| {NAMES.get(label, label)} | {'; '.join(cells)} | "
      f"{_lr(best, label in suite.DAMPING_GRIDS)} |"
    )
  return lines


def _lr(r: dict[str, Any], damping: bool) -> str:
  """The run's learning rate, with its damping when that was tuned."""
  lr = f"{r['config']['lr']:g}"
  if r["config"].get("adam_lr") is not None and r["config"].get("optimizer") == "muon-keller":
    lr += f" / Adam {r['config']['adam_lr']:g}"
  return f"{lr} (damping {r['config']['damping']:g})" if damping else lr


def _time_to(curve: list[dict[str, Any]], target: float, lm: bool) -> float | None:
  for p in curve:
    v = p["eval_loss"] / math.log(2) if lm else p["eval_accuracy"]
    if (v <= target) if lm else (v >= target):
      return p["train_s"]
  return None


def test_table(runs: list[dict[str, Any]], lm: bool = False) -> tuple[list[str], dict[str, Any]]:
  by = collections.defaultdict(list)
  for r in runs:
    by[_label(r["_name"])].append(r)
  stats: dict[str, Any] = {}
  for label, rs in by.items():
    vals = [_value(r) for r in rs]
    curve_final = [
      (r["curves"]["eval"][-1]["eval_loss"] / math.log(2))
      if lm
      else r["curves"]["eval"][-1]["eval_accuracy"]
      for r in rs
      if r["curves"]["eval"]
    ]
    stats[label] = {
      "n": len(rs),
      "lr": rs[0]["config"]["lr"],
      "damping": rs[0]["config"].get("damping"),
      "seeds": sorted(r["config"]["seed"] for r in rs),
      "mean": _mean_std(vals)[0],
      "std": _mean_std(vals)[1],
      "values": vals,
      "curve_final_mean": _mean_std(curve_final)[0],
      "train_s": _mean_std([r["metrics"]["timing"]["train_s"] for r in rs])[0],
      "ms_per_step": 1e3 * _mean_std([r["metrics"]["timing"]["train_s_per_step"] for r in rs])[0],
      "diverged": sum(bool(r["metrics"]["final"]["diverged"]) for r in rs),
      "steps": rs[0]["config"]["steps"],
    }
  # Time to SGD-momentum's final accuracy (on the curves' evaluation subset).
  ref = stats.get("sgd", {}).get("curve_final_mean")
  for label, rs in by.items():
    times = [_time_to(r["curves"]["eval"], ref, lm) for r in rs] if ref is not None else []
    reached = [t for t in times if t is not None]
    stats[label]["time_to_sgd_final_s"] = _mean_std(reached)[0] if reached else None
    stats[label]["reached_sgd_final"] = f"{len(reached)}/{len(rs)}"
  metric = "bits/char (mean ± sd)" if lm else "test accuracy % (mean ± sd)"
  lines = [
    f"| optimizer | lr | seeds | {metric} | train s | ms/step | time to SGD's final (s) | reached |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for label in [l for l in LABELS if l in stats] + [l for l in stats if l not in LABELS]:
    s = stats[label]
    if lm:
      val = f"{s['mean']:.4f} ± {s['std']:.4f}"
    else:
      val = f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"
    if s["diverged"]:
      val += f" ({s['diverged']} diverged)"
    tt = s["time_to_sgd_final_s"]
    lr = _lr(by[label][0], suite.TUNED_AS.get(label, label) in suite.DAMPING_GRIDS)
    lines.append(
      f"| {NAMES.get(label, label)} | {lr} | {s['n']} | {val} | {s['train_s']:.0f} | "
      f"{s['ms_per_step']:.0f} | {'n/a' if tt is None else f'{tt:.0f}'} | {s['reached_sgd_final']} |"
    )
  return lines, stats


def targets(stats: dict[str, Any], lm: bool = False, model: str = "CNN") -> list[str]:
  out = []
  ny = stats.get("nysact")
  if ny is None:
    return [f"- {model}: NysAct test runs not finished."]
  if lm:
    ad = stats.get("adamw")
    if ad:
      ok = ny["mean"] <= ad["mean"]
      out.append(
        f"- {model}: NysAct bits/char {ny['mean']:.4f} <= AdamW's {ad['mean']:.4f}: "
        f"{'MET' if ok else 'NOT MET'}"
      )
    return out
  for other, rule in (("adamw", "at least AdamW's"), ("kfac", "at least K-FAC's")):
    o = stats.get(other)
    if o:
      ok = ny["mean"] >= o["mean"]
      out.append(
        f"- {model}: NysAct {100 * ny['mean']:.2f}% {rule} {100 * o['mean']:.2f}%: "
        f"{'MET' if ok else 'NOT MET'} ({100 * (ny['mean'] - o['mean']):+.2f} points)"
      )
  sgd = stats.get("sgd")
  if sgd:
    gap = 100 * (ny["mean"] - sgd["mean"])
    out.append(
      f"- {model}: NysAct {100 * ny['mean']:.2f}% no more than "
      f"{T.QUALITY_BELOW_SGD_POINTS} points below SGD-momentum's {100 * sgd['mean']:.2f}%: "
      f"{'MET' if gap >= -T.QUALITY_BELOW_SGD_POINTS else 'NOT MET'} "
      f"({gap:+.2f} points)"
    )
    # SGD reaches its final accuracy at its last step: its time is the run's.
    tn, ts = ny.get("time_to_sgd_final_s"), sgd["train_s"]
    if tn is None:
      out.append(
        f"- {model}: NysAct reaches SGD's final accuracy in fewer seconds: NOT MET "
        f"(reached in {ny['reached_sgd_final']} runs)"
      )
    else:
      out.append(
        f"- {model}: NysAct reaches SGD's final accuracy (curve subset, "
        f"{100 * sgd['curve_final_mean']:.2f}%) in {tn:.1f} s against SGD's whole "
        f"run, {ts:.1f} s: {'MET' if tn < ts else 'NOT MET'} (NysAct reached it in "
        f"{ny['reached_sgd_final']} runs; the mean is over those)"
      )
  return out


def paired_table(runs: list[dict[str, Any]], lm: bool) -> tuple[list[str], dict[str, Any]]:
  """Per-seed values of every label and NysAct-graft's paired differences."""
  by = collections.defaultdict(dict)
  for r in runs:
    by[_label(r["_name"])][r["config"]["seed"]] = _value(r)
  labels = [
    l for l in ("sgd", "adamw", "muon", "nysact", "nysact-graft", "graft-identity") if l in by
  ]
  seeds = sorted({s for v in by.values() for s in v})
  fmt = (lambda v: f"{v:.4f}") if lm else (lambda v: f"{100 * v:.2f}")
  others = [o for o in ("adamw", "muon", "graft-identity") if o in by]
  head = [
    "seed",
    *(NAMES.get(l, l) for l in labels),
    *(f"graft - {NAMES.get(o, o)}" for o in others if "nysact-graft" in by),
  ]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  diffs: dict[str, list[float]] = {o: [] for o in others}
  for seed in seeds:
    row = [str(seed)] + [fmt(by[l][seed]) if seed in by[l] else "—" for l in labels]
    if "nysact-graft" in by:
      for o in others:
        g, v = by["nysact-graft"].get(seed), by[o].get(seed)
        if g is None or v is None:
          row.append("—")
          continue
        d = (g - v) if lm else 100 * (g - v)
        diffs[o].append(d)
        row.append(f"{d:+.4f}" if lm else f"{d:+.2f}")
    lines.append("| " + " | ".join(row) + " |")
  stats = {
    o: {"diffs": d, "mean": _mean_std(d)[0], "std": _mean_std(d)[1]} for o, d in diffs.items() if d
  }
  return lines, stats


def tf_targets(
  stats: dict[str, Any], paired: dict[str, Any], cost: dict[str, Any] | None = None
) -> list[str]:
  """Issue 13's targets, from the tables (``stats``: per section key) and
  the side-by-side step cost (``step_cost.py``'s JSON)."""
  out = []
  for key, name in (("lm", "LM (300 steps, 307k tokens)"), ("lm5", "LM (5x tokens)")):
    st, pl = stats.get(key, {}), paired.get(key, {})
    g = st.get("nysact-graft")
    seeds = f"{g['n']} seed(s)" if g else ""
    if g and "adamw" in pl:
      d = pl["adamw"]["diffs"]
      ok = len(d) >= 3 and all(x <= -T.GRAFT_BELOW_ADAMW_BITS for x in d)
      out.append(
        f"- {name}: NysAct-graft at most AdamW's - {T.GRAFT_BELOW_ADAMW_BITS:.2f} bits/char "
        "on every paired "
        f"seed: {'MET' if ok else 'NOT MET'} ({seeds}; differences "
        f"{', '.join(f'{x:+.3f}' for x in d)}; means {g['mean']:.4f} vs "
        f"{st['adamw']['mean']:.4f})"
      )
    if g and "muon" in pl:
      d = pl["muon"]["diffs"]
      out.append(
        f"- {name}: NysAct-graft reaches Muon: "
        f"{'MET' if g['mean'] <= st['muon']['mean'] else 'NOT MET'} "
        f"({g['mean']:.4f} vs {st['muon']['mean']:.4f}; paired "
        f"{', '.join(f'{x:+.3f}' for x in d)})"
      )
    if g and "graft-identity" in pl:
      d = pl["graft-identity"]["diffs"]
      ok = len(d) >= 3 and all(x < 0 for x in d)
      out.append(
        f"- {name}: NysAct-graft below the identity-graft control on every paired "
        f"seed: {'MET' if ok else 'NOT MET'} ({seeds}; mean difference "
        f"{pl['graft-identity']['mean']:+.4f} ± {pl['graft-identity']['std']:.4f}; "
        f"{', '.join(f'{x:+.3f}' for x in d)})"
      )
  if cost and "nysact-graft" in cost.get("ratio_to_adamw", {}):
    med, ratio = cost["median_ms_per_step"], cost["ratio_to_adamw"]
    out.append(
      f"- LM: NysAct-graft's amortised step at most {T.GRAFT_STEP_OVER_ADAMW}x AdamW's, "
      "side by side "
      f"(step_cost.py, {cost['rounds']} interleaved rounds of {cost['block']} steps): "
      f"{'MET' if ratio['nysact-graft'] <= T.GRAFT_STEP_OVER_ADAMW else 'NOT MET'} "
      f"({med['nysact-graft']:.0f} vs {med['adamw']:.0f} ms, "
      f"{ratio['nysact-graft']:.2f}x; "
      + ", ".join(
        f"{NAMES.get(k, k)} {v:.2f}x"
        for k, v in ratio.items()
        if k not in ("adamw", "nysact-graft")
      )
      + f"; load average {cost.get('load_average')})"
    )
  vit = stats.get("vit", {})
  gv = vit.get("nysact-graft")
  for o in ("adamw", "muon"):
    if gv and o in vit:
      out.append(
        f"- ViT: NysAct-graft test accuracy at least {NAMES[o]}'s: "
        f"{'MET' if gv['mean'] >= vit[o]['mean'] else 'NOT MET'} "
        f"({100 * gv['mean']:.2f} vs {100 * vit[o]['mean']:.2f} %, n={gv['n']}/{vit[o]['n']})"
      )
  for key, model in (("cnn", "CNN"), ("resnet", "ResNet-20")):
    st = stats.get(key, {})
    if "nysact-graft" in st and "nysact" in st:
      d = 100 * (st["nysact-graft"]["mean"] - st["nysact"]["mean"])
      out.append(
        f"- {model}: NysAct-graft within {T.GRAFT_BELOW_PLAIN_POINTS} points of plain NysAct "
        f"or better: {'MET' if d >= -T.GRAFT_BELOW_PLAIN_POINTS else 'NOT MET'} "
        f"({100 * st['nysact-graft']['mean']:.2f} vs "
        f"{100 * st['nysact']['mean']:.2f} %, {d:+.2f} points)"
      )
  return out


def _finite(xs):
  return [x for x in xs if x is not None and math.isfinite(x)]


def _by_label(runs: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
  """Runs grouped by ablation label, in ``suite.ABLATION_ORDER``."""
  order = {k: i for i, k in enumerate(suite.ABLATION_ORDER)}
  by = collections.defaultdict(list)
  for r in runs:
    by[_label(r["_name"])].append(r)
  return sorted(by.items(), key=lambda kv: order.get(kv[0], 99))


def _nystrom_of(r: dict[str, Any]) -> str:
  return dict(r["config"].get("nysact") or ()).get("nystrom", "shifted")


def ablation_table(runs: list[dict[str, Any]]) -> list[str]:
  lines = [
    "| setting | Nyström | seeds | val accuracy % (mean ± sd) | per seed | ms/step "
    "| P error rel. Frobenius (last, mean over seeds) | rel. on top-10 eigvecs (last) "
    "| refresh failures |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for label, rs in _by_label(runs):
    rs = sorted(rs, key=lambda r: r["config"]["seed"])
    accs = [r["metrics"]["final"]["eval_accuracy"] for r in rs]
    m, sd = _mean_std(accs)
    per_seed = ", ".join(
      _pct(a) + ("*" if r["metrics"]["final"]["diverged"] else "") for a, r in zip(accs, rs)
    )
    last = [(r["curves"].get("preconditioner_error") or [None])[-1] for r in rs]
    fro = _finite([e.get("rel_fro") for e in last if e])
    top = _finite([e.get("rel_top10") for e in last if e])
    fails = sum(sum((r.get("nysact_refresh_failures") or {}).values()) for r in rs)
    ms = _mean_std([r["metrics"]["timing"]["train_s_per_step"] for r in rs])[0]
    lines.append(
      f"| {label} | {_nystrom_of(rs[0])} | {len(rs)} | {_pct(m)} ± {_pct(sd)} | {per_seed} | "
      f"{1e3 * ms:.0f} | {f'{np.mean(fro):.3f}' if fro else 'n/a'} | "
      f"{f'{np.mean(top):.3f}' if top else 'n/a'} | {fails} |"
    )
  lines.append("")
  lines.append("(* diverged: the loss became non-finite.)")
  return lines


def plot_curves(runs: list[dict[str, Any]], path: pathlib.Path, title: str, lm: bool = False):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  by = collections.defaultdict(list)
  for r in runs:
    by[_label(r["_name"])].append(r)
  fig, axes = plt.subplots(1, 2, figsize=(12, 4))
  for label in [l for l in LABELS if l in by] + [l for l in by if l not in LABELS]:
    rs = by[label]
    n = min(len(r["curves"]["eval"]) for r in rs)
    if n == 0:
      continue
    steps = [p["step"] for p in rs[0]["curves"]["eval"][:n]]
    key = "eval_loss" if lm else "eval_accuracy"
    scale = (1 / math.log(2)) if lm else 100.0
    ys = np.array([[p[key] * scale for p in r["curves"]["eval"][:n]] for r in rs])
    ts = np.array([[p["train_s"] for p in r["curves"]["eval"][:n]] for r in rs])
    m, s = ys.mean(0), ys.std(0)
    for ax, xs in ((axes[0], steps), (axes[1], ts.mean(0))):
      ax.plot(xs, m, marker="o", ms=3, label=f"{NAMES.get(label, label)} (n={len(rs)})")
      ax.fill_between(xs, m - s, m + s, alpha=0.15)
  ylabel = "validation bits/char" if lm else "test accuracy % (curve subset)"
  axes[0].set_xlabel("step")
  axes[1].set_xlabel("training wall-clock s (excl. eval, compile; log scale)")
  axes[1].set_xscale("log")
  for ax in axes:
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if not lm:
      lo = min(l.get_ydata().min() for l in ax.get_lines()) if ax.get_lines() else 0
      ax.set_ylim(max(lo, 60), None)
  axes[0].legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_ablations(runs: list[dict[str, Any]], path: pathlib.Path, title: str):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  groups = [
    (k, rs) for k, rs in _by_label(runs) if not any(r["metrics"]["final"]["diverged"] for r in rs)
  ]
  fig, axes = plt.subplots(1, 2, figsize=(13, 4))
  names = [k for k, _ in groups]
  stats = [_mean_std([r["metrics"]["final"]["eval_accuracy"] for r in rs]) for _, rs in groups]
  means = [100 * m for m, _ in stats]
  sds = [100 * s for _, s in stats]
  colors = [
    "#d62728" if n == "rank10" else "#2ca02c" if n == suite.DEFAULT_ABLATION else "#1f77b4"
    for n in names
  ]
  axes[0].bar(names, means, yerr=sds, color=colors, capsize=3)
  for i, (_, rs) in enumerate(groups):
    axes[0].plot(
      [i] * len(rs), [100 * r["metrics"]["final"]["eval_accuracy"] for r in rs], "k.", ms=4
    )
  if means:
    axes[0].set_ylim(min(means) - 3, max(means) + 2)
  axes[0].set_ylabel("validation accuracy %")
  axes[0].set_title(
    "mean ± sd over seeds (dots: seeds; red: protocol baseline, green: new default)", fontsize=9
  )
  axes[0].tick_params(axis="x", rotation=60)
  for n, rs in groups:
    err = next(
      (r["curves"].get("preconditioner_error") for r in rs if r["config"]["seed"] == 0), None
    )
    err = [e for e in (err or []) if e.get("rel_top10") is not None]
    if err:
      axes[1].plot(
        [e["step"] for e in err], [e["rel_top10"] for e in err], marker="o", ms=3, label=n
      )
  axes[1].set_yscale("log")
  axes[1].set_xlabel("step")
  axes[1].set_ylabel("||(P - P_exact) V10|| / ||P_exact V10||")
  axes[1].set_title("preconditioner error on the covariance's top-10 eigenvectors (seed 0)")
  axes[1].legend(fontsize=7, ncol=2)
  axes[1].grid(alpha=0.3)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _describe(runs: list[dict[str, Any]]) -> str:
  if not runs:
    return ""
  c = runs[0]["config"]
  m = runs[0]["machine"]
  model = ", ".join(f"{k}={v}" for k, v in c["model"].items()) or "default size"
  return (
    f"{runs[0]['metrics']['data']}; model {c['task']} ({model}, {runs[0]['metrics']['param_count']:,} params); "
    f"{c['steps']} steps x batch {c['batch_size']}, warm-up {c['warmup']:.0%} + cosine; "
    f"{m['cpu_model']} ({m['cpus_usable']} core(s) per run, {m['jax_backend']}), "
    f"jax {(runs[0]['versions'] or {}).get('jax')}"
  )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--runs", default=str(suite.RESULTS / "runs"))
  p.add_argument("--out-dir", default=None, help="default: the runs folder's parent")
  a = p.parse_args(argv)
  root = pathlib.Path(a.runs)
  out = pathlib.Path(a.out_dir) if a.out_dir else root.parent
  out.mkdir(parents=True, exist_ok=True)
  md: list[str] = ["# Training quality: results so far", ""]
  summary: dict[str, Any] = {}
  sections = (
    ("Fashion-MNIST CNN", "tune", "test", "cnn", False),
    ("Fashion-MNIST ResNet-20", "resnet_tune", "resnet_test", "resnet", False),
    ("Character LM (KJV Bible)", "lm_tune", "lm_test", "lm", True),
    (
      "Character LM at 5x the tokens (issue 13; settings tuned on the 300-step LM)",
      None,
      "lm5_test",
      "lm5",
      True,
    ),
    (
      "Fashion-MNIST ViT (issue 13; settings tuned on the 300-step LM; the ViT's own "
      "validation grid of the grafted mode is a check only)",
      "vit_tune",
      "vit_test",
      "vit",
      False,
    ),
  )
  paired: dict[str, Any] = {}
  target_lines: list[str] = []
  for title, tune_stage, test_stage, key, lm in sections:
    tune = suite.load_runs(root, tune_stage) if tune_stage else []
    test = suite.load_runs(root, test_stage)
    if key == "cnn":  # the best ablation and the old default beside the others
      test += suite.load_runs(root, "best")
    if not tune and not test:
      continue
    md += [f"## {title}", "", _describe(test or tune), ""]
    if tune:
      md += [
        "Learning-rate tuning (validation split carved from the training set, seed 0):",
        "",
        *tune_table(tune, lm),
        "",
      ]
      tested = {_label(r["_name"]) for r in test}
      md += [
        f"{NAMES.get(label, label)} is tested at the learning rate and damping tuned "
        f"for `{as_}`, the defaults while its tuning ran (`suite.TUNED_AS`)."
        for label, as_ in suite.TUNED_AS.items()
        if label in tested
      ] + [""]
      if key == "cnn":
        md += [
          "The ablations below change one thing of the shifted-Nyström variant (the "
          "paper's method, the defaults before them) at its tuned learning rate.",
          "",
        ]
    if test:
      lines, stats = test_table(test, lm)
      summary[key] = stats
      md += ["Test set, chosen learning rate:", "", *lines, ""]
      png = out / f"curves_{key}.png"
      plot_curves(test, png, f"{title}: test curves (mean ± sd over seeds)", lm)
      md += [f"![{title} curves]({png.name})", ""]
      if key in ("lm5", "vit") or any(_label(r["_name"]) == "nysact-graft" for r in test):
        lines, paired[key] = paired_table(test, lm)
        md += ["Paired seeds (NysAct-graft minus each other optimizer, same seed):", "", *lines, ""]
      if key not in ("lm5", "vit"):
        target_lines += targets(stats, lm, title)
  abl = suite.load_runs(root, "ablate")
  if abl:
    md += [
      "## Ablations (Fashion-MNIST CNN, validation split, NysAct's tuned lr)",
      "",
      _describe(abl),
      "",
      "P error: the factors in the optimizer state against the exact damped inverse "
      "(C + rho I)^-1 of the same (exact) EMA statistics at the last inverse refresh, "
      "for layer `Dense_0`; top-10: the error restricted to C's 10 leading eigenvectors.",
      "",
      *ablation_table(abl),
      "",
    ]
    png = out / "ablations_cnn.png"
    plot_ablations(abl, png, "NysAct ablations on the Fashion-MNIST CNN")
    md += [f"![ablations]({png.name})", ""]
    summary["ablations"] = {
      label: {
        "nystrom": _nystrom_of(rs[0]),
        "seeds": [r["config"]["seed"] for r in rs],
        "val_accuracy": [r["metrics"]["final"]["eval_accuracy"] for r in rs],
        "diverged": [bool(r["metrics"]["final"]["diverged"]) for r in rs],
        "ms_per_step": [1e3 * r["metrics"]["timing"]["train_s_per_step"] for r in rs],
      }
      for label, rs in _by_label(abl)
    }
  adam: dict[str, Any] = {}
  for title, stage, key, lm in (
    ("Char LM, 300 steps", "lm_test", "lm", True),
    ("Char LM, 5x tokens", "lm5_test", "lm5", True),
    ("ViT, Fashion-MNIST", "vit_test", "vit", False),
    ("CNN, Fashion-MNIST", "test", "cnn", False),
    ("ResNet-20, Fashion-MNIST", "resnet_test", "resnet", False),
  ):
    lines, stats = adam_paired(suite.load_runs(root, stage), lm)
    if stats:
      adam[key] = stats
      md += [f"### nysact_adam, paired seeds: {title}", "", *lines, ""]
  peers: dict[str, Any] = {}
  tune = suite.load_runs(root, "peers/lm_tune")
  if tune:
    md += [
      "## The peers at full strength (issue 29, stage peers)",
      "",
      "Learning-rate tuning (300-step LM, validation stream, seed 0; Keller: Muon lr / Adam lr):",
      "",
      *tune_table(tune, True),
      "",
    ]
  for title, stage, key, lm in (
    ("Char LM, 300 steps", "peers/lm_test", "lm", True),
    ("Char LM, 5x tokens", "peers/lm5_test", "lm5", True),
    ("ViT, Fashion-MNIST (LM-tuned settings)", "peers/vit_test", "vit", False),
  ):
    test = suite.load_runs(root, stage)
    if not test:
      continue
    lines, stats = test_table(test, lm)
    plines, pstats = adam_paired(test, lm)
    peers[key] = {"test": stats, "paired": pstats}
    md += [f"### Peers: {title}", "", *lines, "", "Paired seeds:", "", *plines, ""]
  if peers:
    summary["peers"] = peers
  abl = suite.load_runs(root, "lm_ablate")
  if abl:
    md += [
      "### nysact_adam ablations (char LM, validation stream, the default's tuned lr)",
      "",
      *adam_ablation_table(abl),
      "",
    ]
  if adam:
    summary["adam_paired"] = adam
  md += ["## Targets", "", *(target_lines or ["- no test runs finished yet"]), ""]
  cost_path = out / "step_cost_lm5.json"
  cost = None
  if cost_path.exists():
    rec = results.read(cost_path)
    cost = {**rec["config"], **rec["metrics"]}
  tf = tf_targets(summary, paired, cost)
  if tf:
    md += ["## Targets of issue 13 (transformers and grafting)", "", *tf, ""]
    summary["paired"] = paired
  (out / "summary.md").write_text("\n".join(md) + "\n")
  results.write(
    out / "summary.json",
    "quality-summary",
    config={"runs": str(root)},
    metrics=json.loads(json.dumps(summary, default=float)),
    quiet=True,
  )
  print("\n".join(md))
  return summary


if __name__ == "__main__":
  main()
