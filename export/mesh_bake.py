"""Surface colours baked from renders of the Gaussians (what a viewer of the splats sees).

The Gaussians are rendered from orbit views around the mesh (rings of views at several polar
angles, azimuths offset from the evaluation ring's); each surface point takes the average of the
render colours at the pixels where it is visible (its depth matches the mesh's depth buffer there,
its normal faces the camera), weighted by the cosine to the view and the render's alpha. The
renders are made on black and divided by alpha: the colour of the splats, not of the background.
Points no view sees keep their fallback colour.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from export.mesh_render import depth_buffer
from gaussian_renderer import render_in_chunks
from scene.camera_sampler import look_at_cameras
from scene.cameras import Cameras
from scene.gaussian_tensors import GaussianTensors

BAKE_POLARS = (45.0, 75.0, 105.0, 135.0)  # degrees from +z: above, around and below the object
MIN_COSINE = 0.2  # grazing views smear colours


def bake_views(vertices: np.ndarray, per_ring: int, size: int) -> Cameras:
    """len(BAKE_POLARS) rings of per_ring views around the mesh's bounding sphere, fov 40 degrees."""
    lo, hi = vertices.min(0), vertices.max(0)
    centre = torch.from_numpy(0.5 * (lo + hi)).float()
    fov = math.radians(40.0)
    distance = 1.1 * 0.5 * float(np.linalg.norm(hi - lo)) / math.sin(0.5 * fov)
    polar = torch.tensor(BAKE_POLARS).repeat_interleave(per_ring)
    azimuth = (torch.arange(per_ring).float() * 360.0 / per_ring + 180.0 / per_ring).repeat(len(BAKE_POLARS))
    theta, phi = torch.deg2rad(polar), torch.deg2rad(azimuth)
    direction = torch.stack([theta.sin() * phi.sin(), theta.sin() * phi.cos(), theta.cos()], dim=-1)  # [n, 3]
    n = polar.shape[0]
    up = torch.tensor([0.0, 0.0, 1.0]).expand(n, 3)
    return look_at_cameras(centre + distance * direction, centre.expand(n, 3), up, torch.full((n,), fov), size, size,
                           azimuth, polar, torch.full((n,), distance))


@dataclass
class BakeRenders:
    """What the bake views see, computed once per mesh and shared by every set of surface points coloured
    from it (the vertices, then the texels of the UV texture: the same triangles, so the same z-buffer)."""

    cameras: Cameras
    rgb: Tensor  # [B, 3, H, W] float32 CPU: the Gaussians rendered on black
    alpha: Tensor  # [B, 1, H, W] float32 CPU: their alpha
    depth: Tensor  # [B, H, W] float32 CPU: the mesh's z-buffer (camera-space z, inf where empty)


def render_bake(gaussians: GaussianTensors, vertices: np.ndarray, faces: np.ndarray, cameras: Cameras,
                backend: str = "auto") -> BakeRenders:
    """Render the Gaussians (on their device) and the mesh's z-buffer (vertices [V, 3], faces [F, 3]) from
    the bake cameras."""
    device = gaussians.means.device
    with torch.no_grad():
        splat = render_in_chunks(gaussians, cameras, torch.zeros(3, device=device), chunk=4, backend=backend)
    zbuf = depth_buffer(torch.from_numpy(vertices), torch.from_numpy(faces), cameras)  # [B, H, W]
    return BakeRenders(cameras=cameras, rgb=splat.rgb.float().cpu(), alpha=splat.alpha.float().cpu(), depth=zbuf)


def rendered_colors(gaussians: GaussianTensors, points: np.ndarray, normals: np.ndarray, vertices: np.ndarray,
                    faces: np.ndarray, cameras: Cameras, depth_tolerance: float,
                    backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Colours [P, 3] of surface points [P, 3] (unit normals [P, 3]) from renders of the Gaussians,
    and a [P] mask of the points some view saw. The mesh (vertices, faces) provides visibility."""
    return baked_colors(render_bake(gaussians, vertices, faces, cameras, backend), points, normals, depth_tolerance)


def baked_colors(bake: BakeRenders, points: np.ndarray, normals: np.ndarray,
                 depth_tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """rendered_colors from renders already made: colours [P, 3] and the [P] mask of the points seen."""
    cameras, rgb, alpha, zbuf = bake.cameras, bake.rgb, bake.alpha, bake.depth
    p, n = torch.from_numpy(points).float(), torch.from_numpy(normals).float()
    total = torch.zeros(len(p), 3)
    weight = torch.zeros(len(p))
    centres = cameras.camera_centers().float()
    for b in range(len(cameras)):
        view = (cameras.world_to_camera[b, :3, :3].float() @ p.T).T + cameras.world_to_camera[b, :3, 3].float()
        k = cameras.intrinsics()[b].float()
        z = view[:, 2].clamp_min(1e-6)
        grid = torch.stack([(k[0, 0] * view[:, 0] / z + k[0, 2]) / cameras.width * 2 - 1,
                            (k[1, 1] * view[:, 1] / z + k[1, 2]) / cameras.height * 2 - 1], dim=-1)  # [P, 2]
        depth = _sample(zbuf[b][None].clamp_max(1e6), grid, "nearest")[:, 0]  # [P] mesh depth at the pixel
        a = _sample(alpha[b], grid)[:, 0]
        cosine = (F.normalize(centres[b] - p, dim=-1) * n).sum(-1)
        visible = (grid.abs() < 1).all(-1) & (z <= depth + depth_tolerance) & (cosine > MIN_COSINE) & (a > 0.5)
        # only the visible points are sampled and added: the others' weight is 0 (adding 0 changes nothing)
        seen_here = torch.nonzero(visible).squeeze(1)  # [S]
        w, a_seen = cosine[seen_here] * a[seen_here], a[seen_here]
        color = (_sample(rgb[b], grid[seen_here]) / a_seen.clamp_min(1e-3)[:, None]).clamp(0, 1)  # [S, 3]
        total.index_add_(0, seen_here, w[:, None] * color)
        weight.index_add_(0, seen_here, w)
    seen = weight > 0
    colors = torch.where(seen[:, None], total / weight.clamp_min(1e-12)[:, None], torch.zeros(()))
    return colors.numpy().astype(np.float32), seen.numpy()


def _sample(image: Tensor, grid: Tensor, mode: str = "bilinear") -> Tensor:
    """image [C, H, W] at normalised positions grid [P, 2] (x, y in [-1, 1]) -> [P, C]."""
    return F.grid_sample(image[None], grid[None, None], mode=mode, align_corners=False)[0, :, 0].T
