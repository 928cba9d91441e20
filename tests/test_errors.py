"""Every error on bad input, by its exact message.

Each message names the layer path (or the argument), the expected and the
actual shapes or values, and says how to fix it. All of them are raised
before any array computation, so these tests compile nothing.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import nysact_optax
from nysact_optax import ConvSpec, DenseSpec, EinsumSpec, LayerInputs

SAME_3X3 = ConvSpec((3, 3), (1, 1), "SAME", (1, 1), (1, 1))


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(2, (3, 3))(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def net():
  """params (Conv_0: kernel (3, 3, 1, 2); Dense_0: kernel (32, 3)), activations."""
  model = Net()
  x = jnp.ones((2, 4, 4, 1))
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  _, acts = nysact_optax.capture_activations(model.apply)({"params": params}, x)
  return params, acts


def _raises(exc, message, fn, *args, **kwargs):
  with pytest.raises(exc) as err:
    fn(*args, **kwargs)
  assert str(err.value) == message


def _update(params, acts, state_params=None, **kwargs):
  tx = nysact_optax.scale_by_nysact(rank=2, **kwargs)
  state = tx.init(params if state_params is None else state_params)
  return tx.update(params, state, activations=acts)


# --------------------------------------------------------------------------
# Activations


def test_activations_missing_entirely(net):
  params, _ = net
  tx = nysact_optax.scale_by_nysact(rank=2)
  _raises(
    ValueError,
    "scale_by_nysact.update needs activations=...: take the gradient with "
    "nysact_optax.value_and_grad(loss_fn) in place of jax.value_and_grad "
    "(it returns ((value, grads), activations)) and pass the activations "
    "(layers expecting them: ['Conv_0', 'Dense_0']). flax's "
    "TrainState.apply_gradients cannot pass them: use "
    "nysact_optax.apply_gradients(state, grads=grads, activations=acts)",
    tx.update,
    params,
    tx.init(params),
  )


def test_activations_missing_for_a_covered_layer(net):
  params, acts = net
  _raises(
    ValueError,
    "NysAct cannot precondition 1 layer(s) as captured: layer 'Conv_0': no "
    "captured inputs (kernel (3, 3, 1, 2)): no covered layer computed with this "
    "kernel; a module that computes its product itself is not covered (covered: "
    "nn.Einsum, nn.DenseGeneral, nn.Dense, nn.Conv, nn.OptimizedLSTMCell, "
    "nnx.Einsum, nnx.LinearGeneral, nnx.Linear, nnx.Conv). Activations hold "
    "layers ['Dense_0']. Take the gradient with nysact_optax.value_and_grad (or "
    "capture with nysact_optax.capture_activations), or leave the layer to the "
    "plain gradient with exclude=['Conv_0'].",
    _update,
    params,
    {"Dense_0": acts["Dense_0"]},
  )


def test_activations_of_a_layer_the_params_do_not_have(net):
  params, acts = net
  _raises(
    ValueError,
    "activations were captured for layer 'Dense_1', which has no kernel in "
    "the updates tree (layers there: ['Conv_0', 'Dense_0']). Pass the params "
    "tree of the same model (variables['params']).",
    _update,
    params,
    {**acts, "Dense_1": acts["Dense_0"]},
  )


def test_input_feature_size_does_not_match_the_kernel(net):
  params, acts = net
  _raises(
    ValueError,
    "layer 'Dense_0': its input of shape (2, 7) has 7 features, but its "
    "kernel (32, 3) expects 32. The activations must come from the forward "
    "pass of the model whose gradients you update (same params tree, same "
    "input feature size).",
    _update,
    params,
    {**acts, "Dense_0": LayerInputs([jnp.ones((2, 7))], DenseSpec())},
  )


def test_input_of_another_layer_kind(net):
  params, acts = net
  _raises(
    ValueError,
    "layer 'Dense_0': its input of shape (2, 4, 4, 1) comes from a ConvSpec "
    "that contracts 3 kernel axes, but its kernel (32, 3) has 2 axes, so at "
    "most 1 can meet the input. The activations must come from the forward "
    "pass of the model whose gradients you update.",
    _update,
    params,
    {**acts, "Dense_0": acts["Conv_0"]},
  )


def test_input_with_too_few_axes(net):
  params, acts = net
  _raises(
    ValueError,
    "layer 'Conv_0': its input of shape (2,) has fewer than the 3 axes its "
    "ConvSpec contracts. Pass the activations that "
    "nysact_optax.capture_activations returns.",
    _update,
    params,
    {**acts, "Conv_0": LayerInputs([jnp.ones((2,))], SAME_3X3)},
  )


def test_kernel_layout_needs_input_axes():
  """Every layer whose layout the shapes do not tell, in one error with the fix."""
  params = {
    "qkv": {"kernel": jnp.ones((4, 2, 3))},  # bias-free DenseGeneral((2, 3))
    "proj": {"kernel": jnp.ones((2, 4, 3))},
  }  # Einsum "btd,ndh->btnh"
  acts = {
    "qkv": LayerInputs([jnp.ones((5, 4))], DenseSpec((-1,))),
    "proj": LayerInputs([jnp.ones((5, 4))], EinsumSpec("btd,ndh->btnh")),
  }
  _raises(
    ValueError,
    "2 layer(s) have a kernel layout the parameter shapes do not tell: layer "
    "'proj': its input meets kernel axes (1,) of the kernel (2, 4, 3), which "
    "was taken to have input axes (0, 1); layer 'qkv': its input meets kernel "
    "axes (0,) of the kernel (4, 2, 3), which was taken to have input axes "
    "(0, 1). Pass input_axes={'proj': (1,), 'qkv': 1}.",
    _update,
    params,
    acts,
  )
  _raises(
    ValueError,
    "layer 'qkv': input_axes=3 must be between 1 and 2 for a kernel of shape (4, 2, 3)",
    _update,
    params,
    acts,
    input_axes={"qkv": 3},
  )


def test_nnx_einsum_without_bias_names_input_axes_and_the_model_argument():
  model = nnx.Einsum("btd,ndh->btnh", (2, 4, 3), bias_shape=None, rngs=nnx.Rngs(0))
  model = nnx.Dict(q=model)
  x = jnp.ones((2, 5, 4))
  (_, grads), acts = nysact_optax.value_and_grad(lambda m: jnp.sum(m["q"](x)))(model)
  params = nnx.pure(nnx.state(model, nnx.Param))
  _raises(
    ValueError,
    "1 layer(s) have a kernel layout the parameter shapes do not tell: layer "
    "'q': its input meets kernel axes (1,) of the kernel (2, 4, 3), which was "
    "taken to have input axes (0, 1). Pass input_axes={'q': (1,)}, or the model "
    "itself: nysact(..., model=model) (or scale_by_nysact(..., model=model)) "
    "reads every NNX layer's layout off it.",
    _update,
    params,
    acts,
  )
  tx = nysact_optax.nysact(0.1, rank=2, model=model)  # the form the docs recommend
  tx.update(nnx.pure(grads), tx.init(params), params, activations=acts)


@pytest.mark.parametrize(
  "acts, where",
  [
    ({"Dense_0": jnp.ones((2, 32))}, "activations['Dense_0'] is a (2, 32) array"),
    (jnp.ones((2, 32)), "activations is a (2, 32) array"),
    # model.apply(..., mutable=["intermediates"]) output, not captured inputs.
    (
      {"intermediates": {"Dense_0": {"__call__": (jnp.ones((2, 3)),)}}},
      "activations['intermediates/Dense_0/__call__/0'] is a (2, 3) array",
    ),
    ({"Dense_0": [1.0, 2.0]}, "activations['Dense_0/0'] is a float"),
  ],
)
def test_activations_not_from_capture_activations(net, acts, where):
  params, _ = net
  _raises(
    TypeError,
    f"{where}, not LayerInputs: pass the activations that "
    "nysact_optax.capture_activations returns (a dict from layer path to "
    "LayerInputs)",
    _update,
    params,
    acts,
  )


# --------------------------------------------------------------------------
# State


def test_state_of_other_layers(net):
  params, acts = net
  _raises(
    ValueError,
    "the optimizer state does not match the updates: the state was "
    "initialised for layers ['Dense_0'], the updates have layers ['Conv_0', "
    "'Dense_0'] (only in the state: []; only in the updates: ['Conv_0']). "
    "Call init on the params tree you update, with the same exclude= and "
    "input_axes=.",
    _update,
    params,
    acts,
    state_params={"Dense_0": params["Dense_0"]},
  )


def test_state_of_other_shapes(net):
  params, acts = net
  other = {**params, "Dense_0": {"kernel": jnp.ones((33, 3)), "bias": jnp.ones(3)}}
  _raises(
    ValueError,
    "layer 'Dense_0': the optimizer state holds statistics of shape (34, 2), "
    "but its kernel (32, 3) with bias needs (33, 2). Call init on the params "
    "tree you update.",
    _update,
    params,
    acts,
    state_params=other,
  )


# --------------------------------------------------------------------------
# Hyperparameters

STATIC = (
  "must be a Python int, not an array: it fixes shapes or the schedule, so "
  "it is static (with optax.inject_hyperparams, list it in static_args)"
)
EXCLUDE = (
  "exclude must be a list of regexes or a predicate on layer paths (a str "
  "would be read as one pattern per letter: write exclude=['...'])"
)
INPUT_AXES = (
  "input_axes must be a mapping from layer-path regexes to an integer or a "
  "tuple of kernel axes, e.g. "
  "input_axes={'query': 1}"
)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(rank=jnp.array(3)), f"rank {STATIC}, got rank=array(3, dtype=int32)"),
    (
      dict(cov_update_every=np.array(5)),
      f"cov_update_every {STATIC}, got cov_update_every=array(5)",
    ),
    (
      dict(inv_update_every=jnp.array([4])),
      f"inv_update_every {STATIC}, got inv_update_every=array([4], dtype=int32)",
    ),
    (dict(rank=0), "rank must be an integer >= 1, got rank=0"),
    (dict(rank=2.5), "rank must be an integer >= 1, got rank=2.5"),
    (dict(damping=0.0), "damping must be > 0, got damping=0.0"),
    (dict(damping=jnp.array(-1.0)), "damping must be > 0, got damping=array(-1., dtype=float32)"),
    (dict(damping=float("inf")), "damping must be finite and > 0, got damping=inf"),
    (dict(damping=float("nan")), "damping must be finite and > 0, got damping=nan"),
    (
      dict(damping=jnp.ones(2)),
      "damping must be a real scalar, got damping=array([1., 1.], dtype=float32)",
    ),
    (dict(stat_decay=1.0), "stat_decay must be in [0, 1), got stat_decay=1.0"),
    (
      dict(stat_decay=jnp.array(1.0)),
      "stat_decay must be in [0, 1), got stat_decay=array(1., dtype=float32)",
    ),
    (dict(stat_decay="0.9"), "stat_decay must be a real scalar, got stat_decay='0.9'"),
    (dict(cov_update_every=0), "cov_update_every must be an integer >= 1, got cov_update_every=0"),
    (
      dict(cov_update_every=3, inv_update_every=10),
      "inv_update_every must be a multiple of cov_update_every, got "
      "inv_update_every=10 and cov_update_every=3",
    ),
    (
      dict(sketch="rademacher"),
      "sketch must be one of ('gaussian', 'subcolumns'), got sketch='rademacher'",
    ),
    (
      dict(sketch_refresh="never"),
      "sketch_refresh must be one of ('fixed', 'reference'), got sketch_refresh='never'",
    ),
    (dict(nystrom="svd"), "nystrom must be one of ('shifted', 'stable'), got nystrom='svd'"),
    (dict(seed=1.5), "seed must be an integer, got seed=1.5"),
    (dict(exclude="Conv"), f"{EXCLUDE}, got exclude='Conv'"),
    (dict(exclude=[1]), f"{EXCLUDE}, got exclude=[1]"),
    (dict(input_axes=[("qkv", 1)]), f"{INPUT_AXES}, got input_axes=[('qkv', 1)]"),
    (dict(input_axes={"qkv": 1.5}), f"{INPUT_AXES}, got input_axes={{'qkv': 1.5}}"),
  ],
)
def test_bad_hyperparameters(kwargs, message):
  _raises(ValueError, message, nysact_optax.scale_by_nysact, **kwargs)
  _raises(ValueError, message, nysact_optax.nysact, 0.1, **kwargs)


def test_inject_hyperparams_without_static_args(net):
  params, _ = net
  # Every numeric argument, defaults included, becomes an array unless static.
  tx = optax.inject_hyperparams(nysact_optax.nysact)(learning_rate=0.1, rank=3)
  _raises(ValueError, f"rank {STATIC}, got rank=array(3, dtype=int32)", tx.init, params)
  static = ("rank", "cov_update_every", "inv_update_every", "seed")
  tx = optax.inject_hyperparams(nysact_optax.nysact, static_args=static)(
    learning_rate=0.1, damping=-1.0
  )
  _raises(ValueError, "damping must be > 0, got damping=array(-1., dtype=float32)", tx.init, params)


def test_valid_edge_values_are_accepted():
  for kwargs in (
    dict(damping=1e-30),
    dict(stat_decay=0.0),
    dict(seed=np.int64(3)),
    dict(exclude=lambda name: name.startswith("Conv")),
    dict(exclude=()),
    dict(damping=jnp.asarray(2.0), stat_decay=jnp.asarray(0.5)),
  ):
    nysact_optax.scale_by_nysact(**kwargs)


# --------------------------------------------------------------------------
# Capture


def test_dense_general_with_batch_dims_is_not_covered():
  class Batched(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.DenseGeneral(3, batch_dims=(0,), axis=-1)(x)

  model, x = Batched(), jnp.ones((2, 4))
  variables = model.init(jax.random.PRNGKey(0), x)
  _, acts = nysact_optax.capture_activations(model.apply)(variables, x)  # capture is fine
  _raises(
    ValueError,
    "layer 'DenseGeneral_0': the bias of shape (2, 3) does not match the "
    "outputs (4, 3) of the kernel (2, 4, 3) (input axes (0,)); it looks stacked by "
    "nn.scan/nn.vmap: pass stack_axes={'DenseGeneral_0': 1}, or exclude it "
    "with exclude=['DenseGeneral_0']",
    nysact_optax.scale_by_nysact(rank=2).init,
    variables["params"],
  )
  tx = nysact_optax.scale_by_nysact(rank=2, exclude=["DenseGeneral_0"])
  grads = jax.tree.map(jnp.ones_like, variables["params"])
  updates, _ = tx.update(grads, tx.init(variables["params"]), activations=acts)
  jax.tree.map(np.testing.assert_array_equal, updates, grads)
