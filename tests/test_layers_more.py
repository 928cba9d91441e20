"""flax.linen beyond Dense/Conv: nn.Einsum, nn.scan and nn.vmap with stacked
parameters, nn.remat, and shared modules; exact against dense numpy."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nysact_optax
from nysact_optax import LayerInputs
from tests import _reference
from tests.test_nnx import INIT, RHO, _dense_rows, _matrix, _normal, _random_like

COLLECTIONS = {"params": 0, "nysact_inputs": 0}
EXACT = dict(rank=10**6, damping=RHO, stat_decay=0.0, cov_update_every=1, inv_update_every=1)


class Step(nn.Module):
  @nn.compact
  def __call__(self, carry, _):
    return nn.relu(nn.Dense(4, **INIT)(carry)), None


class Child(nn.Module):
  layer: nn.Module

  @nn.compact
  def __call__(self, x):
    return self.layer(x)


class Zoo(nn.Module):
  """One of each: three einsums, a scan, a vmap, a remat and a shared module."""

  scan_axes: dict

  @nn.compact
  def __call__(self, xs):
    outs = [
      # contracted axis leading; bias (h, n) in output order, kernel (d, n, h)
      nn.Einsum((4, 2, 3), "btd,dnh->bthn", name="einsum_lead", **INIT)(xs["einsum_lead"]),
      # contracted axis in the middle of the kernel, equation given at call time
      nn.Einsum((2, 4, 3), use_bias=False, name="einsum_mid", **INIT)(
        xs["einsum_mid"], "btd,ndh->btnh"
      ),
      nn.Einsum((3, 2, 4), "...hd,hdk->...k", name="einsum_ellipsis", **INIT)(
        xs["einsum_ellipsis"]
      ),
      nn.remat(nn.Dense)(3, name="remat", **INIT)(xs["remat"]),
    ]
    scan = nn.scan(Step, variable_axes=self.scan_axes, split_rngs={"params": True}, length=3)
    outs.append(scan(name="scan")(xs["scan"], None)[0])
    vmap = nn.vmap(
      nn.Dense, variable_axes=COLLECTIONS, split_rngs={"params": True}, in_axes=0, out_axes=0
    )
    outs.append(vmap(2, name="ensemble", **INIT)(xs["ensemble"]))
    shared = nn.Dense(3, name="shared", **INIT)
    outs += [Child(shared, name="a")(xs["shared_a"]), Child(shared, name="b")(xs["shared_b"])]
    return outs


SHAPES = {
  "einsum_lead": (2, 3, 4),
  "einsum_mid": (2, 3, 4),
  "einsum_ellipsis": (2, 5, 3, 2),
  "remat": (5, 4),
  "scan": (6, 4),
  "ensemble": (2, 5, 3),
  "shared_a": (4, 3),
  "shared_b": (2, 3),
}
STACKED = {"scan/Dense_0": 1, "ensemble": 1}


@functools.lru_cache
def _setup(scan_collects_inputs=True):
  """Inputs, params and activations of the zoo (shared by the tests: arrays are immutable)."""
  model = Zoo(COLLECTIONS if scan_collects_inputs else {"params": 0})
  xs = {name: _normal(shape, i) for i, (name, shape) in enumerate(SHAPES.items())}
  params = model.init(jax.random.PRNGKey(0), xs)["params"]
  _, acts = nysact_optax.capture_activations(model.apply)({"params": params}, xs)
  return xs, params, acts


def _exact(rows, g, u, k_in=(0,), bias_perm=None):
  a = rows if "bias" not in g else _reference.with_bias_column(rows)
  expected = _reference.damped_inverse(a, RHO) @ _matrix(
    g["kernel"], g.get("bias"), k_in, bias_perm
  )
  actual = _matrix(u["kernel"], u.get("bias"), k_in, bias_perm)
  np.testing.assert_allclose(actual, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())


def test_einsum_scan_vmap_remat_shared_are_exact():
  xs, params, acts = _setup()
  assert acts["scan/Dense_0"].inputs[0].shape == (3, 6, 4)  # stacked like the params
  grads = _random_like(params, 7)
  tx = nysact_optax.scale_by_nysact(**EXACT, stack_axes=STACKED, input_axes={"einsum_mid": (1,)})
  state = tx.init(params)
  assert state.layers["scan/Dense_0"].basis.shape == (3, 5, 5)  # one factor per copy
  assert state.layers["ensemble"].eigvals.shape == (2, 4)
  updates, _ = jax.jit(tx.update)(grads, state, activations=acts)
  x64 = {k: np.asarray(v, np.float64) for k, v in xs.items()}
  dense = _dense_rows((-1,))
  _exact(dense(x64["einsum_lead"]), grads["einsum_lead"], updates["einsum_lead"], bias_perm=(1, 0))
  _exact(dense(x64["einsum_mid"]), grads["einsum_mid"], updates["einsum_mid"], k_in=(1,))
  _exact(
    _dense_rows((-2, -1))(x64["einsum_ellipsis"]),
    grads["einsum_ellipsis"],
    updates["einsum_ellipsis"],
    k_in=(0, 1),
  )
  _exact(dense(x64["remat"]), grads["remat"], updates["remat"])
  _exact(np.concatenate([x64["shared_a"], x64["shared_b"]]), grads["shared"], updates["shared"])
  # The scanned layer: copy l sees the carry after l steps, recomputed here.
  carry, p = x64["scan"], params["scan"]["Dense_0"]
  for l in range(3):
    g = jax.tree.map(lambda a: a[l], grads["scan"]["Dense_0"])
    u = jax.tree.map(lambda a: a[l], updates["scan"]["Dense_0"])
    _exact(carry, g, u)
    carry = np.maximum(carry @ np.asarray(p["kernel"][l]) + np.asarray(p["bias"][l]), 0.0)
  for e in range(2):
    g = jax.tree.map(lambda a: a[e], grads["ensemble"])
    u = jax.tree.map(lambda a: a[e], updates["ensemble"])
    _exact(x64["ensemble"][e], g, u)


def test_low_rank_stacked_layer_matches_each_copy_alone():
  """rank < p: each copy of a scanned layer is preconditioned by its own factors."""
  _, params, acts = _setup()
  grads = _random_like(params, 5)
  kwargs = dict(rank=2, cov_update_every=1, inv_update_every=1, damping=RHO)
  tx = nysact_optax.scale_by_nysact(**kwargs, include=["^scan/"], stack_axes=STACKED)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), activations=acts)
  stacked = state.layers["scan/Dense_0"]
  for l in range(3):
    g = jax.tree.map(lambda a: a[l], grads["scan"]["Dense_0"])
    ls = jax.tree.map(lambda a: a[l], stacked)
    u = nysact_optax._apply.precondition(
      _matrix(g["kernel"], g["bias"], (0,), None), ls.basis, ls.eigvals, RHO
    )
    np.testing.assert_allclose(
      _matrix(
        updates["scan"]["Dense_0"]["kernel"][l], updates["scan"]["Dense_0"]["bias"][l], (0,), None
      ),
      u,
      rtol=1e-4,
      atol=1e-6,
    )
  keys = np.asarray(stacked.sketch_key)
  assert len({tuple(k) for k in keys}) == 3  # a different sketch per copy


def test_stacked_layer_errors_name_the_fix():
  _, params, acts = _setup()
  tx = nysact_optax.scale_by_nysact(rank=3, include=["^scan/"])
  with pytest.raises(
    ValueError,
    match=r"layer 'scan/Dense_0': the bias of shape \(3, 4\) does "
    r"not match.*stacked.*stack_axes=\{'scan/Dense_0': 1\}",
  ):
    tx.init(params)
  # Without a bias the shapes alone look like a Dense: the captured kernel shape tells.
  no_bias = {"scan": {"Dense_0": {"kernel": params["scan"]["Dense_0"]["kernel"]}}}
  with pytest.raises(
    ValueError,
    match=r"layer 'scan/Dense_0' has a kernel of shape \(3, 4, 4\)"
    r".*stacked.*stack_axes=\{'scan/Dense_0': 1\}",
  ):
    tx.update(no_bias, tx.init(no_bias), activations=acts)
  # Not listed in variable_axes: the capture carries the inputs out all the same.
  _, _, unlisted = _setup(scan_collects_inputs=False)
  np.testing.assert_array_equal(unlisted["scan/Dense_0"].inputs[0], acts["scan/Dense_0"].inputs[0])
  dropped = dict(acts, **{"scan/Dense_0": LayerInputs((), acts["scan/Dense_0"].spec)})
  tx = nysact_optax.scale_by_nysact(rank=3, include=["^scan/"], stack_axes=STACKED)
  with pytest.raises(
    ValueError,
    match=r"layer 'scan/Dense_0': it ran, but a lifted transform did not carry its inputs "
    r"out.*variable_axes=\{'params': 0, 'nysact_inputs': 0\}",
  ):
    tx.update(params, tx.init(params), activations=dropped)
  tx = nysact_optax.scale_by_nysact(rank=3, include=["^einsum_mid$"])
  with pytest.raises(ValueError, match=r"layer 'einsum_mid'.*input_axes=\{'einsum_mid': \(1,\)\}"):
    tx.update(params, tx.init(params), activations=acts)


class Batched(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Einsum((2, 3, 4), "bhd,hdk->bhk", use_bias=False, name="per_head", **INIT)(x)


def test_einsum_with_a_batch_label_raises_unless_excluded():
  x = jnp.ones((5, 2, 3))
  params = Batched().init(jax.random.PRNGKey(0), x)["params"]
  _, acts = nysact_optax.capture_activations(Batched().apply)({"params": params}, x)
  tx = nysact_optax.scale_by_nysact(rank=2)
  with pytest.raises(
    NotImplementedError,
    match=r"layer 'per_head': einsum 'bhd,hdk->bhk'.*"
    r"labels 'h' in input, kernel and output.*exclude=\['per_head'\]",
  ):
    tx.update(params, tx.init(params), activations=acts)
  tx = nysact_optax.scale_by_nysact(rank=2, exclude=["per_head"])
  updates, _ = tx.update(params, tx.init(params), activations=acts)
  np.testing.assert_array_equal(updates["per_head"]["kernel"], params["per_head"]["kernel"])


@pytest.mark.parametrize(
  "equation, axis, kernel_axes, bias_perm",
  [
    ("btd,dk->btk", (2,), (0,), (0,)),
    ("btnh,nhd->btd", (2, 3), (0, 1), (0,)),
    ("...d,dnh->...hn", (-1,), (0,), (1, 0)),
    ("bsd,ckdh->cbskh", (2,), (2,), (0, 1, 2)),
  ],
)
def test_einsum_spec_reads_the_equation(equation, axis, kernel_axes, bias_perm):
  spec = nysact_optax.EinsumSpec(equation)
  assert (spec.axis, spec.kernel_input_axes, spec.bias_perm) == (axis, kernel_axes, bias_perm)


class ScanBlock(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(4, 4, rngs=rngs, **INIT)


def test_nnx_scan_over_vmapped_layers_is_stacked():
  @nnx.vmap(in_axes=0, out_axes=0)
  def make(key):
    return ScanBlock(nnx.Rngs(key))

  class Model(nnx.Module):
    def __init__(self):
      self.blocks = make(jax.random.split(jax.random.key(0), 3))
      self.head = nnx.Linear(4, 2, rngs=nnx.Rngs(0), **INIT)

    def __call__(self, x):
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def body(x, block):
        return nnx.relu(block.linear(x))

      return nnx.remat(lambda head, x: head(x))(self.head, body(x, self.blocks))

  model = Model()
  x = _normal((5, 4), 0)
  y, acts = nysact_optax.capture_activations(model)(x)
  inputs = acts["blocks"]["linear"].inputs
  assert len(inputs) == 1 and inputs[0].shape == (3, 5, 4)
  np.testing.assert_array_equal(inputs[0][0], x)
  head_input = acts["head"].inputs[0]  # captured through nnx.remat
  np.testing.assert_allclose(model.head(head_input), y, rtol=1e-6)
  params = nnx.pure(nnx.state(model, nnx.Param))
  grads = _random_like(params, 1)
  tx = nysact_optax.scale_by_nysact(**EXACT, stack_axes={"blocks/linear": 1})
  updates, _ = tx.update(grads, tx.init(params), activations=acts)
  for l in range(3):
    g = jax.tree.map(lambda a: a[l], grads["blocks"]["linear"])
    u = jax.tree.map(lambda a: a[l], updates["blocks"]["linear"])
    _exact(np.asarray(inputs[0][l], np.float64), g, u)
  _exact(np.asarray(head_input, np.float64), grads["head"], updates["head"])


class Partitioned(nn.Module):
  @nn.compact
  def __call__(self, x):
    init = nn.with_partitioning(INIT["kernel_init"], (None, "model"))
    return nn.Dense(3, kernel_init=init, bias_init=INIT["bias_init"])(x)


def test_partitioned_params_are_found_and_stay_boxed():
  x = _normal((4, 5), 0)
  params = Partitioned().init(jax.random.PRNGKey(0), x)["params"]
  assert isinstance(params["Dense_0"]["kernel"], nn.Partitioned)
  _, acts = nysact_optax.capture_activations(Partitioned().apply)({"params": params}, x)
  grads = _random_like(nn.unbox(params), 2)
  boxed_grads = jax.tree.map(
    lambda p, g: p.replace_boxed(g) if isinstance(p, nn.Partitioned) else g,
    params,
    grads,
    is_leaf=lambda v: isinstance(v, nn.Partitioned),
  )
  tx = nysact_optax.scale_by_nysact(**EXACT)
  boxed, _ = tx.update(boxed_grads, tx.init(params), activations=acts)
  plain, _ = tx.update(grads, tx.init(nn.unbox(params)), activations=acts)
  assert isinstance(boxed["Dense_0"]["kernel"], nn.Partitioned)
  jax.tree.map(np.testing.assert_array_equal, nn.unbox(boxed), plain)
  _exact(np.asarray(x, np.float64), grads["Dense_0"], plain["Dense_0"])
