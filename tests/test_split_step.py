"""Gradients and update in separate jitted functions (Flax's mnist example).

Flax's linen mnist example computes the gradients in one jitted function,
``apply_model(state, images, labels)``, which it also uses to evaluate the
test set, and applies them in another, ``update_model(state, grads)``. With
``nysact_optax.value_and_grad(..., statistics_for=state.opt_state)`` the
gradients carry the ``p x r`` sketched statistics across the boundary
(:class:`nysact_optax.GradsWithStatistics`) and the layer inputs die inside
``apply_model``: the script changes in three lines, trains as the fused step
does, and its evaluation returns no activations.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import nysact_optax
from nysact_optax import _accumulate
from tests import _params
from tests.test_examples import _edit, _run

STEPS = 4
PERIODS = dict(rank=6, cov_update_every=2, inv_update_every=2)


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.avg_pool(nn.relu(nn.Conv(8, (3, 3))(x)), (2, 2), (2, 2))
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


MODEL = CNN()


@functools.cache
def _data():
  x, y = _params.data((3 * 32, 8, 8, 1), classes=10)
  return _params.init_params(MODEL, x[:1]), x[:64], y[:64], x[64:], y[64:]


# Flax's examples/mnist/train.py, trimmed: the two jitted functions, the
# TrainState, the test-set evaluation through apply_model.
MNIST = """
from flax.training import train_state


@jax.jit
def apply_model(state, images, labels):
  def loss_fn(params):
    logits = state.apply_fn({"params": params}, images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, logits

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, logits), grads = grad_fn(state.params)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return grads, loss, accuracy


@jax.jit
def update_model(state, grads):
  return state.apply_gradients(grads=grads)


def create_train_state(params):
  tx = optax.sgd(0.1, 0.9)
  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def train(steps):
  global state, test_loss
  state = create_train_state(params)
  losses = []
  for i in range(steps):
    idx = np.arange(i * 16, (i + 1) * 16) % len(x_train)
    grads, loss, accuracy = apply_model(state, x_train[idx], y_train[idx])
    state = update_model(state, grads)
    losses.append(loss)
  _, test_loss, test_accuracy = apply_model(state, x_test, y_test)
  return losses
"""

OPTIMIZERS = {
  "nysact": "nysact_optax.nysact(0.1, momentum=0.9, **periods)",
  "nysact_adam": "nysact_optax.nysact_adam(1e-2, **periods)",
}
GRAD_FN = (
  "  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)",
  "  grad_fn = nysact_optax.value_and_grad(loss_fn, has_aux=True, statistics_for=state.opt_state)",
)


def _split(optimizer: str, train_state_class: bool) -> str:
  """Flax's script with its three lines changed."""
  edits = {"optimizer": ("  tx = optax.sgd(0.1, 0.9)", f"  tx = {optimizer}"), "gradient": GRAD_FN}
  if train_state_class:  # the TrainState class, whose apply_gradients is kept
    edits["class"] = (
      "  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)",
      "  return nysact_optax.TrainState.create(apply_fn=model.apply, params=params, tx=tx)",
    )
  else:
    edits["update"] = (
      "  return state.apply_gradients(grads=grads)",
      "  return nysact_optax.apply_gradients(state, grads=grads)",
    )
  return _edit(MNIST, edits)


def _fused(tx, params, x_train, y_train, steps):
  """The README's fused train step with ``activations=``, on the same batches."""
  state = nysact_optax.TrainState.create(apply_fn=MODEL.apply, params=params, tx=tx)

  @jax.jit
  def train_step(state, images, labels):
    def loss_fn(params):
      logits = state.apply_fn({"params": params}, images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    (loss, grads), acts = nysact_optax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads, activations=acts), loss

  for i in range(steps):
    idx = np.arange(i * 16, (i + 1) * 16) % len(x_train)
    state, _ = train_step(state, x_train[idx], y_train[idx])
  return state


