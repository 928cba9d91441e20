"""Side-by-side amortised step time of the quality study's optimizers on one task.

Every optimizer trains the same model on the same batches, in one process,
with the jitted step of :class:`benchmarks.quality.train.OptaxTrainer` (one
forward, backward and update; NysAct's activations captured). Timing is
interleaved: in each round every optimizer runs one block of ``--block``
consecutive steps (50: whole inverse periods of NysAct, so the time is
amortised), the order shuffled per round; a block is timed from a ready state
to ``block_until_ready`` of its last step, and the two warm-up (compiling)
steps are excluded. Interleaving spreads a shared machine's load over all
optimizers alike. Reports the median over rounds of each optimizer's
ms/step and its ratio to AdamW's.

Usage (from the repository root)::

  python -m benchmarks.quality.step_cost --task lm5 --rounds 4
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import _common, results
from benchmarks.quality import suite, train

TASKS = {"lm5": suite._LM_LONG_CPU, "vit": suite._VIT_CPU}
LRS = {
  "sgd": 0.1,
  "adamw": 3e-3,
  "muon": 0.05,
  "nysact": 0.1,
  "nysact-graft": 1e-2,
  "graft-identity": 1e-2,
}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--task", choices=sorted(TASKS), default="lm5")
  p.add_argument("--optimizers", default="adamw,muon,nysact-graft,graft-identity,nysact")
  p.add_argument("--rounds", type=int, default=4)
  p.add_argument("--block", type=int, default=50)
  p.add_argument("--out", default=str(suite.RESULTS / "step_cost_lm5.json"))
  a = p.parse_args(argv)
  labels = [l for l in a.optimizers.split(",") if l]
  base = dataclasses.replace(TASKS[a.task], steps=10**6)
  d = train.load_data(base)
  trainers = {}
  for label in labels:
    cfg = suite._cfg(base, label, lr=LRS[label], split="test", seed=0)
    model, tokens = train.make_model(cfg, d)
    batches = train.train_batches(cfg, d)
    x0, y0 = next(batches)
    params, state = train._init_variables(model, cfg, x0[:1])
    tr = train.OptaxTrainer(cfg, model, tokens)
    tr.init(params, state, (x0, y0))
    data = [tuple(map(jnp.asarray, next(batches))) for _ in range(a.block)]
    for x, y in data[:2]:  # compile
      jax.block_until_ready(tr.step(x, y)[0])
    trainers[label] = (tr, data)
  times: dict[str, list[float]] = {l: [] for l in labels}
  rng = random.Random(0)
  for _ in range(a.rounds):
    order = labels[:]
    rng.shuffle(order)
    for label in order:
      tr, data = trainers[label]
      t0 = time.perf_counter()
      loss = None
      for x, y in data:
        loss, _ = tr.step(x, y)
      jax.block_until_ready(loss)
      times[label].append(1e3 * (time.perf_counter() - t0) / a.block)
  med = {l: statistics.median(v) for l, v in times.items()}
  ref = med.get("adamw")
  metrics = {
    "ms_per_step": times,
    "median_ms_per_step": med,
    "ratio_to_adamw": {l: (m / ref if ref else None) for l, m in med.items()},
    "load_average": _common.load_average(),
  }
  result = results.write(
    a.out,
    "step-cost",
    config={"task": a.task, "block": a.block, "rounds": a.rounds, "optimizers": labels},
    metrics=metrics,
  )
  for l in labels:
    print(f"{l:16s} {med[l]:8.1f} ms/step" + (f"  {med[l] / ref:.2f}x AdamW" if ref else ""))
  return result


if __name__ == "__main__":
  main()
