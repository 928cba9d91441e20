"""``python -m benchmarks <suite> [options]``: the one entry point of the
benchmarks. ``python -m benchmarks --help`` lists the suites;
``python -m benchmarks <suite> --help`` is the suite's own help.

Every suite is also its module's ``main`` (``python -m benchmarks.<module>``
keeps working).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# suite -> (module, one line)
SUITES: dict[str, tuple[str, str]] = {
  "step_time": (
    "benchmarks.step_time",
    "train-step time and optimizer-state memory against SGD, AdamW, K-FAC",
  ),
  "scaling": ("benchmarks.scaling", "NysAct's operations against the layer width p"),
  "conv_stats": ("benchmarks.conv_stats", "patch-free conv statistics against im2col"),
  "communication": (
    "benchmarks.communication",
    "all-reduce bytes of data-parallel NysAct (simulated CPU devices)",
  ),
  "profile_update": (
    "benchmarks.profile_update",
    "NysAct's update split into plain / statistics / inverse steps",
  ),
  "precision": ("benchmarks.precision", "error of reduced-precision formats (precision study)"),
  "memory": ("benchmarks.memory", "train-step peak memory (compiled memory analysis)"),
  "authors_literal": (
    "benchmarks.authors_literal",
    "the authors' literal Nystrom against the library's",
  ),
  "report": ("benchmarks.report", "the tables of benchmarks/README.md from the results"),
  "quality": ("benchmarks.quality.suite", "the training-quality suite (resumable runner)"),
  "quality-run": ("benchmarks.quality.train", "one training-quality run -> one JSON"),
  "quality-summary": ("benchmarks.quality.summary", "summary tables and plots of the quality runs"),
  "quality-recheck": (
    "benchmarks.quality.recheck",
    "rerun recorded quality runs at the current code, paired by seed",
  ),
  "step-cost": (
    "benchmarks.quality.step_cost",
    "side-by-side step cost of the quality optimizers on one task",
  ),
  "convert-results": (
    "benchmarks.convert_results",
    "one-off: convert old-layout results JSON to the current schema",
  ),
}


def usage() -> str:
  width = max(map(len, SUITES))
  lines = [
    "usage: python -m benchmarks <suite> [options]",
    "",
    "python -m benchmarks <suite> --help shows a suite's options.",
    "",
    "suites:",
  ]
  lines += [f"  {name:<{width}}  {line}" for name, (_, line) in SUITES.items()]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(usage())
    return 0 if argv else 2
  suite, rest = argv[0], argv[1:]
  if suite not in SUITES:
    print(f"unknown suite {suite!r}\n\n{usage()}", file=sys.stderr)
    return 2
  from benchmarks import _common

  _common.ENTRY = f"python -m benchmarks {suite}"
  sys.argv = [_common.ENTRY, *rest]  # argparse's prog and the recorded command
  module = importlib.import_module(SUITES[suite][0])
  module.main(rest)
  return 0


if __name__ == "__main__":
  sys.exit(main())
