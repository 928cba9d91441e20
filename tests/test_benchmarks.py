"""The benchmark harness (benchmarks/): every optimizer label of the factory
takes a step on a tiny model, every committed result has the schema's
header, and ``python -m benchmarks --help`` lists the suites."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

from benchmarks import _common, optimizers, results, tasks

ROOT = pathlib.Path(__file__).resolve().parent.parent


class _Tiny(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


def _problem():
  model = _Tiny()
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 5))
  y = jnp.arange(8) % 3
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  return model, params, x, y


def _labels():
  out = [("step_time", n) for n in optimizers.STEP_TIME]
  return out + [("quality", n) for n in optimizers.QUALITY]


@pytest.mark.parametrize("harness,label", _labels(), ids=lambda v: str(v))
def test_every_label_takes_a_step(harness, label):
  model, params, x, y = _problem()
  before = jax.tree_util.tree_map(jnp.copy, params)  # K-FAC's step donates params
  if harness == "step_time":
    family = optimizers.STEP_TIME[label].family
  else:
    family, over = optimizers.QUALITY[label]
  if family == "kfac":
    pytest.importorskip("kfac_jax")
    # kfac-jax broadcasts implicitly; the suite's conftest makes that an error
    stack = jax.numpy_rank_promotion("allow")
    stack.__enter__()
    loss = tasks.make_loss(model, stateful=False, tokens=1, capture=False, register_kfac=True)
    vg = jax.value_and_grad(lambda p, batch: loss(p, None, *batch)[0])
    if harness == "step_time":
      opt = optimizers.step_time_kfac(label, vg, has_state=False)
    else:
      opt = optimizers.kfac_optimizer(
        vg, has_state=False, cov_every=1, inv_every=1, l2_reg=5e-4, norm_constraint=1e-2
      )
    state = opt.init(params, jax.random.PRNGKey(0), (x, y))
    new, state, _ = opt.step(
      params,
      state,
      jax.random.PRNGKey(2),
      batch=(x, y),
      learning_rate=jnp.float32(1e-3),
      momentum=jnp.float32(0.9),
      damping=jnp.float32(0.1),
      global_step_int=0,
    )
    stack.__exit__(None, None, None)
  else:
    if harness == "step_time":
      tx = optimizers.step_time_optax(label)
    else:
      tx = optimizers.quality_optax(
        family, 0.01, weight_decay=over.get("weight_decay"), nysact=dict(over.get("nysact", ()))
      )
    needs = optimizers.needs_activations(family)
    loss = tasks.make_loss(model, stateful=False, tokens=1, capture=needs)
    (value, (_, acts)), grads = jax.value_and_grad(loss, has_aux=True)(params, None, x, y)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params, **({"activations": acts} if needs else {}))
    new = optax.apply_updates(params, updates)
    assert jnp.isfinite(value)
  moved = jax.tree_util.tree_map(lambda a, b: jnp.any(a != b), new, before)
  assert any(jax.tree_util.tree_leaves(moved))


def test_every_committed_result_has_the_header():
  paths = sorted(_common.RESULTS_DIR.rglob("*.json"))
  assert len(paths) > 100
  for path in paths:
    rec = results.read(path)
    assert results.has_header(rec), path
    assert list(rec)[: len(results.HEADER_KEYS)] == list(results.HEADER_KEYS), path
    assert "commit_at_write" not in rec or rec["commit"] is not None, path


def test_new_records_have_the_header_first(tmp_path):
  rec = results.write(
    tmp_path / "r.json", "unit", config={"a": 1}, metrics={"b": 2}, curves=[1, 2], quiet=True
  )
  read = results.read(tmp_path / "r.json")
  assert list(read) == [*results.HEADER_KEYS, "config", "metrics", "curves"]
  assert read["commit"]["commit"] == rec["commit"]["commit"]
  assert set(results.THREAD_ENV) <= set(read["threads"])


def test_entry_point_lists_every_suite():
  out = subprocess.run(
    [sys.executable, "-m", "benchmarks", "--help"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=60,
    check=True,
  ).stdout
  from benchmarks.__main__ import SUITES

  for suite in SUITES:
    assert f"  {suite} " in out