@pytest.mark.parametrize(
  "optimizer, train_state_class",
  [("nysact", False), ("nysact_adam", False), ("nysact", True)],
)
def test_split_step_changes_three_lines_and_matches_the_fused_step(optimizer, train_state_class):
  params, x_train, y_train, x_test, y_test = _data()
  ns = _run(
    _split(OPTIMIZERS[optimizer], train_state_class),
    STEPS,
    model=MODEL,
    params=params,
    x_train=x_train,
    y_train=y_train,
    x_test=x_test,
    y_test=y_test,
    periods=PERIODS,
  )
  assert np.all(np.isfinite(ns["losses"])) and np.isfinite(ns["test_loss"])
  tx = eval(OPTIMIZERS[optimizer], {"nysact_optax": nysact_optax, "periods": PERIODS})
  fused = _fused(tx, params, x_train, y_train, STEPS)
  assert int(ns["state"].step) == int(fused.step) == STEPS
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
    ns["state"].params,
    fused.params,
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
    nysact_optax.find_nysact_state(ns["state"].opt_state).layers,
    nysact_optax.find_nysact_state(fused.opt_state).layers,
  )


def _memory(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis()


def test_evaluation_through_apply_model_returns_no_activations(monkeypatch):
  """The compiled ``apply_model`` of the split form outputs the gradients and
  ``p x r`` statistics, where the form that returns the activations outputs
  them all; its temporaries exceed the plain optax program's by a bound that
  does not grow with the test set."""
  monkeypatch.setattr(_accumulate, "CHUNK_EXAMPLES", 64)  # the chunked path at test size
  params, *_ = _data()
  tx = nysact_optax.nysact(0.1, momentum=0.9, **PERIODS)
  state = nysact_optax.TrainState.create(apply_fn=MODEL.apply, params=params, tx=tx)

  def loss_fn(state, images, labels):
    def loss(params):
      logits = state.apply_fn({"params": params}, images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    return loss

  def plain(state, images, labels):
    (loss, _), grads = jax.value_and_grad(loss_fn(state, images, labels), has_aux=True)(
      state.params
    )
    return grads, loss

  def with_activations(state, images, labels):  # the 10-line form
    ((loss, _), grads), acts = nysact_optax.value_and_grad(
      loss_fn(state, images, labels), has_aux=True
    )(state.params)
    return grads, acts, loss

  def split(state, images, labels):
    (loss, _), grads = nysact_optax.value_and_grad(
      loss_fn(state, images, labels), has_aux=True, statistics_for=state.opt_state
    )(state.params)
    return grads, loss

  stats_bytes = sum(
    ls.cov.size * ls.cov.dtype.itemsize
    for ls in nysact_optax.find_nysact_state(state.opt_state).layers.values()
  )
  extra_temp, act_bytes_of = {}, {}
  for n in (256, 1024, 4096):
    images = jax.ShapeDtypeStruct((n, 8, 8, 1), jnp.float32)
    labels = jax.ShapeDtypeStruct((n,), jnp.int32)
    acts = jax.eval_shape(with_activations, state, images, labels)[1]
    act_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(acts))
    p, a, s = (_memory(f, state, images, labels) for f in (plain, with_activations, split))
    assert a.output_size_in_bytes >= p.output_size_in_bytes + act_bytes
    # and 8 bytes of the output tuple's index per statistics array
    assert s.output_size_in_bytes <= p.output_size_in_bytes + stats_bytes + 8 * 4
    extra_temp[n] = s.temp_size_in_bytes - p.temp_size_in_bytes
    act_bytes_of[n] = act_bytes
  # The statistics' temporaries are those of one chunk: bounded as the test
  # set grows 16-fold (measured: 428, 176 and 0.5 KB of 0.5, 2 and 7.9 MB).
  assert all(extra < act_bytes_of[256] for extra in extra_temp.values()), extra_temp
  assert extra_temp[4096] < act_bytes_of[4096] / 10, (extra_temp, act_bytes_of)


def test_chunked_statistics_equal_the_whole_batch(monkeypatch):
  """A batch larger than a chunk (here 40 examples in chunks of 13 and a
  remainder of 1) gives the statistics of the whole batch."""
  params, x_train, y_train, *_ = _data()
  x, y = x_train[:40], y_train[:40]
  tx = nysact_optax.nysact(0.1, **PERIODS)
  opt_state = tx.init(params)

  def loss_fn(p):
    logits = MODEL.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  (_, grads), acts = jax.jit(nysact_optax.value_and_grad(loss_fn))(params)
  whole = nysact_optax.sketched_statistics(opt_state, acts)
  monkeypatch.setattr(_accumulate, "CHUNK_EXAMPLES", 14)
  split = jax.jit(nysact_optax.grad(loss_fn, statistics_for=opt_state))(params)
  assert isinstance(split, nysact_optax.GradsWithStatistics)
  assert sorted(split.statistics) == sorted(whole)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), split.statistics, whole
  )
  jax.tree.map(np.testing.assert_allclose, split.grads, grads)


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(8, 16, rngs=rngs)
    self.out = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def test_nnx_split_step_matches_the_fused_step():
  x, y = _params.data((32, 8))

  def loss_fn(model):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  @nnx.jit
  def apply_model(model, optimizer):
    grad_fn = nysact_optax.value_and_grad(loss_fn, statistics_for=optimizer)
    return grad_fn(model)

  @nnx.jit
  def update_model(model, optimizer, grads):
    optimizer.update(model, grads.grads, statistics=grads.statistics)

  @nnx.jit
  def train_step(model, optimizer):
    (loss, grads), acts = nysact_optax.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads, activations=acts)
    return loss

  models = [MLP(nnx.Rngs(0)) for _ in range(2)]
  optimizers = [
    nnx.Optimizer(m, nysact_optax.nysact(0.1, momentum=0.9, **PERIODS), wrt=nnx.Param)
    for m in models
  ]
  for _ in range(STEPS):
    _, grads = apply_model(models[0], optimizers[0])
    assert sorted(grads.statistics) == ["hidden", "out"]
    update_model(models[0], optimizers[0], grads)
    train_step(models[1], optimizers[1])
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
    nnx.state(models[0], nnx.Param),
    nnx.state(models[1], nnx.Param),
  )


