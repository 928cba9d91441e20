"""Patch-free statistics against explicit patches and dense formulas."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nysact_optax import ConvSpec, DenseSpec, LayerInputs, _covariance
from nysact_optax._sketch import draw_sketch
from nysact_optax._statistics import sketched_covariance
from tests import _reference
from tests._reference import conv_patches

CONVS = [
  # kernel, strides, padding, dilation, groups, input shape (b, *spatial, c)
  ((3, 3), (1, 1), "SAME", (1, 1), 1, (2, 6, 5, 4)),
  ((3, 3), (2, 2), "VALID", (1, 1), 1, (2, 7, 7, 3)),
  ((3, 2), (2, 1), ((1, 2), (0, 1)), (2, 1), 1, (2, 8, 6, 2)),
  ((3, 3), (1, 1), "SAME", (1, 1), 2, (2, 5, 5, 4)),
  ((3, 3), (2, 2), "SAME", (1, 1), 4, (1, 6, 6, 4)),  # depthwise
  ((5,), (2,), "SAME", (2,), 1, (3, 11, 3)),
  ((2, 2, 2), (1, 1, 1), "VALID", (1, 1, 1), 1, (1, 3, 4, 3, 2)),
  # strided, one group, no kernel dilation: the stride-phase form of A^T Z,
  # with taps that are not a multiple of the stride
  ((4, 3), (3, 2), "SAME", (1, 1), 1, (2, 10, 9, 3)),
  ((3,), (2,), "SAME", (1,), 1, (2, 9, 3)),
  ((3, 3, 3), (2, 1, 2), "SAME", (1, 1, 1), 1, (1, 5, 4, 6, 2)),
]


def _spec(kernel, strides, padding, dilation, groups):
  n = len(kernel)
  return ConvSpec(kernel, strides, padding, (1,) * n, dilation, groups)


@pytest.mark.parametrize("conv", CONVS)
def test_conv_patches_match_explicit_loops(conv):
  *cfg, shape = conv
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  ours = conv_patches(x, _spec(*cfg))
  kernel, strides, padding, dilation, groups = cfg
  expected = _reference.im2col(np.asarray(x), kernel, strides, padding, dilation, groups)
  np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)


@pytest.fixture
def convolutions(monkeypatch):
  """Every convolution takes the patch-free path (no input here is too big
  for explicit patches)."""
  monkeypatch.setattr(_covariance, "PATCH_LIMIT", 0)


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["gaussian", "subcolumns"])
def test_patch_free_conv_statistics_equal_patch_formula(conv, bias, kind, convolutions):
  *cfg, shape = conv
  spec = _spec(*cfg)
  x = jax.random.normal(jax.random.PRNGKey(1), shape)
  a = np.asarray(conv_patches(x, spec), np.float64)
  if bias:
    a = _reference.with_bias_column(a)
  p = a.shape[1]
  s = draw_sketch(jax.random.PRNGKey(2), p, min(4, p - 1), kind)
  ours = jax.jit(sketched_covariance, static_argnums=2)(LayerInputs([x], spec), s, bias)
  expected = a.T @ (a @ np.asarray(s.matrix, np.float64)) / a.shape[0]
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strides", [(1, 1), (2, 2), (3, 1)])
def test_conv_statistics_have_no_dilated_convolution(strides, convolutions):
  # A^T Z of a strided convolution as an rhs-dilated convolution ran several
  # times slower than the stride-1 one on XLA:CPU; the stride-phase form
  # needs none.
  spec = _spec((3, 3), strides, "SAME", (1, 1), 1)
  x = jnp.ones((2, 12, 12, 8))
  s = draw_sketch(jax.random.PRNGKey(0), 73, 5, "gaussian")
  text = jax.jit(sketched_covariance, static_argnums=2).lower(LayerInputs([x], spec), s, True)
  text = text.as_text()
  assert text.count("stablehlo.convolution") == 2
  dilations = re.findall(r"[lr]hs_dilate = \[([0-9, ]*)\]", text)
  assert len(dilations) == 4 and {d.replace(" ", "") for d in dilations} == {"1,1"}, dilations


@pytest.mark.parametrize("conv", CONVS)
def test_small_convs_take_explicit_patches_with_the_same_result(conv):
  *cfg, shape = conv
  spec = _spec(*cfg)
  x = jax.random.normal(jax.random.PRNGKey(1), shape)
  a = _reference.with_bias_column(np.asarray(conv_patches(x, spec), np.float64))
  assert a.size <= _covariance.PATCH_LIMIT
  s = draw_sketch(jax.random.PRNGKey(2), a.shape[1], min(4, a.shape[1] - 1), "gaussian")
  step = jax.jit(sketched_covariance, static_argnums=2)
  ours = step(LayerInputs([x], spec), s, True)
  expected = a.T @ (a @ np.asarray(s.matrix, np.float64)) / a.shape[0]
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def _convolutions(x, spec, s, limit, monkeypatch):
  monkeypatch.setattr(_covariance, "PATCH_LIMIT", limit)
  fn = lambda x, s: sketched_covariance(LayerInputs([x], spec), s, True)
  return jax.jit(fn).lower(x, s).as_text().count("stablehlo.convolution")


@pytest.mark.parametrize("conv", CONVS[:2] + CONVS[3:4])
def test_patches_replace_the_two_statistics_convolutions(conv, monkeypatch):
  *cfg, shape = conv
  spec = _spec(*cfg)
  x = jnp.ones(shape)
  s = draw_sketch(jax.random.PRNGKey(2), spec.input_width(shape) + 1, 3, "gaussian")
  patches = _convolutions(x, spec, s, _covariance.PATCH_LIMIT, monkeypatch)
  convolutions = _convolutions(x, spec, s, 0, monkeypatch)
  grouped = cfg[-1] > 1  # grouped convolutions always take the convolutions
  assert (patches == convolutions) if grouped else (patches < convolutions)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["gaussian", "subcolumns"])
def test_dense_statistics_over_several_calls(bias, kind):
  spec = DenseSpec((-1,))
  x1 = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 6))
  x2 = jax.random.normal(jax.random.PRNGKey(1), (5, 6))
  a = np.concatenate([np.asarray(x1).reshape(-1, 6), np.asarray(x2)]).astype(np.float64)
  if bias:
    a = _reference.with_bias_column(a)
  s = draw_sketch(jax.random.PRNGKey(3), a.shape[1], 3, kind)
  ours = sketched_covariance(LayerInputs([x1, x2], spec), s, bias)
  expected = a.T @ a @ np.asarray(s.matrix, np.float64) / a.shape[0]
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_dense_general_contracts_non_trailing_axes_in_kernel_order():
  spec = DenseSpec((1, -1))  # flax DenseGeneral(axis=(1, -1))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4, 5))
  rows = np.moveaxis(np.asarray(x, np.float64), (1, 3), (2, 3)).reshape(-1, 15)
  s = draw_sketch(jax.random.PRNGKey(1), 15, 15, "gaussian")  # identity
  ours = sketched_covariance(LayerInputs([x], spec), s, False)
  np.testing.assert_allclose(ours, rows.T @ rows / rows.shape[0], rtol=1e-5, atol=1e-5)


def test_bf16_inputs_are_accumulated_in_float32():
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 8)).astype(jnp.bfloat16)
  s = draw_sketch(jax.random.PRNGKey(1), 8, 8, "gaussian")
  y = sketched_covariance(LayerInputs([x], DenseSpec()), s, False)
  assert y.dtype == jnp.float32
  a = np.asarray(x.astype(jnp.float32), np.float64)
  np.testing.assert_allclose(y, a.T @ a / 64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("limit", [0, _covariance.PATCH_LIMIT])  # convolutions, patches
@pytest.mark.parametrize("padding", [((0, 0), (0, 0)), ((2, 1), (-1, 2))])
def test_conv_statistics_with_input_dilation_equal_patch_formula(padding, limit, monkeypatch):
  monkeypatch.setattr(_covariance, "PATCH_LIMIT", limit)
  """Input (lhs) dilation and negative explicit pads (lax takes no string
  padding with input dilation): A^T A S against the patch matrix that lax
  builds for the same convolution."""
  spec = ConvSpec((3, 2), (2, 1), padding, (2, 3), (1, 2), 1)
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 4, 3))
  a = np.asarray(conv_patches(x, spec), np.float64)
  a = _reference.with_bias_column(a)
  s = draw_sketch(jax.random.PRNGKey(4), a.shape[1], 5, "gaussian")
  ours = jax.jit(sketched_covariance, static_argnums=2)(LayerInputs([x], spec), s, True)
  expected = a.T @ (a @ np.asarray(s.matrix, np.float64)) / a.shape[0]
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("limit", [0, _covariance.PATCH_LIMIT])  # convolutions, patches
@pytest.mark.parametrize("conv", [c for c in CONVS if c[-1][0] > 1])
def test_batch_chunks_give_the_whole_batch_statistics(conv, limit, monkeypatch):
  monkeypatch.setattr(_covariance, "PATCH_LIMIT", limit)
  monkeypatch.setattr(_covariance, "_chunking_applies", lambda x: True)  # 8 devices here
  *cfg, shape = conv
  spec = _spec(*cfg)
  x = jax.random.normal(jax.random.PRNGKey(1), shape)
  a = _reference.with_bias_column(np.asarray(conv_patches(x, spec), np.float64))
  s = draw_sketch(jax.random.PRNGKey(2), a.shape[1], min(4, a.shape[1] - 1), "gaussian")
  fn = lambda x, s: sketched_covariance(LayerInputs([x], spec), s, True)
  monkeypatch.setattr(_covariance, "CHUNK_LIMIT", 1)  # one sample per chunk
  lowered = jax.jit(fn).lower(x, s)
  assert "stablehlo.while" in lowered.as_text()  # the chunks are a scan
  chunked = lowered.compile()(x, s)
  expected = a.T @ (a @ np.asarray(s.matrix, np.float64)) / a.shape[0]
  np.testing.assert_allclose(chunked, expected, rtol=1e-5, atol=1e-5)
