"""Offline datasets for the benchmarks and the training-quality studies.

Every dataset here comes inside a package (see the project's data note), so
nothing is downloaded at run time:

* Fashion-MNIST: Debian package ``dataset-fashion-mnist`` (IDX gz files under
  ``/usr/share/datasets/fashion-mnist/``).
* King James Bible text: Debian package ``bible-kjv`` (the ``bible`` command).
* UCI handwritten digits 8x8: ``sklearn.datasets.load_digits``.

A missing dataset raises :class:`DatasetMissingError`, whose message names the
command that installs it. Loaders return NumPy arrays; the batch iterators at
the end of the module are deterministic given their seed.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Iterator, Sequence

import numpy as np

__all__ = [
  "BIBLE_INSTALL",
  "DEFAULT_VALIDATION_BOOKS",
  "FASHION_MNIST_CLASSES",
  "FASHION_MNIST_DIR",
  "FASHION_MNIST_INSTALL",
  "CharDataset",
  "DatasetMissingError",
  "bible_books",
  "bible_text",
  "char_lm_batches",
  "classification_batches",
  "load_digits",
  "load_fashion_mnist",
  "load_kjv_chars",
  "read_idx",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = (
  "apt-get update && apt-get install -y --no-install-recommends dataset-fashion-mnist"
)
BIBLE_INSTALL = "apt-get update && apt-get install -y --no-install-recommends bible-kjv"
FASHION_MNIST_CLASSES = (
  "T-shirt/top",
  "Trouser",
  "Pullover",
  "Dress",
  "Coat",
  "Sandal",
  "Shirt",
  "Sneaker",
  "Bag",
  "Ankle boot",
)
# Held-out books for the character LM: one from each part of the canon
# (history, wisdom, prophets, gospels, epistles); about 9% of the characters.
DEFAULT_VALIDATION_BOOKS = ("Joshua", "Proverbs", "Daniel", "Mark", "Hebrews")


class DatasetMissingError(FileNotFoundError):
  """A packaged dataset is not installed; the message says how to install it."""


# --------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX file (optionally gzip-compressed) into a NumPy array.

  Format: header ``>HBB`` (zero, type code, number of dimensions), then one
  big-endian uint32 per dimension, then the data in C order.
  """
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  zero, code, ndim = struct.unpack_from(">HBB", data, 0)
  dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
  if zero != 0 or code not in dtypes:
    raise ValueError(f"{path}: not an IDX file (header {zero:#x}, {code:#x})")
  shape = struct.unpack_from(f">{ndim}I", data, 4)
  offset = 4 + 4 * ndim
  array = np.frombuffer(data, dtype=dtypes[code], offset=offset)
  if array.size != int(np.prod(shape)):
    raise ValueError(f"{path}: {array.size} values for shape {shape}")
  return array.reshape(shape).astype(np.dtype(dtypes[code]).newbyteorder("="))


@functools.lru_cache(maxsize=4)
def _fashion_mnist_raw(split: str, root: str) -> tuple[np.ndarray, np.ndarray]:
  prefix = {"train": "train", "test": "t10k"}[split]
  images = os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")
  labels = os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")
  for path in (images, labels):
    if not os.path.exists(path):
      raise DatasetMissingError(
        f"Fashion-MNIST file {path} not found. Install the Debian package "
        f"with: {FASHION_MNIST_INSTALL}"
      )
  x, y = read_idx(images), read_idx(labels)
  x.setflags(write=False)
  y.setflags(write=False)
  return x, y


