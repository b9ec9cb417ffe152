"""A baked colour texture for an exported mesh: xatlas unwraps it, texels are rasterised in UV space.

Each covered texel gets the colour of its surface point, found exactly as the per-vertex colours
are (utils/mesh_export.colors_at), so the texture carries colour detail
finer than the mesh's vertices. Empty texels take the colour of the nearest covered one, so that
filtering at chart borders does not bleed background into the surface.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

from export.mesh_colors import colors_at, vertex_normals
from export.mesh_render import rasterize_flat
from scene.gaussian_tensors import GaussianTensors

if TYPE_CHECKING:
    from export.mesh_colors import ColorSources


@dataclass
class TexturedMesh:
    vertices: np.ndarray  # [V, 3] float32, training world (vertices split along UV seams)
    faces: np.ndarray  # [F, 3] int64
    uv: np.ndarray  # [V, 2] float32 in [0, 1], v pointing up (OBJ / trimesh convention)
    image: np.ndarray  # [S, S, 3] uint8 sRGB; row 0 is v = 1

    def exported_vertices(self) -> np.ndarray:
        from scene.orientation import MESH_UP_AXIS, world_to_export

        return self.vertices @ world_to_export(MESH_UP_AXIS).numpy().T


def bake_texture(gaussians: GaussianTensors, vertices: np.ndarray, faces: np.ndarray, options,
                 sources: "ColorSources | None" = None) -> TexturedMesh:
    """Unwrap (vertices [V, 3], faces [F, 3]) with xatlas and bake an options.texture-sized colour
    texture (options: export.mesh.MeshOptions). sources: the mesh's colour sources
    (export.mesh_colors.color_sources) when already made for its vertex colours."""
    import xatlas

    size = options.texture
    if size < 16:
        raise ValueError(f"texture size must be >= 16, got {size}")
    mapping, indices, uv = xatlas.parametrize(vertices.astype(np.float32), faces.astype(np.uint32))
    verts, new_faces = vertices[mapping].astype(np.float32), indices.astype(np.int64)
    pixels = np.stack([uv[:, 0] * size, (1.0 - uv[:, 1]) * size], axis=1)  # [V', 2], row 0 at v = 1
    frags = rasterize_flat(torch.from_numpy(pixels[new_faces]).float(), size, size)
    face, bary = frags.face[0].numpy(), frags.bary[0].numpy()  # [S, S], [S, S, 3]
    covered = face >= 0
    if not covered.any():
        raise ValueError("the UV atlas covers no texel: texture size too small")
    corners = new_faces[face[covered]]  # [T, 3]
    weights = bary[covered][..., None]  # [T, 3, 1]
    points = (weights * verts[corners]).sum(1)
    normals = (weights * vertex_normals(verts, new_faces)[corners]).sum(1)
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    image = np.zeros((size, size, 3), np.float32)
    image[covered] = colors_at(gaussians, points, normals, verts, new_faces, options, sources)
    _, (rows, cols) = distance_transform_edt(~covered, return_indices=True)
    image = image[rows, cols]  # empty texels: colour of the nearest covered texel
    rgb8 = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    return TexturedMesh(vertices=verts, faces=new_faces, uv=uv.astype(np.float32), image=rgb8)
