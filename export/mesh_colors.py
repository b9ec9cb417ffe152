"""Colours of mesh surface points from the Gaussians: their renders where a bake view sees the point
(export/mesh_bake.py), the nearby Gaussians' SH DC colour elsewhere."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor

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


@dataclass
class NearestGaussians:
    """The Gaussians surface_colors blends (opacity >= MIN_OPACITY) on the CPU, with a k-d tree over their
    centres: built once per mesh and shared by its vertices and its texels."""

    tree: cKDTree
    means: Tensor  # [N, 3]
    rgb: Tensor  # [N, 3] SH DC colour in [0, 1]
    rot: Tensor  # [N, 3, 3] local-to-world rotations
    scales: Tensor  # [N, 3]
    opacity: Tensor  # [N]

    @classmethod
    def of(cls, gaussians: GaussianTensors) -> NearestGaussians:
        keep = gaussians.opacities.detach().cpu() >= MIN_OPACITY
        means = gaussians.means.detach().float().cpu()[keep]
        return cls(tree=cKDTree(means.numpy()), means=means,
                   rgb=sh_to_rgb(gaussians.sh_coeffs.detach().float().cpu()[keep, 0]).clamp(0, 1),
                   rot=quat_to_rotmat(gaussians.quats.detach().float().cpu()[keep]),
                   scales=gaussians.scales.detach().float().cpu()[keep].clamp_min(1e-6),
                   opacity=gaussians.opacities.detach().float().cpu()[keep])


@dataclass
class ColorSources:
    """What colours the surface points of one mesh, made once (colour_sources) for its vertex colours and
    its texture: xatlas keeps every face and its corners' order, so the UV-split mesh has the same
    triangles, the same bake cameras and the same z-buffer."""

    nearest: NearestGaussians
    bake: BakeRenders | None  # None without bake views


def surface_colors(gaussians: GaussianTensors, points: np.ndarray, normals: np.ndarray, offset: float,
                   neighbours: int = 16, chunk: int = 65536, nearest: NearestGaussians | None = None) -> np.ndarray:
    """[P, 3] colours at surface points [P, 3] with unit normals [P, 3]: the degree-0 SH colours of
    the `neighbours` Gaussians nearest to p = point + offset * normal, weighted by o_i g_i(p) (just
    outside the surface, where the Gaussians a viewer sees weigh most). nearest: NearestGaussians.of(gaussians)
    when already built."""
    g = nearest if nearest is not None else NearestGaussians.of(gaussians)
    k = min(neighbours, g.means.shape[0])
    out = []
    for start in range(0, len(points), chunk):
        p = torch.from_numpy(points[start:start + chunk] + offset * normals[start:start + chunk]).float()  # [C, 3]
        _, idx = g.tree.query(p.numpy(), k=k)
        idx = torch.from_numpy(np.asarray(idx).reshape(len(p), k))  # [C, k]
        local = torch.einsum("ckji,ckj->cki", g.rot[idx], p[:, None] - g.means[idx]) / g.scales[idx]  # [C, k, 3]
        weight = g.opacity[idx] * torch.exp(-0.5 * local.square().sum(-1))  # [C, k]
        weight = weight + 1e-12 * (torch.arange(k) == 0)  # nearest Gaussian when none reaches the point
        out.append((weight[..., None] * g.rgb[idx]).sum(1) / weight.sum(1, keepdim=True))
    return torch.cat(out).numpy().astype(np.float32)


def colors_at(gaussians: GaussianTensors, points: np.ndarray, normals: np.ndarray, verts: np.ndarray,
              faces: np.ndarray, options, sources: ColorSources | None = None) -> np.ndarray:
    """[P, 3] colours of surface points: from renders of the Gaussians where a bake view sees them
    (export/mesh_bake.py), from the nearby Gaussians' SH DC elsewhere (surface_colors).

    sources: color_sources(gaussians, verts, faces, options), when the caller already made them (the vertex
    colours and the texture of one mesh share them); made here otherwise.
    """
    sources = sources if sources is not None else color_sources(gaussians, verts, faces, options)
    offset = color_offset(verts, options)
    colors = surface_colors(gaussians, points, normals, offset, options.neighbours, nearest=sources.nearest)
    if sources.bake is not None:
        from export.mesh_bake import baked_colors

        baked, seen = baked_colors(sources.bake, points, normals, depth_tolerance=4 * offset)
        colors[seen] = baked[seen]
    return colors


def color_sources(gaussians: GaussianTensors, verts: np.ndarray, faces: np.ndarray, options) -> ColorSources:
    """The k-d tree of the Gaussians and the bake renders of a mesh (verts [V, 3], faces [F, 3]) with
    options.bake_views views per ring of options.bake_size pixels (none when options.bake_views is 0)."""
    bake = None
    if options.bake_views:
        from export.mesh_bake import bake_views, render_bake

        bake = render_bake(gaussians, verts, faces, bake_views(verts, options.bake_views, options.bake_size))
    return ColorSources(nearest=NearestGaussians.of(gaussians), bake=bake)


def color_offset(verts: np.ndarray, options) -> float:
    """Half a grid cell: how far outside the surface colours are looked up."""
    return 0.5 * float(np.ptp(verts, axis=0).max()) / options.resolution