def load_fashion_mnist(
  split: str = "train",
  *,
  root: str | None = None,
  normalize: bool = True,
  limit: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Fashion-MNIST images and labels.

  Args:
    split: ``"train"`` (60000 images) or ``"test"`` (10000).
    root: folder of the IDX gz files (default: the Debian package's, or the
      ``FASHION_MNIST_DIR`` environment variable).
    normalize: return float32 images in ``[0, 1]`` of shape ``(N, 28, 28, 1)``;
      otherwise the raw uint8 ``(N, 28, 28)``.
    limit: keep only the first ``limit`` examples.

  Returns:
    ``(images, labels)``; labels are int32 in ``[0, 10)``.

  Raises:
    DatasetMissingError: the package is not installed (the message has the
      install command).
  """
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  root = root or os.environ.get("FASHION_MNIST_DIR", FASHION_MNIST_DIR)
  x, y = _fashion_mnist_raw(split, root)
  if limit is not None:
    x, y = x[:limit], y[:limit]
  y = y.astype(np.int32)
  if normalize:
    x = (x.astype(np.float32) / 255.0)[..., None]
  return x, y


# --------------------------------------------------------------------------
# King James Bible
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def bible_text() -> str:
  """The whole King James Bible as printed by ``bible gen1:1-rev22:21``.

  About 4.3 M ASCII characters; each chapter starts with a heading line such
  as ``Genesis 1`` between blank lines, and each verse with its number.

  Raises:
    DatasetMissingError: the ``bible`` command (package ``bible-kjv``) is not
      installed.
  """
  exe = shutil.which("bible")
  if exe is None:
    raise DatasetMissingError(
      f"the `bible` command was not found. Install the King James Bible with: {BIBLE_INSTALL}"
    )
  out = subprocess.run([exe, "gen1:1-rev22:21"], capture_output=True, check=True).stdout
  return out.decode("ascii")


_HEADING = re.compile(r"(\S.*) (\d+)")


def bible_books(text: str | None = None) -> list[tuple[str, str]]:
  """Splits the Bible text into its 66 books, in canonical order.

  A chapter heading is a line ``<Book> <chapter>`` with blank lines on both
  sides; a book starts at its first chapter heading.

  Returns:
    ``[(book name, book text), ...]``; the texts concatenate to ``text``.
  """
  text = bible_text() if text is None else text
  lines = text.split("\n")
  starts: list[tuple[str, int]] = []  # (book, character offset of its line)
  offset = 0
  seen = set()
  for i, line in enumerate(lines):
    m = _HEADING.fullmatch(line)
    if (
      m
      and (i == 0 or lines[i - 1] == "")
      and i + 1 < len(lines)
      and lines[i + 1] == ""
      and m.group(1) not in seen
    ):
      seen.add(m.group(1))
      # The book includes the blank line before its first heading.
      starts.append((m.group(1), max(offset - 1, 0) if i else 0))
    offset += len(line) + 1
  if not starts:
    raise ValueError("no chapter headings found in the Bible text")
  books = []
  for k, (name, start) in enumerate(starts):
    end = starts[k + 1][1] if k + 1 < len(starts) else len(text)
    books.append((name, text[start:end]))
  return books


@dataclasses.dataclass(frozen=True)
class CharDataset:
  """A character-level corpus split into train and validation token ids.

  Attributes:
    train: uint8 token ids of the training books, concatenated.
    validation: uint8 token ids of the held-out books, concatenated.
    vocab: the characters; token ``i`` is ``vocab[i]``.
    train_books: names of the training books.
    validation_books: names of the held-out books.
  """

  train: np.ndarray
  validation: np.ndarray
  vocab: str
  train_books: tuple[str, ...]
  validation_books: tuple[str, ...]

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def encode(self, text: str) -> np.ndarray:
    table = {c: i for i, c in enumerate(self.vocab)}
    return np.fromiter((table[c] for c in text), dtype=np.uint8, count=len(text))

  def decode(self, ids: Sequence[int]) -> str:
    return "".join(self.vocab[int(i)] for i in ids)


def load_kjv_chars(
  validation_books: Sequence[str] = DEFAULT_VALIDATION_BOOKS,
) -> CharDataset:
  """The King James Bible as a character-level language-modelling dataset.

  The split is by whole books (no chapter of a held-out book is seen in
  training). The vocabulary is every character of the whole text (73), sorted.

  Args:
    validation_books: names of the books held out for validation, as printed
      in the chapter headings (e.g. ``"1 Samuel"``, ``"Song of Solomon"``).

  Raises:
    DatasetMissingError: ``bible-kjv`` is not installed.
    ValueError: an unknown book name.
  """
  text = bible_text()
  books = bible_books(text)
  names = [name for name, _ in books]
  unknown = sorted(set(validation_books) - set(names))
  if unknown:
    raise ValueError(f"unknown book(s) {unknown}; books are {names}")
  vocab = "".join(sorted(set(text)))
  lookup = np.zeros(256, dtype=np.uint8)
  for i, c in enumerate(vocab):
    lookup[ord(c)] = i

  def ids(parts):
    raw = np.frombuffer("".join(parts).encode("ascii"), dtype=np.uint8)
    return lookup[raw]

  held = set(validation_books)
  train = [t for n, t in books if n not in held]
  valid = [t for n, t in books if n in held]
  return CharDataset(
    train=ids(train),
    validation=ids(valid),
    vocab=vocab,
    train_books=tuple(n for n in names if n not in held),
    validation_books=tuple(n for n in names if n in held),
  )


# --------------------------------------------------------------------------
# sklearn digits
# --------------------------------------------------------------------------


def load_digits(
  *, test_fraction: float = 0.2, seed: int = 0, image: bool = False
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """The UCI 8x8 handwritten digits (1797 examples), split train/test.

  Args:
    test_fraction: share of the examples held out (stratified by class).
    seed: seed of the split.
    image: return ``(N, 8, 8, 1)`` images instead of ``(N, 64)`` rows.

  Returns:
    ``((x_train, y_train), (x_test, y_test))``: float32 pixels scaled to
    ``[0, 1]`` and int32 labels.
  """
  from sklearn import datasets, model_selection

  digits = datasets.load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  if image:
    x = x.reshape(-1, 8, 8, 1)
  x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
    x, y, test_size=test_fraction, random_state=seed, stratify=y
  )
  return (x_tr, y_tr), (x_te, y_te)


# --------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------


def classification_batches(
  x: np.ndarray,
  y: np.ndarray,
  batch_size: int,
  *,
  seed: int = 0,
  epochs: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Shuffled ``(x, y)`` batches of exactly ``batch_size``, epoch after epoch.

  The last incomplete batch of each epoch is dropped, so every batch has the
  same shape (one compile). ``epochs=None`` repeats forever.
  """
  if batch_size > len(x):
    raise ValueError(f"batch_size {batch_size} > dataset size {len(x)}")
  rng = np.random.default_rng(seed)
  epoch = 0
  while epochs is None or epoch < epochs:
    order = rng.permutation(len(x))
    for i in range(0, len(x) - batch_size + 1, batch_size):
      idx = order[i : i + batch_size]
      yield x[idx], y[idx]
    epoch += 1


def char_lm_batches(
  ids: np.ndarray, batch_size: int, context: int, *, seed: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Random windows of a token stream: ``(inputs, targets)`` int32 of shape
  ``(batch_size, context)``, targets shifted by one. Infinite."""
  if len(ids) <= context + 1:
    raise ValueError(f"stream of {len(ids)} tokens is too short for context {context}")
  rng = np.random.default_rng(seed)
  offsets = np.arange(context + 1)
  while True:
    starts = rng.integers(0, len(ids) - context - 1, size=batch_size)
    window = ids[starts[:, None] + offsets].astype(np.int32)
    yield window[:, :-1], window[:, 1:]
