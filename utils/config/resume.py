"""The configuration of a resumed run: the run folder's config.yaml plus the overrides that may change.

A checkpoint continues one trajectory; most keys define that trajectory, so changing them on
resume would silently mix two runs. The keys in RESUMABLE_KEYS only extend the run or change what
is written and how fast it runs; any other override that changes a value is refused by name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from utils.config.loading import load_config
from utils.config.schema import Config, ConfigError, section_attributes

RESUMABLE_KEYS = {
    "OptimizationParams.iterations": "train further (past the original end the learning rates stay at their "
                                     "final values)",
    "checkpoint_interval": "how often checkpoints are written",
    "log_interval": "how often scalars are logged",
    "preview_interval": "how often preview images are logged",
    "nonfinite_patience": "how long NaN/Inf steps are tolerated",
    "save_video": "whether the turntable video is written",
    "video_frames": "frames of the turntable video",
    "test_ratio": "how often test views are rendered",
    "save_ratio": "how often point clouds are saved",
    "ply_sh_degree": "the SH padding of exported PLYs",
    "eval_resolution": "the size of test views and videos",
    "ply_up_axis": "the up axis of exported PLYs",
    "export_mesh": "whether the mesh is exported at the end",
    "mesh_resolution": "the mesh export's grid",
    "mesh_faces": "the mesh export's face count",
    "mesh_level": "the mesh export's opacity level",
    "mesh_bake_views": "the mesh export's colour views",
    "mesh_texture": "the mesh export's texture size",
    "viewer": "whether the live viewer is served",
    "viewer_host": "where the live viewer listens",
    "viewer_port": "the live viewer's port",
    "viewer_max_fps": "the live viewer's frame rate",
    "viewer_render_share": "the live viewer's share of the time",
    "viewer_resolution": "the live viewer's image size",
    "PipelineParams.cuda_graphs": "a speed lever",
    "PipelineParams.channels_last": "a speed lever",
    "PipelineParams.vae_channels_last": "a speed lever",
    "PipelineParams.compile": "a speed lever",
    "PipelineParams.compile_dynamic_batch": "a speed lever",
    "PipelineParams.cudnn_benchmark": "a speed lever",
    "PipelineParams.attention_slicing": "a memory lever",
}


def config_value(cfg: Config, key: str) -> Any:
    """The value of a full key (``Section.key`` or a top-level key)."""
    section, _, name = key.rpartition(".")
    target = getattr(cfg, section_attributes()[section]) if section else cfg
    return getattr(target, name)


def changed_keys(before: Config, after: Config) -> list[str]:
    """Full keys whose values differ."""
    keys = [f.name for f in before.__dataclass_fields__.values() if "section" not in f.metadata]
    for section, attr in section_attributes().items():
        keys += [f"{section}.{name}" for name in getattr(before, attr).__dataclass_fields__]
    return [k for k in keys if config_value(before, k) != config_value(after, k)]


def load_run_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> tuple[Config, list[str]]:
    """(config of the run folder with the overrides applied, keys the overrides changed).

    ConfigError when the folder has no readable config.yaml, or when an override changes a key that
    a resumed run cannot change.
    """
    path = Path(run_dir) / "config.yaml"
    if not Path(run_dir).is_dir():
        raise ConfigError(f"--resume {run_dir}: no such run folder")
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml in that folder; is it a run folder of train.py?")
    try:
        saved = load_config(path, warn_no_effect=False)
    except ConfigError as exc:
        raise ConfigError(f"--resume {run_dir}: config.yaml is damaged or was edited into an invalid state: "
                          f"{exc}") from None
    cfg = load_config(path, overrides, warn_no_effect=False)
    changed = changed_keys(saved, cfg)
    refused = [k for k in changed if k not in RESUMABLE_KEYS]
    if refused:
        was = ", ".join(f"{k}={config_value(saved, k)!r}" for k in refused)
        raise ConfigError(f"--resume {run_dir}: {', '.join(refused)} cannot change when resuming: the checkpoint "
                          f"continues a run trained with {was}. Keys that may change on resume: "
                          f"{', '.join(RESUMABLE_KEYS)}; for other values start a new run")
    return cfg, changed
