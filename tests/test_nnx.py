"""Flax NNX: capture, exactness against dense numpy, transforms, nnx.Optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import nysact_optax
from tests import _reference

# Every NNX path runs with warnings as errors (pyproject.toml ignores
# DeprecationWarning elsewhere): the capture must not trigger flax's.
pytestmark = pytest.mark.filterwarnings("error")

RHO = 0.3


def np_init(key, shape, dtype=jnp.float32):
  """A deterministic numpy initializer: no jax.random compilation per shape."""
  del key
  return jnp.asarray(np.random.default_rng(list(shape)).standard_normal(shape) / 2, dtype)


INIT = dict(kernel_init=np_init, bias_init=np_init)


def _dense_rows(x_axes):
  """Rows of ``A`` for a dense-like layer contracting input axes ``x_axes``."""

  def rows(x):
    x = np.moveaxis(x, x_axes, tuple(range(-len(x_axes), 0)))
    return x.reshape(-1, int(np.prod(x.shape[x.ndim - len(x_axes) :])))

  return rows


# name: (constructor, input shape, rows, kernel input axes, bias permutation)
CASES = {
  "linear": (lambda r: nnx.Linear(4, 5, rngs=r, **INIT), (6, 4), _dense_rows((-1,)), (0,), None),
  "linear_nobias": (
    lambda r: nnx.Linear(4, 3, use_bias=False, rngs=r, **INIT),
    (2, 3, 4),
    _dense_rows((-1,)),
    (0,),
    None,
  ),
  "general_heads": (
    lambda r: nnx.LinearGeneral(4, (2, 3), rngs=r, **INIT),
    (5, 4),
    _dense_rows((-1,)),
    (0,),
    None,
  ),
  "general_in": (
    lambda r: nnx.LinearGeneral((2, 3), 4, axis=(-2, -1), rngs=r, **INIT),
    (3, 2, 3),
    _dense_rows((-2, -1)),
    (0, 1),
    None,
  ),
  "general_axis1": (
    lambda r: nnx.LinearGeneral((2, 3), 2, axis=(1, -1), rngs=r, **INIT),
    (3, 2, 4, 3),
    _dense_rows((1, -1)),
    (0, 1),
    None,
  ),
  "conv": (
    lambda r: nnx.Conv(3, 4, (3, 3), rngs=r, **INIT),
    (2, 5, 6, 3),
    _reference.conv_rows((3, 3)),
    (0, 1, 2),
    None,
  ),
  "conv_strided": (
    lambda r: nnx.Conv(
      2,
      4,
      (3, 2),
      strides=2,
      kernel_dilation=(2, 1),
      padding="VALID",
      use_bias=False,
      rngs=r,
      **INIT,
    ),
    (2, 9, 6, 2),
    _reference.conv_rows((3, 2), (2, 2), "VALID", (2, 1)),
    (0, 1, 2),
    None,
  ),
  "conv_groups": (
    lambda r: nnx.Conv(4, 6, (3, 3), feature_group_count=2, rngs=r, **INIT),
    (2, 5, 5, 4),
    _reference.conv_rows((3, 3), groups=2),
    (0, 1, 2),
    None,
  ),
  "conv_causal": (
    lambda r: nnx.Conv(2, 3, (3,), padding="CAUSAL", kernel_dilation=2, rngs=r, **INIT),
    (2, 9, 2),
    _reference.conv_rows((3,), padding="CAUSAL", dilation=(2,)),
    (0, 1),
    None,
  ),
  # kernel (heads, d, head_dim): the contracted axis is not leading; bias in
  # output order (head_dim, heads) is transposed against the kernel's (heads, head_dim).
  "einsum": (
    lambda r: nnx.Einsum("btd,ndh->bthn", (2, 4, 3), (3, 2), rngs=r, **INIT),
    (2, 3, 4),
    _dense_rows((-1,)),
    (1,),
    (1, 0),
  ),
}


class Zoo(nnx.Module):
  """Every covered NNX layer, each fed its own input; "linear" runs twice."""

  def __init__(self, rngs):
    for name, (make, *_) in CASES.items():
      setattr(self, name, make(rngs))

  def __call__(self, xs):
    outs = [getattr(self, name)(xs[name]) for name in CASES]
    return outs + [self.linear(xs["linear_again"])]


def _matrix(kernel, bias, k_in, bias_perm):
  """``(p, o)``: the kernel with input axes first, then the bias row."""
  k_out = tuple(a for a in range(kernel.ndim) if a not in k_in)
  m = np.transpose(np.asarray(kernel, np.float64), k_in + k_out)
  m = m.reshape(int(np.prod([kernel.shape[a] for a in k_in])), -1)
  if bias is None:
    return m
  b = np.asarray(bias, np.float64)
  b = np.transpose(b, bias_perm) if bias_perm else b
  return np.concatenate([m, b.reshape(1, -1)])


def _normal(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _random_like(tree, seed):
  return jax.tree.map(lambda a: _normal(a.shape, seed), tree)


def test_exact_mode_equals_dense_damped_inverse_for_every_nnx_layer():
  model = Zoo(nnx.Rngs(0))
  xs = {name: _normal(CASES[name][1], i) for i, name in enumerate(CASES)}
  xs["linear_again"] = _normal((3, 4), 99)
  _, acts = nysact_optax.capture_activations(model)(xs)
  params = nnx.pure(nnx.state(model, nnx.Param))
  grads = _random_like(params, 7)
  tx = nysact_optax.scale_by_nysact(
    rank=10**6,
    damping=RHO,
    stat_decay=0.0,
    cov_update_every=1,
    inv_update_every=1,
  )  # no input_axes: the einsum's input axis (1,) is read off its bias's shape
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), activations=acts)
  for name, (_, _, rows, k_in, bias_perm) in CASES.items():
    a = rows(np.asarray(xs[name], np.float64))
    if name == "linear":
      a = np.concatenate([a, rows(np.asarray(xs["linear_again"], np.float64))])
    g, u = grads[name], updates[name]
    if "bias" in g:
      a = _reference.with_bias_column(a)
    gmat = _matrix(g["kernel"], g.get("bias"), k_in, bias_perm)
    umat = _matrix(u["kernel"], u.get("bias"), k_in, bias_perm)
    expected = _reference.damped_inverse(a, RHO) @ gmat
    np.testing.assert_allclose(
      umat, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max(), err_msg=name
    )


def test_multi_head_attention_projections_are_captured_and_exact():
  mha = nnx.MultiHeadAttention(2, 4, qkv_features=6, decode=False, rngs=nnx.Rngs(0), **INIT)
  xq, xkv = _normal((2, 5, 4), 1), _normal((2, 3, 4), 2)
  y, acts = nysact_optax.capture_activations(mha)(xq, xkv)
  table = nysact_optax._tree.activation_table(acts)
  assert sorted(table) == ["key", "out", "query", "value"]
  np.testing.assert_array_equal(table["query"].inputs[0], xq)
  np.testing.assert_array_equal(table["key"].inputs[0], xkv)
  np.testing.assert_array_equal(table["value"].inputs[0], xkv)
  attended = table["out"].inputs[0]  # (batch, tokens, heads, head_dim)
  assert attended.shape == (2, 5, 2, 3)
  np.testing.assert_allclose(mha.out(attended), y, rtol=1e-6)
  params = nnx.pure(nnx.state(mha, nnx.Param))
  grads = _random_like(params, 3)
  tx = nysact_optax.scale_by_nysact(
    rank=10**6, damping=RHO, stat_decay=0.0, cov_update_every=1, inv_update_every=1
  )
  updates, _ = tx.update(grads, tx.init(params), activations=acts)
  for name, x, k_in in (("query", xq, (0,)), ("value", xkv, (0,)), ("out", attended, (0, 1))):
    a = _dense_rows(tuple(range(-len(k_in), 0)))(np.asarray(x, np.float64))
    a = _reference.with_bias_column(a)
    expected = _reference.damped_inverse(a, RHO) @ _matrix(
      grads[name]["kernel"], grads[name]["bias"], k_in, None
    )
    actual = _matrix(updates[name]["kernel"], updates[name]["bias"], k_in, None)
    np.testing.assert_allclose(
      actual, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max(), err_msg=name
    )


class Net(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs, **INIT)
    self.norm = nnx.LayerNorm(4, rngs=rngs)
    self.blocks = nnx.List(
      [nnx.Linear(64, 8, rngs=rngs, **INIT), nnx.Linear(8, 3, rngs=rngs, **INIT)]
    )

  def __call__(self, x):
    x = self.norm(nnx.relu(self.conv(x)))
    x = x.reshape(x.shape[0], -1)
    return self.blocks[1](nnx.relu(self.blocks[0](x)))


def _data():
  return _normal((8, 4, 4, 1), 0), np.arange(8, dtype=np.int32) % 3


def _loss(model, x, y):
  logits, acts = nysact_optax.capture_activations(model)(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), acts


def test_activations_mirror_nnx_state_paths():
  model = Net(nnx.Rngs(0))
  _, acts = nysact_optax.capture_activations(model)(_data()[0])
  assert isinstance(acts, nnx.State)
  act_paths = {
    path
    for path, _ in jax.tree_util.tree_flatten_with_path(
      acts, is_leaf=lambda x: isinstance(x, nysact_optax.LayerInputs)
    )[0]
  }
  kernel_nodes = {
    path[:-2]
    for path, _ in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    if path[-2].key == "kernel"
  }
  assert act_paths == kernel_nodes  # ('blocks', 0), ('blocks', 1), ('conv',)
  tx = nysact_optax.scale_by_nysact(rank=3)
  assert sorted(tx.init(nnx.state(model, nnx.Param)).layers) == ["blocks/0", "blocks/1", "conv"]


def test_nnx_optimizer_under_nnx_jit_equals_jax_jit_with_split_merge():
  x, y = _data()
  kwargs = dict(rank=3, cov_update_every=1, inv_update_every=2, weight_decay=1e-3)
  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, nysact_optax.nysact(0.05, **kwargs), wrt=nnx.Param)
  traces = []

  @nnx.jit
  def nnx_step(model, optimizer, x, y):
    traces.append(1)
    (loss, acts), grads = nnx.value_and_grad(_loss, has_aux=True)(model, x, y)
    optimizer.update(model, grads, activations=acts)
    return loss

  # The same training with plain jax.jit, nnx.split/merge and optax.
  graphdef, params, rest = nnx.split(Net(nnx.Rngs(0)), nnx.Param, ...)
  tx = nysact_optax.nysact(0.05, **kwargs)
  opt_state = tx.init(params)

  @jax.jit
  def jax_step(params, rest, opt_state, x, y):
    def loss_fn(params):
      return _loss(nnx.merge(graphdef, params, rest), x, y)

    (loss, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    return optax.apply_updates(params, updates), opt_state, loss

  for _ in range(3):
    loss_a = nnx_step(model, optimizer, x, y)
    params, opt_state, loss_b = jax_step(params, rest, opt_state, x, y)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  assert len(traces) == 1
  ours = nnx.pure(nnx.state(model, nnx.Param))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), ours, nnx.pure(params)
  )
  assert not np.allclose(
    ours["blocks"][0]["kernel"],
    nnx.pure(nnx.state(Net(nnx.Rngs(0)), nnx.Param))["blocks"][0]["kernel"],
  )


class Shared(nnx.Module):
  def __init__(self, rngs):
    self.first = nnx.Linear(3, 3, rngs=rngs, **INIT)
    self.second = self.first  # one module at two paths

  def __call__(self, x):
    self.sow(nnx.Intermediate, "hidden", x)
    return self.second(self.first(x))


def test_shared_module_nested_user_capture_and_restore_on_exception():
  model = Shared(nnx.Rngs(0))
  x = jnp.ones((2, 3))
  originals = {cls: cls.__call__ for cls in (nnx.Linear, nnx.Conv, nnx.LinearGeneral, nnx.Einsum)}

  def forward(model, x):
    y, acts = nysact_optax.capture_activations(model)(x)
    return y, acts

  (_, acts), inter = nnx.capture(forward, nnx.Intermediate)(model, x)
  assert list(acts) == ["first"]  # shared: once, at nnx.state's path, both calls
  assert len(acts["first"].inputs) == 2
  np.testing.assert_allclose(acts["first"].inputs[1], model.first(x), rtol=1e-6)
  np.testing.assert_array_equal(inter["hidden"].get_value()[0], x)  # the user's capture survives

  class Boom(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(3, 3, rngs=rngs, **INIT)

    def __call__(self, x):
      self.linear(x)
      raise RuntimeError("boom")

  boom = Boom(nnx.Rngs(0))
  with pytest.raises(RuntimeError, match="boom"):
    nysact_optax.capture_activations(boom)(x)
  assert {cls: cls.__call__ for cls in originals} == originals
  assert not hasattr(boom.linear, "__captures__") and not hasattr(model.first, "__captures__")


def test_unsupported_nnx_layer_raises_unless_excluded():
  layer = nnx.LinearGeneral(3, 2, batch_axis={0: 4}, use_bias=False, rngs=nnx.Rngs(0), **INIT)
  _, acts = nysact_optax.capture_activations(layer)(jnp.ones((4, 3)))
  params = nnx.pure(nnx.state(layer, nnx.Param))
  tx = nysact_optax.scale_by_nysact(rank=2)
  with pytest.raises(
    NotImplementedError, match=r"layer '': LinearGeneral with batch_axis=\{0: 4\}"
  ):
    tx.update(params, tx.init(params), activations=acts)
  tx = nysact_optax.scale_by_nysact(rank=2, exclude=["^$"])
  updates, _ = tx.update(params, tx.init(params), activations=acts)
  jax.tree.map(np.testing.assert_array_equal, updates, params)


class Sowing(nnx.Module):
  def __init__(self, rngs):
    self.first = nnx.Linear(3, 4, rngs=rngs, **INIT)
    self.second = nnx.Linear(4, 2, rngs=rngs, **INIT)

  def __call__(self, x):
    h = self.first(x)
    self.sow(nnx.Intermediate, "hidden", h)
    return self.second(h)


def test_nnx_capture_in_either_order():
  model, x = Sowing(nnx.Rngs(0)), _normal((2, 3), 0)
  y_ref, inter_ref = nnx.capture(model, nnx.Intermediate)(x)
  hidden = inter_ref["hidden"].get_value()[0]
  capture = nysact_optax.capture_activations
  (y1, acts1), inter1 = nnx.capture(capture(model), nnx.Intermediate)(x)
  (y2, inter2), acts2 = capture(nnx.capture(model, nnx.Intermediate))(x)
  # nnx.capture of a function whose first argument is the model (gemma's loss).
  (y3, inter3), acts3 = capture(nnx.capture(lambda m, x: m(x), nnx.Intermediate))(model, x)
  y4, acts4 = capture(nnx.capture(model))(x)  # no variable types: outputs alone
  (y5, inter5, perturbations), acts5 = capture(
    nnx.capture(model.__call__, nnx.Intermediate, nnx.Perturbation)
  )(x)
  for y in (y1, y2, y3, y4, y5):
    np.testing.assert_array_equal(y, y_ref)
  for inter in (inter1, inter2, inter3, inter5):
    np.testing.assert_array_equal(inter["hidden"].get_value()[0], hidden)
  assert not jax.tree.leaves(perturbations)
  for acts in (acts1, acts2, acts3, acts4, acts5):
    assert sorted(acts) == ["first", "second"]
    np.testing.assert_array_equal(acts["first"].inputs[0], x)
    np.testing.assert_array_equal(acts["second"].inputs[0], hidden)
  for layer in (model, model.first, model.second):  # nothing left behind
    assert not hasattr(layer, "__captures__")
  with pytest.raises(TypeError, match="already returns activations: call capture_activations once"):
    capture(capture(model))
  with pytest.raises(TypeError, match="already returns activations"):
    capture(nnx.capture(capture(model), nnx.Intermediate))


def test_nnx_capture_outside_under_nnx_grad_and_jit():
  """The gemma train step: the loss runs the model under the user's
  nnx.capture, inside nnx.value_and_grad and nnx.jit; the captured
  activations drive an update equal to capturing without nnx.capture."""
  x, y = _data()
  tx = nysact_optax.scale_by_nysact(rank=3, cov_update_every=1, inv_update_every=1)

  def grads_and_acts(forward_of):
    model = Net(nnx.Rngs(0))

    @nnx.jit
    def step(model, x, y):
      def loss_fn(model):
        (logits, acts), _ = forward_of(model)(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, acts

      (_, acts), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
      return grads, acts

    grads, acts = step(model, x, y)
    params = nnx.pure(nnx.state(model, nnx.Param))
    return tx.update(nnx.pure(grads), tx.init(params), params, activations=acts)[0]

  inside = grads_and_acts(
    lambda m: nnx.capture(nysact_optax.capture_activations(m), nnx.Intermediate)
  )
  plain = grads_and_acts(lambda m: lambda x: (nysact_optax.capture_activations(m)(x), None))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), inside, plain)


def test_nnx_layer_called_with_two_equations_is_an_error():
  einsum = nnx.Einsum("bi,io->bo", (3, 3), rngs=nnx.Rngs(0), **INIT)
  _, acts = nysact_optax.capture_activations(einsum)(jnp.ones((2, 3)))  # one equation
  assert acts.spec == nysact_optax.EinsumSpec("bi,io->bo")
  model = nnx.Sequential(einsum, lambda h: einsum(h, "bi,oi->bo"))
  with pytest.raises(
    ValueError,
    match=r"layer 'layers/0' was called with several "
    r"configurations: .*'bi,io->bo'.*'bi,oi->bo'.*use one module per configuration",
  ):
    nysact_optax.capture_activations(model)(jnp.ones((2, 3)))
