"""The README's quickstart code runs as written."""

import pathlib
import re

import jax
import numpy as np

from nysact_optax import demo

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quickstart_block_is_short_and_trains():
  quickstart = _python_blocks()[0]
  assert len(quickstart.strip().splitlines()) <= 25
  data = demo.load_digits_split()
  model = demo.DigitsCNN()
  params = model.init(jax.random.PRNGKey(0), data.x_train[:1])["params"]
  namespace = {"model": model, "params": params}
  exec(compile(quickstart, str(README), "exec"), namespace)
  train_step, opt_state = namespace["train_step"], namespace["opt_state"]
  losses = []
  for i in range(60):
    idx = np.arange(i * 16, (i + 1) * 16) % len(data.x_train)
    params, opt_state, loss = train_step(params, opt_state, data.x_train[idx], data.y_train[idx])
    losses.append(float(loss))
  assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
