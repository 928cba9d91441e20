"""Bytes all-reduced per step by data-parallel NysAct: statistics vs gradients.

For each model, the analytic count (gradients: every parameter; statistics:
one ``p x r`` float32 matrix per preconditioned layer, on statistics steps
only) is set against the all-reduce operations XLA keeps in the compiled
train step, on simulated CPU devices:

- ``shard_map``: the step as each device sees it, gradients averaged through
  the loss (``lax.pmean``), statistics through ``axis_name``;
- ``jit``: the batch sharded over a mesh (``AxisType.Explicit``), parameters
  and optimizer state replicated; XLA inserts the reductions.

An all-reduce whose op name lies under ``nysact/statistics`` counts as
statistics; all others as gradients (and the scalar loss). Run:

  python benchmarks/communication.py [--rank 10] [--devices 8]

and it writes ``benchmarks/results/communication.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

DEFAULT_DEVICES = 8
# Import this checkout's nysact_optax when run as a script.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _set_devices(n: int) -> None:
  flag = f"--xla_force_host_platform_device_count={n}"
  if "jax" in sys.modules:
    raise RuntimeError("set the device count before importing jax")
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "s32": 4, "u32": 4, "pred": 1}
_SHAPE = re.compile(r"\b(f32|bf16|f16|f64|s32|u32|pred)\[([0-9,]*)\]")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def all_reduce_bytes(hlo_text: str) -> list[tuple[int, str]]:
  """``(bytes, op_name)`` of every all-reduce in compiled HLO text.

  Counts the result shapes (tuple all-reduces from XLA's combiner count every
  element); ``all-reduce-done`` halves of async pairs are skipped.
  """
  found = []
  for line in hlo_text.splitlines():
    if "=" not in line:
      continue
    _, rhs = line.split("=", 1)
    op = re.search(r"\s(all-reduce(?:-start)?)\(", rhs)
    if op is None:
      continue
    result_type = rhs[: op.start()]
    total = 0
    for dtype, dims in _SHAPE.findall(result_type):
      size = 1
      for d in filter(None, dims.split(",")):
        size *= int(d)
      total += size * _DTYPE_BYTES[dtype]
    name = _OP_NAME.search(line)
    found.append((total, name.group(1) if name else ""))
  return found


def _models():
  import flax.linen as nn

  from nysact_optax.demo import DigitsCNN

  class Block(nn.Module):
    dim: int
    heads: int

    @nn.compact
    def __call__(self, x):
      h = nn.LayerNorm()(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h)
      h = nn.LayerNorm()(x)
      h = nn.Dense(4 * self.dim)(h)
      return x + nn.Dense(self.dim)(nn.gelu(h))

  class Transformer(nn.Module):
    """A ViT-like stack: embedding, ``depth`` pre-norm blocks, a linear head."""

    dim: int = 256
    depth: int = 2
    heads: int = 4

    @nn.compact
    def __call__(self, x):
      x = nn.Dense(self.dim)(x)
      for _ in range(self.depth):
        x = Block(self.dim, self.heads)(x)
      return nn.Dense(10)(nn.LayerNorm()(x).mean(axis=1))

  return {
    "digits_cnn": (DigitsCNN(), (64, 8, 8, 1)),
    "transformer_d256_depth2_tokens64": (Transformer(), (64, 64, 48)),
  }


def measure(model, shape, *, rank, cov_update_every, devices):
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  import nysact_optax

  x = jnp.zeros(shape, jnp.float32)
  y = jnp.zeros((shape[0],), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  apply = nysact_optax.capture_activations(model.apply)
  kwargs = dict(
    rank=rank, cov_update_every=cov_update_every, inv_update_every=10 * cov_update_every
  )

  def step(tx, loss_axis, params, state, x, y):
    def loss_fn(p):
      logits, acts = apply({"params": p}, x)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return (loss if loss_axis is None else jax.lax.pmean(loss, loss_axis)), acts

    (_, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, state = tx.update(grads, state, params, activations=acts)
    return optax.apply_updates(params, updates), state

  # One statistics matrix per preconditioned layer: its state's covariance EMA
  # (p x r; p x p for an exact-mode layer), all-reduced on statistics steps.
  state_shapes = jax.eval_shape(nysact_optax.scale_by_nysact(**kwargs).init, params)
  covs = [ls.cov for ls in nysact_optax.find_nysact_state(state_shapes).layers.values()]
  n_params = sum(a.size for a in jax.tree.leaves(params))
  analytic_stats = sum(c.size * c.dtype.itemsize for c in covs)
  result = {
    "parameters": int(n_params),
    "preconditioned_layers": len(covs),
    "analytic": {
      "gradient_bytes_per_step": int(4 * n_params),
      "statistics_bytes_per_statistics_step": int(analytic_stats),
      "statistics_bytes_per_step_amortised": analytic_stats / cov_update_every,
    },
  }

  mesh = jax.make_mesh((devices,), ("data",), axis_types=(AxisType.Explicit,))
  tx = nysact_optax.nysact(0.1, axis_name="data", **kwargs)
  mapped = jax.jit(
    jax.shard_map(
      lambda *a: step(tx, "data", *a),
      mesh=mesh,
      in_specs=(P(), P(), P("data"), P("data")),
      out_specs=(P(), P()),
    )
  )
  tx_plain = nysact_optax.nysact(0.1, **kwargs)
  with jax.set_mesh(mesh):
    rep = NamedSharding(mesh, P())
    sharded_args = (
      jax.device_put(params, rep),
      jax.device_put(tx_plain.init(params), rep),
      jax.device_put(x, NamedSharding(mesh, P("data"))),
      jax.device_put(y, NamedSharding(mesh, P("data"))),
    )
    compiled = {
      "shard_map": mapped.lower(params, tx.init(params), x, y).compile(),
      "jit": jax.jit(lambda *a: step(tx_plain, None, *a)).lower(*sharded_args).compile(),
    }
  for name, exe in compiled.items():
    ops = all_reduce_bytes(exe.as_text())
    stats = [b for b, op in ops if "nysact/statistics" in op]
    other = [b for b, op in ops if "nysact/statistics" not in op]
    result[f"hlo_{name}"] = {
      "all_reduce_ops": len(ops),
      "statistics_bytes_per_statistics_step": sum(stats),
      "gradient_and_loss_bytes_per_step": sum(other),
      "statistics_all_reduces_inside_lax_cond": all(
        "cond" in op for b, op in ops if "nysact/statistics" in op
      ),
    }
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rank", type=int, default=10)
  parser.add_argument("--cov-update-every", type=int, default=5)
  parser.add_argument("--devices", type=int, default=DEFAULT_DEVICES)
  parser.add_argument(
    "--out", default=os.path.join(os.path.dirname(__file__), "results", "communication.json")
  )
  args = parser.parse_args(argv)
  _set_devices(args.devices)
  from benchmarks import results as bresults  # imports jax: after _set_devices

  results = {"models": {}}
  for name, (model, shape) in _models().items():
    r = measure(
      model, shape, rank=args.rank, cov_update_every=args.cov_update_every, devices=args.devices
    )
    r["input_shape"] = list(shape)
    results["models"][name] = r
    print(name, json.dumps(r, indent=1))
  bresults.write(
    args.out,
    "communication",
    config={"devices": args.devices, "rank": args.rank, "cov_update_every": args.cov_update_every},
    metrics=results,
  )


if __name__ == "__main__":
  main()
