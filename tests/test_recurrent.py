"""Recurrent cells: flax's LSTMCell, OptimizedLSTMCell, GRUCell and SimpleCell
under nn.RNN, nn.scan and called by hand (linen), and under nnx.RNN, nnx.scan
and called by hand (NNX).

A cell's input and hidden projections are layers whose weights are shared
across time steps: their statistics are those of every (batch, time) row
(K-FAC for RNNs, Martens, Ba, Johnson 2018), checked in exact mode against
``G (A^T A / n + rho I)^{-1}`` with ``A`` stacking the rows of all steps.
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
from tests import _reference
from tests.test_nnx import RHO, _normal

EXACT = dict(rank=10**6, damping=RHO, stat_decay=0.0, cov_update_every=1, inv_update_every=1)
CELLS = {
  "lstm": nn.LSTMCell,
  "optimized_lstm": nn.OptimizedLSTMCell,
  "gru": nn.GRUCell,
  "simple": nn.SimpleCell,
}
B, T, D, H = 4, 5, 3, 2


class Scanned(nn.Module):
  """The cell under a hand-written nn.scan, as flax's sst2 example writes it."""

  cell: str

  @functools.partial(
    nn.scan, variable_broadcast="params", in_axes=1, out_axes=1, split_rngs={"params": False}
  )
  @nn.compact
  def __call__(self, carry, x):
    return CELLS[self.cell](H, name="cell")(carry, x)


class Encoder(nn.Module):
  """(B, T, D) -> every step's hidden state (B, T, H)."""

  cell: str
  form: str

  @nn.compact
  def __call__(self, x):
    if self.form == "rnn":
      return nn.RNN(CELLS[self.cell](H), name="rnn")(x)
    carry = CELLS[self.cell](H, parent=None).initialize_carry(jax.random.PRNGKey(0), x[:, 0].shape)
    if self.form == "scan":
      return Scanned(self.cell, name="scanned")(carry, x)[1]
    cell = CELLS[self.cell](H, name="cell")
    ys = []
    for t in range(x.shape[1]):
      carry, y = cell(carry, x[:, t])
      ys.append(y)
    return jnp.stack(ys, axis=1)


