"""What every benchmark script ends with: its table printed, and written to --out when given."""
from __future__ import annotations

from pathlib import Path


def publish_table(table: str, out: Path | None) -> None:
    """Print `table` (markdown) and, with `out`, write it there (its folder created)."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
    print(table)
