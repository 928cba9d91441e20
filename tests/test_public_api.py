"""The benchmarks use only the public API, and ``nysact_optax.linalg`` (NysAct's
pieces, public for measuring them) agrees with dense NumPy formulas."""

from __future__ import annotations

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nysact_optax
from benchmarks import _reference as bench_reference
from nysact_optax import ConvSpec, DenseSpec, LayerInputs, linalg
from tests import _reference

ROOT = pathlib.Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------
# Benchmarks import no private module and no tests
# --------------------------------------------------------------------------


def _private(module: str) -> bool:
  """A private ``nysact_optax`` module, or the tests package."""
  parts = module.split(".")
  if parts[0] == "tests":
    return True
  return parts[0] == "nysact_optax" and any(
    p.startswith("_") and not p.startswith("__") for p in parts[1:]
  )


def _private_attribute(node: ast.Attribute) -> bool:
  """``nysact_optax._name`` (the private name itself, not what is read off it)."""
  return node.attr.startswith("_") and _private(f"{ast.unparse(node.value)}.{node.attr}")


def private_uses(source: str) -> list[str]:
  """Every import of ``tests`` or of a private ``nysact_optax._`` module in
  ``source``, and every ``nysact_optax._name`` attribute read, as
  ``"line: what"``."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found += [f"{node.lineno}: import {a.name}" for a in node.names if _private(a.name)]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names = [a.name for a in node.names]
      if _private(node.module) or any(_private(f"{node.module}.{n}") for n in names):
        found.append(f"{node.lineno}: from {node.module} import {', '.join(names)}")
    elif isinstance(node, ast.Attribute) and _private_attribute(node):
      found.append(f"{node.lineno}: {ast.unparse(node)}")
  return found


def test_benchmarks_use_only_the_public_api():
  files = sorted((ROOT / "benchmarks").rglob("*.py"))
  assert len(files) > 20, files
  found = [
    f"{path.relative_to(ROOT)}:{use}"
    for path in files
    for use in private_uses(path.read_text(encoding="utf-8"))
  ]
  assert found == [], "benchmarks must use the public API (nysact_optax.linalg):\n" + "\n".join(
    found
  )


@pytest.mark.parametrize(
  "line",
  [
    "from nysact_optax import _sketch",
    "from nysact_optax import DenseSpec, _apply",
    "from nysact_optax._sketch import draw_sketch",
    "import nysact_optax._tree",
    "import nysact_optax._tree as t",
    "layers = nysact_optax._tree.find_layers(p)",
    "from tests import _reference",
    "from tests._reference import dense_preconditioner",
    "import tests._reference",
    "import tests",
  ],
)
def test_the_scan_finds_private_uses(line):
  assert len(private_uses(line)) == 1, line


@pytest.mark.parametrize(
  "line",
  [
    "import nysact_optax",
    "from nysact_optax import linalg, nysact",
    "from nysact_optax.linalg import draw_sketch",
    "lib = nysact_optax.__file__",
    "from benchmarks import _common, _reference",
    "x = something._private",
  ],
)
def test_the_scan_allows_public_uses(line):
  assert private_uses(line) == [], line


# --------------------------------------------------------------------------
# nysact_optax.linalg
# --------------------------------------------------------------------------

PUBLIC = {
  "Sketch": "_sketch",
  "draw_sketch": "_sketch",
  "sketched_covariance": "_statistics",
  "nystrom_stable": "_nystrom",
  "nystrom_shifted": "_nystrom",
  "exact_eigh": "_nystrom",
  "precondition": "_apply",
}


def test_linalg_reexports_the_optimizers_own_functions_and_documents_them():
  import importlib

  assert sorted(linalg.__all__) == sorted(PUBLIC)
  assert nysact_optax.linalg is linalg
  api = (ROOT / "docs" / "api.md").read_text()
  for name, module in PUBLIC.items():
    assert getattr(linalg, name) is getattr(importlib.import_module(f"nysact_optax.{module}"), name)
    assert getattr(linalg, name).__doc__, name
    assert f"nysact_optax.linalg.{name}" in api, name


def _inputs(n=96, p_in=7, seed=0):
  """Correlated inputs (a decaying spectrum), float32."""
  rng = np.random.default_rng(seed)
  x = (
    rng.standard_normal((n, p_in))
    @ np.diag(0.7 ** np.arange(p_in))
    @ rng.standard_normal((p_in, p_in))
  )
  return jnp.asarray(x, jnp.float32)


def _dense_cov(x, has_bias=True):
  a = np.asarray(x, np.float64)
  a = _reference.with_bias_column(a) if has_bias else a
  return a.T @ a / a.shape[0]


@pytest.mark.parametrize("kind", ["gaussian", "subcolumns"])
def test_draw_sketch(kind):
  s = linalg.draw_sketch(jax.random.PRNGKey(3), 8, 3, kind, orthonormal=True)
  assert isinstance(s, linalg.Sketch) and s.matrix.shape == (8, 3)
  m = np.asarray(s.matrix, np.float64)
  np.testing.assert_allclose(m.T @ m, np.eye(3), atol=1e-5)
  if kind == "subcolumns":
    np.testing.assert_array_equal(m, np.eye(8)[:, np.asarray(s.indices)])
  plain = np.asarray(linalg.draw_sketch(jax.random.PRNGKey(3), 8, 3, kind).matrix)
  assert plain.shape == (8, 3) and np.isfinite(plain).all()
  np.testing.assert_array_equal(
    linalg.draw_sketch(jax.random.PRNGKey(3), 8, 8, kind).matrix, np.eye(8)
  )


def test_sketched_covariance_of_dense_and_conv_layers():
  x = _inputs()
  s = linalg.draw_sketch(jax.random.PRNGKey(1), 8, 3, "gaussian")
  y = linalg.sketched_covariance(LayerInputs([x], DenseSpec()), s, True)
  np.testing.assert_allclose(y, _dense_cov(x) @ np.asarray(s.matrix), rtol=1e-5, atol=1e-6)

  spec = ConvSpec((3, 3), (2, 1), "SAME", (1, 1), (1, 1), feature_group_count=2)
  xc = jnp.asarray(np.random.default_rng(2).standard_normal((2, 5, 6, 4)), jnp.float32)
  a = _reference.with_bias_column(
    _reference.im2col(xc, spec.kernel_size, spec.strides, "SAME", (1, 1), groups=2)
  )
  s = linalg.draw_sketch(jax.random.PRNGKey(2), a.shape[1], 4, "gaussian")
  y = linalg.sketched_covariance(LayerInputs([xc], spec), s, True)
  want = a.T @ a / a.shape[0] @ np.asarray(s.matrix, np.float64)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_nystrom_stable_is_the_nystrom_approximation():
  x = _inputs()
  c = _dense_cov(x)
  s = linalg.draw_sketch(jax.random.PRNGKey(4), 8, 4, "gaussian", orthonormal=True)
  sm = np.asarray(s.matrix, np.float64)
  u, lam = linalg.nystrom_stable(jnp.asarray(c @ sm, jnp.float32), s.matrix)
  u, lam = np.asarray(u, np.float64), np.asarray(lam, np.float64)
  want = c @ sm @ np.linalg.inv(sm.T @ c @ sm) @ sm.T @ c
  np.testing.assert_allclose((u * lam) @ u.T, want, atol=1e-4 * np.abs(want).max())
  np.testing.assert_allclose(u.T @ u, np.eye(4), atol=1e-5)
  assert (lam >= 0).all()


@pytest.mark.parametrize("rho", [0.1, 1.0])
def test_nystrom_shifted_is_the_papers_factorisation(rho):
  x = _inputs()
  c = _dense_cov(x)
  s = linalg.draw_sketch(jax.random.PRNGKey(5), 8, 4, "gaussian")
  c_hat = c @ np.asarray(s.matrix, np.float64)
  u, lam = linalg.nystrom_shifted(jnp.asarray(c_hat, jnp.float32), s.matrix, rho)
  # One sketch: W = S^T C S is symmetric, and L^{-T} is the standard formula.
  want = _reference.reference_preconditioner(c_hat, s.matrix, rho, solve_with_l=False)
  np.testing.assert_allclose(
    _reference.dense_preconditioner(u, lam, rho), want, atol=1e-4 * np.abs(want).max()
  )


def test_exact_eigh_and_precondition_give_the_damped_inverse():
  x = _inputs()
  c = _dense_cov(x)
  eye = linalg.draw_sketch(jax.random.PRNGKey(0), 8, 8, "gaussian")
  cov = linalg.sketched_covariance(LayerInputs([x], DenseSpec()), eye, True)
  u, lam = linalg.exact_eigh(cov)
  un, ln = np.asarray(u, np.float64), np.asarray(lam, np.float64)
  np.testing.assert_allclose((un * ln) @ un.T, c, atol=1e-5 * np.abs(c).max())
  np.testing.assert_allclose(ln, np.linalg.eigvalsh(c), atol=1e-5 * ln.max())
  g = jnp.asarray(np.random.default_rng(6).standard_normal((8, 5)), jnp.float32)
  for rho in (0.01, 1.0):
    want = np.linalg.solve(c + rho * np.eye(8), np.asarray(g, np.float64))
    got = np.asarray(linalg.precondition(g, u, lam, rho), np.float64)
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


def test_precondition_is_the_dense_preconditioner():
  rng = np.random.default_rng(7)
  u = jnp.asarray(np.linalg.qr(rng.standard_normal((9, 3)))[0], jnp.float32)
  lam = jnp.asarray([5.0, 1.0, 0.0], jnp.float32)
  g = jnp.asarray(rng.standard_normal((9, 4)), jnp.float32)
  for rho in (0.1, 1.0):
    want = _reference.dense_preconditioner(u, lam, rho) @ np.asarray(g, np.float64)
    got = np.asarray(linalg.precondition(g, u, lam, rho), np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# The benchmarks' own dense formulas equal the tests'
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
  "spec, shape",
  [
    (ConvSpec((3, 3), (1, 1), "SAME", (1, 1), (1, 1)), (2, 5, 6, 4)),
    (ConvSpec((3, 3), (2, 2), "SAME", (1, 1), (1, 1), feature_group_count=2), (2, 7, 6, 4)),
    (ConvSpec((2,), (1,), "VALID", (1,), (2,)), (3, 9, 3)),
    (ConvSpec((3, 2), (2, 1), ((1, 0), (2, 1)), (1, 1), (1, 1)), (1, 5, 5, 2)),
  ],
)
def test_benchmark_conv_patches_equal_the_tests(spec, shape):
  x = jnp.asarray(np.random.default_rng(9).standard_normal(shape), jnp.float32)
  got = np.asarray(bench_reference.conv_patches(x, spec), np.float64)
  np.testing.assert_array_equal(got, np.asarray(_reference.conv_patches(x, spec)))
  ks, st, dil = spec.kernel_size, spec.strides, spec.kernel_dilation
  want = _reference.im2col(x, ks, st, spec.padding, dil, spec.feature_group_count)
  np.testing.assert_allclose(got, want, rtol=1e-6)
