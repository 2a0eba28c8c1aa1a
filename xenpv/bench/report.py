"""Benchmark output: a human table on stderr, one JSON object as the last line of stdout."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table


def emit(
    result: Mapping[str, Any],
    *,
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    notes: Sequence[str] = (),
) -> None:
    """Print `rows` as a table on stderr, then `result` as one JSON line on stdout."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(_fmt(cell) for cell in row))
    console = Console(file=sys.stderr)
    console.print(table)
    for note in notes:
        console.print(note)
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    sys.stdout.flush()


def _fmt(cell: Any) -> str:
    if isinstance(cell, float):
        return f"{cell:,.2f}" if abs(cell) < 1000 else f"{cell:,.0f}"
    return str(cell)
