"""Two processes with 4 CPU devices each (``jax.distributed`` on localhost, gloo
collectives) train on one global mesh and match a single process.

This is the multi-host GPU/TPU recipe of the README's "Distributed training"
section, on CPUs: each process feeds only its own rows of the global batch.
The file is also the worker: ``python -m tests.test_multiprocess PID PORT OUT``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests import _params

BATCH, STEPS, PROCESSES, LOCAL_DEVICES = 16, 6, 2, 4
# Dense_0 (p = 13) gets a rank-4 Nystrom approximation, Dense_1 (p = 9) is exact.
KWARGS = dict(rank=4, damping=0.5, cov_update_every=2, inv_update_every=4)


def train(
  process_index: int, process_count: int, distributed: bool = True
) -> dict[str, np.ndarray]:
  """``STEPS`` NysAct steps on a mesh over every device of every process, or
  on one device with ``distributed=False``."""
  import flax.linen as nn
  import jax
  import optax
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  import nysact_optax

  model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
  apply = nysact_optax.capture_activations(model.apply)
  tx = nysact_optax.nysact(0.1, weight_decay=1e-3, **KWARGS)
  x, y = _params.data((BATCH, 12))
  params = _params.init_params(model, x[:1])

  def step(params, state, x, y):
    def loss_fn(p):
      logits, acts = apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), acts

    (_, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, state = tx.update(grads, state, params, activations=acts)
    return optax.apply_updates(params, updates), state

  if not distributed:
    state, step = tx.init(params), jax.jit(step)
    for _ in range(STEPS):
      params, state = step(params, state, x, y)
    return _results(params, state, np.asarray)

  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Explicit,))
  replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  mine = slice(process_index * BATCH // process_count, (process_index + 1) * BATCH // process_count)
  with jax.set_mesh(mesh):
    # Every process holds the same initial parameters and only its rows.
    params = jax.tree.map(
      lambda a: jax.make_array_from_callback(a.shape, replicated, lambda i: a[i]), params
    )
    xg = jax.make_array_from_process_local_data(rows, x[mine], x.shape)
    yg = jax.make_array_from_process_local_data(rows, y[mine], y.shape)
    state = jax.jit(tx.init, out_shardings=replicated)(params)
    step = jax.jit(step)
    for _ in range(STEPS):
      params, state = step(params, state, xg, yg)
  return _results(params, state, lambda a: np.asarray(a.addressable_data(0)))


def _results(params, state, local):
  """Parameters, statistics and eigenvalues as named numpy arrays."""
  import jax

  out = {
    f"params/{jax.tree_util.keystr(k)}": local(v)
    for k, v in jax.tree_util.tree_leaves_with_path(params)
  }
  for name, layer in state[0].layers.items():
    out[f"cov/{name}"] = local(layer.cov)
    out[f"eigvals/{name}"] = local(layer.eigvals)
  return out


def _worker(process_id: int, port: int, out: str) -> None:
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=PROCESSES,
    process_id=process_id,
  )
  if jax.process_count() != PROCESSES or jax.local_device_count() != LOCAL_DEVICES:
    raise RuntimeError(
      f"got {jax.process_count()} processes with {jax.local_device_count()} devices each"
    )
  np.savez(out, **train(jax.process_index(), jax.process_count()))
  jax.distributed.shutdown()


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path):
  import jax

  if jax.device_count() < PROCESSES * LOCAL_DEVICES:
    pytest.skip("needs 8 devices (tests/conftest.py simulates them)")
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"
  env["PYTHONPATH"] = os.pathsep.join(
    [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    + [p for p in [env.get("PYTHONPATH")] if p]
  )
  port = _free_port()
  outs = [tmp_path / f"process{i}.npz" for i in range(PROCESSES)]
  procs = [
    subprocess.Popen(
      [sys.executable, "-m", "tests.test_multiprocess", str(i), str(port), str(out)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i, out in enumerate(outs)
  ]
  expected = train(0, 1, distributed=False)  # meanwhile, one device on the whole batch
  logs = []
  try:
    for proc in procs:
      logs.append(proc.communicate(timeout=300)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
  for i, proc in enumerate(procs):
    assert proc.returncode == 0, f"process {i} failed:\n{logs[i][-3000:]}"
  results = [dict(np.load(out)) for out in outs]
  assert sorted(results[0]) == sorted(expected)
  for name, want in expected.items():
    np.testing.assert_array_equal(results[1][name], results[0][name])  # one model
    np.testing.assert_allclose(
      results[0][name], want, rtol=2e-5, atol=2e-5 * np.abs(want).max(), err_msg=name
    )


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