def _kernels(params):
  """``{layer path: {'kernel': ..., 'bias': ...}}`` of a params tree."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  layers = {}
  for path, leaf in leaves:
    names = [p.key for p in path]
    layers.setdefault("/".join(names[:-1]), {})[names[-1]] = leaf
  return layers


def _rows(name, x, ys):
  """Every step's input rows of the gate ``name``: the cell's input for an
  input projection, the previous hidden state (zeros first) for a hidden one."""
  gate = name.rsplit("/", 1)[-1]
  if gate.startswith("i"):
    return np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  prev = np.concatenate([np.zeros_like(ys[:, :1]), ys[:, :-1]], axis=1)
  return np.asarray(prev, np.float64).reshape(-1, ys.shape[-1])


def _setup(cell, form):
  model = Encoder(cell, form)
  x = _normal((B, T, D), 0)
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  target = _normal((B, T, H), 2)

  def loss_fn(p):
    return jnp.sum(model.apply({"params": p}, x) * target)

  return model, x, params, loss_fn


@pytest.mark.parametrize("form", ["rnn", "scan", "by_hand"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_exact_mode_equals_the_unrolled_damped_inverse(cell, form):
  model, x, params, loss_fn = _setup(cell, form)
  (_, grads), acts = nysact_optax.value_and_grad(loss_fn)(params)
  ys = np.asarray(model.apply({"params": params}, x), np.float64)
  gates = _kernels(params)
  assert sorted(acts) == sorted(gates)  # every projection, and nothing else
  tx = nysact_optax.scale_by_nysact(**EXACT)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), activations=acts)
  g_layers, u_layers = _kernels(grads), _kernels(updates)
  for name in gates:
    a = _rows(name, x, ys)
    g, u = g_layers[name], u_layers[name]
    gmat, umat = (np.asarray(t["kernel"], np.float64) for t in (g, u))
    if "bias" in g:
      a = _reference.with_bias_column(a)
      gmat = np.concatenate([gmat, np.asarray(g["bias"], np.float64)[None]])
      umat = np.concatenate([umat, np.asarray(u["bias"], np.float64)[None]])
    expected = _reference.damped_inverse(a, RHO) @ gmat
    np.testing.assert_allclose(
      umat, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max(), err_msg=name
    )


@pytest.mark.parametrize("form", ["rnn", "scan"])
def test_capture_activations_equals_value_and_grad(form):
  model, x, params, loss_fn = _setup("optimized_lstm", form)
  _, acts = nysact_optax.value_and_grad(loss_fn)(params)
  _, want = nysact_optax.capture_activations(model.apply)({"params": params}, x)
  assert sorted(acts) == sorted(want)
  for name in acts:
    assert acts[name].spec == want[name].spec
    jax.tree.map(np.testing.assert_array_equal, list(acts[name].inputs), list(want[name].inputs))


@pytest.mark.parametrize("sketch", ["gaussian", "subcolumns"])
def test_statistics_path_equals_activations_path(sketch):
  _, _, params, loss_fn = _setup("lstm", "rnn")
  (_, grads), acts = nysact_optax.value_and_grad(loss_fn)(params)
  tx = nysact_optax.scale_by_nysact(
    rank=2, sketch=sketch, cov_update_every=1, inv_update_every=1, stat_decay=0.5, damping=RHO
  )
  state = tx.init(params)
  want, s1 = jax.jit(lambda g, s, a: tx.update(g, s, activations=a))(grads, state, acts)
  stats = jax.jit(nysact_optax.sketched_statistics)(state, acts)
  got, s2 = jax.jit(lambda g, s, st: tx.update(g, s, statistics=st))(grads, state, stats)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
  jax.tree.map(close, got, want)
  jax.tree.map(close, s2.layers, s1.layers)


class _NNXEncoder(nnx.Module):
  def __init__(self, cell, rngs):
    self.cell = cell(D, H, rngs=rngs)

  def __call__(self, x):
    carry = self.cell.initialize_carry(x[:, 0].shape, nnx.Rngs(0))
    ys = []
    for t in range(x.shape[1]):
      carry, y = self.cell(carry, x[:, t])
      ys.append(y)
    return jnp.stack(ys, axis=1)


class _NNXScanned(nnx.Module):
  """(B, T, D) -> (B, T, H): the cell under nnx.RNN or a hand-written nnx.scan."""

  def __init__(self, cell, form, rngs):
    self.form = form
    if form == "rnn":
      self.rnn = nnx.RNN(cell(D, H, rngs=rngs))
    else:
      self.cell = cell(D, H, rngs=rngs)

  def __call__(self, x):
    if self.form == "rnn":
      return self.rnn(x)

    @nnx.scan(in_axes=(None, nnx.Carry, 1), out_axes=(nnx.Carry, 1))
    def steps(cell, carry, x_t):  # the cell broadcast, as flax's sst2 example
      return cell(carry, x_t)

    carry = self.cell.initialize_carry(x[:, 0].shape, nnx.Rngs(0))
    return steps(self.cell, carry, x)[1]


NNX_CELLS = [nnx.LSTMCell, nnx.OptimizedLSTMCell, nnx.GRUCell, nnx.SimpleCell]


def _nnx_exact(model, x, grads, acts):
  """Exact mode on every projection of ``model`` equals ``G (A^T A / n + rho
  I)^{-1}``, ``A`` every (batch, time) row of its input."""
  ys = np.asarray(model(x), np.float64)
  params = nnx.pure(nnx.state(model, nnx.Param))
  tx = nysact_optax.scale_by_nysact(**EXACT, model=model)
  grads = nnx.pure(grads)
  updates, _ = tx.update(grads, tx.init(params), activations=acts)
  linears = [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear)]
  assert len(linears) in (2, 6, 8)
  for path, _ in linears:
    name = path[-1]  # NNX names: ii/if_/... (LSTMCell), dense_i/dense_h
    g = _kernels(grads)["/".join(map(str, path))]
    u = _kernels(updates)["/".join(map(str, path))]
    a = _rows("i" if name.startswith(("i", "dense_i")) else "h", x, ys)
    gmat, umat = (np.asarray(t["kernel"], np.float64) for t in (g, u))
    if "bias" in g:
      a = _reference.with_bias_column(a)
      gmat = np.concatenate([gmat, np.asarray(g["bias"], np.float64)[None]])
      umat = np.concatenate([umat, np.asarray(u["bias"], np.float64)[None]])
    expected = _reference.damped_inverse(a, RHO) @ gmat
    np.testing.assert_allclose(
      umat, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max(), err_msg=str(path)
    )


@pytest.mark.parametrize("cell", NNX_CELLS, ids=lambda c: c.__name__)
def test_nnx_cells_called_by_hand_are_exact(cell):
  model = _NNXEncoder(cell, nnx.Rngs(0))
  x = _normal((B, T, D), 0)
  target = _normal((B, T, H), 2)
  (_, grads), acts = nysact_optax.value_and_grad(lambda m: jnp.sum(m(x) * target))(model)
  _nnx_exact(model, x, grads, acts)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("form", ["rnn", "scan"])
@pytest.mark.parametrize("cell", NNX_CELLS, ids=lambda c: c.__name__)
def test_nnx_cells_under_nnx_scan_are_exact(cell, form):
  """The scan shares the cell's weights across steps: each projection's
  inputs come out with a leading time axis, and its statistics are those of
  every (batch, time) row, for value_and_grad and capture_activations alike."""
  model = _NNXScanned(cell, form, nnx.Rngs(0))
  x = _normal((B, T, D), 0)
  target = _normal((B, T, H), 2)
  (_, grads), acts = nysact_optax.value_and_grad(lambda m: jnp.sum(m(x) * target))(model)
  _, want = nysact_optax.capture_activations(model)(x)
  flat, want_flat = dict(nnx.to_flat_state(acts)), dict(nnx.to_flat_state(want))
  assert sorted(flat) == sorted(want_flat) and flat
  for path, inputs in flat.items():
    assert [a.shape[:2] for a in inputs.inputs] == [(T, B)], path
    assert inputs.spec == want_flat[path].spec
    jax.tree.map(np.testing.assert_array_equal, list(inputs.inputs), list(want_flat[path].inputs))
  _nnx_exact(model, x, grads, acts)


class _NNXLSTMLM(nnx.Module):
  def __init__(self, vocab, rngs):
    self.embed = nnx.Embed(vocab, 16, rngs=rngs)
    self.rnn = nnx.RNN(nnx.LSTMCell(16, 32, rngs=rngs))
    self.head = nnx.Linear(32, vocab, rngs=rngs)

  def __call__(self, tokens):
    return self.head(self.rnn(self.embed(tokens)))


def _counting(vocab):
  """Batches of noisy counting sequences (t+1 mod V, 20 % random tokens)."""

  def batches(i):
    r = np.random.default_rng(i)
    start = r.integers(0, vocab, (16, 1))
    seq = (start + np.arange(13)) % vocab
    seq = np.where(r.random(seq.shape) < 0.2, r.integers(0, vocab, seq.shape), seq)
    return jnp.asarray(seq[:, :-1]), jnp.asarray(seq[:, 1:])

  return batches


@pytest.mark.filterwarnings("error")
def test_nnx_lstm_language_model_under_nnx_rnn_trains():
  """nnx.RNN(nnx.LSTMCell) with nnx.Optimizer and no exclude=: the next token."""
  vocab = 8
  batches = _counting(vocab)
  model = _NNXLSTMLM(vocab, nnx.Rngs(0))
  tx = nysact_optax.nysact(0.5, rank=4, damping=1.0, cov_update_every=2, inv_update_every=10)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, tokens, labels):
    def loss_fn(model):
      logits = model(tokens)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    (loss, grads), acts = nysact_optax.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads, activations=acts)
    return loss

  losses = [float(step(model, optimizer, *batches(i))) for i in range(40)]
  layers = [layer.name for layer in optimizer.opt_state[0].config.layers]
  assert len(layers) == 9 and "head" in layers, layers  # the 8 projections and the head
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses


def _train(model, params, batches, loss_of_logits, steps, lr):
  """The quickstart's train step: nysact, value_and_grad, activations=."""
  tx = nysact_optax.nysact(lr, rank=4, damping=1.0, cov_update_every=2, inv_update_every=10)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    def loss_fn(p):
      return loss_of_logits(model.apply({"params": p}, batch[0]), batch[1])

    (loss, grads), acts = nysact_optax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for i in range(steps):
    params, opt_state, loss = step(params, opt_state, batches(i))
    losses.append(float(loss))
  return losses


