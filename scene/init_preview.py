"""What a run started from: the initial point cloud saved as a PLY and drawn from a few views.

`record_initial_cloud` writes `<run>/init/point_cloud.ply` (x, y, z, red, green, blue: readable again with
`init_shape: ply`, like the official `init_points3d.ply`) and logs `init/point_cloud` to TensorBoard: the
points themselves, one pixel each with a depth test, on white, from the azimuths 0, 90, 180 and 270 of
the evaluation ring. The points are read back from the Gaussians before the first step, so this shows
exactly the positions and colours training starts from, whatever the init_shape.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from plyfile import PlyData, PlyElement
from torch import Tensor

from scene.camera_sampler import evaluation_ring
from scene.cameras import Cameras
from scene.gaussian_model import GaussianModel, sh_to_rgb

INIT_PLY = Path("init") / "point_cloud.ply"
PREVIEW_VIEWS = 4
PREVIEW_SIZE = 256


def initial_cloud(gaussians: GaussianModel) -> tuple[Tensor, Tensor]:
    """Positions [N, 3] and base colours [N, 3] in [0, 1] of the Gaussians (CPU, float32)."""
    with torch.no_grad():
        rgb = sh_to_rgb(gaussians.features[:, 0]).clamp(0.0, 1.0)
        return gaussians.means.detach().float().cpu(), rgb.float().cpu()


def save_point_cloud_ply(xyz: Tensor, rgb: Tensor, path: Path) -> Path:
    """A point-cloud PLY: float x, y, z and uint8 red, green, blue. xyz, rgb [N, 3]."""
    if xyz.ndim != 2 or xyz.shape[1] != 3 or rgb.shape != xyz.shape:
        raise ValueError(f"xyz and rgb must both be [N, 3], got {tuple(xyz.shape)} and {tuple(rgb.shape)}")
    vertices = np.empty(xyz.shape[0], dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"),
                                             ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    colours = (rgb.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()
    for i, name in enumerate("xyz"):
        vertices[name] = xyz[:, i].numpy()
    for i, name in enumerate(("red", "green", "blue")):
        vertices[name] = colours[:, i]
    path.parent.mkdir(parents=True, exist_ok=True)
    PlyData([PlyElement.describe(vertices, "vertex")]).write(str(path))
    return path


def splat_points(xyz: Tensor, rgb: Tensor, cameras: Cameras, background: float = 1.0) -> Tensor:
    """Each point drawn as one pixel, the nearest point winning: xyz, rgb [N, 3] -> images [B, 3, H, W]."""
    h, w = cameras.height, cameras.width
    ones = torch.ones(xyz.shape[0], 1, dtype=xyz.dtype)
    images = torch.full((len(cameras), 3, h * w), float(background), dtype=rgb.dtype)
    for b in range(len(cameras)):
        cam = (cameras.world_to_camera[b].to(xyz.dtype) @ torch.cat([xyz, ones], 1).T)[:3]  # [3, N]
        pix = cameras.intrinsics()[b].to(xyz.dtype) @ cam
        depth = cam[2]
        u, v = pix[0] / depth.clamp_min(1e-9), pix[1] / depth.clamp_min(1e-9)
        visible = (depth > cameras.near) & (u >= 0) & (u < w) & (v >= 0) & (v < h)
        flat = v[visible].long() * w + u[visible].long()
        nearest = torch.full((h * w,), float("inf"), dtype=depth.dtype).scatter_reduce(
            0, flat, depth[visible], reduce="amin")
        winner = depth[visible] == nearest[flat]
        images[b][:, flat[winner]] = rgb[visible][winner].T
    return images.reshape(len(cameras), 3, h, w)


def record_initial_cloud(gaussians: GaussianModel, camera_cfg: Any, run_dir: Path, monitor: Any) -> Path:
    """Save <run_dir>/init/point_cloud.ply and log its views as TensorBoard image init/point_cloud (step 0)."""
    xyz, rgb = initial_cloud(gaussians)
    path = save_point_cloud_ply(xyz, rgb, Path(run_dir) / INIT_PLY)
    cameras = evaluation_ring(camera_cfg, PREVIEW_VIEWS, False, PREVIEW_SIZE, PREVIEW_SIZE)
    monitor.log_images("init/point_cloud", splat_points(xyz, rgb, cameras), 0)
    return path
