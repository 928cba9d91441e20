"""nysact_optax.muon_dimension_numbers: Muon's layout as its authors run it
(hidden matrices by their reduction/output axes; embeddings, head, biases,
norms to AdamW), on the project's char transformer and a flax MHA."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import nysact_optax

Dims = optax.contrib.MuonDimensionNumbers


def _flat(tree):
  leaves = jax.tree_util.tree_flatten_with_path(
    tree, is_leaf=lambda x: x is None or isinstance(x, Dims)
  )[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): v for path, v in leaves}


def _char_params():
  from benchmarks import models

  model = models.CharTransformer(vocab_size=13, num_layers=2, width=16, num_heads=2, context=8)
  with jax.numpy_rank_promotion("allow"):
    return model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]


def test_char_transformer_layout():
  params = _char_params()
  dims = _flat(nysact_optax.muon_dimension_numbers(params, exclude=["^head$"]))
  shapes = {k: v.shape for k, v in _flat(params).items()}
  assert dims.keys() == shapes.keys()
  muon = {k: v for k, v in dims.items() if v is not None}
  attn = "TransformerBlock_{}/MultiHeadDotProductAttention_0/{}/kernel"
  want = {}
  for b in range(2):
    for proj in ("query", "key", "value"):
      want[attn.format(b, proj)] = Dims((0,), (1, 2))  # (d, heads, head_dim)
    want[attn.format(b, "out")] = Dims((0, 1), (2,))  # (heads, head_dim, d)
    for dense in ("Dense_0", "Dense_1"):
      want[f"TransformerBlock_{b}/{dense}/kernel"] = Dims((0,), (1,))
  assert muon == want
  assert shapes[attn.format(0, "query")] == (16, 2, 8)
  assert shapes[attn.format(0, "out")] == (2, 8, 16)
  # AdamW: the embeddings, the excluded head, every bias (the q/k/v biases are
  # 2-D, (heads, head_dim)) and the norms
  for name in (
    "token_embed/embedding",
    "position_embed/embedding",
    "head/kernel",
    "head/bias",
    "TransformerBlock_0/MultiHeadDotProductAttention_0/query/bias",
    "TransformerBlock_0/LayerNorm_0/scale",
  ):
    assert dims[name] is None, name
  assert len(shapes["TransformerBlock_0/MultiHeadDotProductAttention_0/query/bias"]) == 2
  # without exclude the head is a hidden matrix like any Dense (the documented rule)
  assert _flat(nysact_optax.muon_dimension_numbers(params))["head/kernel"] == Dims((0,), (1,))


class _MHA(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16, use_bias=False)(x)


def test_mha_layout_and_muon_orthogonalises_the_q_kernel():
  x = jax.random.normal(jax.random.key(0), (2, 5, 12))
  params = _MHA().init(jax.random.key(1), x)["params"]
  dims = nysact_optax.muon_dimension_numbers(params)
  mha = dims["MultiHeadDotProductAttention_0"]
  assert mha["query"]["kernel"] == Dims((0,), (1, 2))  # (12, 4, 4), no bias
  assert mha["out"]["kernel"] == Dims((0, 1), (2,))  # (4, 4, 12)
  # optax's muon with the callable form: one step from zero momentum on a
  # random gradient of the 3-D q kernel gives a Newton-Schulz-orthogonalised
  # matrix in its (d, heads * head_dim) view: singular values ~1 (NS's
  # quintic lands them in about [0.7, 1.2]), the update's row space the
  # gradient's, and the layout's own scale (consistent RMS 0.2 x sqrt(max)).
  tx = optax.contrib.muon(
    1.0,
    nesterov=False,
    beta=0.0,
    consistent_rms=0.2,
    muon_weight_dimension_numbers=nysact_optax.muon_dimension_numbers,
  )
  state = tx.init(params)
  grads = jax.tree.map(
    lambda p: jax.random.normal(jax.random.key(p.size), p.shape, p.dtype), params
  )
  updates, _ = jax.jit(tx.update)(grads, state, params)
  q = -np.asarray(updates["MultiHeadDotProductAttention_0"]["query"]["kernel"], np.float64)
  g = np.asarray(grads["MultiHeadDotProductAttention_0"]["query"]["kernel"], np.float64)
  qm, gm = q.reshape(12, 16) / (0.2 * np.sqrt(16)), g.reshape(12, 16)
  s = np.linalg.svd(qm, compute_uv=False)
  assert s.shape == (12,) and s.min() > 0.6 and s.max() < 1.25, s
  # the exact polar factor U V^T of the gradient is close (NS is approximate)
  u, _, vt = np.linalg.svd(gm, full_matrices=False)
  polar = u @ vt
  assert np.linalg.norm(qm - polar) / np.linalg.norm(polar) < 0.35
  assert np.sum(qm * polar) / (np.linalg.norm(qm) * np.linalg.norm(polar)) > 0.95


def test_masked_trees_keep_their_structure():
  # optax calls the callable on partitioned trees with MaskedNode entries
  params = _char_params()
  full = nysact_optax.muon_dimension_numbers(params)
  masked = jax.tree.map(
    lambda d, p: p if d is not None else optax.MaskedNode(),
    full,
    params,
    is_leaf=lambda x: x is None or isinstance(x, Dims),
  )
  dims = nysact_optax.muon_dimension_numbers(masked)
  assert _flat(dims) == _flat(full)
