"""What an accelerator's reduced-precision matmuls do to NysAct's preconditioner.

On TPU a float32 product at ``jax.lax.Precision.DEFAULT`` is one bf16 pass
(operands rounded to 8 significant bits, products accumulated in float32), at
``HIGH`` three bf16 passes; on recent NVIDIA GPUs ``DEFAULT`` and ``HIGH`` are
TF32 (11 significant bits). XLA:CPU ignores the precision, so this script
emulates it: it traces the library's own statistics, factorisation and apply
functions to jaxprs and evaluates them with every ``dot_general`` and
``conv_general_dilated`` fed operands rounded (round to nearest even, by bit
operations) to the chosen format; bf16_3x is ``hi*hi + hi*lo + lo*hi`` with
``hi = bf16(x)``, ``lo = bf16(x - hi)``. A bf16 or TF32 product of rounded
operands is exact in float32, so this is what the accelerator computes up to
the order of the float32 accumulation.

Activations and gradients are real: each model trains ``--train-steps`` steps
with NysAct at its defaults on its real data, then one batch is captured.
Per layer, the exact covariance ``C`` (identity sketch, float32 products,
float64 eigendecomposition) gives the exact damped inverse
``P* = (C + rho I)^{-1}``; the statistics ``Y = C S`` of the same batch
(rank ``r``, the default stable Nyström, an orthonormal Gaussian sketch; exact
mode when ``p <= r``) go through the factorisation and the apply with each
phase's products emulated. Reported per layer:

* ``p_err``: ``||P - P*||_F / ||P*||_F`` of the applied operator
  ``P = apply(I)``;
* ``pg_err``: ``||P G - P* G||_F / ||P* G||_F`` for the layer's real gradient
  ``G`` (the gradient lies mostly in the covariance's top directions, where
  the apply's cancellation is);
* ``lam_min``: the smallest eigenvalue of the symmetric part of ``apply(I)``
  divided by that of ``P*`` (``1 / (lam_max(C) + rho)``); below 0, ``P`` is
  indefinite. It is computed exactly from the rank-``2r`` part
  ``apply(I) - I / rho``;
* ``y_err``: the statistics' relative error against float32.

Usage (from the repository root; 20 min on a loaded 2-core CPU)::

  python -m benchmarks.precision
  python -m benchmarks.precision --models cnn --dampings 1 --train-steps 0
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import nysact_optax
from benchmarks import _common, tasks
from benchmarks import results as bresults
from nysact_optax import ConvSpec, DenseSpec, LayerInputs, linalg

PRODUCTS = ("dot_general", "conv_general_dilated")
FORMATS = ("f32", "tf32", "bf16", "bf16_3x")
# (name, statistics, factors, apply) formats; "f32" is what HIGHEST computes.
CONFIGS = (
  ("float32", "f32", "f32", "f32"),
  ("stats_tf32", "tf32", "f32", "f32"),
  ("factors_tf32", "f32", "tf32", "f32"),
  ("apply_tf32", "f32", "f32", "tf32"),
  ("all_tf32", "tf32", "tf32", "tf32"),
  ("stats_bf16", "bf16", "f32", "f32"),
  ("factors_bf16", "f32", "bf16", "f32"),
  ("apply_bf16", "f32", "f32", "bf16"),
  ("all_bf16", "bf16", "bf16", "bf16"),
  ("all_bf16_3x", "bf16_3x", "bf16_3x", "bf16_3x"),
)
# Not emulated: the library at each precision= setting on this backend (on
# CPU all equal "float32"; on a GPU or TPU, what the hardware does).
DEVICE_CONFIGS = (
  ("device_highest", "highest"),
  ("device_high", "high"),
  ("device_default", "default"),
)
MEANING = {
  "tf32": "GPU (A100/H100) at DEFAULT or HIGH",
  "bf16": "TPU at DEFAULT",
  "bf16_3x": "TPU at HIGH",
  "f32": "HIGHEST (and any precision on CPU)",
}


# --------------------------------------------------------------------------
# Emulated reduced-precision products
# --------------------------------------------------------------------------


def round_mantissa(x: jax.Array, bits: int) -> jax.Array:
  """``x`` (float32) rounded to ``bits`` explicit mantissa bits, nearest even.

  bf16 keeps 7, TF32 10 (float32: 23); the exponent range is float32's.

  Examples:
    >>> import numpy as np
    >>> x = jnp.asarray(np.random.default_rng(0).standard_normal(1000), jnp.float32)
    >>> bool((round_mantissa(x, 7) == x.astype(jnp.bfloat16).astype(jnp.float32)).all())
    True
  """
  drop = 23 - bits
  u = lax.bitcast_convert_type(x, jnp.uint32)
  lsb = (u >> drop) & 1
  u = (u + jnp.uint32((1 << (drop - 1)) - 1) + lsb) & jnp.uint32(~((1 << drop) - 1) & 0xFFFFFFFF)
  out = lax.bitcast_convert_type(u, jnp.float32)
  return jnp.where(jnp.isfinite(x), out, x)


def _bf16(x):
  return round_mantissa(x, 7)


def _product(eqn, a, b, fmt: str):
  """One ``dot_general``/``conv_general_dilated`` as ``fmt`` computes it.

  Every product runs at ``HIGHEST``, so that the emulation is exact on a GPU
  or TPU too (its own reduced precision would add to the emulated one).
  """
  highest = lax.Precision.HIGHEST
  params = dict(eqn.params, precision=(highest, highest))

  def bind(x, y):
    return eqn.primitive.bind(x, y, **params)

  if fmt == "f32" or a.dtype != jnp.float32 or b.dtype != jnp.float32:
    return bind(a, b)
  if fmt == "tf32":
    return bind(round_mantissa(a, 10), round_mantissa(b, 10))
  if fmt == "bf16":
    return bind(_bf16(a), _bf16(b))
  if fmt == "bf16_3x":
    a_hi, b_hi = _bf16(a), _bf16(b)
    a_lo, b_lo = _bf16(a - a_hi), _bf16(b - b_hi)
    return bind(a_hi, b_lo) + bind(a_lo, b_hi) + bind(a_hi, b_hi)
  raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")


def _eval(jaxpr, consts, args, fmt):
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jax.extend.core.Literal) else env[v]

  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    vals = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name in PRODUCTS:
      outs = [_product(eqn, *vals, fmt)]
    elif name in ("pjit", "jit", "closed_call", "core_call"):
      sub = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
      outs = _eval(sub.jaxpr, sub.consts, vals, fmt)
    elif name in ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"):
      sub = eqn.params.get("call_jaxpr") or eqn.params.get("fun_jaxpr")
      outs = _eval(sub.jaxpr, sub.consts, vals, fmt)
    elif name == "cond":
      index, *ops = vals
      sub = eqn.params["branches"][int(index)]
      outs = _eval(sub.jaxpr, sub.consts, ops, fmt)
    else:
      outs = eqn.primitive.bind(*vals, **eqn.params)
      if not eqn.primitive.multiple_results:
        outs = [outs]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def emulated(fn: Callable, fmt: str) -> Callable:
  """``fn`` with every product's operands rounded to ``fmt`` (eager).

  ``fmt="device"`` is ``fn`` itself: its products at the precision the
  library requests, as this backend computes them.
  """
  if fmt == "device":
    return fn

  def run(*args):
    flat, tree = jax.tree_util.tree_flatten(args)
    closed, out_shape = jax.make_jaxpr(
      lambda *f: fn(*jax.tree_util.tree_unflatten(tree, f)), return_shape=True
    )(*flat)
    outs = _eval(closed.jaxpr, closed.consts, flat, fmt)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

  return run


# --------------------------------------------------------------------------
# Real activations and gradients
# --------------------------------------------------------------------------


def capture(model: str, batch_size: int, train_steps: int, seed: int):
  """``(task, inputs, grads)`` after ``train_steps`` NysAct steps: each layer's
  captured inputs and gradient matrix (:func:`gradient_matrices`), by name."""
  task = tasks.build_task(model, batch_size, seed=seed, n_batches=11)
  loss = tasks.batch_loss(task, capture=True)
  tx = nysact_optax.nysact(0.05, momentum=0.9)
  params, model_state = task.params, task.model_state
  opt_state = tx.init(params)

  @jax.jit
  def step(params, model_state, opt_state, batch):
    (_, (model_state, acts)), grads = jax.value_and_grad(loss, has_aux=True)(
      params, model_state, batch
    )
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    return optax.apply_updates(params, updates), model_state, opt_state

  for i in range(train_steps):
    params, model_state, opt_state = step(params, model_state, opt_state, task.batches[i % 10])
  (_, (_, acts)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
    params, model_state, task.batches[10]
  )
  return task, dict(sorted(acts.items())), gradient_matrices(grads, acts)


def _key_name(key: Any) -> str:
  return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def gradient_matrices(grads: Any, acts: dict[str, LayerInputs]) -> dict[str, jax.Array]:
  """Each captured layer's gradient as the ``p x o`` matrix ``P`` acts on (float32).

  Kernel rows, then the bias row, as ``nysact_optax.linalg.precondition``
  takes it. The layers of these models (flax ``Dense``, ``DenseGeneral``,
  ``Conv``) have their input axes first in the kernel, so the kernel rows are
  ``kernel.reshape(p_in, o)``; other layouts (``Einsum``, stacked layers) are
  refused.

  Examples:
    >>> from nysact_optax import DenseSpec, LayerInputs
    >>> grads = {"head": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    >>> acts = {"head": LayerInputs([jnp.ones((5, 3))], DenseSpec())}
    >>> gradient_matrices(grads, acts)["head"].shape  # p = 3 inputs + 1 for the bias
    (4, 2)
  """
  flat = {
    "/".join(_key_name(k) for k in path): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]
  }
  out = {}
  for name, layer in sorted(acts.items()):
    kernel = flat[f"{name}/kernel"]
    lead = [int(np.prod(kernel.shape[:i])) for i in range(1, kernel.ndim)]
    p_in = layer.spec.input_width(layer.inputs[0].shape)
    if not isinstance(layer.spec, DenseSpec | ConvSpec) or p_in not in lead:
      raise ValueError(f"layer {name!r}: kernel {kernel.shape} has no leading input axes")
    g = kernel.reshape(p_in, -1).astype(jnp.float32)
    bias = flat.get(f"{name}/bias")
    if bias is not None:
      g = jnp.concatenate([g, bias.reshape(1, -1).astype(jnp.float32)])
    out[name] = g
  return out


# --------------------------------------------------------------------------
# One layer
# --------------------------------------------------------------------------


def _lam_min_of_applied(m: np.ndarray, rho: float, rank: int, seed: int = 0) -> float:
  """Smallest eigenvalue of ``sym(m)`` where ``m - I / rho`` has rank ``<= 2 rank``.

  ``sym(m) - I/rho`` is found on its range (a randomized range finder with 20
  extra columns: exact for a rank-``2r`` matrix), its other eigenvalues are
  0 (round-off of the float32 ``g / rho`` term aside).
  """
  p = m.shape[0]
  k = 0.5 * (m + m.T) - np.eye(p) / rho
  if p <= 4 * rank + 40:
    return float(np.linalg.eigvalsh(k)[0] + 1 / rho)
  omega = np.random.default_rng(seed).standard_normal((p, 2 * rank + 20))
  q, _ = np.linalg.qr(k @ omega)
  low = np.linalg.eigvalsh(q.T @ k @ q)[0]
  return float(min(low, 0.0) + 1 / rho)


def study_layer(
  inputs: LayerInputs,
  g: jax.Array,
  *,
  rank: int,
  dampings: Sequence[float],
  seed: int,
  device_configs: bool = False,
):
  """Every configuration's errors for one layer (its inputs and ``p x o``
  gradient matrix), at each damping."""
  p = int(g.shape[0])
  exact_mode = rank >= p
  r = p if exact_mode else rank
  has_bias = p == inputs.spec.input_width(inputs.inputs[0].shape) + 1
  ident = linalg.draw_sketch(jax.random.PRNGKey(0), p, p, "gaussian")
  cov = np.asarray(linalg.sketched_covariance(inputs, ident, has_bias), np.float64)
  cov = 0.5 * (cov + cov.T)
  evals, evecs = np.linalg.eigh(cov)
  evals = np.maximum(evals, 0.0)
  s = linalg.draw_sketch(jax.random.PRNGKey(seed), p, r, "gaussian", orthonormal=True)
  g64 = np.asarray(g, np.float64)
  eye = jnp.eye(p, dtype=jnp.float32)

  def stats_fn(inputs, s, precision="highest"):
    return linalg.sketched_covariance(
      inputs, linalg.Sketch(s), has_bias, precision=lax.Precision(precision)
    )

  def factors_fn(y, s, rho):
    return linalg.exact_eigh(y) if exact_mode else linalg.nystrom_stable(y, s, rho)

  def apply_fn(g, u, lam, rho, precision="highest"):
    return linalg.precondition(g, u, lam, rho, precision=lax.Precision(precision))

  ys = {fmt: emulated(stats_fn, fmt)(inputs, s.matrix) for fmt in FORMATS}
  configs = [(name, a, b, c, None) for name, a, b, c in CONFIGS]
  if device_configs:
    for name, precision in DEVICE_CONFIGS:
      ys[name] = stats_fn(inputs, s.matrix, precision)
      configs.append((name, name, "device", "device", precision))
  out: dict[str, Any] = {
    "p": p,
    "out": int(g.shape[1]),
    "rank": r,
    "exact_mode": exact_mode,
    "lam_max": float(evals[-1]),
    "by_damping": {},
  }
  for rho in dampings:
    p_star = (evecs / (evals + rho)) @ evecs.T
    pg_star = p_star @ g64
    lam_min_star = 1.0 / (evals[-1] + rho)
    rows = {}
    for name, f_stats, f_factors, f_apply, precision in configs:
      y = ys[f_stats]
      u, lam = emulated(factors_fn, f_factors)(y, s.matrix, jnp.float32(rho))
      run_apply = emulated(apply_fn, f_apply)
      if precision is not None:
        run_apply = functools.partial(run_apply, precision=precision)
      m = np.asarray(run_apply(eye, u, lam, jnp.float32(rho)), np.float64)
      pg = np.asarray(run_apply(g, u, lam, jnp.float32(rho)), np.float64)
      lam_min = _lam_min_of_applied(m, rho, r)
      rows[name] = {
        "y_err": float(
          np.linalg.norm(np.asarray(y, np.float64) - np.asarray(ys["f32"]))
          / np.linalg.norm(np.asarray(ys["f32"], np.float64))
        ),
        "p_err": float(np.linalg.norm(m - p_star) / np.linalg.norm(p_star)),
        "pg_err": float(np.linalg.norm(pg - pg_star) / np.linalg.norm(pg_star)),
        "lam_min": lam_min / lam_min_star,
        "finite": bool(np.isfinite(m).all() and np.isfinite(pg).all()),
      }
    base = rows["float32"]
    for row in rows.values():
      row["p_err_ratio"] = row["p_err"] / base["p_err"]
      row["pg_err_ratio"] = row["pg_err"] / base["pg_err"]
    out["by_damping"][str(rho)] = {"lam_max_over_rho": float(evals[-1] / rho), "configs": rows}
  return out


def summarise(layers_out: dict[str, Any], dampings: Sequence[float]) -> dict[str, Any]:
  """Per damping, layer kind (Nyström or exact mode) and configuration: the
  worst ratio to float32 over the layers.

  The two kinds are kept apart: an exact-mode layer's float32 error is
  float32 round-off (1e-7), a Nyström layer's is the rank truncation (1e-2 and
  up), so ratios to float32 mean different things.
  """
  summary = {}
  for rho in dampings:
    for kind, exact in (("nystrom", False), ("exact", True)):
      picked = [lo for lo in layers_out.values() if lo["exact_mode"] == exact]
      if picked:
        summary[f"{rho}/{kind}"] = _summary_rows(picked, rho)
  return summary


def _summary_rows(layers_out, rho):
  per = {}
  for name in layers_out[0]["by_damping"][str(rho)]["configs"]:
    rows = [lo["by_damping"][str(rho)]["configs"][name] for lo in layers_out]
    per[name] = {
      "p_err_max": max(r["p_err"] for r in rows),
      "pg_err_max": max(r["pg_err"] for r in rows),
      "p_err_ratio_max": max(r["p_err_ratio"] for r in rows),
      "pg_err_ratio_max": max(r["pg_err_ratio"] for r in rows),
      "pg_err_ratio_median": float(np.median([r["pg_err_ratio"] for r in rows])),
      "lam_min_min": min(r["lam_min"] for r in rows),
      "indefinite_layers": sum(r["lam_min"] <= 0 for r in rows),
      "non_finite_layers": sum(not r["finite"] for r in rows),
      "layers": len(rows),
      "lam_max_over_rho_max": max(
        lo["by_damping"][str(rho)]["lam_max_over_rho"] for lo in layers_out
      ),
    }
  return per


def plot(results: dict[str, Any], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = [
    (m, rho)
    for m in results["metrics"]["models"]
    for rho in results["metrics"]["models"][m]["summary"]
  ]
  fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 7), squeeze=False)
  for j, (model, rho) in enumerate(panels):
    summ = results["metrics"]["models"][model]["summary"][rho]
    names = list(summ)
    ax = axes[0][j]
    ax.bar(range(len(names)), [summ[n]["pg_err_ratio_max"] for n in names], color="C0")
    ax.axhline(2.0, color="k", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_title(f"{model}, damping {rho} layers", fontsize=9)
    ax.set_ylabel("worst layer: error of P G / float32's")
    ax.set_xticks(range(len(names)), names, rotation=70, fontsize=7)
    ax = axes[1][j]
    vals = [summ[n]["lam_min_min"] for n in names]
    ax.bar(range(len(names)), vals, color=["C3" if v <= 0 else "C2" for v in vals])
    ax.axhline(0.0, color="k", lw=1)
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_ylabel("worst layer: lam_min(P) / lam_min(P*)")
    ax.set_xticks(range(len(names)), names, rotation=70, fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--models", default="cnn,transformer", help="comma-separated subset of cnn,resnet20,transformer"
  )
  parser.add_argument("--rank", type=int, default=10)
  parser.add_argument(
    "--dampings",
    default="1,0.01",
    help="comma-separated rho (1: the library's default; 0.01: the authors' CIFAR default)",
  )
  parser.add_argument(
    "--train-steps", type=int, default=50, help="NysAct steps before the activations are captured"
  )
  parser.add_argument("--batch-cnn", type=int, default=128)
  parser.add_argument("--batch-resnet20", type=int, default=64)
  parser.add_argument("--batch-transformer", type=int, default=8)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--device-configs",
    choices=("auto", "yes", "no"),
    default="auto",
    help="also run the library at precision=highest/high/default on "
    "this backend, unemulated (auto: on a GPU or TPU)",
  )
  parser.add_argument("--blas-threads", type=int, default=1)
  parser.add_argument("--out", default=str(_common.RESULTS_DIR / "precision.json"))
  parser.add_argument("--plot", default=None)
  args = parser.parse_args(argv)
  blas = _common.limit_blas_threads(args.blas_threads)
  dampings = [float(d) for d in args.dampings.split(",")]
  device_configs = args.device_configs == "yes" or (
    args.device_configs == "auto" and jax.default_backend() != "cpu"
  )
  method = (
    "library functions traced to jaxprs and evaluated with every dot_general/"
    "conv_general_dilated fed operands rounded to the format (round to nearest "
    "even; bf16_3x as hi*hi+hi*lo+lo*hi), float32 accumulation; exact damped "
    "inverse from the identity-sketch covariance (float32 products, float64 "
    "eigh); ratios against the same layer's float32 (HIGHEST) error"
  )
  results: dict[str, Any] = {
    "formats": MEANING,
    "configs": {n: {"statistics": a, "factors": b, "apply": c} for n, a, b, c in CONFIGS},
    "models": {},
  }
  t0 = time.perf_counter()
  batch = {
    "cnn": args.batch_cnn,
    "resnet20": args.batch_resnet20,
    "transformer": args.batch_transformer,
  }
  for model in [m for m in args.models.split(",") if m]:
    task, inputs, gmat = capture(model, batch[model], args.train_steps, args.seed)
    layers_out = {}
    for name in inputs:
      print(f"{model}/{name}: p={gmat[name].shape[0]}", file=sys.stderr, flush=True)
      layers_out[name] = study_layer(
        inputs[name],
        gmat[name],
        rank=args.rank,
        dampings=dampings,
        seed=args.seed,
        device_configs=device_configs,
      )
    results["models"][model] = {
      "description": task.description,
      "batch_shape": list(task.batch_shape),
      "train_steps": args.train_steps,
      "layers": layers_out,
      "summary": summarise(layers_out, dampings),
    }
  results["wall_s"] = time.perf_counter() - t0
  rec = bresults.record(
    "precision", config=bresults.config_of(args, method), metrics=results, blas=blas
  )
  bresults.save(args.out, rec, plot=plot, plot_path=getattr(args, "plot", None))
  for model, res in results["models"].items():
    for rho, per in res["summary"].items():
      print(f"\n{model}, damping {rho}: worst layer of {per['float32']['layers']}")
      print(
        f"  {'config':<14}{'P err':>10}{'x f32':>9}{'PG err':>10}{'x f32':>9}"
        f"{'lam_min/lam*':>14}{'indefinite':>12}"
      )
      for name, row in per.items():
        print(
          f"  {name:<14}{row['p_err_max']:>10.2e}{row['p_err_ratio_max']:>9.3g}"
          f"{row['pg_err_max']:>10.2e}{row['pg_err_ratio_max']:>9.3g}"
          f"{row['lam_min_min']:>14.3g}{row['indefinite_layers']:>12d}"
        )
  return rec


if __name__ == "__main__":
  main()
