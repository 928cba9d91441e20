"""The task registry: which model on which data, and the loss both harnesses
train.

Two kinds of use, one set of models (:mod:`benchmarks.models`), data
(:mod:`benchmarks.data`) and losses:

* timing (``step_time``, ``memory``, ``precision``, ``profile_update``): a
  :class:`Task` with a fixed list of device batches, built by
  :func:`build_task` for ``cnn``, ``resnet20`` or ``transformer``
  (:data:`TIMING_TASKS`);
* training quality (``quality``): :func:`load_data` for a task of
  :data:`QUALITY_TASKS` and a split, :func:`make_model`, the augmented
  stream of :func:`train_batches` and the jitted :func:`make_eval`.

Every loss is :func:`make_loss`: mean softmax cross-entropy over examples (and
tokens), optionally capturing NysAct's layer inputs and registering the loss
with kfac-jax.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax

import nysact_optax
from benchmarks import data as bdata
from benchmarks import models

# name -> description
TIMING_TASKS = {
  "digits": "the demo's two-conv CNN on scikit-learn's 8x8 digits (make train's model)",
  "cnn": "FashionCNN (3 conv + 2 dense) on Fashion-MNIST 28x28x1",
  "vgg32": "VGG-style CNN, strided 3x3 convs 32-64-128-128 + Dense 256, on 32x32x3 "
  "(random images: no 32x32 colour data set installs here; time does not depend on values)",
  "char_mlp": "char MLP LM (8 previous characters, embedding vocab x 16, two Dense 512) "
  "on the KJV Bible",
  "resnet20": "ResNet-20 (BatchNorm, 1x1-conv shortcuts) on Fashion-MNIST 28x28x1",
  "transformer": "decoder-only char transformer (4 layers, width 256, 4 heads, context 128) "
  "on the KJV Bible",
}
QUALITY_TASKS = {
  "digits": "the demo's two-conv CNN on scikit-learn's 8x8 digits (smoke task)",
  "fmnist_cnn": "FashionCNN on Fashion-MNIST, random crop (pad 2) and horizontal flip",
  "fmnist_resnet": "ResNet20 (BatchNorm) on Fashion-MNIST, same augmentation",
  "fmnist_vit": "ViT (patches of 4) on Fashion-MNIST, same augmentation",
  "char_lm": "CharTransformer on the King James Bible, bits per character on held-out books",
}
# Tasks whose model carries BatchNorm statistics (``batch_stats``).
STATEFUL = {"resnet20", "fmnist_resnet"}
VALIDATION_SIZE = 10_000


def has_state(task: str) -> bool:
  return task in STATEFUL


def make_model(task: str, *, vocab_size: int | None = None, **kw: Any) -> tuple[nn.Module, int]:
  """The model of ``task`` (``kw``: model keyword arguments) and the number of
  tokens per example (1 for images)."""
  if task == "cnn":
    return models.FashionCNN(**kw), 1
  if task == "vgg32":
    return models.VGGStrided(**kw), 1
  if task == "char_mlp":
    return models.CharMLP(vocab_size=vocab_size, **kw), 1
  if task == "resnet20":
    return models.ResNet20(**kw), 1
  if task == "transformer":  # the timing size
    kw = {"num_layers": 4, "width": 256, "num_heads": 4, "context": 128, **kw}
    return models.CharTransformer(vocab_size=vocab_size, **kw), kw["context"]
  if task == "digits":
    from nysact_optax.demo import DigitsCNN

    return DigitsCNN(), 1
  if task == "fmnist_cnn":
    return models.FashionCNN(**kw), 1
  if task == "fmnist_resnet":
    return models.ResNet20(**kw), 1
  if task == "fmnist_vit":
    return models.ViT(**kw), 1
  if task == "char_lm":  # the quality study's size
    kw = {"num_layers": 2, "width": 128, "num_heads": 4, "context": 64, **kw}
    return models.CharTransformer(vocab_size=vocab_size, **kw), kw["context"]
  raise ValueError(
    f"unknown task {task!r}; choose from {sorted(TIMING_TASKS) + sorted(QUALITY_TASKS)}"
  )


def make_loss(
  model: nn.Module, *, stateful: bool, tokens: int, capture: bool, register_kfac: bool = False
):
  """``loss(params, model_state, x, y) -> (loss, (model_state, activations))``.

  ``tokens``: tokens per example; kfac-jax's convention is ``weight *
  sum(losses) / batch_size`` while the loss here is the mean over batch and
  tokens, hence its weight ``1 / tokens``.
  """
  apply = nysact_optax.capture_activations(model.apply) if capture else model.apply

  def loss(params, model_state, x, y):
    variables = {"params": params}
    acts = None
    if stateful:
      variables["batch_stats"] = model_state
      out = apply(variables, x, train=True, mutable=["batch_stats"])
      (logits, mutated), acts = out if capture else (out, None)
      model_state = mutated["batch_stats"]
    else:
      out = apply(variables, x)
      logits, acts = out if capture else (out, None)
    if register_kfac:
      import kfac_jax

      kfac_jax.register_softmax_cross_entropy_loss(logits, y, weight=1.0 / tokens)
    value = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return value, (model_state, acts)

  return loss


def make_eval(model: nn.Module, *, stateful: bool):
  """Jitted ``(params, model_state, x, y) -> (sum of losses, correct, count)``."""

  @jax.jit
  def evaluate(params, model_state, x, y):
    variables = {"params": params}
    if stateful:
      variables["batch_stats"] = model_state
      logits = model.apply(variables, x, train=False)
    else:
      logits = model.apply(variables, x)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    correct = (logits.argmax(-1) == y).sum()
    return losses.sum(), correct, losses.size

  return evaluate


# --------------------------------------------------------------------------
# Timing tasks: model + initial variables + a fixed list of device batches
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Task:
  name: str
  description: str
  model: nn.Module
  params: Any
  model_state: Any  # batch_stats, or None
  batches: list[tuple[jax.Array, jax.Array]]
  tokens_per_example: int  # loss = mean over batch * tokens

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.batches[0][0].shape)


def _image_batches(batch_size: int, n_batches: int, source: str, seed: int):
  if source == "synthetic":
    rng = np.random.default_rng(seed)
    x = rng.random((batch_size * n_batches, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, batch_size * n_batches).astype(np.int32)
  else:
    x, y = bdata.load_fashion_mnist("train")
  it = bdata.classification_batches(x, y, batch_size, seed=seed)
  return [tuple(jax.device_put(a) for a in next(it)) for _ in range(n_batches)]


def build_task(
  name: str, batch_size: int, *, source: str = "real", n_batches: int = 10, seed: int = 0
) -> Task:
  """A timing task (:data:`TIMING_TASKS`): ``source`` ``"real"`` reads
  Fashion-MNIST / the KJV Bible, ``"synthetic"`` draws random data."""
  key = jax.random.PRNGKey(seed)
  if name in ("cnn", "resnet20"):
    batches = _image_batches(batch_size, n_batches, source, seed)
    model, tokens = make_model(name)
    desc = TIMING_TASKS[name]
  elif name == "digits":
    from nysact_optax.demo import load_digits_split

    digits = load_digits_split(seed=seed)
    it = bdata.classification_batches(digits.x_train, digits.y_train, batch_size, seed=seed)
    batches = [tuple(jax.device_put(a) for a in next(it)) for _ in range(n_batches)]
    model, tokens = make_model(name)
    desc = TIMING_TASKS[name]
  elif name == "vgg32":
    rng = np.random.default_rng(seed)
    batches = [
      (
        jax.device_put(rng.random((batch_size, 32, 32, 3), dtype=np.float32)),
        jax.device_put(rng.integers(0, 10, batch_size).astype(np.int32)),
      )
      for _ in range(n_batches)
    ]
    model, tokens = make_model(name)
    desc = TIMING_TASKS[name]
  elif name == "char_mlp":
    context = 8
    if source == "synthetic":
      vocab, stream = 73, np.random.default_rng(seed).integers(0, 73, 200_000).astype(np.uint8)
    else:
      ds = bdata.load_kjv_chars()
      vocab, stream = ds.vocab_size, ds.train
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n_batches):
      starts = rng.integers(0, len(stream) - context - 1, batch_size)
      windows = np.stack([stream[s : s + context + 1] for s in starts]).astype(np.int32)
      batches.append((jax.device_put(windows[:, :-1]), jax.device_put(windows[:, -1])))
    model, tokens = make_model(name, vocab_size=vocab)
    desc = TIMING_TASKS[name]
  elif name == "transformer":
    context = 128
    if source == "synthetic":
      vocab, stream = 73, np.random.default_rng(seed).integers(0, 73, 200_000).astype(np.uint8)
    else:
      ds = bdata.load_kjv_chars()
      vocab, stream = ds.vocab_size, ds.train
    it = bdata.char_lm_batches(stream, batch_size, context, seed=seed)
    batches = [tuple(jax.device_put(a) for a in next(it)) for _ in range(n_batches)]
    model, tokens = make_model(name, vocab_size=vocab, context=context)
    desc = (
      "decoder-only char transformer (4 layers, width 256, 4 heads, "
      f"context {context}, vocab {vocab}) on the KJV Bible"
    )
  else:
    raise ValueError(f"unknown model {name!r}; choose from {sorted(TIMING_TASKS)}")
  variables = dict(model.init(key, batches[0][0]))
  return Task(
    name=name,
    description=desc,
    model=model,
    params=variables["params"],
    model_state=variables.get("batch_stats"),
    batches=batches,
    tokens_per_example=tokens,
  )


def batch_loss(task: Task, *, capture: bool, register_kfac: bool = False):
  """``loss(params, model_state, batch) -> (loss, (new_model_state, acts))``
  of a timing task (:func:`make_loss` on ``batch = (x, y)``)."""
  stateful = task.model_state is not None
  loss = make_loss(
    task.model,
    stateful=stateful,
    tokens=task.tokens_per_example,
    capture=capture,
    register_kfac=register_kfac,
  )

  def wrapped(params, model_state, batch):
    value, (state, acts) = loss(params, model_state, *batch)
    return value, (state if stateful else None, acts)

  return wrapped


# --------------------------------------------------------------------------
# Quality tasks: training stream and evaluation set of one task and split
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
  """Training stream and evaluation set of one task and split."""

  kind: str  # "images" or "chars"
  train_x: np.ndarray
  train_y: np.ndarray | None
  eval_x: np.ndarray
  eval_y: np.ndarray
  num_classes: int
  description: str


def _carve(x, y, seed: int = 0):
  """(train, validation): the last ``VALIDATION_SIZE`` of a fixed permutation."""
  order = np.random.default_rng(seed).permutation(len(x))
  tr, va = order[:-VALIDATION_SIZE], order[-VALIDATION_SIZE:]
  return (x[tr], y[tr]), (x[va], y[va])


def _lm_windows(ids: np.ndarray, context: int, count: int) -> tuple[np.ndarray, np.ndarray]:
  """``count`` evenly spaced windows of a token stream (a fixed eval set)."""
  starts = np.linspace(0, len(ids) - context - 2, count).astype(np.int64)
  w = ids[starts[:, None] + np.arange(context + 1)].astype(np.int32)
  return w[:, :-1], w[:, 1:]


@functools.lru_cache(maxsize=4)
def load_data(
  task: str,
  split: str,
  train_limit: int | None = None,
  eval_limit: int | None = None,
  context: int | None = None,
) -> Data:
  """The training and evaluation arrays of a quality task for ``split``
  (``"val"``: a validation split carved from the training set; ``"test"``).
  Cached: runs of one process share them."""
  if split not in ("val", "test"):
    raise ValueError(f"split must be 'val' or 'test', got {split!r}")
  if task == "digits":
    (xtr, ytr), (xte, yte) = bdata.load_digits(image=True)
    if split == "val":
      n = len(xtr) // 5
      (xtr, ytr), (xte, yte) = (xtr[n:], ytr[n:]), (xtr[:n], ytr[:n])
    name, kind, classes = "sklearn digits 8x8", "images", 10
  elif task in ("fmnist_cnn", "fmnist_resnet", "fmnist_vit"):
    xtr, ytr = bdata.load_fashion_mnist("train")
    if split == "val":
      (xtr, ytr), (xte, yte) = _carve(xtr, ytr)
    else:
      xte, yte = bdata.load_fashion_mnist("test")
    name, kind, classes = "Fashion-MNIST", "images", 10
  elif task == "char_lm":
    ds = bdata.load_kjv_chars()
    context = context or 64
    stream = ds.train
    if split == "val":
      cut = int(0.9 * len(stream))
      stream, held = stream[:cut], stream[cut:]
    else:
      held = ds.validation
    xte, yte = _lm_windows(held, context, 256)
    desc = (
      f"KJV Bible chars, {len(stream):,} train tokens / "
      f"{xte.size:,} {split} tokens (held-out books: "
      f"{', '.join(ds.validation_books)})"
    )
    return Data("chars", stream, None, xte, yte, ds.vocab_size, desc)
  else:
    raise ValueError(f"unknown task {task!r}; choose from {tuple(QUALITY_TASKS)}")
  if train_limit:
    xtr, ytr = xtr[:train_limit], ytr[:train_limit]
  if eval_limit:
    xte, yte = xte[:eval_limit], yte[:eval_limit]
  desc = f"{name}, {len(xtr)} train / {len(xte)} {split}"
  return Data(kind, xtr, ytr, xte, yte, classes, desc)


def augment(x: np.ndarray, rng: np.random.Generator, pad: int = 2) -> np.ndarray:
  """Random crop after zero-padding by ``pad`` and a random horizontal flip."""
  n, h, w, _ = x.shape
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy = rng.integers(0, 2 * pad + 1, n)
  dx = rng.integers(0, 2 * pad + 1, n)
  rows = dy[:, None] + np.arange(h)[None]
  cols = dx[:, None] + np.arange(w)[None]
  flip = rng.random(n) < 0.5
  cols = np.where(flip[:, None], cols[:, ::-1], cols)
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def train_batches(
  task: str, d: Data, *, batch_size: int, seed: int, augmented: bool = True, context: int = 64
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """The training stream: shuffled epochs of images (augmented except on
  ``digits``) or random windows of the character stream."""
  if d.kind == "chars":
    yield from bdata.char_lm_batches(d.train_x, batch_size, context, seed=seed)
    return
  rng = np.random.default_rng(seed + 10_000)
  use_aug = augmented and task != "digits"
  for x, y in bdata.classification_batches(d.train_x, d.train_y, batch_size, seed=seed):
    yield (augment(x, rng) if use_aug else x), y
