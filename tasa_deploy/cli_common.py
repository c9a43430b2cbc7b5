"""What every CLI module shares: the two consoles (stderr for progress and errors, stdout for results) and the
results table."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

console = Console(stderr=True)
out_console = Console()


def table(title: str, rows: list[dict]) -> Table:
    """A rich table whose columns are the union of the rows' keys (first-seen order); a missing cell is blank."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    result = Table(title=title)
    for key in columns:
        result.add_column(str(key))
    for row in rows:
        result.add_row(*("" if key not in row else f"{row[key]:.4g}" if isinstance(row[key], float) else str(row[key])
                         for key in columns))
    return result
