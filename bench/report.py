"""What the benchmark scripts share: the table printed (and written to --out), a run's loop split."""
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


def loop_split(timings: dict) -> tuple[float, float]:
    """(ms per iteration, fixed in-loop seconds) of a run's metrics.json "timings": its TensorBoard previews,
    one per preview_interval iterations, go with the iterations; evaluations, snapshots and checkpoints
    stay a fixed cost."""
    previews = timings.get("in_loop_work", {}).get("preview", {}).get("seconds", 0.0)
    per_iteration = 1000.0 * previews / max(timings.get("iterations", 1) - 1, 1)
    return timings["ms_per_iteration"] + per_iteration, timings["in_loop_work_seconds"] - previews
