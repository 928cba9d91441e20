"""benchmarks.soap: two-sided SOAP against a float64 NumPy transcription of
the paper's update (Vyas et al. 2024, arXiv 2409.11321, Algorithm 3 with the
authors' first-step and refresh conventions), across basis refreshes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import soap

B1 = B2 = 0.95
EPS = 1e-8
FREQ = 10


def _eigvecs_desc(c):
  return np.linalg.eigh(c)[1][:, ::-1]


class NumpySoap:
  """One matrix (m x n) in float64, written step by step from the paper:
  L, R EMAs of G G^T and G^T G; bases by eigh after the first gradient (no
  update then), then every FREQ steps one power iteration + QR of the
  columns sorted by estimated eigenvalue; Adam in rotated coordinates, the
  first moment in the parameter's coordinates; a side above ``max_dim`` has
  no basis."""

  def __init__(self, m, n, max_dim=10000):
    self.ql = np.eye(m) if m <= max_dim else None
    self.qr = np.eye(n) if n <= max_dim else None
    self.l = np.zeros((m, m)) if self.ql is not None else None
    self.r = np.zeros((n, n)) if self.qr is not None else None
    self.m = np.zeros((m, n))
    self.v = np.zeros((m, n))
    self.calls = 0

  def rot(self, x):
    if self.ql is not None:
      x = self.ql.T @ x
    if self.qr is not None:
      x = x @ self.qr
    return x

  def back(self, x):
    if self.ql is not None:
      x = self.ql @ x
    if self.qr is not None:
      x = x @ self.qr.T
    return x

  def stats(self, g):
    if self.l is not None:
      self.l = B2 * self.l + (1 - B2) * g @ g.T
    if self.r is not None:
      self.r = B2 * self.r + (1 - B2) * g.T @ g

  def step(self, g):
    g = np.asarray(g, np.float64)
    t = self.calls
    self.calls += 1
    if t == 0:
      self.stats(g)
      if self.l is not None:
        self.ql = _eigvecs_desc(self.l)
      if self.r is not None:
        self.qr = _eigvecs_desc(self.r)
      return np.zeros_like(g)
    self.m = B1 * self.m + (1 - B1) * g
    self.v = B2 * self.v + (1 - B2) * self.rot(g) ** 2
    n = self.back(self.rot(self.m) / (np.sqrt(self.v) + EPS))
    n *= np.sqrt(1 - B2**t) / (1 - B1**t)
    self.stats(g)
    if t % FREQ == 0:
      if self.l is not None:
        order = np.argsort(-np.diag(self.ql.T @ self.l @ self.ql))
        self.v = self.v[order, :]
        self.ql = np.linalg.qr(self.l @ self.ql[:, order])[0]
      if self.r is not None:
        order = np.argsort(-np.diag(self.qr.T @ self.r @ self.qr))
        self.v = self.v[:, order]
        self.qr = np.linalg.qr(self.r @ self.qr[:, order])[0]
    return n


class NumpyAdam:
  def __init__(self, shape):
    self.m = np.zeros(shape)
    self.v = np.zeros(shape)
    self.calls = 0

  def step(self, g):
    g = np.asarray(g, np.float64)
    t = self.calls
    self.calls += 1
    if t == 0:
      return np.zeros_like(g)
    self.m = B1 * self.m + (1 - B1) * g
    self.v = B2 * self.v + (1 - B2) * g**2
    return self.m / (np.sqrt(self.v) + EPS) * np.sqrt(1 - B2**t) / (1 - B1**t)


def _grads(rng, shapes, steps):
  # a gradient with a drifting low-rank structure plus noise, so the bases move
  out = []
  base = {k: rng.normal(size=s) for k, s in shapes.items()}
  for _ in range(steps):
    out.append(
      {k: (base[k] + 0.7 * rng.normal(size=s)).astype(np.float32) for k, s in shapes.items()}
    )
    base = {k: 0.9 * v + 0.3 * rng.normal(size=v.shape) for k, v in base.items()}
  return out


@pytest.mark.parametrize(("max_dim", "head_dim"), [(10000, 3), (5, 2)])
def test_soap_matches_float64_transcription_across_refreshes(max_dim, head_dim):
  # an attention-like 3-D kernel (d=6, heads=2, head_dim): reduction axis 0,
  # output axes (1, 2) -> a 6 x (2 head_dim) matrix; its (2, head_dim) bias
  # and a (5, 4) embedding table. max_dim=5: the kernel's 6-side stays
  # unrotated (one-sided SOAP). The shapes keep the first gradient's
  # statistics free of repeated eigenvalues but for one null direction
  # (a basis unique up to signs, to which the update is invariant).
  n = 2 * head_dim
  shapes = {"kernel": (6, 2, head_dim), "bias": (2, head_dim), "embedding": (5, 4)}
  params = {
    "attn": {"query": {"kernel": jnp.zeros(shapes["kernel"]), "bias": jnp.zeros(shapes["bias"])}},
    "embed": {"embedding": jnp.zeros(shapes["embedding"])},
  }
  dims = soap.soap_dimension_numbers(params)
  assert dims["attn"]["query"]["kernel"] == optax.contrib.MuonDimensionNumbers((0,), (1, 2))
  assert dims["attn"]["query"]["bias"] is None
  assert dims["embed"]["embedding"] == optax.contrib.MuonDimensionNumbers((0,), (1,))
  tx = soap.scale_by_soap(max_precond_dim=max_dim)
  state = tx.init(params)
  update = jax.jit(tx.update)
  ref_k = NumpySoap(6, n, max_dim)
  ref_e = NumpySoap(5, 4, max_dim)
  ref_b = NumpyAdam(shapes["bias"])
  steps = 2 * FREQ + 5  # across the refreshes at steps 10 and 20
  for i, g in enumerate(_grads(np.random.default_rng(0), shapes, steps)):
    grads = {
      "attn": {"query": {"kernel": jnp.asarray(g["kernel"]), "bias": jnp.asarray(g["bias"])}},
      "embed": {"embedding": jnp.asarray(g["embedding"])},
    }
    u, state = update(grads, state)
    want_k = ref_k.step(g["kernel"].reshape(6, n)).reshape(shapes["kernel"])
    want_e = ref_e.step(g["embedding"])
    want_b = ref_b.step(g["bias"])
    got_k = np.asarray(u["attn"]["query"]["kernel"], np.float64)
    if i == 0:
      assert not np.any(got_k) and not np.any(np.asarray(u["embed"]["embedding"]))
    np.testing.assert_allclose(got_k, want_k, rtol=2e-3, atol=2e-4, err_msg=f"kernel, step {i}")
    np.testing.assert_allclose(
      np.asarray(u["embed"]["embedding"]), want_e, rtol=2e-3, atol=2e-4, err_msg=f"table, {i}"
    )
    np.testing.assert_allclose(
      np.asarray(u["attn"]["query"]["bias"]), want_b, rtol=1e-5, atol=1e-6, err_msg=f"bias, {i}"
    )
  # the rotation is real: SOAP's step differs from plain Adam's on the kernel
  adam = NumpyAdam(shapes["kernel"])
  for g in _grads(np.random.default_rng(0), shapes, steps):
    plain = adam.step(g["kernel"])
  assert np.abs(plain - want_k).max() > 0.1
  leaf = state.leaves["attn"]["query"]["kernel"]
  assert (leaf.q_left is None) == (max_dim == 5)  # 6 > 5: that side is not rotated
  q = np.asarray(leaf.q_right[0], np.float64)
  np.testing.assert_allclose(q.T @ q, np.eye(n), atol=1e-5)


def test_soap_smoke_flax_model_init_update_jit():
  from benchmarks import models

  with jax.numpy_rank_promotion("allow"):  # the model broadcasts position embeddings
    _smoke(models)


def _smoke(models):
  model = models.CharTransformer(vocab_size=11, num_layers=1, width=16, num_heads=2, context=8)
  x = jnp.zeros((2, 8), jnp.int32)
  params = model.init(jax.random.key(0), x)["params"]
  tx = soap.soap(1e-2)
  state = tx.init(params)

  def loss(p, x):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, (x + 1) % 11).mean()

  @jax.jit
  def step(p, s, x):
    value, g = jax.value_and_grad(loss)(p, x)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, value

  x = jax.random.randint(jax.random.key(1), (4, 8), 0, 11)
  losses = []
  for _ in range(15):
    params, state, value = step(params, state, x)
    losses.append(float(value))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  leaves = state[0].leaves
  q = leaves["TransformerBlock_0"]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
  assert q.q_left.shape == (1, 16, 16) and q.q_right.shape == (1, 16, 16)
  assert leaves["token_embed"]["embedding"].q_left.shape == (1, 11, 11)
  assert leaves["LayerNorm_0"]["scale"].q_left is None
