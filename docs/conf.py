"""Sphinx configuration: MyST markdown guides, notebooks rendered from their
saved outputs (myst-nb, no execution), and the API reference from the
docstrings (autodoc, Google style through napoleon)."""

from __future__ import annotations

import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

project = "nysact_optax"
author = "the nysact_optax authors"
copyright = "2026, the nysact_optax authors"

extensions = [
  "myst_nb",
  "sphinx.ext.autodoc",
  "sphinx.ext.napoleon",
  "sphinx.ext.viewcode",
  "sphinx.ext.intersphinx",
]

# The notebooks live in notebooks/ (CI executes them there); the docs render
# copies with the outputs they were saved with.
_NOTEBOOKS = pathlib.Path(__file__).resolve().parent / "notebooks"
shutil.rmtree(_NOTEBOOKS, ignore_errors=True)
shutil.copytree(ROOT / "notebooks", _NOTEBOOKS)
for _nb in _NOTEBOOKS.glob("*.ipynb"):  # one folder deeper: relative links gain a ../
  _nb.write_text(_nb.read_text().replace("](../benchmarks/", "](../../benchmarks/"))

nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3
suppress_warnings = ["mystnb.unknown_mime_type"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

intersphinx_mapping: dict = {}  # offline builds: no inventories fetched

exclude_patterns = ["_build", "notebooks/.ipynb_checkpoints"]
html_theme = "sphinx_book_theme"
html_title = "nysact_optax"
html_theme_options = {"show_toc_level": 2}

# The benchmark READMEs and the quality study's tables are written for the
# repository (GitHub renders them there); the site renders copies whose links
# point at its own pages, and whose other file links become paths.
_DOCS = pathlib.Path(__file__).resolve().parent
_GENERATED = {
  "benchmarks/README.md": "benchmarks",
  "benchmarks/quality/README.md": "quality",
  "benchmarks/results/quality/summary.md": "quality_summary",
}


def _rewrite_links(text: str, source: pathlib.Path) -> str:
  import os
  import re

  def link(match: re.Match) -> str:
    bang, label, target = match.group(1), match.group(2), match.group(3)
    if re.match(r"[a-z]+:", target) or target.startswith("#"):
      return match.group(0)
    path, _, anchor = target.partition("#")
    repo_path = (source.parent / path).resolve().relative_to(ROOT).as_posix()
    if repo_path in _GENERATED:
      return f"{bang}[{label}]({_GENERATED[repo_path]}.md{'#' + anchor if anchor else ''})"
    if bang:  # an image: relative to the docs
      return f"{bang}[{label}]({os.path.relpath(ROOT / repo_path, _DOCS)})"
    return f"{label} (`{repo_path}`)" if label.strip("`") != repo_path else f"`{repo_path}`"

  return re.sub(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)", link, text)


for _source, _page in _GENERATED.items():
  _path = ROOT / _source
  _text = _path.read_text() if _path.exists() else f"# {_page}\n\nNot run yet.\n"
  (_DOCS / f"{_page}.md").write_text(_rewrite_links(_text, _path))
