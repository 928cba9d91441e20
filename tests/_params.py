"""Test inputs without eager JAX: numpy data and numpy-initialised parameters.

Every eager JAX operation compiles a small program on first use; a flax
``init`` and a few ``jax.random`` calls cost seconds of CPU per process.
Parameters here get their shapes from ``jax.eval_shape`` (a trace, no
compilation) and their values from numpy.
"""

from __future__ import annotations

import jax
import numpy as np


def init_params(model, x, seed: int = 0):
  """``model``'s params for input ``x``: kernels ``N(0, 1/fan_in)``, biases and
  other leaves ``N(0, 0.1^2)``, as float32 numpy arrays."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  rng = np.random.default_rng(seed)

  def draw(path, s):
    scale = 0.1
    if jax.tree_util.keystr(path[-1:]) == "['kernel']":
      scale = 1.0 / np.sqrt(np.prod(s.shape[:-1]))
    return (scale * rng.standard_normal(s.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def data(shape, classes: int = 3, seed: int = 1):
  """Inputs ``N(0, 1)`` of ``shape`` and integer labels, as numpy arrays."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape).astype(np.float32)
  return x, rng.integers(0, classes, shape[0]).astype(np.int32)
