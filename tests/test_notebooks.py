"""Every notebook under notebooks/ executes without error.

The notebooks run here as short runs: a few whole lines of their code are
replaced (fewer training steps, fewer sketch ranks), each replacement listed
below and checked to match exactly once, so every cell still runs the code
the docs show. Their saved outputs, rendered by the docs, come from full runs
of the notebooks as saved.
"""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))

# {notebook: {old text: new text}}: the short run. Training loops keep at
# least two evaluations (the cells print the last and best accuracy).
SHORT = {
  "how_it_works": {
    "for _ in range(200):": "for _ in range(20):",
    "ranks = [1, 5, 10, 20, 50, 100, 200]": "ranks = [1, 10, 200]",
  },
  "nnx": {"steps=400, batch=64, eval_every=20": "steps=40, batch=64, eval_every=20"},
  "quickstart": {"steps=400, batch=64, eval_every=20": "steps=40, batch=64, eval_every=20"},
  "transformer": {
    "steps=300, batch=64": "steps=20, batch=64",
    'grids = {"adamw": [1e-3, 3e-3, 1e-2], "nysact_adam": [1e-3, 3e-3, 1e-2], '
    '"muon": [0.01, 0.03, 0.1]}': (
      'grids = {"adamw": [1e-2], "nysact_adam": [1e-2], "muon": [0.03]}'
    ),
  },
}


def _shorten(notebook, edits):
  """Replaces each ``old`` of ``edits`` in the code cells; it must occur exactly once."""
  code = [c for c in notebook.cells if c.cell_type == "code"]
  for old, new in edits.items():
    assert sum(c.source.count(old) for c in code) == 1, old
    cell = next(c for c in code if old in c.source)
    cell.source = cell.source.replace(old, new)


def test_there_are_notebooks():
  assert len(NOTEBOOKS) >= 2
  assert set(SHORT) <= {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, monkeypatch):
  monkeypatch.setenv("MPLBACKEND", "Agg")
  notebook = nbformat.read(path, as_version=4)
  _shorten(notebook, SHORT.get(path.stem, {}))
  client = nbclient.NotebookClient(
    notebook,
    timeout=600,
    kernel_name="python3",
    resources={"metadata": {"path": str(path.parent.parent)}},
  )
  client.execute()  # raises CellExecutionError on the first failing cell
  errors = [
    o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"
  ]
  assert not errors
  code = [c for c in notebook.cells if c.cell_type == "code"]
  assert all(c.execution_count for c in code), "a code cell did not run"
