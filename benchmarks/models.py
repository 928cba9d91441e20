"""flax.linen models used by the benchmarks and the training-quality studies.

* :class:`FashionCNN`: 3 conv + 2 dense layers for 28x28x1 images.
* :class:`ResNet20`: the CIFAR-style ResNet-20 (He et al. 2016; 3 stages of
  3 basic blocks, 16/32/64 channels) with BatchNorm, so ``apply`` needs
  ``mutable=["batch_stats"]`` in training.
* :class:`CharTransformer`: a decoder-only (GPT-style, pre-LayerNorm)
  character language model built on ``nn.MultiHeadDotProductAttention``.
* :class:`ViT`: a small vision transformer (Dosovitskiy et al. 2021) for
  28x28x1 images: non-overlapping patches, pre-LN blocks, mean pooling.

Every preconditionable layer is an ``nn.Conv``, ``nn.Dense`` or
``nn.DenseGeneral`` (what ``nysact_optax.capture_activations`` covers). The
attention projections keep ``use_bias=True``: NysAct's default kernel-layout
rule reads a ``DenseGeneral`` kernel ``(d, heads, head_dim)`` as having one
input axis because its bias has two axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
  "BasicBlock",
  "CharMLP",
  "CharTransformer",
  "FashionCNN",
  "ResNet20",
  "TransformerBlock",
  "VGGStrided",
  "ViT",
]


class FashionCNN(nn.Module):
  """3 conv (3x3, SAME, ReLU; 2x2 max-pool after the 2nd and 3rd) + 2 dense.

  On 28x28x1 inputs with the default widths: 28x28x32 -> 28x28x64 -> pool
  14x14x64 -> 14x14x64 -> pool 7x7x64 -> Dense(128) -> Dense(num_classes).
  """

  num_classes: int = 10
  features: Sequence[int] = (32, 64, 64)
  hidden: int = 128

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i, f in enumerate(self.features):
      x = nn.relu(nn.Conv(f, (3, 3), padding="SAME")(x))
      if i >= 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_classes)(x)


class VGGStrided(nn.Module):
  """A VGG-style CNN for 32x32x3 images whose downsampling is strided convs:
  3x3 convs of 32 (stride 1), 64, 128, 128 (stride 2 each), then Dense(256)
  and the head."""

  num_classes: int = 10
  features: Sequence[int] = (32, 64, 128, 128)
  hidden: int = 256

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i, f in enumerate(self.features):
      x = nn.relu(nn.Conv(f, (3, 3), strides=(1, 1) if i == 0 else (2, 2), padding="SAME")(x))
    x = nn.relu(nn.Dense(self.hidden)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes)(x)


class CharMLP(nn.Module):
  """A character MLP language model: the previous ``context`` characters,
  embedded (``vocab_size x embed``), concatenated, two Dense(``hidden``)
  layers, and the next character's logits."""

  vocab_size: int = 32
  context: int = 8
  embed: int = 16
  hidden: int = 512

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = nn.Embed(self.vocab_size, self.embed)(tokens).reshape(tokens.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden)(x))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.vocab_size)(x)


class BasicBlock(nn.Module):
  """Two 3x3 convs with BatchNorm; a 1x1 conv + BN shortcut when the shape
  changes (ResNet "option B")."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
    y = nn.Conv(self.features, (3, 3), self.strides, padding="SAME", use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False)(y)
    y = norm()(y)
    if x.shape[-1] != self.features or self.strides != 1:
      x = nn.Conv(self.features, (1, 1), self.strides, use_bias=False)(x)
      x = norm()(x)
    return nn.relu(x + y)


class ResNet20(nn.Module):
  """ResNet-20 (CIFAR variant): conv 16, 3 stages x 3 blocks (16, 32, 64
  channels, stride 2 at stages 2 and 3), global average pool, dense head."""

  num_classes: int = 10
  stage_sizes: Sequence[int] = (3, 3, 3)
  widths: Sequence[int] = (16, 32, 64)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    x = nn.Conv(self.widths[0], (3, 3), padding="SAME", use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    for stage, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for b in range(blocks):
        strides = 2 if stage > 0 and b == 0 else 1
        x = BasicBlock(width, strides)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


class TransformerBlock(nn.Module):
  """Pre-LayerNorm block: causal self-attention, then a GELU MLP."""

  width: int
  num_heads: int
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    y = nn.LayerNorm()(x)
    y = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      qkv_features=self.width,
      use_bias=True,
      deterministic=True,
    )(y, mask=mask)
    x = x + y
    y = nn.LayerNorm()(x)
    y = nn.gelu(nn.Dense(self.mlp_ratio * self.width)(y))
    y = nn.Dense(self.width)(y)
    return x + y


class CharTransformer(nn.Module):
  """Decoder-only character language model.

  Token and learned position embeddings, ``num_layers`` pre-LN blocks, a
  final LayerNorm and an untied dense head over the vocabulary. Inputs are
  int token ids ``(batch, tokens)`` with ``tokens <= context``; outputs are
  logits ``(batch, tokens, vocab_size)``.
  """

  vocab_size: int
  num_layers: int = 4
  width: int = 256
  num_heads: int = 4
  context: int = 128

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    t = tokens.shape[-1]
    if t > self.context:
      raise ValueError(f"{t} tokens > context {self.context}")
    x = nn.Embed(self.vocab_size, self.width, name="token_embed")(tokens)
    pos = nn.Embed(self.context, self.width, name="position_embed")(jnp.arange(t))
    x = x + pos
    mask = nn.make_causal_mask(tokens)
    for _ in range(self.num_layers):
      x = TransformerBlock(self.width, self.num_heads)(x, mask)
    x = nn.LayerNorm()(x)
    return nn.Dense(self.vocab_size, name="head")(x)


class ViT(nn.Module):
  """Vision transformer: ``patch x patch`` patches embedded by a ``Dense``,
  learned position embeddings, ``depth`` pre-LN blocks (bidirectional
  attention), a final LayerNorm, mean pooling over patches, a dense head.

  On 28x28x1 inputs with the defaults: 49 patches of 16 pixels, width 128,
  depth 4, 4 heads, 0.8M parameters.
  """

  num_classes: int = 10
  patch: int = 4
  width: int = 128
  depth: int = 4
  num_heads: int = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    p = self.patch
    if h % p or w % p:
      raise ValueError(f"image {h}x{w} is not a multiple of patch={p}")
    x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(n, (h // p) * (w // p), p * p * c)
    x = nn.Dense(self.width, name="patch_embed")(x)
    pos = self.param("position_embed", nn.initializers.normal(0.02), (x.shape[1], self.width))
    x = x + pos[None]
    for _ in range(self.depth):
      x = TransformerBlock(self.width, self.num_heads)(x, None)
    x = nn.LayerNorm()(x)
    return nn.Dense(self.num_classes, name="head")(x.mean(axis=1))


def param_count(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
