"""capture_activations with flax.linen: arguments, collections, no extra passes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nysact_optax


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
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, ref_grads)
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
