"""NysAct on the structure of four of Flax's own examples, changed as little as
a new user following the README would change them.

Each pattern is written once as a plain optax training script (a string, run
with ``exec`` as the README blocks are), and the NysAct version is that script
with a few whole lines replaced. The replacements are listed, so the diff is
the test's own data: every pattern makes the README's three changes and no
more: the optimizer, ``nysact_optax.value_and_grad`` in place of
``jax.value_and_grad`` (or ``nnx.value_and_grad``), and ``activations=``
where the update happens (``nysact_optax.apply_gradients`` for flax's own
``TrainState``). No pattern passes ``input_axes`` or needs a workaround (a
mesh context, a hand-written update, a changed model or a changed loss).

- ``mnist``-like: a ``flax.linen`` CNN trained through ``TrainState``.
- ``lm1b``-like: a ``flax.linen`` decoder LM, bias-free attention, output
  head tied to the embedding (``Embed.attend``), ``TrainState``, ``jax.jit``
  with ``NamedSharding`` in/out shardings and no mesh context.
- ``gemma``-like: an NNX transformer with ``nnx.Einsum`` projections whose
  loss runs the model under the user's own ``nnx.capture``.
- ``imagenet``-like: a ``flax.linen`` ResNet with BatchNorm, ``TrainState``
  with ``batch_stats``, ``jax.pmap`` with ``axis_name``.
"""

import difflib
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state as flax_train_state

import nysact_optax
from nysact_optax import demo

# The README's changes: the optimizer, the gradient, the update.
CHANGES = 3


def _edit(source: str, edits: dict[str, tuple[str, str]]) -> str:
  """``source`` with whole lines replaced: ``{why: (old line, new line)}``.

  Each old line must occur exactly once (indentation included); the result
  differs from ``source`` in exactly those lines.
  """
  lines = source.splitlines()
  for why, (old, new) in edits.items():
    hits = [i for i, line in enumerate(lines) if line == old]
    assert len(hits) == 1, (why, old, hits)
    lines[hits[0]] = new
  edited = "\n".join(lines) + "\n"
  changed = [l for l in difflib.ndiff(source.splitlines(), lines) if l.startswith("+ ")]
  assert len(changed) == len(edits), changed
  return edited


def _run(source: str, steps: int, **namespace) -> dict[str, Any]:
  """Executes a training script; it must define ``train(steps) -> losses``."""
  namespace = {
    "jax": jax,
    "jnp": jnp,
    "nn": nn,
    "nnx": nnx,
    "optax": optax,
    "nysact_optax": nysact_optax,
    "np": np,
    **namespace,
  }
  exec(compile(source, "<example>", "exec"), namespace)
  namespace["losses"] = np.asarray(namespace["train"](steps))
  return namespace


def _assert_trains(losses, factor):
  assert np.all(np.isfinite(losses)), losses
  assert np.mean(losses[-3:]) < factor * np.mean(losses[:3]), losses


def _layers(opt_state):
  return sorted(nysact_optax.find_nysact_state(opt_state).layers)


# --------------------------------------------------------------------------
# mnist: linen CNN, TrainState


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.avg_pool(nn.relu(nn.Conv(8, (3, 3))(x)), (2, 2), (2, 2))
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


CNN_OPTAX = """
from flax.training import train_state

def train(steps):
  global state
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1, momentum=0.9))

  @jax.jit
  def train_step(state, images, labels):
    def loss_fn(params):
      logits = state.apply_fn({"params": params}, images)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, logits
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return state.apply_gradients(grads=grads), loss, accuracy

  losses = []
  for i in range(steps):
    idx = np.arange(i * 32, (i + 1) * 32) % len(x_train)
    state, loss, _ = train_step(state, x_train[idx], y_train[idx])
    losses.append(loss)
  return losses
"""

CNN_EDITS = {
  "optimizer": (
    "  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1, momentum=0.9))",
    "  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=nysact_optax.nysact(0.1, momentum=0.9))",
  ),
  "gradient": (
    "    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)",
    "    ((loss, logits), grads), acts = nysact_optax.value_and_grad(loss_fn, has_aux=True)(state.params)",
  ),
  "update": (
    "    return state.apply_gradients(grads=grads), loss, accuracy",
    "    return nysact_optax.apply_gradients(state, grads=grads, activations=acts), loss, accuracy",
  ),
}


@functools.cache
def _digits():
  return demo.load_digits_split()


