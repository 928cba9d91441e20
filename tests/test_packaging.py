"""The release artefact: ``python -m build --wheel`` gives a wheel with the
package's modules, its license and pyproject's metadata, and the wheel, installed
on its own, imports outside the source tree.

The install uses ``pip install --no-deps --target``: the runtime dependencies
(jax, flax, ...) come from the test environment, so the check needs no network
beyond what ``build`` needs for its isolated build environment.
"""

import email.parser
import os
import pathlib
import subprocess
import sys
import tomllib
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

pytest.importorskip("build")
Requirement = pytest.importorskip("packaging.requirements").Requirement  # a dependency of build


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("dist")
  subprocess.run(
    [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(ROOT)],
    check=True,
    capture_output=True,
    timeout=300,
  )
  (path,) = out.glob("*.whl")
  return path


def test_wheel_holds_the_package_license_and_metadata(wheel):
  version = PYPROJECT["version"]
  assert wheel.name == f"nysact_optax-{version}-py3-none-any.whl"
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    info = f"nysact_optax-{version}.dist-info"
    metadata = email.parser.Parser().parsestr(z.read(f"{info}/METADATA").decode())
    license_text = z.read(f"{info}/licenses/LICENSE").decode()
  modules = {n for n in names if not n.startswith(info)}
  assert modules == {
    p.relative_to(ROOT).as_posix() for p in (ROOT / "nysact_optax").glob("*.py")
  }, "every module of nysact_optax and nothing else (no tests, benchmarks or notebooks)"
  assert metadata["Name"] == "nysact-optax" and metadata["Version"] == version
  assert metadata["License-Expression"] == PYPROJECT["license"] == "Apache-2.0"
  assert metadata["Requires-Python"] == PYPROJECT["requires-python"]
  requires = [Requirement(r) for r in metadata.get_all("Requires-Dist")]
  core = {(r.name, r.specifier) for r in requires if r.marker is None}
  assert core == {(r.name, r.specifier) for r in map(Requirement, PYPROJECT["dependencies"])}
  extras = set(metadata.get_all("Provides-Extra"))
  assert extras == set(PYPROJECT["optional-dependencies"])
  assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text


def test_wheel_installs_and_imports_outside_the_source_tree(wheel, tmp_path):
  target = tmp_path / "site"
  subprocess.run(
    [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), wheel],
    check=True,
    capture_output=True,
    timeout=120,
  )
  code = (
    "import jax.numpy as jnp, optax, nysact_optax\n"
    "print(nysact_optax.__file__)\n"
    "print(nysact_optax.__version__)\n"
    "params = {'w': jnp.ones((3, 2))}\n"
    "tx = nysact_optax.nysact(0.1)\n"
    "print(type(tx.init(params)).__name__)\n"
  )
  env = {**os.environ, "PYTHONPATH": str(target)}
  # -I would also drop PYTHONPATH; -s keeps user site-packages out, and the working
  # directory is outside the repository, so only the installed copy can be imported.
  run = subprocess.run(
    [sys.executable, "-s", "-c", code],
    cwd=tmp_path,
    env=env,
    check=True,
    capture_output=True,
    text=True,
    timeout=120,
  )
  file, version, _ = run.stdout.splitlines()
  assert pathlib.Path(file).is_relative_to(target), file
  assert version == PYPROJECT["version"]
