"""The code blocks of the documentation's guides run as written."""

import pathlib
import re

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import nysact_optax
from nysact_optax import demo

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def _block(page: str, after: str) -> str:
  """The first python block of ``docs/page`` after the text ``after``."""
  text = (DOCS / page).read_text()
  assert after in text, (page, after)
  return re.search(r"```python\n(.*?)```", text.split(after, 1)[1], re.S).group(1)


def test_train_state_block_trains():
  data = demo.load_digits_split()
  model = demo.DigitsCNN()
  params = model.init(jax.random.PRNGKey(0), data.x_train[:1])["params"]
  ns = {"jax": jax, "optax": optax, "nysact_optax": nysact_optax, "model": model, "params": params}
  code = _block("quickstart.md", "**With flax's `TrainState`**")
  exec(compile(code, "quickstart.md", "exec"), ns)
  state, losses = ns["state"], []
  for i in range(40):
    idx = np.arange(i * 32, (i + 1) * 32) % len(data.x_train)
    state, loss = ns["train_step"](state, data.x_train[idx], data.y_train[idx])
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
  assert int(state.step) == 40


@pytest.mark.filterwarnings("error")
def test_nnx_block_trains():
  ns: dict = {}
  exec(compile(_block("quickstart.md", "## Flax NNX"), "quickstart.md", "exec"), ns)
  losses = ns["losses"]
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
  assert int(ns["optimizer"].step[...]) == 20


@pytest.mark.filterwarnings("error")
def test_nnx_capture_block_keeps_the_users_intermediates():
  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.Linear(8, 16, rngs=rngs)
      self.out = nnx.Linear(16, 2, rngs=rngs)

    def __call__(self, x):
      h = nnx.relu(self.hidden(x))
      self.sow(nnx.Intermediate, "features", h)
      return self.out(h)

  x = np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32)
  model = MLP(nnx.Rngs(0))
  ns = {"nnx": nnx, "optax": optax, "nysact_optax": nysact_optax, "x": x, "y": y, "model": model}
  exec(compile(_block("quickstart.md", "**With `nnx.capture`**"), "quickstart.md", "exec"), ns)
  (features,) = ns["intermediates"]["features"].get_value()
  assert features.shape == (32, 16)
  assert sorted(ns["acts"]) == ["hidden", "out"]
  np.testing.assert_array_equal(ns["acts"]["hidden"].inputs[0], x)
  np.testing.assert_allclose(ns["acts"]["out"].inputs[0], features, rtol=1e-6)
  optimizer = nnx.Optimizer(model, nysact_optax.nysact(0.1, rank=4), wrt=nnx.Param)
  optimizer.update(model, ns["grads"], activations=ns["acts"])
  assert int(optimizer.step[...]) == 1
