"""capture_activations with flax.linen: arguments, collections, no extra passes."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nysact_optax

# No warning from the capture (pyproject.toml ignores DeprecationWarning
# elsewhere).
pytestmark = pytest.mark.filterwarnings("error")


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(4, (3, 3), use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.Dropout(0.5, deterministic=not train)(nn.relu(x))
    shared = nn.Dense(4, name="shared")
    x = x.reshape(x.shape[0], -1)
    h = shared(nn.Dense(4)(x))
    return shared(h)  # "shared" is called twice

  @nn.compact
  def embed(self, x):
    return nn.Dense(2, name="head")(x)


def _init():
  model = Block()
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 5, 2))
  variables = model.init({"params": jax.random.PRNGKey(1), "dropout": jax.random.PRNGKey(2)}, x)
  return model, x, variables


def test_mutable_and_rngs_are_passed_through():
  model, x, variables = _init()
  apply = nysact_optax.capture_activations(model.apply)
  rngs = {"dropout": jax.random.PRNGKey(3)}
  (y, mutated), acts = apply(variables, x, mutable=["batch_stats"], rngs=rngs)
  y_ref, mutated_ref = model.apply(variables, x, mutable=["batch_stats"], rngs=rngs)
  np.testing.assert_array_equal(y, y_ref)
  assert set(mutated) == {"batch_stats"}
  jax.tree.map(np.testing.assert_array_equal, mutated, mutated_ref)
  assert sorted(acts) == ["Conv_0", "Dense_0", "shared"]
  assert len(acts["shared"].inputs) == 2  # both calls
  np.testing.assert_array_equal(acts["Conv_0"].inputs[0], x)


def test_plain_call_and_method():
  model, x, variables = _init()
  apply = nysact_optax.capture_activations(model.apply)
  y, acts = apply(variables, x, train=False)
  np.testing.assert_array_equal(y, model.apply(variables, x, train=False))
  params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 3)), method=Block.embed)
  _, acts = apply(params, jnp.ones((1, 3)), method=Block.embed)
  assert list(acts) == ["head"]
  (_, mutated), _ = apply(variables, x, train=False, mutable=True)
  assert "nysact_inputs" not in mutated


def _count(jaxpr, name):
  """Occurrences of a primitive, nested jaxprs included (they print inline)."""
  return str(jaxpr).count(f"{name}[")


def test_no_extra_forward_or_backward_pass():
  model, x, variables = _init()
  apply = nysact_optax.capture_activations(model.apply)
  rngs = {"dropout": jax.random.PRNGKey(3)}

  def plain(params):
    y, _ = model.apply({**variables, "params": params}, x, mutable=["batch_stats"], rngs=rngs)
    return jnp.sum(y)

  def captured(params):
    (y, _), acts = apply({**variables, "params": params}, x, mutable=["batch_stats"], rngs=rngs)
    return jnp.sum(y), acts

  g1 = jax.make_jaxpr(jax.grad(plain))(variables["params"]).jaxpr
  g2 = jax.make_jaxpr(jax.grad(captured, has_aux=True))(variables["params"]).jaxpr
  for prim in ("conv_general_dilated", "dot_general"):
    assert _count(g1, prim) == _count(g2, prim) > 0


def test_captured_inputs_carry_no_gradient_and_work_under_jit():
  model, x, variables = _init()
  apply = nysact_optax.capture_activations(model.apply)

  @jax.jit
  def f(params):
    def loss(p):
      (y, _), acts = apply({**variables, "params": p}, x, train=False, mutable=["batch_stats"])
      # Using the captured input in the loss must not add a gradient path.
      return jnp.sum(y) + jnp.sum(acts["shared"].inputs[0]), acts

    return jax.grad(loss, has_aux=True)(params)

  grads, acts = f(variables["params"])
  _, ref_grads = jax.value_and_grad(
    lambda p: jnp.sum(model.apply({**variables, "params": p}, x, train=False))
  )(variables["params"])
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, ref_grads
  )
  assert isinstance(acts["Conv_0"], nysact_optax.LayerInputs)


def test_activations_for_unknown_layer_are_an_error():
  model, x, variables = _init()
  _, acts = nysact_optax.capture_activations(model.apply)(variables, x, train=False)
  tx = nysact_optax.scale_by_nysact(rank=2)
  params = {k: v for k, v in variables["params"].items() if k != "Dense_0"}
  grads = params
  with pytest.raises(ValueError, match="captured for layer 'Dense_0'"):
    tx.update(grads, tx.init(params), activations=acts)


def test_non_layer_inputs_in_activations_are_a_type_error():
  params = {"Dense_0": {"kernel": jnp.ones((3, 2))}}
  tx = nysact_optax.scale_by_nysact(rank=2)
  with pytest.raises(TypeError, match=r"activations\['Dense_0'\] is a .*capture_activations"):
    tx.update(params, tx.init(params), activations={"Dense_0": jnp.ones((4, 3))})


def test_layer_called_with_two_configurations_is_an_error():
  class TwoWays(nn.Module):
    @nn.compact
    def __call__(self, x):
      einsum = nn.Einsum((3, 3), use_bias=False)
      return einsum(x, "bi,io->bo") + einsum(x, "bi,oi->bo")

  model, x = TwoWays(), jnp.ones((2, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  with pytest.raises(
    ValueError,
    match=r"layer 'Einsum_0' was called with several "
    r"configurations: .*'bi,io->bo'.*'bi,oi->bo'.*use one module per configuration",
  ):
    nysact_optax.capture_activations(model.apply)(variables, x)


def test_a_function_without_mutable_gets_an_error_saying_what_to_pass():
  model, x, variables = _init()
  apply = nysact_optax.capture_activations(lambda v, x: model.apply(v, x, train=False))
  with pytest.raises(
    TypeError,
    match=r"capture_activations took <function .*<lambda>.*> for a "
    r"flax.linen apply and passed it mutable=, which it does not accept .*"
    r"Pass a linen model's apply \(model.apply\), an nnx.Module",
  ):
    apply(variables, x)


def test_captured_apply_jitted_for_its_outputs_materialises_no_activations():
  """Evaluation through the captured apply, returning only the outputs,
  compiles to a program of the plain apply's size: XLA drops the inputs."""
  model, _, variables = _init()
  x = jnp.ones((512, 5, 5, 2))
  apply = nysact_optax.capture_activations(model.apply)

  def memory(fn):
    stats = jax.jit(fn).lower(variables, x).compile().memory_analysis()
    return stats.output_size_in_bytes, stats.temp_size_in_bytes

  plain = memory(lambda v, x: model.apply(v, x, train=False))
  outputs_only = memory(lambda v, x: apply(v, x, train=False)[0])
  with_activations = memory(lambda v, x: apply(v, x, train=False))
  assert outputs_only == plain
  # Returned, the activations are materialised: the inputs of Conv_0 (x
  # itself, copied out), Dense_0 and twice the shared Dense, in float32.
  extra = with_activations[0] - plain[0]
  assert (
    4 * 512 * (5 * 5 * 2 + 5 * 5 * 4 + 4 + 4)
    <= extra
    < 4 * 512 * (5 * 5 * 2 + 5 * 5 * 4 + 4 + 4) + 1024
  )


