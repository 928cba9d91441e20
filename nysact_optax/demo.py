"""The main job: a small CNN on scikit-learn's bundled digits, NysAct and
``nysact_adam`` against optax SGD-momentum and AdamW, with a progress bar and a
results table.

Run it with ``python -m nysact_optax.demo`` (``--help`` for the flags). It needs
the ``demo`` extra (scikit-learn, tqdm, rich).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import nysact_optax


class Split(NamedTuple):
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def load_digits_split(seed: int = 0, test_fraction: float = 0.2) -> Split:
  """The 8x8 UCI digits as ``(n, 8, 8, 1)`` floats in [0, 1], stratified split."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  xtr, xte, ytr, yte = train_test_split(
    x,
    digits.target.astype(np.int32),
    test_size=test_fraction,
    random_state=seed,
    stratify=digits.target,
  )
  return Split(xtr, ytr, xte, yte)


class DigitsCNN(nn.Module):
  """Two convolutions and two dense layers (about 35k parameters)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(10)(x)


def optimizers(steps: int) -> dict[str, tuple[optax.GradientTransformation, bool]]:
  """The compared optimizers: ``name -> (transformation, needs activations)``.

  ``nysact`` takes SGD-momentum's shape (coupled weight decay, momentum 0.9);
  ``nysact_adam``, the mode the README recommends for CNNs, takes AdamW's
  settings as they are (learning rate and weight decay), as the
  hyperparameter guide says for a model coming from AdamW.

  >>> list(optimizers(100))
  ['sgd-momentum', 'adamw', 'nysact', 'nysact_adam']
  >>> [needs for _, needs in optimizers(100).values()]
  [False, False, True, True]
  """
  return {
    "sgd-momentum": (optax.sgd(0.05, momentum=0.9), False),
    "adamw": (optax.adamw(2e-3, weight_decay=1e-4), False),
    "nysact": (nysact_optax.nysact(0.1, weight_decay=5e-4), True),
    "nysact_adam": (nysact_optax.nysact_adam(2e-3, weight_decay=1e-4), True),
  }


class Result(NamedTuple):
  name: str
  test_accuracy: float
  final_loss: float
  ms_per_step: float
  compile_s: float
  state_bytes: int
  param_bytes: int


def _bytes(tree: Any) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def train(
  name: str,
  tx: optax.GradientTransformation,
  needs_activations: bool,
  data: Split,
  *,
  steps: int = 600,
  batch_size: int = 64,
  seed: int = 0,
  progress: Callable[[int], None] | None = None,
) -> Result:
  """Trains :class:`DigitsCNN` with ``tx`` and evaluates on the test split."""
  model = DigitsCNN()
  params = model.init(jax.random.PRNGKey(seed), data.x_train[:1])["params"]
  opt_state = tx.init(params)
  apply = nysact_optax.capture_activations(model.apply)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits, acts = apply({"params": p}, x)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, acts

    (loss, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    extra = {"activations": acts} if needs_activations else {}
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  n = len(data.x_train)
  batches: list[np.ndarray] = []
  while len(batches) < steps:
    perm = rng.permutation(n)
    batches += [perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
  t0 = time.perf_counter()
  compiled = step.lower(
    params, opt_state, data.x_train[:batch_size], data.y_train[:batch_size]
  ).compile()
  compile_s = time.perf_counter() - t0
  last = jnp.zeros([])
  t0 = time.perf_counter()
  for idx in batches[:steps]:
    params, opt_state, last = compiled(params, opt_state, data.x_train[idx], data.y_train[idx])
    if progress is not None:
      progress(1)
  loss = float(jax.block_until_ready(last))
  elapsed = time.perf_counter() - t0
  logits = model.apply({"params": params}, data.x_test)
  accuracy = float((np.asarray(logits).argmax(-1) == data.y_test).mean())
  return Result(
    name, accuracy, loss, 1e3 * elapsed / steps, compile_s, _bytes(opt_state), _bytes(params)
  )


def main(argv: Sequence[str] | None = None) -> list[Result]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=1500)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--seeds", type=int, default=3, help="seeds per optimizer")
  parser.add_argument(
    "--optimizers", nargs="*", default=None, help=f"subset to run, of: {' '.join(optimizers(0))}"
  )
  args = parser.parse_args(argv)

  from rich.console import Console
  from rich.table import Table
  from tqdm.auto import tqdm

  data = load_digits_split()
  chosen = optimizers(args.steps)
  if args.optimizers:
    chosen = {k: v for k, v in chosen.items() if k in args.optimizers}
  results: dict[str, list[Result]] = {k: [] for k in chosen}
  total = args.steps * args.seeds * len(chosen)
  with tqdm(total=total, desc="training", unit="step") as bar:
    for seed in range(args.seeds):  # interleave optimizers so drift hits all alike
      for name, (tx, needs) in chosen.items():
        bar.set_postfix_str(f"{name} seed {seed}")
        results[name].append(
          train(
            name,
            tx,
            needs,
            data,
            steps=args.steps,
            batch_size=args.batch_size,
            seed=seed,
            progress=bar.update,
          )
        )

  table = Table(
    title=f"digits CNN: {args.steps} steps x batch {args.batch_size}, "
    f"{args.seeds} seed(s), {jax.devices()[0].platform}"
  )
  for col in (
    "optimizer",
    "test acc %",
    "final loss",
    "ms/step",
    "compile s",
    "state bytes",
    "state/params",
  ):
    table.add_column(col, justify="left" if col == "optimizer" else "right", no_wrap=True)
  for name, runs in results.items():
    acc = np.array([r.test_accuracy for r in runs]) * 100
    r0 = runs[0]
    table.add_row(
      name,
      f"{acc.mean():.2f} ± {acc.std():.2f}",
      f"{np.mean([r.final_loss for r in runs]):.4f}",
      f"{np.mean([r.ms_per_step for r in runs]):.2f}",
      f"{np.mean([r.compile_s for r in runs]):.2f}",
      f"{r0.state_bytes:,}",
      f"{r0.state_bytes / r0.param_bytes:.2f}x",
    )
  console = Console()
  Console(width=max(console.width, 100)).print(table)
  return [r for runs in results.values() for r in runs]


if __name__ == "__main__":
  main()