class LSTMLM(nn.Module):
  vocab: int

  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(self.vocab, 16)(tokens)
    h = nn.RNN(nn.LSTMCell(32))(h)
    return nn.Dense(self.vocab)(h)


def test_lstm_language_model_trains():
  """nn.RNN(nn.LSTMCell) with no exclude= and no variable_axes: next token
  of noisy counting sequences (t+1 mod V, 20 % random tokens)."""
  vocab = 8
  batches = _counting(vocab)

  model = LSTMLM(vocab)
  params = model.init(jax.random.PRNGKey(0), batches(0)[0])["params"]
  xent = lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  losses = _train(model, params, batches, xent, steps=40, lr=0.5)
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses


class SimpleLSTM(nn.Module):
  """flax's sst2 encoder: OptimizedLSTMCell under a hand-written nn.scan."""

  hidden: int

  @functools.partial(
    nn.transforms.scan,
    variable_broadcast="params",
    in_axes=1,
    out_axes=1,
    split_rngs={"params": False},
  )
  @nn.compact
  def __call__(self, carry, x):
    return nn.OptimizedLSTMCell(self.hidden)(carry, x)


class SST2Shaped(nn.Module):
  """Embedding -> nn.scan'd or nn.RNN OptimizedLSTMCell -> Dense classifier."""

  form: str

  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(6, 8)(tokens)
    if self.form == "scan":
      carry = nn.OptimizedLSTMCell(16, parent=None).initialize_carry(
        jax.random.PRNGKey(0), h[:, 0].shape
      )
      _, h = SimpleLSTM(16)(carry, h)
    else:
      h = nn.RNN(nn.OptimizedLSTMCell(16))(h)
    return nn.Dense(2)(h[:, -1])


