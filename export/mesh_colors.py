"""Colours of mesh surface points from the Gaussians: their renders where a bake view sees the point
(export/mesh_bake.py), the nearby Gaussians' SH DC colour elsewhere."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.spatial import cKDTree

from export.gaussian_field import MIN_OPACITY
from scene.gaussian_model import quat_to_rotmat, sh_to_rgb
from scene.gaussian_tensors import GaussianTensors

if TYPE_CHECKING:
    from export.mesh_bake import BakeRenders


def vertex_normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """[V, 3] area-weighted unit normals."""
    a, b, c = (verts[faces[:, i]] for i in range(3))
    face_n = np.cross(b - a, c - a)
    normals = np.zeros_like(verts)
    for i in range(3):
        np.add.at(normals, faces[:, i], face_n)
    return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)


def surface_colors(gaussians: GaussianTensors, points: np.ndarray, normals: np.ndarray, offset: float,
                   neighbours: int = 16, chunk: int = 65536) -> np.ndarray:
    """[P, 3] colours at surface points [P, 3] with unit normals [P, 3]: the degree-0 SH colours of
    the `neighbours` Gaussians nearest to p = point + offset * normal, weighted by o_i g_i(p) (just
    outside the surface, where the Gaussians a viewer sees weigh most)."""
    keep = gaussians.opacities.detach().cpu() >= MIN_OPACITY
    means = gaussians.means.detach().float().cpu()[keep]
    rgb = sh_to_rgb(gaussians.sh_coeffs.detach().float().cpu()[keep, 0]).clamp(0, 1)  # [N, 3]
    rot = quat_to_rotmat(gaussians.quats.detach().float().cpu()[keep])  # [N, 3, 3]
    scales = gaussians.scales.detach().float().cpu()[keep].clamp_min(1e-6)
    opacity = gaussians.opacities.detach().float().cpu()[keep]
    k = min(neighbours, means.shape[0])
    tree = cKDTree(means.numpy())
    out = []
    for start in range(0, len(points), chunk):
        p = torch.from_numpy(points[start:start + chunk] + offset * normals[start:start + chunk]).float()  # [C, 3]
        _, idx = tree.query(p.numpy(), k=k)
        idx = torch.from_numpy(np.asarray(idx).reshape(len(p), k))  # [C, k]
        local = torch.einsum("ckji,ckj->cki", rot[idx], p[:, None] - means[idx]) / scales[idx]  # [C, k, 3]
        weight = opacity[idx] * torch.exp(-0.5 * local.square().sum(-1))  # [C, k]
        weight = weight + 1e-12 * (torch.arange(k) == 0)  # nearest Gaussian when none reaches the point
        out.append((weight[..., None] * rgb[idx]).sum(1) / weight.sum(1, keepdim=True))
    return torch.cat(out).numpy().astype(np.float32)


def colors_at(gaussians: GaussianTensors, points: np.ndarray, normals: np.ndarray, verts: np.ndarray,
              faces: np.ndarray, options, bake: "BakeRenders | None" = None) -> np.ndarray:
    """[P, 3] colours of surface points: from renders of the Gaussians where a bake view sees them
    (export/mesh_bake.py), from the nearby Gaussians' SH DC elsewhere (surface_colors).

    bake: the renders of bake_for(gaussians, verts, faces, options), when the caller already made them (the
    vertex colours and the texture of one mesh share them); made here otherwise.
    """
    offset = color_offset(verts, options)
    colors = surface_colors(gaussians, points, normals, offset, options.neighbours)
    if options.bake_views:
        from export.mesh_bake import baked_colors

        bake = bake if bake is not None else bake_for(gaussians, verts, faces, options)
        baked, seen = baked_colors(bake, points, normals, depth_tolerance=4 * offset)
        colors[seen] = baked[seen]
    return colors


def bake_for(gaussians: GaussianTensors, verts: np.ndarray, faces: np.ndarray, options) -> "BakeRenders | None":
    """The bake renders of a mesh (verts [V, 3], faces [F, 3]) with options.bake_views views per ring of
    options.bake_size pixels; None when options.bake_views is 0."""
    if not options.bake_views:
        return None
    from export.mesh_bake import bake_views, render_bake

    return render_bake(gaussians, verts, faces, bake_views(verts, options.bake_views, options.bake_size))


def color_offset(verts: np.ndarray, options) -> float:
    """Half a grid cell: how far outside the surface colours are looked up."""
    return 0.5 * float(np.ptp(verts, axis=0).max()) / options.resolution
