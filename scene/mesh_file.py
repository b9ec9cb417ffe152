"""Coloured meshes and point clouds from files (PLY, OBJ, GLB/glTF, ... through trimesh), and points
sampled on their surface with their colours, so that any generator's output can start a run.

Colours come from vertex colours, face colours (averaged onto the vertices) or a texture (read at the
vertices' UV coordinates); a file without any gives `colours=None`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

KEY = "GenerateCamParams.init_path"


@dataclass(frozen=True)
class ColouredMesh:
    verts: Tensor  # [V, 3] float64
    faces: Tensor  # [F, 3] int64 (F = 0: a point cloud)
    colours: Tensor | None  # [V, 3] float64 in [0, 1], or None

    def __post_init__(self) -> None:
        if self.verts.ndim != 2 or self.verts.shape[1] != 3:
            raise ValueError(f"verts must be [V, 3], got {tuple(self.verts.shape)}")
        if self.faces.ndim != 2 or self.faces.shape[1] != 3:
            raise ValueError(f"faces must be [F, 3], got {tuple(self.faces.shape)}")
        if self.colours is not None and self.colours.shape != self.verts.shape:
            raise ValueError(f"colours must be [V={self.verts.shape[0]}, 3], got {tuple(self.colours.shape)}")


def _vertex_colours(geometry) -> np.ndarray | None:
    """[V, 3] in [0, 1] from a trimesh mesh's or point cloud's visual, or None when it carries no colour."""
    visual = geometry.visual
    kind = visual.kind
    if kind == "texture":
        visual = visual.to_color()  # the texture read at each vertex's UV (or the material's single colour)
        kind = visual.kind
    if kind not in ("vertex", "face"):
        return None
    rgba = np.asarray(visual.vertex_colors, dtype=np.float64)
    if rgba.size == 0:  # a point cloud without colours (a PLY of x, y, z only)
        return None
    return np.broadcast_to(rgba[..., :3], (len(geometry.vertices), 3)) / 255.0


def load_mesh_file(path: str | Path) -> ColouredMesh:
    """Every mesh and point cloud of the file, in the file's world frame, as one ColouredMesh."""
    import trimesh

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{KEY}: no such file {str(path)!r}")
    try:  # trimesh parses lazily: a damaged file can fail while loading, dumping or reading colours
        scene = trimesh.load_scene(str(path))
        parts = [g for g in scene.dump() if len(getattr(g, "vertices", ())) > 0]
        if not parts:
            raise ValueError(f"{KEY} {str(path)!r}: the file holds no vertices")
        verts, faces, colours, offset = [], [], [], 0
        for part in parts:
            v = np.asarray(part.vertices, dtype=np.float64)
            f = np.asarray(getattr(part, "faces", np.zeros((0, 3))), dtype=np.int64).reshape(-1, 3)
            verts.append(v)
            faces.append(f + offset)
            colours.append(_vertex_colours(part))
            offset += len(v)
    except (ValueError, KeyError, IndexError, NotImplementedError) as err:
        if str(err).startswith(KEY):
            raise
        raise ValueError(f"{KEY} {str(path)!r}: trimesh cannot read it ({type(err).__name__}: {err})") from None
    coloured = any(c is not None for c in colours)
    if coloured:  # parts without colour are grey beside coloured ones
        colours = [np.full((len(v), 3), 0.5) if c is None else c for v, c in zip(verts, colours)]
    mesh = ColouredMesh(torch.from_numpy(np.concatenate(verts)), torch.from_numpy(np.concatenate(faces)),
                        torch.from_numpy(np.concatenate(colours)) if coloured else None)
    logger.info("%s: %d vertices, %d faces, %s", path, mesh.verts.shape[0], mesh.faces.shape[0],
                "coloured" if coloured else "no colours")
    return mesh


def sample_surface(mesh: ColouredMesh, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
    """`count` points uniform over the surface area with barycentric colours -> xyz [N, 3], rgb [N, 3] or None.

    A point cloud (no faces) gives `count` of its points drawn without replacement (all when it has fewer).
    """
    if count <= 0:
        raise ValueError(f"count must be positive, got {count}")
    if mesh.faces.shape[0] == 0:
        n = mesh.verts.shape[0]
        index = torch.randperm(n, generator=generator)[:count] if n > count else torch.arange(n)
        return mesh.verts[index], None if mesh.colours is None else mesh.colours[index]
    corners = mesh.verts[mesh.faces]  # [F, 3 corners, 3]
    area = torch.linalg.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]).norm(dim=-1)
    if not (torch.isfinite(area).all() and float(area.sum()) > 0):
        raise ValueError("the mesh has no surface area (all faces are degenerate)")
    # relative areas: a file at any scale (1e30 overflows float32 areas) samples the same points
    face = torch.multinomial((area / area.max()).float(), count, replacement=True, generator=generator)  # [N]
    u, v = torch.rand(2, count, 1, generator=generator, dtype=torch.float64)
    flip = (u + v) > 1  # reflect into the triangle: uniform barycentric coordinates
    u, v = torch.where(flip, 1 - u, u), torch.where(flip, 1 - v, v)
    weights = torch.cat([1 - u - v, u, v], dim=1)[:, :, None]  # [N, 3, 1]
    xyz = (corners[face] * weights).sum(1)
    rgb = None if mesh.colours is None else (mesh.colours[mesh.faces[face]] * weights).sum(1)
    return xyz, rgb
