"""nysact_optax.value_and_grad / grad / apply_gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import nysact_optax


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(8)(x))
    h = nn.Dense(8, name="shared")(h)
    return nn.Dense(3)(h)


class Twice(nn.Module):
  """One layer called twice: both calls are recorded."""

  @nn.compact
  def __call__(self, x):
    layer = nn.Dense(5)
    return nn.Dense(2)(layer(x) + layer(x * 2))


def _data():
  rng = np.random.default_rng(0)
  return rng.standard_normal((6, 5)).astype(np.float32), rng.integers(0, 2, 6)


def _tree_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("model", [MLP(), Twice()], ids=["mlp", "twice"])
def test_linen_equals_jax_value_and_grad_and_capture_activations(model):
  x, y = _data()
  variables = model.init(jax.random.PRNGKey(0), x)

  def loss_fn(params):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

  ((loss, logits), grads), acts = jax.jit(nysact_optax.value_and_grad(loss_fn, has_aux=True))(
    variables["params"]
  )
  (want_loss, want_logits), want_grads = jax.value_and_grad(loss_fn, has_aux=True)(
    variables["params"]
  )
  _, want_acts = nysact_optax.capture_activations(model.apply)(variables, x)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, want_grads
  )
  assert sorted(acts) == sorted(want_acts)
  for name in acts:
    assert acts[name].spec == want_acts[name].spec
    assert acts[name].kernel_shape == want_acts[name].kernel_shape
    assert len(acts[name].inputs) == len(want_acts[name].inputs)
    _tree_equal(list(acts[name].inputs), list(want_acts[name].inputs))


def test_grad_forms_and_the_update_they_feed():
  x, _ = _data()
  model = MLP()
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  loss_fn = lambda p: jnp.mean(model.apply({"params": p}, x) ** 2)
  grads, acts = nysact_optax.grad(loss_fn)(params)
  (grads_aux, aux), acts_aux = nysact_optax.grad(lambda p: (loss_fn(p), 7), has_aux=True)(params)
  _tree_equal(grads, jax.grad(loss_fn)(params))
  _tree_equal(grads_aux, grads)
  assert aux == 7 and sorted(acts_aux) == sorted(acts) == ["Dense_0", "Dense_1", "shared"]
  tx = nysact_optax.nysact(0.1, rank=2)
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


def test_argnums_and_kwargs_pass_through():
  x, _ = _data()
  model = nn.Dense(3)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  f = lambda scale, p: scale * jnp.sum(model.apply({"params": p}, x))
  (value, grads), acts = nysact_optax.value_and_grad(f, argnums=1)(2.0, params)
  np.testing.assert_allclose(value, f(2.0, params), rtol=1e-6)
  _tree_equal(grads, jax.grad(f, argnums=1)(2.0, params))
  np.testing.assert_array_equal(acts[""].inputs[0], x)


def test_layer_under_nn_remat_is_recorded_as_capture_activations_records_it():
  x, _ = _data()

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.remat(nn.Dense)(4, name="body")(x)

  model = Net()
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  loss_fn = lambda p: jnp.sum(model.apply({"params": p}, x))
  _, acts = nysact_optax.value_and_grad(loss_fn)(params)
  _, want = nysact_optax.capture_activations(model.apply)({"params": params}, x)
  assert list(acts) == list(want) == ["body"]
  _tree_equal(list(acts["body"].inputs), list(want["body"].inputs))


def test_layer_under_jax_vmap_inside_the_loss_names_layer_and_the_fix():
  x, _ = _data()
  model = nn.Dense(4, name="body")
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  loss_fn = lambda p: jnp.sum(jax.vmap(lambda row: model.apply({"params": p}, row))(x))
  with pytest.raises(ValueError, match=r"layer '' runs under a JAX transform.*capture_activations"):
    nysact_optax.value_and_grad(loss_fn)(params)


class NNXNet(nnx.Module):
  def __init__(self, rngs, sow=False):
    self.sow_features = sow
    self.hidden = nnx.Linear(5, 8, rngs=rngs)
    self.proj = nnx.Einsum("bd,dh->bh", (8, 4), rngs=rngs)
    self.out = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.hidden(x))
    if self.sow_features:
      self.sow(nnx.Intermediate, "features", h)
    return self.out(self.proj(h))


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("user_capture", [False, True], ids=["plain", "nnx.capture"])
def test_nnx_equals_capture_activations(user_capture):
  x, y = _data()
  model = NNXNet(nnx.Rngs(0), sow=user_capture)

  def loss_fn(model):
    if user_capture:
      logits, inter = nnx.capture(model, nnx.Intermediate)(x)
    else:
      logits, inter = model(x), None
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), inter

  ((_, inter), grads), acts = nysact_optax.value_and_grad(loss_fn, has_aux=True)(model)
  (_, _), want_grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  model.sow_features = False
  _, want_acts = nysact_optax.capture_activations(model)(x)
  _tree_equal(grads, want_grads)
  assert set(acts.keys()) == {"hidden", "proj", "out"}
  for name in ("hidden", "proj", "out"):
    np.testing.assert_array_equal(acts[name].inputs[0], want_acts[name].inputs[0])
    assert acts[name].spec == want_acts[name].spec
  if user_capture:  # the user's own capture still gets its intermediates
    assert inter["features"].get_value()[0].shape == (6, 8)
  optimizer = nnx.Optimizer(model, nysact_optax.nysact(0.1, rank=2), wrt=nnx.Param)
  optimizer.update(model, grads, activations=acts)
  assert int(optimizer.step[...]) == 1


def test_nnx_two_differentiated_models_is_an_error():
  a, b = NNXNet(nnx.Rngs(0)), NNXNet(nnx.Rngs(1))
  x, _ = _data()
  with pytest.raises(ValueError, match=r"differentiates 2 nnx.Modules \(argnums=\(0, 1\)\)"):
    nysact_optax.value_and_grad(lambda a, b: jnp.sum(a(x) + b(x)), argnums=(0, 1))(a, b)


def test_apply_gradients_on_flax_train_state():
  x, _ = _data()
  model = MLP()
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  state = train_state.TrainState.create(
    apply_fn=model.apply, params=params, tx=nysact_optax.nysact(0.1, rank=2)
  )
  loss_fn = lambda p: jnp.mean(state.apply_fn({"params": p}, x) ** 2)
  (_, grads), acts = nysact_optax.value_and_grad(loss_fn)(state.params)
  new = nysact_optax.apply_gradients(state, grads=grads, activations=acts)
  want, _ = state.tx.update(grads, state.opt_state, state.params, activations=acts)
  _tree_equal(new.params, optax.apply_updates(state.params, want))
  assert type(new) is train_state.TrainState and new.tx is state.tx and int(new.step) == 1
  with pytest.raises(ValueError, match=r"apply_gradients\(state, grads=...\) needs activations"):
    nysact_optax.apply_gradients(state, grads=grads)
  # Another optimizer ignores the activations: one step serves both.
  sgd = state.replace(tx=optax.sgd(0.1), opt_state=optax.sgd(0.1).init(params))
  moved = nysact_optax.apply_gradients(sgd, grads=grads, activations=acts)
  _tree_equal(moved.params, optax.apply_updates(params, jax.tree.map(lambda g: -0.1 * g, grads)))
