"""The one table helper of the benchmarks: a :class:`Table` renders as a
markdown table (what the READMEs and ``benchmarks/results/report.md`` show)
and as a rich table on the terminal, from the same cells."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any


@dataclasses.dataclass
class Table:
  """Columns, rows of cells (already formatted strings) and the alignment of
  each column (``"l"`` or ``"r"``)."""

  columns: Sequence[str]
  rows: list[Sequence[str]] = dataclasses.field(default_factory=list)
  align: str | None = None
  title: str | None = None

  def add(self, *cells: Any) -> None:
    self.rows.append([str(c) for c in cells])

  def _align(self) -> str:
    return self.align or "l" + "r" * (len(self.columns) - 1)

  def markdown(self) -> str:
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in self._align()) + "|"
    lines = ["| " + " | ".join(self.columns) + " |", rule]
    lines += ["| " + " | ".join(r) + " |" for r in self.rows]
    return "\n".join(lines)

  def rich(self):
    import rich.table

    t = rich.table.Table(title=self.title, show_lines=False)
    for c, a in zip(self.columns, self._align()):
      t.add_column(c, justify="right" if a == "r" else "left", overflow="fold")
    for r in self.rows:
      t.add_row(*r)
    return t


Block = str | Table


def markdown(blocks: Iterable[Block]) -> str:
  """Text blocks and tables as markdown (a blank line between blocks)."""
  return "\n\n".join(b.markdown() if isinstance(b, Table) else b for b in blocks)


def show(blocks: Iterable[Block], console=None) -> None:
  """Text blocks (as markdown) and tables (as rich tables) on the terminal."""
  import rich.console
  import rich.markdown

  console = console or rich.console.Console()
  for b in blocks:
    console.print(b.rich() if isinstance(b, Table) else rich.markdown.Markdown(b))
    console.print()
