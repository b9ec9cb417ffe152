"""Which final outputs of a finished run are on disk: a small record, so that finishing is idempotent.

A run writes its final outputs (the final evaluation's test views and metrics, point_cloud.ply, the
turntable video, the mesh) after the checkpoint of its last step. A run killed between the two has
nothing left to train, yet lacks some of them: `--resume` then writes only what this record does not
list (or lists but is gone from the folder), and says "already finished" only when nothing is missing.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from utils.files import atomic_write_text

RECORD_NAME = "final_outputs.json"
EVALUATION, POINT_CLOUD, VIDEO, MESH = "evaluation", "point_cloud", "video", "mesh"


def wanted_outputs(save_video: bool, export_mesh: bool) -> list[str]:
    """The final outputs a run's configuration asks for, in the order they are written."""
    return [EVALUATION, POINT_CLOUD] + ([VIDEO] if save_video else []) + ([MESH] if export_mesh else [])


@dataclass
class FinalOutputs:
    """The record of run_dir's final outputs for one step: name -> path relative to the run folder
    (None: written as nothing, e.g. no mesh because the Gaussians have no surface)."""

    run_dir: Path
    step: int
    written: dict[str, str | None] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.run_dir / RECORD_NAME

    @classmethod
    def read(cls, run_dir: Path, step: int) -> FinalOutputs:
        """The record of `step`; empty when there is none, it is damaged, or it is about another step
        (a run extended on --resume writes its final outputs again)."""
        try:
            state = json.loads((run_dir / RECORD_NAME).read_text())
            written = dict(state["written"]) if int(state["step"]) == step else {}
        except (OSError, ValueError, KeyError, TypeError):
            written = {}
        return cls(run_dir, step, written)

    def has(self, name: str) -> bool:
        """Whether `name` was written for this step and its file is still there."""
        if name not in self.written:
            return False
        relative = self.written[name]
        return relative is None or (self.run_dir / relative).exists()

    def missing(self, wanted: list[str]) -> list[str]:
        return [name for name in wanted if not self.has(name)]

    def mark(self, name: str, path: Path | None) -> None:
        """Record `name` as written (at `path`, inside the run folder) and save the record atomically."""
        self.written[name] = None if path is None else path.relative_to(self.run_dir).as_posix()
        atomic_write_text(self.path, json.dumps(self.state_dict(), indent=2) + "\n")

    def state_dict(self) -> dict:
        return {"step": self.step, "written": dict(self.written)}
