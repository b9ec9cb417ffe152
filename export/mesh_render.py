"""A small z-buffer triangle rasteriser in PyTorch (any device), to compare meshes with splats.

Same cameras as the Gaussian renderer (OpenCV pinhole, pixel centres at i + 0.5). Each
triangle is tested against the pixels of its screen bounding box (triangles grouped by box size,
chunked), the nearest hit wins per pixel, and attributes are interpolated perspective-correctly.
Unlit: the colour of a pixel is the interpolated vertex colour, as the splats are unlit too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from scene.cameras import Cameras


@dataclass
class Fragments:
    face: Tensor  # [B, H, W] long: index of the visible face, -1 where no face covers the pixel
    bary: Tensor  # [B, H, W, 3] perspective-correct barycentric weights of that face's vertices
    depth: Tensor  # [B, H, W] camera-space z of the hit (inf where empty)


def _check_mesh(vertices: Tensor, faces: Tensor) -> None:
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"vertices must be [V, 3], got {tuple(vertices.shape)}")
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"faces must be an integer [F, 3] tensor, got {tuple(faces.shape)} {faces.dtype}")


def rasterize(vertices: Tensor, faces: Tensor, cameras: Cameras, chunk_elements: int = 1 << 22) -> Fragments:
    """Nearest visible face and its barycentrics for every pixel of every camera.

    vertices [V, 3] world positions, faces [F, 3] vertex indices.
    """
    _check_mesh(vertices, faces)
    b, h, w = len(cameras), cameras.height, cameras.width
    hits = []
    for cam, (tri_xy, tri_z, in_front) in enumerate(_screen_triangles(vertices, faces, cameras)):
        hits.append(_camera_hits(tri_xy, tri_z, in_front, cam, w, h, chunk_elements))
    return _resolve(torch.cat([x[0] for x in hits]), torch.cat([x[1] for x in hits]),
                    torch.cat([x[2] for x in hits]), torch.cat([x[3] for x in hits]), b, h, w)


def depth_buffer(vertices: Tensor, faces: Tensor, cameras: Cameras, chunk_elements: int = 1 << 22) -> Tensor:
    """[B, H, W] camera-space z of the nearest face at every pixel (inf where empty): rasterize(...).depth,
    for what needs visibility only (the colour bake, export/mesh_bake.py).

    Cheaper than rasterize: no faces or barycentrics are kept, and each face is tested against the pixels of
    its own box (faces grouped by exact box width and height) instead of a power-of-two square holding it;
    the pixels outside a face's box are outside the face, and the per-pixel minimum does not depend on the
    order of the hits, so the depths are rasterize's.
    """
    _check_mesh(vertices, faces)
    b, h, w = len(cameras), cameras.height, cameras.width
    zbuf = torch.full((b, h * w), float("inf"), device=vertices.device)
    for cam, (tri_xy, tri_z, in_front) in enumerate(_screen_triangles(vertices, faces, cameras)):
        lo = torch.floor(tri_xy.amin(dim=1) - 0.5).clamp_min(0)  # [F, 2] first pixel of the box
        hi = torch.ceil(tri_xy.amax(dim=1) - 0.5).clamp_max(torch.tensor([w - 1, h - 1], device=tri_xy.device))
        extent = (hi - lo + 1).long()  # [F, 2] box width and height (pixels)
        valid = in_front & (extent > 0).all(dim=1)
        key = extent[:, 0] * (h + 1) + extent[:, 1]  # [F] one group per box shape
        for shape in torch.unique(key[valid]).tolist():
            members = torch.nonzero(valid & (key == shape)).squeeze(1)
            sx, sy = divmod(shape, h + 1)
            offsets = torch.stack(torch.meshgrid(torch.arange(sx, device=tri_xy.device),
                                                 torch.arange(sy, device=tri_xy.device), indexing="xy"),
                                  dim=-1).reshape(-1, 2).float()  # [sx * sy, 2]
            per_chunk = max(1, chunk_elements // offsets.shape[0])
            for start in range(0, members.shape[0], per_chunk):
                f = members[start:start + per_chunk]
                flat, depth, _, _ = _face_hits(f, tri_xy[f], tri_z[f], lo[f], offsets, 0, w, h)
                zbuf[cam].scatter_reduce_(0, flat, depth, reduce="amin")
    return zbuf.view(b, h, w)


def _screen_triangles(vertices: Tensor, faces: Tensor, cameras: Cameras):
    """Per camera: (corner pixel positions [F, 3, 2], corner camera z [F, 3], [F] all corners beyond near)."""
    device = vertices.device
    cams = cameras.to(device)
    homogeneous = torch.cat([vertices.float(), torch.ones_like(vertices[:, :1].float())], dim=1)  # [V, 4]
    view = torch.einsum("bij,vj->bvi", cams.world_to_camera.float(), homogeneous)[..., :3]  # [B, V, 3]
    k = cams.intrinsics().float()
    z = view[..., 2].clamp_min(1e-6)
    pix = torch.stack([k[:, 0, 0, None] * view[..., 0] / z + k[:, 0, 2, None],
                       k[:, 1, 1, None] * view[..., 1] / z + k[:, 1, 2, None]], dim=-1)  # [B, V, 2]
    face_idx = faces.long()
    for cam in range(len(cams)):
        tri_xy, tri_z = pix[cam][face_idx], view[cam, :, 2][face_idx]  # [F, 3, 2], [F, 3]
        yield tri_xy, tri_z, (tri_z > cams.near).all(dim=1)


def _camera_hits(tri_xy: Tensor, tri_z: Tensor, valid: Tensor, cam: int, w: int, h: int, chunk_elements: int):
    """(flat pixel index, depth, face, bary [M, 3]) of every pixel centre inside a face, for one camera."""
    lo = torch.floor(tri_xy.amin(dim=1) - 0.5).clamp_min(0)  # [F, 2] first candidate pixel
    hi = torch.ceil(tri_xy.amax(dim=1) - 0.5).clamp_max(torch.tensor([w - 1, h - 1], device=tri_xy.device))
    size = (hi - lo + 1).amax(dim=1)  # [F] candidate box edge (pixels)
    valid = valid & (size > 0)
    side = torch.where(size <= 1, 1, 2 ** torch.ceil(torch.log2(size.clamp_min(1)))).long()
    out = []
    for s in torch.unique(side[valid]).tolist():
        members = torch.nonzero(valid & (side == s)).squeeze(1)
        axis = torch.arange(s, device=tri_xy.device)
        offsets = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1).reshape(-1, 2).float()  # [s*s, 2]
        per_chunk = max(1, chunk_elements // offsets.shape[0])
        for start in range(0, members.shape[0], per_chunk):
            f = members[start:start + per_chunk]
            out.append(_face_hits(f, tri_xy[f], tri_z[f], lo[f], offsets, cam, w, h))
    if not out:
        empty = torch.zeros(0, dtype=torch.long, device=tri_xy.device)
        return empty, empty.float(), empty, torch.zeros(0, 3, device=tri_xy.device)
    return tuple(torch.cat(parts) for parts in zip(*out))


def _face_hits(f: Tensor, xy: Tensor, z: Tensor, lo: Tensor, offsets: Tensor, cam: int, w: int, h: int):
    pixel = lo[:, None, :] + offsets[None]  # [n, P, 2] integer pixel coordinates
    centre = pixel + 0.5
    a, b, c = xy[:, 0, None], xy[:, 1, None], xy[:, 2, None]  # [n, 1, 2]

    def edge(p, q, r):  # twice the signed area of (p, q, r)
        return (q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1]) - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0])

    area = edge(a, b, c)  # [n, 1]
    safe = torch.where(area.abs() < 1e-12, torch.ones_like(area), area)
    screen = torch.stack([edge(b, c, centre), edge(c, a, centre), edge(a, b, centre)], dim=-1) / safe[..., None]
    inside = (screen >= 0).all(-1) & (area.abs() >= 1e-12) & (pixel[..., 0] < w) & (pixel[..., 1] < h)
    inv_z = screen / z[:, None, :]  # [n, P, 3] perspective-correct weights before normalisation
    depth = 1.0 / inv_z.sum(-1)
    bary = inv_z * depth[..., None]
    flat = cam * w * h + pixel[..., 1].long() * w + pixel[..., 0].long()  # [n, P]
    face = f[:, None].expand_as(flat)
    return flat[inside], depth[inside], face[inside], bary[inside]


def _resolve(flat: Tensor, depth: Tensor, face: Tensor, bary: Tensor, b: int, h: int, w: int) -> Fragments:
    """Keep the nearest hit per pixel (z-buffer)."""
    device = depth.device
    zbuf = torch.full((b * h * w,), float("inf"), device=device)
    zbuf.scatter_reduce_(0, flat, depth, reduce="amin")
    win = depth <= zbuf[flat]
    out_face = torch.full((b * h * w,), -1, dtype=torch.long, device=device)
    out_bary = torch.zeros(b * h * w, 3, device=device)
    out_face[flat[win]] = face[win]
    out_bary[flat[win]] = bary[win]
    return Fragments(face=out_face.view(b, h, w), bary=out_bary.view(b, h, w, 3), depth=zbuf.view(b, h, w))


def render_mesh(vertices: Tensor, faces: Tensor, colors: Tensor, cameras: Cameras,
                background: Tensor) -> tuple[Tensor, Tensor]:
    """Unlit render with per-vertex colours.

    vertices [V, 3], faces [F, 3], colors [V, 3] in [0, 1], background [3].
    Returns rgb [B, 3, H, W] and the coverage mask [B, 1, H, W] (float, 1 where a face is visible).
    """
    if colors.shape != vertices.shape:
        raise ValueError(f"colors must be [V, 3] = {tuple(vertices.shape)}, got {tuple(colors.shape)}")
    frags = rasterize(vertices, faces, cameras)
    covered = frags.face >= 0  # [B, H, W]
    corner_colors = colors.float()[faces.long()[frags.face.clamp_min(0)]]  # [B, H, W, 3, 3]
    rgb = (frags.bary[..., None] * corner_colors).sum(-2)  # [B, H, W, 3]
    rgb = torch.where(covered[..., None], rgb, background.float().to(rgb.device))
    return rgb.permute(0, 3, 1, 2), covered[:, None].float()


def rasterize_flat(tri_xy: Tensor, width: int, height: int, chunk_elements: int = 1 << 22) -> Fragments:
    """Triangles given directly in pixel coordinates (e.g. a UV atlas), no projection.

    tri_xy [F, 3, 2] corner positions in pixels. Returns Fragments with B = 1; where faces overlap,
    one of them is kept.
    """
    if tri_xy.ndim != 3 or tri_xy.shape[1:] != (3, 2):
        raise ValueError(f"tri_xy must be [F, 3, 2], got {tuple(tri_xy.shape)}")
    f = tri_xy.shape[0]
    ones = torch.ones(f, 3, device=tri_xy.device)
    valid = torch.ones(f, dtype=torch.bool, device=tri_xy.device)
    flat, depth, face, bary = _camera_hits(tri_xy.float(), ones, valid, 0, width, height, chunk_elements)
    return _resolve(flat, depth, face, bary, 1, height, width)


def render_textured(vertices: Tensor, faces: Tensor, uv: Tensor, image: Tensor, cameras: Cameras,
                    background: Tensor) -> tuple[Tensor, Tensor]:
    """Unlit render of a UV-textured mesh (bilinear lookup).

    vertices [V, 3], faces [F, 3], uv [V, 2] in [0, 1] with v up, image [3, S, S] in [0, 1] whose
    row 0 is v = 1, background [3]. Returns rgb [B, 3, H, W] and the coverage mask [B, 1, H, W].
    """
    if uv.shape != (vertices.shape[0], 2):
        raise ValueError(f"uv must be [V={vertices.shape[0]}, 2], got {tuple(uv.shape)}")
    frags = rasterize(vertices, faces, cameras)
    covered = frags.face >= 0  # [B, H, W]
    corner_uv = uv.float()[faces.long()[frags.face.clamp_min(0)]]  # [B, H, W, 3, 2]
    pixel_uv = (frags.bary[..., None] * corner_uv).sum(-2)  # [B, H, W, 2]
    grid = torch.stack([2.0 * pixel_uv[..., 0] - 1.0, 1.0 - 2.0 * pixel_uv[..., 1]], dim=-1)  # x right, y down
    b = grid.shape[0]
    rgb = torch.nn.functional.grid_sample(image.float()[None].expand(b, -1, -1, -1), grid, mode="bilinear",
                                          align_corners=False)  # [B, 3, H, W]
    rgb = torch.where(covered[:, None], rgb, background.float().view(1, 3, 1, 1))
    return rgb, covered[:, None].float()
