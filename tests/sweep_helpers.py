"""Shared pieces of the sweep tests: a tiny sweep's settings and comparisons of run results."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from plyfile import PlyData

PROMPTS = ["a red apple", "a blue car on a road"]
TINY_ANALYTIC = [
    "GuidanceParams.prior=analytic", "GuidanceParams.C_batch_size=2", "GuidanceParams.lambda_guidance=0.1",
    "GenerateCamParams.image_w=32", "GenerateCamParams.image_h=32", "GenerateCamParams.init_num_pts=300",
    "OptimizationParams.iterations=6", "OptimizationParams.densify_from_iter=1",
    "OptimizationParams.densification_interval=2", "OptimizationParams.warmup_iter=2",
    "video_frames=4", "checkpoint_interval=2", "save_video=false", "test_ratio=2", "export_mesh=false",
]


def tiny_sd(model_dir: Path) -> list[str]:
    """The tiny random Stable Diffusion at 64x64 (8x8 latents), uncompiled."""
    return [o for o in TINY_ANALYTIC if not o.startswith(("GuidanceParams.prior", "GenerateCamParams.image"))] + [
        "GuidanceParams.prior=stable_diffusion", f"GuidanceParams.model_key={model_dir}",
        "GenerateCamParams.image_w=64", "GenerateCamParams.image_h=64", "PipelineParams.compile=false",
        "GuidanceParams.perpneg=true", "GuidanceParams.negative=blurry",
    ]


def write_prompts(folder: Path, prompts=PROMPTS) -> Path:
    path = folder / "prompts.txt"
    path.write_text("# test prompts\n" + "\n".join(prompts) + "\n\n")
    return path


def ply_arrays(path: Path) -> dict:
    v = PlyData.read(str(path))["vertex"]
    return {name: np.asarray(v[name]).copy() for name in v.data.dtype.names}


def assert_same_result(run_a: Path, run_b: Path) -> None:
    """Bitwise-equal Gaussians and equal evaluation metrics (timings aside)."""
    a, b = ply_arrays(run_a / "point_cloud.ply"), ply_arrays(run_b / "point_cloud.ply")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=f"{run_a} vs {run_b}: {name}")
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (run_a, run_b))
    for key in ("initial", "final"):
        assert ma[key] == mb[key], (key, ma[key], mb[key])
