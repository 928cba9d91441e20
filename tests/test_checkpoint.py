"""orbax checkpoints: a resumed run is bitwise identical; mismatches are named."""

import functools

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import nysact_optax
from tests import _params

pytest.importorskip("orbax.checkpoint")

STEPS, SAVE_AT = 11, 6  # refreshes at steps 0, 4, 8: saved between two of them
KWARGS = dict(rank=6, damping=0.5, cov_update_every=2, inv_update_every=4)


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.relu(nn.Conv(4, (3, 3))(x))


class Net(nn.Module):
  width: int = 8

  @nn.compact
  def __call__(self, x):
    x = Block()(x)  # layer path "Block_0/Conv_0": a '/' inside a state key
    x = nn.relu(nn.Dense(self.width)(x.reshape(x.shape[0], -1)))
    return nn.Dense(3)(x)


def _setup(width=8, **kwargs):
  model = Net(width)
  x, y = _params.data((8, 4, 4, 2))
  params = jax.device_put(_params.init_params(model, x))
  tx = nysact_optax.nysact(0.1, weight_decay=1e-3, **dict(KWARGS, **kwargs))
  return model, tx, params, x, y


@functools.cache
def _run():
  """An uninterrupted run, and one saved at step SAVE_AT and resumed from disk
  into a fresh state; both with one compiled step."""
  model, tx, params, x, y = _setup()
  apply = nysact_optax.capture_activations(model.apply)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      logits, acts = apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), acts

    (_, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    return optax.apply_updates(params, updates), opt_state

  return tx, params, step


def test_resumed_run_is_bitwise_identical(tmp_path):
  tx, params0, step = _run()
  run = {"params": params0, "opt_state": tx.init(params0)}
  for i in range(STEPS):
    if i == SAVE_AT:
      nysact_optax.save_checkpoint(tmp_path / "ckpt", run)
      saved = run
    run = dict(zip(("params", "opt_state"), step(run["params"], run["opt_state"])))
  fresh = {"params": params0, "opt_state": tx.init(params0)}
  resumed = nysact_optax.restore_checkpoint(tmp_path / "ckpt", fresh)
  assert jax.tree.structure(resumed) == jax.tree.structure(fresh)
  jax.tree.map(np.testing.assert_array_equal, resumed, saved)
  state = resumed["opt_state"][0]
  assert int(state.count) == SAVE_AT and all(
    int(ls.stat_count) == SAVE_AT // 2 for ls in state.layers.values()
  )
  assert sorted(state.layers) == ["Block_0/Conv_0", "Dense_0", "Dense_1"]
  assert np.abs(state.layers["Dense_0"].basis).max() > 0  # factors exist mid-run
  for _ in range(SAVE_AT, STEPS):  # crosses the refresh at step 8
    resumed = dict(zip(("params", "opt_state"), step(resumed["params"], resumed["opt_state"])))
  jax.tree.map(np.testing.assert_array_equal, resumed, run)


def _saved_state(tmp_path):
  tx, params, _ = _run()
  path = tmp_path / "ckpt"
  nysact_optax.save_checkpoint(path, {"opt_state": tx.init(params)})
  return path


def test_restoring_another_rank_names_the_layers_and_shapes(tmp_path):
  path = _saved_state(tmp_path)
  _, tx, params, _, _ = _setup(rank=3)
  with pytest.raises(ValueError) as error:
    nysact_optax.restore_checkpoint(path, {"opt_state": tx.init(params)})
  message = str(error.value)
  assert (
    "layer 'Dense_0': cov has shape (65, 6) in the checkpoint but (65, 3) in "
    "the target (p, rank): the checkpoint was written with rank 6, the target "
    "expects rank 3" in message
  )
  assert "layer 'Block_0/Conv_0': basis has shape (19, 6) in the checkpoint but (19, 3)" in message
  assert "layer 'Dense_1': eigvals has shape (6,) in the checkpoint but (3,)" in message


def test_restoring_other_layers_names_them(tmp_path):
  path = _saved_state(tmp_path)
  _, tx, params, _, _ = _setup(exclude=["Dense_1"])
  with pytest.raises(
    ValueError,
    match=(
      r"the NysAct state at \['opt_state'\]\['0'\] preconditions different layers: "
      r"only in the checkpoint: \['Dense_1'\], only in the target: \[\]"
    ),
  ):
    nysact_optax.restore_checkpoint(path, {"opt_state": tx.init(params)})


def test_restoring_another_model_names_input_width_and_leaves(tmp_path):
  path = _saved_state(tmp_path)
  _, tx, params, _, _ = _setup(width=5)
  with pytest.raises(ValueError) as error:
    nysact_optax.restore_checkpoint(path, {"opt_state": tx.init(params)})
  message = str(error.value)
  assert (
    "layer 'Dense_1': cov has shape (9, 6) in the checkpoint but (6, 6) in the "
    "target (p, rank): the checkpoint was written with rank 6, the target "
    "expects rank 6 and input width p=9, not p=6" in message
  )
  assert (
    "['opt_state']['2']['trace']['Dense_0']['kernel'] has shape (64, 8) in the "
    "checkpoint but (64, 5) in the target" in message
  )


def test_restore_places_arrays_on_the_target_shardings(tmp_path):
  path = _saved_state(tmp_path)
  tx, params, _ = _run()
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  target = jax.device_put({"opt_state": tx.init(params)}, NamedSharding(mesh, P()))
  restored = nysact_optax.restore_checkpoint(path, target)
  same = jax.tree.map(
    lambda a, b: a.sharding == b.sharding and a.dtype == b.dtype, restored, target
  )
  assert all(jax.tree.leaves(same))
  jax.tree.map(np.testing.assert_array_equal, restored, target)
