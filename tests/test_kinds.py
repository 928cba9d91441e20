"""The layer-kind registry: statistics are dispatched by spec, never silently."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from nysact_optax import DenseSpec, LayerInputs, _covariance, _kinds, linalg


@dataclasses.dataclass(frozen=True)
class DoubledSpec(DenseSpec):
  """A dense layer that multiplies its input by 2 before the kernel."""


def doubled_stats(x, spec, sketch, has_bias, dtype, precision):
  return _covariance.dense_stats(2 * x, spec, sketch, has_bias, dtype, precision)


@pytest.fixture
def doubled():
  kind = _kinds.LayerKind("doubled", (), (), lambda *a: DoubledSpec(), DoubledSpec, doubled_stats)
  _kinds.register(kind)
  yield kind
  _kinds.unregister("doubled")


def test_a_dense_spec_kind_with_its_own_statistics_is_honoured(doubled):
  # Before: the first kind whose spec type matched by isinstance (DenseSpec's
  # dense_stats) served every DenseSpec subclass.
  x = jnp.arange(12.0).reshape(4, 3) / 7
  s = linalg.Sketch(jnp.eye(3))
  got = linalg.sketched_covariance(LayerInputs([x], DoubledSpec()), s, has_bias=False)
  want = (2 * x).T @ (2 * x) / 4
  np.testing.assert_allclose(got, want, rtol=1e-6)
  plain = linalg.sketched_covariance(LayerInputs([x], DenseSpec()), s, has_bias=False)
  np.testing.assert_allclose(plain, x.T @ x / 4, rtol=1e-6)
  assert _kinds.statistics_of(DoubledSpec()) is doubled_stats


def test_a_kind_that_would_be_served_other_statistics_is_refused(doubled):
  clash = _kinds.LayerKind("clash", (), (), lambda *a: DenseSpec(), DenseSpec, doubled_stats)
  with pytest.raises(ValueError, match="its spec type DenseSpec has the statistics dense_stats"):
    _kinds.register(clash)
  with pytest.raises(ValueError, match="a layer kind named 'doubled' is registered already"):
    _kinds.register(doubled)
  assert [k.name for k in _kinds.KINDS].count("doubled") == 1


def test_unregister_restores_the_table(doubled):
  assert [k.name for k in _kinds.KINDS][-1] == "doubled"
  _kinds.unregister("doubled")
  assert "doubled" not in [k.name for k in _kinds.KINDS]
  # Without its kind, the subclass falls back to its base class's statistics.
  assert _kinds.statistics_of(DoubledSpec()) is _covariance.dense_stats
  _kinds.register(doubled)  # for the fixture's teardown