@pytest.mark.parametrize("form", ["scan", "rnn"])
def test_sst2_shaped_classifier_trains(form):
  """Label: whether token 1 occurs in the sequence."""

  def batches(i):
    r = np.random.default_rng(i)
    seq = r.integers(2, 6, (32, 8))
    label = r.random(32) < 0.5
    seq[label, r.integers(0, 8, label.sum())] = 1
    return jnp.asarray(seq), jnp.asarray(label.astype(np.int32))

  model = SST2Shaped(form)
  params = model.init(jax.random.PRNGKey(0), batches(0)[0])["params"]
  xent = lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  losses = _train(model, params, batches, xent, steps=40, lr=0.5)
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses


class OwnDense(nn.Module):
  """Computes its product itself: the capture cannot see it."""

  @nn.compact
  def __call__(self, x):
    return x @ self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 3))


class OwnProducts(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = OwnDense(name="mix_a")(x) + OwnDense(name="mix_b")(x)
    return nn.Dense(2, name="head")(h)


def test_uncovered_layers_are_one_error_with_one_exclude_pattern():
  model, x = OwnProducts(), _normal((4, 3), 0)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  (_, grads), acts = nysact_optax.value_and_grad(lambda p: jnp.sum(model.apply({"params": p}, x)))(
    params
  )
  tx = nysact_optax.scale_by_nysact(rank=2)
  with pytest.raises(
    ValueError,
    match=r"NysAct cannot precondition 2 layer\(s\) as captured: layer 'mix_a': no "
    r"captured inputs \(kernel \(3, 3\)\).*computes its product itself.*layer 'mix_b'.*"
    r"exclude=\['\^\(\?:mix_a\|mix_b\)\$'\]",
  ) as err:
    tx.update(grads, tx.init(params), activations=acts)
  pattern = str(err.value).rsplit("exclude=[", 1)[1][1:-3]
  tx = nysact_optax.scale_by_nysact(rank=2, exclude=[pattern])
  updates, _ = tx.update(grads, tx.init(params), activations=acts)
  np.testing.assert_array_equal(updates["mix_a"]["kernel"], grads["mix_a"]["kernel"])
  assert [layer.name for layer in tx.init(params).config.layers] == ["head"]


class _JittedRNN(nnx.Module):
  def __init__(self, rngs):
    self.rnn = nnx.RNN(nnx.GRUCell(D, H, rngs=rngs))

  def __call__(self, x):
    return nnx.jit(lambda rnn, x: rnn(x))(self.rnn, x)


def test_nnx_scan_inside_a_further_transform_names_the_layer():
  """The scan's outputs live in the inner transform's trace: both captures
  raise, naming the layer, rather than leaking tracers or dropping inputs."""
  model, x = _JittedRNN(nnx.Rngs(0)), _normal((B, T, D), 0)
  with pytest.raises(ValueError, match=r"layer 'rnn/cell/dense_i' runs under nnx.scan inside"):
    nysact_optax.capture_activations(model)(x)
  with pytest.raises(ValueError, match=r"layer 'rnn/cell/dense_i' runs under a JAX transform"):
    nysact_optax.value_and_grad(lambda m: jnp.sum(m(x)))(model)
  assert not any(hasattr(m, "_nysact_captured_path") for _, m in nnx.iter_modules(model))
