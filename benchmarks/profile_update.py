"""Where NysAct's time goes: its update alone, per phase and per layer.

For each model of ``benchmarks.step_time`` (same batches), with the gradients
and captured activations of one batch fixed:

* ``fwd_bwd``: the model's loss-and-gradient alone (the part every optimizer
  pays), for scale;
* ``update``: ``scale_by_nysact(...).update`` alone, jitted, at step counts
  1 (plain: apply only), 5 (statistics + apply) and 50 (statistics +
  inverse refresh + apply);
* ``layers``: each layer's sketched statistics alone, at the top level of a
  jitted function and inside a taken ``lax.cond`` branch (where the optimizer
  runs them);
* ``hlo``: the convolutions of the compiled update that XLA:CPU emitted as
  naive loops (``outer_dimension_partitions`` in their backend config) with
  the named scope they come from.

Usage: ``python -m benchmarks.profile_update`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

import nysact_optax
from benchmarks import _common, tasks
from benchmarks import results as bresults
from nysact_optax import linalg


def _time(compiled, *args, repeats: int) -> float:
  jax.block_until_ready(compiled(*args))
  times = _common.time_fn(
    lambda: jax.block_until_ready(compiled(*args)), repeats=repeats, min_time=0.2, max_repeats=20
  )
  return min(times)


def naive_convs(hlo: str) -> list[dict[str, str]]:
  """Convolutions XLA:CPU lowered to loops (not the Eigen runtime)."""
  out = []
  for line in hlo.split("\n"):
    if " convolution(" in line and "outer_dimension_partitions" in line:
      shape = line.split("=", 1)[1].split("convolution(")[0].strip()
      labels = re.search(r"dim_labels=(\S+?),", line)
      scope = re.search(r'op_name="([^"]+)"', line)
      out.append(
        {
          "shape": shape,
          "dim_labels": labels.group(1) if labels else "",
          "op_name": scope.group(1) if scope else "",
        }
      )
  return out


def profile_model(
  name: str, batch: int, configs: Sequence[dict], repeats: int, source: str
) -> dict[str, Any]:
  task = tasks.build_task(name, batch, source=source)
  loss = tasks.batch_loss(task, capture=True)
  batch0 = task.batches[0]
  grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (_, (_, acts)), grads = grad_fn(task.params, task.model_state, batch0)
  fwd_bwd = _time(
    grad_fn.lower(task.params, task.model_state, batch0).compile(),
    task.params,
    task.model_state,
    batch0,
    repeats=repeats,
  )
  res: dict[str, Any] = {"batch_shape": list(task.batch_shape), "fwd_bwd_s": fwd_bwd, "configs": []}
  for cfg in configs:
    entry: dict[str, Any] = {"config": cfg}
    for variant in ("library",):
      tx = nysact_optax.scale_by_nysact(**cfg)
      state = tx.init(task.params)
      f = jax.jit(lambda g, s, a, tx=tx: tx.update(g, s, None, activations=a))
      compiled = f.lower(grads, state, acts).compile()
      times = {}
      for count, phase in ((1, "plain"), (5, "statistics"), (50, "inverse")):
        s2 = state._replace(count=jnp.asarray(count, jnp.int32))
        times[phase] = _time(compiled, grads, s2, acts, repeats=repeats)
      amortised = (40 * times["plain"] + 9 * times["statistics"] + times["inverse"]) / 50
      entry[variant] = {
        "update_s": times,
        "update_amortised_s": amortised,
        "update_amortised_over_fwd_bwd": amortised / fwd_bwd,
      }
      if variant == "library":
        entry["naive_loop_convs"] = naive_convs(compiled.as_text())
    # per-layer statistics: top level vs inside lax.cond
    layers = {}
    for lname, li in acts.items():
      x = li.inputs[0]
      has_bias = "bias" in _params_at(task.params, lname)
      p = li.spec.input_width(x.shape) + int(has_bias)
      r = min(cfg.get("rank", 10), p)
      sk = linalg.draw_sketch(jax.random.PRNGKey(0), p, r, cfg.get("sketch", "gaussian"))

      def stats(x, m, li=li, has_bias=has_bias):
        return linalg.sketched_covariance(
          nysact_optax.LayerInputs([x], li.spec), linalg.Sketch(m), has_bias
        )

      def in_cond(pred, x, m, stats=stats):
        return jax.lax.cond(pred, stats, lambda x, m: jnp.zeros(m.shape, jnp.float32), x, m)

      top = _time(jax.jit(stats).lower(x, sk.matrix).compile(), x, sk.matrix, repeats=repeats)
      cond = _time(
        jax.jit(in_cond).lower(True, x, sk.matrix).compile(), True, x, sk.matrix, repeats=repeats
      )
      layers[lname] = {
        "input_shape": list(x.shape),
        "p": p,
        "rank": r,
        "kind": type(li.spec).__name__,
        "top_level_s": top,
        "in_cond_s": cond,
      }
    entry["layers"] = layers
    res["configs"].append(entry)
  return res


def _params_at(params, path: str):
  node = params
  for part in path.split("/"):
    node = node[part]
  return node


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="cnn,resnet20,transformer")
  parser.add_argument("--configs", default="gaussian:10,subcolumns:50", help="sketch:rank pairs")
  parser.add_argument("--batch-cnn", type=int, default=128)
  parser.add_argument("--batch-resnet20", type=int, default=64)
  parser.add_argument("--batch-transformer", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--data", choices=("real", "synthetic"), default="real")
  parser.add_argument(
    "--blas-threads",
    type=int,
    default=1,
    help="OpenBLAS threads for jax's LAPACK calls (0: leave as is)",
  )
  parser.add_argument("--out", default=str(_common.RESULTS_DIR / "profile_update.json"))
  args = parser.parse_args(argv)
  blas = _common.limit_blas_threads(args.blas_threads)
  configs = []
  for item in args.configs.split(","):
    sketch, rank = item.split(":")
    configs.append({"sketch": sketch, "rank": int(rank)})
  batch = {
    "cnn": args.batch_cnn,
    "resnet20": args.batch_resnet20,
    "transformer": args.batch_transformer,
  }
  method = (
    "best-of-N wall time of AOT-compiled functions on fixed gradients "
    "and activations; amortised update = (40 plain + 9 statistics + "
    "1 inverse) / 50"
  )
  results: dict[str, Any] = {
    "models": {},
  }
  t0 = time.perf_counter()
  models_ = [m for m in args.models.split(",") if m]
  for m in tqdm(models_, unit="model", file=sys.stderr):
    results["models"][m] = profile_model(m, batch[m], configs, args.repeats, args.data)
  results["wall_s"] = time.perf_counter() - t0
  results["load_average_at_end"] = _common.load_average()
  rec = bresults.record(
    "profile_update", config=bresults.config_of(args, method), metrics=results, blas=blas
  )
  bresults.save(args.out, rec)
  for m, res in results["models"].items():
    print(f"\n{m}: batch {tuple(res['batch_shape'])}, fwd+bwd {1e3 * res['fwd_bwd_s']:.1f} ms")
    for e in res["configs"]:
      cfg = e["config"]
      for variant in ("library",):
        v = e[variant]
        u = v["update_s"]
        print(
          f"  {cfg['sketch']}:{cfg['rank']:<3} {variant:<19} update ms: plain "
          f"{1e3 * u['plain']:8.1f} stats {1e3 * u['statistics']:8.1f} inverse "
          f"{1e3 * u['inverse']:8.1f} amortised {1e3 * v['update_amortised_s']:8.1f} "
          f"({100 * v['update_amortised_over_fwd_bwd']:.1f}% of fwd+bwd)"
        )
      slow = [(k, l) for k, l in e["layers"].items() if l["in_cond_s"] > 2 * l["top_level_s"]]
      for k, l in slow:
        print(
          f"    {k:<42} stats top-level {1e3 * l['top_level_s']:8.1f} ms, in lax.cond "
          f"{1e3 * l['in_cond_s']:8.1f} ms"
        )
      print(f"    naive-loop convolutions in the compiled update: {len(e['naive_loop_convs'])}")
  return rec


if __name__ == "__main__":
  main()
