"""One-off (issue 17): converts the results JSON committed under
``benchmarks/results/`` to the one schema of :mod:`benchmarks.results`.

Each file gets the header from what it recorded (unknown fields ``None``),
its settings become ``config``, everything else ``metrics``, and a quality
run's curve and preconditioner errors ``curves``. Quality runs recorded two
commits that often disagree: the one taken when the process started is kept
as ``commit``, the one taken when the JSON was written as
``commit_at_write`` (see ``commit_note`` in each file). Files already in the
schema are left alone, so running it again changes nothing.

Usage (from the repository root)::

  python -m benchmarks.convert_results [--check]
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Sequence

from benchmarks import _common, results


def main(argv: Sequence[str] | None = None) -> list[pathlib.Path]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--results", default=str(_common.RESULTS_DIR))
  p.add_argument("--check", action="store_true", help="list old-layout files, change nothing")
  a = p.parse_args(argv)
  changed = []
  for path in sorted(pathlib.Path(a.results).rglob("*.json")):
    rec = json.loads(path.read_text())
    if results.has_header(rec):
      continue
    changed.append(path)
    if not a.check:
      # no re-rounding: the values are written as they were read
      path.write_text(json.dumps(results.upgrade(rec, path.name), indent=1) + "\n")
  print(f"{'old layout' if a.check else 'converted'}: {len(changed)} file(s)")
  return changed


if __name__ == "__main__":
  main()