def test_linen_cnn_through_train_state():
  data = _digits()
  model = CNN()
  params = model.init(jax.random.PRNGKey(0), data.x_train[:1])["params"]
  ns = dict(model=model, params=params, x_train=data.x_train, y_train=data.y_train)
  assert len(CNN_EDITS) == CHANGES
  optax_run = _run(CNN_OPTAX, 20, **ns)
  nysact_run = _run(_edit(CNN_OPTAX, CNN_EDITS), 20, **ns)
  _assert_trains(optax_run["losses"], 0.7)
  _assert_trains(nysact_run["losses"], 0.7)
  state = nysact_run["state"]
  assert type(state) is flax_train_state.TrainState and int(state.step) == 20
  assert _layers(state.opt_state) == ["Conv_0", "Conv_1", "Dense_0", "Dense_1"]


# --------------------------------------------------------------------------
# lm1b: linen decoder LM, bias-free attention, tied head, NamedSharding jit


VOCAB, SEQ = 16, 8


class DecoderLM(nn.Module):
  dim: int = 16
  heads: int = 2

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(VOCAB, self.dim, embedding_init=nn.initializers.normal(1.0))
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, tokens.shape[1], self.dim))
    x = embed(tokens) + pos
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(self.heads, use_bias=False, deterministic=True)(
      h, mask=nn.make_causal_mask(tokens)
    )
    h = nn.LayerNorm()(x)
    x = x + nn.Dense(self.dim)(nn.gelu(nn.Dense(4 * self.dim)(h)))
    return embed.attend(nn.LayerNorm()(x))  # logits via the embedding


def _sequences(n, seed):
  """Counting sequences mod VOCAB from random starts: learnable next tokens."""
  start = np.random.default_rng(seed).integers(0, VOCAB, (n, 1))
  return ((start + np.arange(SEQ + 1)) % VOCAB).astype(np.int32)


LM_OPTAX = """
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec as P

def train(steps):
  global state
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  data_sharding, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  tx = optax.adamw(3e-3, weight_decay=0.01)
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  state = jax.device_put(state, replicated)

  def train_step(state, batch):
    inputs, targets = batch[:, :-1], batch[:, 1:]
    def loss_fn(params):
      logits = state.apply_fn({"params": params}, inputs)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
      return loss, logits
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads=grads)
    return new_state, {"loss": loss}

  p_train_step = jax.jit(train_step, in_shardings=(replicated, data_sharding),
                         out_shardings=(replicated, replicated))
  losses = []
  for i in range(steps):
    batch = jax.device_put(batches[i % len(batches)], data_sharding)
    state, metrics = p_train_step(state, batch)
    losses.append(metrics["loss"])
  return losses
"""

LM_EDITS = {
  "optimizer": (
    "  tx = optax.adamw(3e-3, weight_decay=0.01)",
    "  tx = nysact_optax.nysact(0.1, rank=8, damping=0.1, cov_update_every=1, inv_update_every=2)",
  ),
  "gradient": (
    "    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)",
    "    ((loss, logits), grads), acts = nysact_optax.value_and_grad(loss_fn, has_aux=True)(state.params)",
  ),
  "update": (
    "    new_state = state.apply_gradients(grads=grads)",
    "    new_state = nysact_optax.apply_gradients(state, grads=grads, activations=acts)",
  ),
}
LM_LAYERS = ["Dense_0", "Dense_1"] + [
  f"MultiHeadDotProductAttention_0/{n}" for n in ("key", "out", "query", "value")
]


def _lm_namespace():
  model = DecoderLM()
  batches = [_sequences(16, seed) for seed in range(4)]
  params = model.init(jax.random.PRNGKey(0), batches[0][:, :-1])["params"]
  return dict(model=model, params=params, batches=batches)


def _check_lm(run):
  _assert_trains(run["losses"], 0.6)
  state = run["state"]
  assert _layers(state.opt_state) == LM_LAYERS
  for leaf in jax.tree.leaves(state):
    assert leaf.sharding.is_fully_replicated


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py)")
def test_linen_decoder_lm_with_named_shardings_and_no_mesh_context():
  """No input_axes: the bias-free query/key/value kernels follow flax's
  attention layout (one input axis)."""
  ns = _lm_namespace()
  assert len(LM_EDITS) == CHANGES
  _assert_trains(_run(LM_OPTAX, 12, **ns)["losses"], 0.8)
  _check_lm(_run(_edit(LM_OPTAX, LM_EDITS), 12, **ns))


# --------------------------------------------------------------------------
# gemma: NNX transformer with nnx.Einsum projections, loss under nnx.capture