def test_train_state_passes_activations_on_and_says_when_they_are_missing():
  model, x, variables = _init()
  params = variables["params"]
  apply = nysact_optax.capture_activations(model.apply)
  (_, acts) = apply(variables, x, train=False)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)

  tx = nysact_optax.nysact(0.1, rank=2)
  state = nysact_optax.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  with pytest.raises(
    ValueError,
    match=r"TrainState.apply_gradients\(grads=...\) needs "
    r"activations=... with a NysAct optimizer: take the gradient with "
    r"nysact_optax.value_and_grad\(loss_fn, ...\).*"
    r"state.apply_gradients\(grads=grads, activations=activations\)",
  ):
    state.apply_gradients(grads=grads)
  new = jax.jit(lambda s, g, a: s.apply_gradients(grads=g, activations=a))(state, grads, acts)
  updates, opt_state = tx.update(grads, tx.init(params), params, activations=acts)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7)
  jax.tree.map(close, new.params, optax.apply_updates(params, updates))
  jax.tree.map(close, new.opt_state, opt_state)
  assert int(new.step) == 1 and new.tx is tx

  # Any other optimizer ignores the activations: flax's TrainState's result.
  from flax.training import train_state

  sgd = optax.sgd(0.1, momentum=0.9)
  ours = nysact_optax.TrainState.create(apply_fn=model.apply, params=params, tx=sgd)
  flax_state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=sgd)
  jax.tree.map(
    np.testing.assert_array_equal,
    ours.apply_gradients(grads=grads, activations=acts).params,
    flax_state.apply_gradients(grads=grads).params,
  )
