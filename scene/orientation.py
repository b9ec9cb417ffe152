"""Axis conventions of exported files, and rotating Gaussians between them.

Training happens in a z-up world whose front (azimuth 0) is the +y side (see
scene/camera_sampler.py). Viewers assume other conventions, so exports are rotated, training
never is:

    "y"  : +y up, front +z.  glTF 2.0 (it mandates +Y up, assets facing +Z), three.js, Blender's
           glTF/OBJ importers. Meshes are always written this way.
    "-y" : -y up, front +z.  The OpenCV/COLMAP world of the 3DGS reference code, which splat
           viewers assume for PLY files: SuperSplat / PlayCanvas roll every PLY 180 degrees about z
           on load (entity.setLocalEulerAngles(0, 0, 180)), GaussianSplats3D and antimatter15/splat
           use a -y camera up. A "-y" PLY therefore opens upright there.
    "z"  : the training world itself (no rotation).

Each rotation is proper (det +1), so Gaussians rotate exactly: means and orientations by R,
scales unchanged, spherical-harmonic coefficients by the band-wise rotation D_l(R).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from scene.spherical_harmonics import spherical_harmonics

UP_AXES = ("-y", "y", "z")

# Rows: the export axes expressed in training-world coordinates (x_export = R @ x_world).
_WORLD_TO_EXPORT = {
    "z": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
    "y": ((-1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 1.0, 0.0)),
    "-y": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0)),
}

MESH_UP_AXIS = "y"  # the exported meshes' up axis: glTF 2.0 mandates +Y up


def world_to_export(up_axis: str) -> Tensor:
    """[3, 3] rotation taking training-world coordinates to the `up_axis` convention."""
    if up_axis not in _WORLD_TO_EXPORT:
        raise ValueError(f"up_axis must be one of {UP_AXES}, got {up_axis!r}")
    return torch.tensor(_WORLD_TO_EXPORT[up_axis])


def rotmat_to_quat(rot: Tensor) -> Tensor:
    """[3, 3] rotation -> [4] unit quaternion (w, x, y, z), by the largest-component branch."""
    if rot.shape != (3, 3):
        raise ValueError(f"rot must be [3, 3], got {tuple(rot.shape)}")
    m = rot.double()
    trace = m.trace()
    candidates = torch.stack([trace, m[0, 0], m[1, 1], m[2, 2]])
    k = int(candidates.argmax())
    if k == 0:
        w = torch.sqrt(1.0 + trace) / 2.0
        q = torch.stack([w, (m[2, 1] - m[1, 2]) / (4 * w), (m[0, 2] - m[2, 0]) / (4 * w),
                         (m[1, 0] - m[0, 1]) / (4 * w)])
    else:
        i, j, n = k - 1, k % 3, (k + 1) % 3
        s = torch.sqrt(1.0 + m[i, i] - m[j, j] - m[n, n]) * 2.0  # 4 * |q_i|
        q = torch.zeros(4, dtype=torch.float64)
        q[0] = (m[n, j] - m[j, n]) / s
        q[1 + i] = s / 4.0
        q[1 + j] = (m[j, i] + m[i, j]) / s
        q[1 + n] = (m[n, i] + m[i, n]) / s
    return F.normalize(q, dim=0).to(rot.dtype)


def quat_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product a * b of (w, x, y, z) quaternions, broadcast over leading dims: [..., 4]."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    ], dim=-1)


def sh_rotation(rot: Tensor, degree: int, samples: int = 64) -> Tensor:
    """[K, K] matrix D (K = (degree + 1) ** 2) with rotated coefficients c' = D @ c.

    The rotated colour function is f'(d) = f(R^T d). Band l of the real SH basis spans a space
    closed under rotation, so Y(R^T d) = M Y(d) holds exactly for a block-diagonal M; it is solved
    by least squares on random directions (float64) and D = M^T.
    """
    k = (degree + 1) ** 2
    g = torch.Generator().manual_seed(0)
    dirs = F.normalize(torch.randn(samples + 2 * k, 3, generator=g, dtype=torch.float64), dim=-1)  # [M, 3]
    eye = torch.eye(k, dtype=torch.float64)[None].expand(dirs.shape[0], k, k)  # coefficient e_i per column

    def basis(d: Tensor) -> Tensor:  # [M, K]: Y_i(d), the i-th basis function (colour axis used as index)
        return spherical_harmonics(degree, d, eye)

    rotated = basis(dirs @ rot.double())  # rows: Y(R^T d_m)
    m_transposed = torch.linalg.lstsq(basis(dirs), rotated).solution  # Y(d) M^T = Y(R^T d)
    return m_transposed.to(rot.dtype)


def rotate_gaussians(means: Tensor, quats: Tensor, sh: Tensor, rot: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rotate Gaussians rigidly about the origin.

    means [N, 3], quats [N, 4] (w, x, y, z), sh [N, K, C] coefficients in the 3DGS order, rot [3, 3].
    Returns the rotated (means, quats, sh); scales are unchanged by a rotation.
    """
    n = means.shape[0]
    if means.shape != (n, 3) or quats.shape != (n, 4) or sh.ndim != 3 or sh.shape[0] != n:
        raise ValueError(f"expected means [N, 3], quats [N, 4], sh [N, K, C]; got "
                         f"{tuple(means.shape)}, {tuple(quats.shape)}, {tuple(sh.shape)}")
    degree = round(sh.shape[1] ** 0.5) - 1
    if (degree + 1) ** 2 != sh.shape[1]:
        raise ValueError(f"sh must have (degree + 1) ** 2 coefficients, got {sh.shape[1]}")
    rot = rot.to(means)
    q_rot = rotmat_to_quat(rot).to(quats)
    d = sh_rotation(rot, degree).to(sh)
    return means @ rot.T, quat_multiply(q_rot.expand(n, 4), quats), torch.einsum("ij,njc->nic", d, sh)
