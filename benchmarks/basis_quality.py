"""How close is ``nysact_adam``'s Nyström basis to the exact top-r eigenspace?

The char transformer of the quality study (2 layers, width 128, context 64,
batch 16; the validation split's training stream) is trained by
``nysact_adam`` at its defaults. Beside it, observers (``nysact_adam``
transformations fed the same activations and zero gradients: only their
factors matter) keep their own factors with one setting changed each, and
an exact-mode observer keeps the truth: the exact EMA (decay 0.95, every
step) of every layer's covariance ``C``. Every ``--every`` steps, for every
layer with ``p > r``, each observer's basis ``U`` (its top ``r`` columns)
is compared with the top-``r`` eigenvectors ``V`` of ``C``:

* ``energy``: ``tr(U^T C U) / (sum of C's top r eigenvalues)``, the share of
  the top-r variance the basis captures (1: the exact top-r subspace);
* ``overlap``: ``||V^T U||_F^2 / r`` (1: the same subspace).

``r`` is each observer's own rank (32 for the exact-mode observer, whose
top 32 eigenvectors are compared).

Means over layers and over the checkpoints after step ``--skip``. The basis
a run uses at step t is the one of its last refresh, so the refresh period
and the statistics' period show up as staleness.

Usage::

  python -m benchmarks.basis_quality                  # the default grid
  python -m benchmarks.basis_quality --steps 100 --variants default r16
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nysact_optax
from benchmarks import results
from benchmarks.quality import train

OUT = pathlib.Path(__file__).resolve().parent / "results" / "basis_quality.json"
RANK = 32
DEFAULTS = dict(rank=RANK, cov_update_every=5, inv_update_every=10, stat_decay=0.95, oversample=0)
# One thing changed at a time from the defaults; ``r`` is the width compared.
VARIANTS: dict[str, dict[str, Any]] = {
  "default": {},
  "r8": dict(rank=8),
  "r16": dict(rank=16),
  "r64": dict(rank=64),
  "exact": dict(rank=10**9),
  "oversample8": dict(oversample=8),
  "oversample16": dict(oversample=16),
  "oversample32": dict(oversample=32),
  "cov1": dict(cov_update_every=1),
  "inv5": dict(inv_update_every=5),
  "inv50": dict(inv_update_every=50),
  "decay0.9": dict(stat_decay=0.9),
  "decay0.99": dict(stat_decay=0.99),
}


def _config(**kw) -> train.RunConfig:
  return train.RunConfig(
    task="char_lm",
    optimizer="nysact-adam",
    lr=3e-3,
    steps=kw.pop("steps", 300),
    batch_size=16,
    split="val",
    model=(("context", 64), ("num_layers", 2), ("width", 128)),
    augment=False,
    **kw,
  )


def _compare(u: np.ndarray, c: np.ndarray, r: int) -> tuple[float, float]:
  lam, v = np.linalg.eigh(0.5 * (c + c.T))
  top = v[:, -r:]
  energy = float(np.trace(u.T @ c @ u) / lam[-r:].sum())
  overlap = float(np.sum(np.square(top.T @ u)) / r)
  return energy, overlap


def run(steps: int, every: int, skip: int, names: Sequence[str], seed: int) -> dict[str, Any]:
  cfg = _config(steps=steps, seed=seed)
  data = train.load_data(cfg)
  model, tokens = train.make_model(cfg, data)
  loss = train.make_loss(cfg, model, tokens, capture=True)
  batches = train.train_batches(cfg, data)
  x0, _ = next(train.train_batches(cfg, data))
  params = model.init(jax.random.PRNGKey(seed), x0[:1])["params"]
  driver = nysact_optax.nysact_adam(3e-3, **DEFAULTS)
  settings = {n: {**DEFAULTS, **VARIANTS[n]} for n in names}
  observers = {n: nysact_optax.scale_by_nysact_adam(**kw) for n, kw in settings.items()}
  truth = nysact_optax.scale_by_nysact_adam(rank=10**9, cov_update_every=1, stat_decay=0.95)
  states = {n: tx.init(params) for n, tx in observers.items()}
  truth_state = truth.init(params)
  opt_state = driver.init(params)
  sched = train.schedule(cfg)

  @jax.jit
  def step(params, opt_state, states, truth_state, x, y, lr):
    (_, (_, acts)), grads = jax.value_and_grad(loss, has_aux=True)(params, None, x, y)
    updates, opt_state = driver.update(grads, opt_state, params, activations=acts)
    zeros = jax.tree.map(jnp.zeros_like, grads)
    states = {
      n: observers[n].update(zeros, s, params, activations=acts)[1] for n, s in states.items()
    }
    truth_state = truth.update(zeros, truth_state, params, activations=acts)[1]
    updates = jax.tree.map(lambda u: lr * u, updates)
    return optax.apply_updates(params, updates), opt_state, states, truth_state

  records: dict[str, list[dict[str, float]]] = {n: [] for n in names}
  t0 = time.perf_counter()
  for t in range(steps):
    x, y = next(batches)
    params, opt_state, states, truth_state = step(
      params, opt_state, states, truth_state, x, y, jnp.float32(sched(t))
    )
    if (t + 1) % every or t + 1 <= skip:
      continue
    exact = nysact_optax.find_nysact_state(truth_state)
    covs = {
      name: np.asarray(ls.cov, np.float64) / (1.0 - 0.95 ** int(ls.stat_count))
      for name, ls in exact.layers.items()
    }
    for n in names:
      fs = nysact_optax.find_nysact_state(states[n])
      for layer in fs.config.layers:
        c = covs[layer.name]
        r = min(settings[n]["rank"], RANK if settings[n]["rank"] >= 10**9 else 10**9)
        if c.shape[0] <= r:  # exact at this width: nothing to compare
          continue
        u = np.asarray(fs.layers[layer.name].basis, np.float64)
        # the top r columns (ascending order); an exact basis: its top r
        energy, overlap = _compare(u[:, -r:], c, r)
        records[n].append(dict(step=t + 1, layer=layer.name, energy=energy, overlap=overlap))
  summary = {
    n: {
      "energy": float(np.mean([r["energy"] for r in rs])),
      "overlap": float(np.mean([r["overlap"] for r in rs])),
      "energy_min": float(np.min([r["energy"] for r in rs])),
      "settings": settings[n],
    }
    for n, rs in records.items()
  }
  config = dict(dataclasses.asdict(cfg), every=every, skip=skip, rank=RANK, defaults=DEFAULTS)
  metrics = dict(seconds=time.perf_counter() - t0, summary=summary)
  return dict(config=config, metrics=metrics, curves=records)


def table(summary: dict[str, Any]) -> str:
  lines = [
    "| variant | change from the defaults | energy (mean) | energy (worst) | overlap |",
    "|---|---|---|---|---|",
  ]
  for n, s in summary.items():
    change = ", ".join(f"{k}={v}" for k, v in VARIANTS[n].items()) or "(defaults)"
    lines.append(
      f"| {n} | {change} | {s['energy']:.3f} | {s['energy_min']:.3f} | {s['overlap']:.3f} |"
    )
  return "\n".join(lines)


def plot(summary: dict[str, Any], path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(summary)
  fig, ax = plt.subplots(figsize=(9, 3.5))
  xs = np.arange(len(names))
  ax.bar(xs - 0.2, [summary[n]["energy"] for n in names], 0.4, label="energy")
  ax.bar(xs + 0.2, [summary[n]["overlap"] for n in names], 0.4, label="overlap")
  ax.set_xticks(xs, names, rotation=30, ha="right")
  ax.set_ylim(0, 1.05)
  ax.set_title(f"Nyström basis vs exact top-{RANK} eigenspace (char transformer)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--every", type=int, default=10)
  p.add_argument("--skip", type=int, default=50, help="checkpoints up to this step are left out")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
  p.add_argument("--out", type=pathlib.Path, default=OUT)
  a = p.parse_args(argv)
  out = run(a.steps, a.every, a.skip, a.variants, a.seed)
  summary = out["metrics"]["summary"]
  rec = results.write(
    a.out,
    "basis_quality",
    **out,
    plot=lambda rec, path: plot(rec["metrics"]["summary"], pathlib.Path(path)),
  )
  print(table(summary))
  return rec


if __name__ == "__main__":
  main()