def test_apply_gradients_refuses_statistics_twice():
  params = {"dense": {"kernel": jnp.ones((3, 2))}}
  state = nysact_optax.TrainState.create(
    apply_fn=None, params=params, tx=nysact_optax.nysact(0.1, rank=2)
  )
  grads = nysact_optax.GradsWithStatistics(params, {"dense": jnp.zeros((3, 2))})
  with pytest.raises(ValueError, match=r"statistics_for=.*and statistics=.*pass one"):
    nysact_optax.apply_gradients(state, grads=grads, statistics=grads.statistics)
  with pytest.raises(ValueError, match=r"and activations=.*pass one"):
    state.apply_gradients(grads=grads, activations={})


def test_statistics_for_needs_a_nysact_state():
  params = {"kernel": jnp.ones((3, 2))}
  opt_state = optax.sgd(0.1).init(params)
  grad_fn = nysact_optax.grad(lambda p: jnp.sum(p["kernel"]), statistics_for=opt_state)
  with pytest.raises(ValueError, match="exactly one ScaleByNysActState"):
    grad_fn(params)


@pytest.mark.parametrize(
  "make", [nysact_optax.nysact, nysact_optax.nysact_adam], ids=["nysact", "nysact_adam"]
)
def test_carrier_passed_to_a_plain_update_is_a_named_error(make):
  """Flax's own ``state.apply_gradients(grads=carrier)`` (or ``tx.update``) on
  the gradients that carry statistics: an error that says what to call."""
  params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
  tx = make(1e-2, rank=2)
  state = tx.init(params)
  carrier = nysact_optax.GradsWithStatistics(params, {"dense": jnp.zeros((4, 2))})
  with pytest.raises(TypeError, match=r"gradients that carry statistics.*apply_gradients"):
    tx.update(carrier, state, params)
