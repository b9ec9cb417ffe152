"""What every benchmark script ends with: its table printed, and written to --out when given."""
from __future__ import annotations

from pathlib import Path


def publish_table(table: str, out: Path | None, quiet: bool = False) -> None:
    """Print `table` (markdown) and, with `out`, write it there (its folder created); quiet: write only
    (a partial table, rewritten as rows come)."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
    if not quiet:
        print(table)
