"""The acceptance targets of the benchmarks (timing and quality), in one place.

The scripts evaluate them when they write a result (the evaluated list is
stored in the result's ``metrics.targets``) and ``python -m benchmarks
report`` re-evaluates the step-time targets from the stored measurements, so
a changed limit shows in the report without re-running anything.
"""

from __future__ import annotations

from typing import Any

# Step time (issue 14): NysAct's amortised step over SGD-momentum's with the
# machine's default threading, per model (others: STEP_TIME_RATIO_DEFAULT);
# the grafted mode's over AdamW's alike.
STEP_TIME_RATIO_DEFAULT = 1.10
STEP_TIME_RATIO = {"digits": 1.25}
# First compile of the whole train step over SGD-momentum's.
COMPILE_RATIO = 2.0
# NysAct's overhead over SGD as a fraction of K-FAC(5, 50)'s overhead.
KFAC_OVERHEAD_FRACTION = 0.2
# Optimizer state (with momentum) over parameter bytes.
STATE_OVER_PARAMS = 1.15
# scaling: the fitted exponent of each operation's time in p.
SCALING_EXPONENT = 1.2
# conv_stats: the patch-free statistics' speedup over im2col.
CONV_SPEEDUP = 5.0

# Training quality (benchmarks/quality/summary.py).
# NysAct's test accuracy at most this many points below SGD-momentum's.
QUALITY_BELOW_SGD_POINTS = 0.2
# Issue 13: NysAct-graft's bits/char at most AdamW's minus this, every paired seed.
GRAFT_BELOW_ADAMW_BITS = 0.10
# Issue 13: NysAct-graft's amortised step over AdamW's, side by side.
GRAFT_STEP_OVER_ADAMW = 1.15
# Issue 13: NysAct-graft at most this many points below plain NysAct (CNN, ResNet-20).
GRAFT_BELOW_PLAIN_POINTS = 0.3


def step_time(models_out: dict[str, Any]) -> list[dict[str, Any]]:
  """The step-time targets, evaluated on the medians of interleaved rounds
  (``models_out``: a step-time result's ``metrics.models``)."""
  out = []
  for model, res in models_out.items():
    opts = res["optimizers"]
    sgd = opts.get("sgd")
    kfac = opts.get("kfac_5_50")
    limit = STEP_TIME_RATIO.get(model, STEP_TIME_RATIO_DEFAULT)
    for name, o in opts.items():
      if o.get("config", {}).get("rank") is None or name == "foof":
        continue
      variant = "library as shipped"
      base = "adamw" if dict(o.get("config", {})).get("graft") else "sgd"
      if sgd is not None and o.get("compile_s") and sgd.get("compile_s"):
        c = o["compile_s"] / sgd["compile_s"]
        out.append(
          {
            "variant": variant,
            "target": f"{model}: {name} first compile <= {COMPILE_RATIO:g}x SGD's",
            "value": c,
            "limit": COMPILE_RATIO,
            "pass": c <= COMPILE_RATIO,
          }
        )
      if base == "adamw" and o.get("ratio_to_adamw_median") is not None:
        out.append(
          {
            "variant": variant,
            "timing": o.get("timing"),
            "target": f"{model}: {name} amortised step <= {limit:.2f}x AdamW",
            "value": o["ratio_to_adamw_median"],
            "limit": limit,
            "pass": o["ratio_to_adamw_median"] <= limit,
          }
        )
      elif sgd is not None and o.get("ratio_to_sgd_median") is not None:
        out.append(
          {
            "variant": variant,
            "timing": o.get("timing"),
            "target": f"{model}: {name} amortised step <= {limit:.2f}x SGD",
            "value": o["ratio_to_sgd_median"],
            "limit": limit,
            "per_round": o.get("ratio_to_sgd_per_round"),
            "ratio_of_fastest_blocks": o.get("ratio_to_sgd_of_min"),
            "pass": o["ratio_to_sgd_median"] <= limit,
          }
        )
      if sgd is not None and kfac is not None and o.get("step_s_median"):
        ny = o["step_s_median"] - sgd["step_s_median"]
        kf = kfac["step_s_median"] - sgd["step_s_median"]
        # per-round overheads, to see the spread
        per_round = [
          (a - s) / (k - s) if k != s else float("nan")
          for a, s, k in zip(
            o["block_s_per_step"], sgd["block_s_per_step"], kfac["block_s_per_step"]
          )
        ]
        out.append(
          {
            "variant": variant,
            "target": f"{model}: {name} overhead over SGD <= 1/5 of K-FAC(5,50)'s",
            "value": ny / kf if kf else None,
            "limit": KFAC_OVERHEAD_FRACTION,
            "per_round": per_round,
            "pass": (ny / kf if kf else float("inf")) <= KFAC_OVERHEAD_FRACTION,
          }
        )
      if base == "adamw":  # the grafted mode carries AdamW-like state by design
        continue
      ratio = o["state_over_param_bytes"]
      out.append(
        {
          "variant": variant,
          "target": f"{model}: {name} optimizer state (with momentum) <= "
          f"{STATE_OVER_PARAMS:.2f}x param bytes",
          "value": ratio,
          "limit": STATE_OVER_PARAMS,
          "pass": ratio <= STATE_OVER_PARAMS,
        }
      )
  return out