class Attention(nnx.Module):
  def __init__(self, dim, heads, head_dim, rngs):
    self.q_einsum = nnx.Einsum("BTD,NDH->BTNH", (heads, dim, head_dim), rngs=rngs)
    self.kv_einsum = nnx.Einsum("BSD,CKDH->CBSKH", (2, heads, dim, head_dim), rngs=rngs)
    self.attn_vec_einsum = nnx.Einsum("BTNH,NHD->BTD", (heads, head_dim, dim), rngs=rngs)

  def __call__(self, x, mask):
    q = self.q_einsum(x)
    k, v = self.kv_einsum(x)
    logits = jnp.einsum("BTNH,BSNH->BTNS", q, k) / np.sqrt(q.shape[-1])
    probs = jax.nn.softmax(jnp.where(mask[:, :, None, :], logits, -1e9), axis=-1)
    return self.attn_vec_einsum(jnp.einsum("BTNS,BSNH->BTNH", probs, v))


class Block(nnx.Module):
  def __init__(self, dim, heads, rngs):
    self.pre_attention_norm = nnx.RMSNorm(dim, rngs=rngs)
    self.attn = Attention(dim, heads, dim // heads, rngs)
    self.pre_ffw_norm = nnx.RMSNorm(dim, rngs=rngs)
    self.up = nnx.Linear(dim, 4 * dim, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(4 * dim, dim, use_bias=False, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attn(self.pre_attention_norm(x), mask)
    self.sow(nnx.Intermediate, "rs_after_attention", x)
    return x + self.down(nnx.gelu(self.up(self.pre_ffw_norm(x))))


class Transformer(nnx.Module):
  def __init__(self, dim, heads, rngs):
    self.input_embedding = nnx.Param(jax.random.normal(rngs.params(), (VOCAB, dim)))
    self.block = Block(dim, heads, rngs)
    self.final_norm = nnx.RMSNorm(dim, rngs=rngs)

  def __call__(self, tokens):
    mask = jnp.tril(jnp.ones((tokens.shape[1],) * 2, bool))[None]
    x = self.input_embedding[...][tokens]
    x = self.final_norm(self.block(x, mask))
    return x @ self.input_embedding[...].T  # decode with the embedding


NNX_OPTAX = """
def train(steps):
  global model, optimizer, intermediates
  model = Transformer(16, 2, nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, batch):
    inputs, targets = batch[:, :-1], batch[:, 1:]
    def loss_fn(model):
      forward = nnx.capture(model, nnx.Intermediate)
      logits, intermediates = forward(inputs)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
      return loss, intermediates
    (loss, intermediates), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, intermediates

  losses = []
  for i in range(steps):
    loss, intermediates = train_step(model, optimizer, batches[i % len(batches)])
    losses.append(loss)
  return losses
"""

NNX_EDITS = {
  "optimizer": (
    "  optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)",
    "  optimizer = nnx.Optimizer(model, nysact_optax.nysact(0.1, rank=8, damping=0.1, cov_update_every=1, inv_update_every=2, model=model), wrt=nnx.Param)",
  ),
  "gradient": (
    "    (loss, intermediates), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)",
    "    ((loss, intermediates), grads), acts = nysact_optax.value_and_grad(loss_fn, has_aux=True)(model)",
  ),
  "update": (
    "    optimizer.update(model, grads)",
    "    optimizer.update(model, grads, activations=acts)",
  ),
}
NNX_LAYERS = [
  "block/attn/attn_vec_einsum",
  "block/attn/kv_einsum",
  "block/attn/q_einsum",
  "block/down",
  "block/up",
]


def _check_nnx(run):
  _assert_trains(run["losses"], 0.6)
  assert _layers(run["optimizer"].opt_state) == NNX_LAYERS
  # The user's own nnx.capture still gets its intermediates.
  (after_attention,) = run["intermediates"]["block"]["rs_after_attention"].get_value()
  assert after_attention.shape == (16, SEQ, 16)


def _nnx_namespace():
  return dict(Transformer=Transformer, batches=[_sequences(16, seed) for seed in range(4)])


@pytest.mark.filterwarnings("error")
def test_nnx_einsum_transformer_under_the_users_nnx_capture():
  """No input_axes: model=model on the optimizer line reads the einsum
  equations (their contracted D is not the kernels' leading axis)."""
  assert len(NNX_EDITS) == CHANGES
  _assert_trains(_run(NNX_OPTAX, 12, **_nnx_namespace())["losses"], 0.8)
  _check_nnx(_run(_edit(NNX_OPTAX, NNX_EDITS), 12, **_nnx_namespace()))


# --------------------------------------------------------------------------
# imagenet: linen ResNet with BatchNorm, pmap with axis_name


class ResNetBlock(nn.Module):
  filters: int
  norm: Any
  strides: tuple = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = nn.relu(self.norm()(nn.Conv(self.filters, (3, 3), self.strides, use_bias=False)(x)))
    y = self.norm()(nn.Conv(self.filters, (3, 3), use_bias=False)(y))
    if residual.shape != y.shape:
      residual = self.norm()(nn.Conv(self.filters, (1, 1), self.strides, use_bias=False)(residual))
    return nn.relu(residual + y)


class ResNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = functools.partial(
      nn.BatchNorm, use_running_average=not train, momentum=0.9, axis_name="batch"
    )
    x = nn.relu(norm()(nn.Conv(8, (3, 3), use_bias=False)(x)))
    x = ResNetBlock(8, norm)(x)
    x = ResNetBlock(16, norm, strides=(2, 2))(x)
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


RESNET_OPTAX = """
from flax import jax_utils
from flax.training import train_state

class TrainState(train_state.TrainState):
  batch_stats: Any

def train(steps):
  global state
  state = TrainState.create(apply_fn=model.apply, params=variables["params"], batch_stats=variables["batch_stats"], tx=optax.sgd(0.3, momentum=0.9))
  state = jax_utils.replicate(state, devices)

  def train_step(state, batch):
    def loss_fn(params):
      logits, new_model_state = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, batch["image"], mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
      return loss, (new_model_state, logits)
    (loss, (new_model_state, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, axis_name="batch")
    new_state = state.apply_gradients(grads=grads, batch_stats=new_model_state["batch_stats"])
    return new_state, jax.lax.pmean(loss, axis_name="batch")

  p_train_step = jax.pmap(train_step, axis_name="batch", devices=devices)
  losses = []
  for i in range(steps):
    idx = np.arange(i * 32, (i + 1) * 32) % len(x_train)
    batch = {"image": x_train[idx].reshape(len(devices), -1, 8, 8, 1),
             "label": y_train[idx].reshape(len(devices), -1)}
    state, loss = p_train_step(state, batch)
    losses.append(loss[0])
  return losses
"""

RESNET_EDITS = {
  "optimizer": (
    '  state = TrainState.create(apply_fn=model.apply, params=variables["params"], batch_stats=variables["batch_stats"], tx=optax.sgd(0.3, momentum=0.9))',
    '  state = TrainState.create(apply_fn=model.apply, params=variables["params"], batch_stats=variables["batch_stats"], tx=nysact_optax.nysact(0.1, momentum=0.9, axis_name="batch"))',
  ),
  "gradient": (
    "    (loss, (new_model_state, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)",
    "    ((loss, (new_model_state, logits)), grads), acts = nysact_optax.value_and_grad(loss_fn, has_aux=True)(state.params)",
  ),
  "update": (
    '    new_state = state.apply_gradients(grads=grads, batch_stats=new_model_state["batch_stats"])',
    '    new_state = nysact_optax.apply_gradients(state, grads=grads, batch_stats=new_model_state["batch_stats"], activations=acts)',
  ),
}


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices (tests/conftest.py)")
def test_linen_resnet_with_batch_norm_under_pmap():
  data = _digits()
  model = ResNet()
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), data.x_train[:2])
  ns = dict(
    model=model,
    variables=variables,
    x_train=data.x_train,
    y_train=data.y_train,
    devices=jax.devices()[:2],
    Any=Any,
  )
  assert len(RESNET_EDITS) == CHANGES
  # The optax version is not run here (the costliest pattern under pmap);
  # _edit checks the diff is exactly these lines.
  run = _run(_edit(RESNET_OPTAX, RESNET_EDITS), 20, **ns)
  _assert_trains(run["losses"], 0.8)
  state = run["state"]
  for leaf in jax.tree.leaves(state):  # every replica holds the same
    np.testing.assert_array_equal(leaf[1], leaf[0])
  assert not np.allclose(
    state.batch_stats["BatchNorm_0"]["mean"][0], variables["batch_stats"]["BatchNorm_0"]["mean"]
  )
  layers = _layers(jax.tree.map(lambda a: a[0], state.opt_state))
  assert "Dense_0" in layers and "ResNetBlock_1/Conv_2" in layers and len(layers) == 7
