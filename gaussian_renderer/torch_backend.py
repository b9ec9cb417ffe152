"""Pure-PyTorch reference rasterizer for 3D Gaussians (CPU or GPU, differentiable by autograd).

It follows the 3DGS / gsplat "classic" pipeline, batched over B cameras without Python loops
over cameras:

1. means to camera space (OpenCV axes); Gaussians with depth outside [near, far] are culled;
2. EWA projection: cov2d = J W Sigma W^T J^T with the Jacobian of the perspective projection
   evaluated at the mean, whose x/z, y/z are clamped to the frustum enlarged by 30 %
   (1.3 tan(fov / 2) for a centred principal point, exactly gsplat's ``persp_proj``);
3. a low-pass dilation ``eps2d`` (0.3 px^2) added to the 2D covariance, no antialiasing
   compensation; conic = inverse of the dilated covariance;
4. screen radius ceil(3 sqrt(lambda_max)) as in the 3DGS rasterizer; a Gaussian whose square
   of that radius lies outside the image gets radius 0 and is not drawn;
5. per pixel (centre at (x + 0.5, y + 0.5), gsplat's and 3DGS's convention):
   alpha = min(0.99, opacity exp(-0.5 d^T conic d)), dropped below 1/255, composited front to
   back in order of camera depth with exclusive transmittance T_i = prod_{j<i} (1 - alpha_j);
   like the CUDA kernels, a pixel stops at the first Gaussian that would bring T below 1e-4.
   colour = sum_i c_i a_i T_i + T_final bg, accumulated depth = sum_i z_i a_i T_i,
   alpha = 1 - T_final.

Colours are spherical harmonics of degree 0..3 (standard 3DGS constants) evaluated in the
direction normalise(mean - camera centre), then max(sh + 0.5, 0).

The pixel stage is dense ([B, N, pixels]); pixels are processed in chunks of at most
``max_chunk_elements`` B*N*pixel entries, each chunk under activation checkpointing when
gradients are needed, so memory is bounded by one chunk in the forward and in the backward.
Unlike the official rasterizer, the accumulated depth also passes gradients to the
per-Gaussian depth z_i (as gsplat does).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = [
    "ALPHA_THRESHOLD",
    "MAX_ALPHA",
    "TRANSMITTANCE_EPS",
    "quat_scale_to_covar",
    "spherical_harmonics",
    "sh_to_rgb",
    "project_gaussians",
    "rasterize_pixels",
    "rasterize_torch",
]

ALPHA_THRESHOLD = 1.0 / 255.0
MAX_ALPHA = 0.99
TRANSMITTANCE_EPS = 1e-4
DEFAULT_MAX_CHUNK_ELEMENTS = 1 << 23

_SH_C0 = 0.28209479177387814
_SH_C1 = 0.4886025119029199
_SH_C2 = (
    1.0925484305920792,
    -1.0925484305920792,
    0.31539156525252005,
    -1.0925484305920792,
    0.5462742152960396,
)
_SH_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)


def quat_scale_to_covar(quats: Tensor, scales: Tensor) -> Tensor:
    """World-space covariances R S S^T R^T.

    Args:
        quats: [N, 4] rotations (w, x, y, z), normalised here.
        scales: [N, 3] standard deviations along the local axes.

    Returns:
        [N, 3, 3] covariances.
    """
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    rot = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(-1, 3, 3)  # [N, 3, 3]
    m = rot * scales[:, None, :]  # [N, 3, 3] = R S
    return m @ m.transpose(1, 2)


def spherical_harmonics(degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:
    """Evaluates real SH (3DGS convention) of bands 0..degree.

    Args:
        degree: 0..3.
        dirs: [..., 3] unit view directions.
        coeffs: [..., K, 3] coefficients, K >= (degree + 1) ** 2.

    Returns:
        [..., 3] raw SH value (before the +0.5 offset).
    """
    if not 0 <= degree <= 3:
        raise ValueError(f"sh degree must be in 0..3, got {degree}")
    result = _SH_C0 * coeffs[..., 0, :]
    if degree == 0:
        return result
    x, y, z = (d[..., None] for d in dirs.unbind(-1))  # each [..., 1]
    result = (
        result
        - _SH_C1 * y * coeffs[..., 1, :]
        + _SH_C1 * z * coeffs[..., 2, :]
        - _SH_C1 * x * coeffs[..., 3, :]
    )
    if degree == 1:
        return result
    xx, yy, zz = x * x, y * y, z * z
    xy, yz, xz = x * y, y * z, x * z
    result = (
        result
        + _SH_C2[0] * xy * coeffs[..., 4, :]
        + _SH_C2[1] * yz * coeffs[..., 5, :]
        + _SH_C2[2] * (2.0 * zz - xx - yy) * coeffs[..., 6, :]
        + _SH_C2[3] * xz * coeffs[..., 7, :]
        + _SH_C2[4] * (xx - yy) * coeffs[..., 8, :]
    )
    if degree == 2:
        return result
    return (
        result
        + _SH_C3[0] * y * (3.0 * xx - yy) * coeffs[..., 9, :]
        + _SH_C3[1] * xy * z * coeffs[..., 10, :]
        + _SH_C3[2] * y * (4.0 * zz - xx - yy) * coeffs[..., 11, :]
        + _SH_C3[3] * z * (2.0 * zz - 3.0 * xx - 3.0 * yy) * coeffs[..., 12, :]
        + _SH_C3[4] * x * (4.0 * zz - xx - yy) * coeffs[..., 13, :]
        + _SH_C3[5] * z * (xx - yy) * coeffs[..., 14, :]
        + _SH_C3[6] * x * (xx - 3.0 * yy) * coeffs[..., 15, :]
    )


def sh_to_rgb(means: Tensor, sh_coeffs: Tensor, sh_degree: int, camera_centers: Tensor) -> Tensor:
    """View-dependent colours max(SH(normalise(mean - centre)) + 0.5, 0).

    Args:
        means: [N, 3] world positions.
        sh_coeffs: [N, K, 3] coefficients.
        sh_degree: degree used.
        camera_centers: [B, 3] camera centres in world coordinates.

    Returns:
        [B, N, 3] colours.
    """
    dirs = F.normalize(means[None, :, :] - camera_centers[:, None, :], dim=-1)  # [B, N, 3]
    coeffs = sh_coeffs[None].expand(camera_centers.shape[0], -1, -1, -1)  # [B, N, K, 3]
    return torch.clamp_min(spherical_harmonics(sh_degree, dirs, coeffs) + 0.5, 0.0)


def project_gaussians(
    means: Tensor,
    covars: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near: float,
    far: float,
    eps2d: float = 0.3,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """EWA projection of N Gaussians into B pinhole cameras.

    Args:
        means: [N, 3] world positions.
        covars: [N, 3, 3] world covariances.
        viewmats: [B, 4, 4] world-to-camera transforms (OpenCV axes).
        Ks: [B, 3, 3] pixel intrinsics.
        width, height: image size in pixels.
        near, far: depth range kept; Gaussians outside it get radius 0.
        eps2d: low-pass dilation added to the 2D covariance diagonal (pixels^2).

    Returns:
        means2d: [B, N, 2] projected centres in pixels (differentiable).
        conics: [B, N, 3] inverse 2D covariance (a, b, c) of [[a, b], [b, c]].
        depths: [B, N] camera-space z.
        radii: [B, N] int32 screen radius ceil(3 sqrt(lambda_max)); 0 = not drawn.
        visible: [B, N] bool, radii > 0.
    """
    rot = viewmats[:, :3, :3]  # [B, 3, 3]
    trans = viewmats[:, :3, 3]  # [B, 3]
    means_c = torch.einsum("bij,nj->bni", rot, means) + trans[:, None, :]  # [B, N, 3]
    covars_c = torch.einsum("bij,njk,blk->bnil", rot, covars, rot)  # [B, N, 3, 3]
    x, y, z = means_c.unbind(-1)  # each [B, N]
    in_range = (z >= near) & (z <= far)
    # Culled Gaussians are evaluated at a harmless depth so that no inf/NaN reaches autograd.
    z = torch.where(in_range, z, torch.ones_like(z))

    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # [B, 1]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]  # [B, 1]
    tan_fovx = 0.5 * width / fx
    tan_fovy = 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + 0.3 * tan_fovx
    lim_x_neg = cx / fx + 0.3 * tan_fovx
    lim_y_pos = (height - cy) / fy + 0.3 * tan_fovy
    lim_y_neg = cy / fy + 0.3 * tan_fovy
    tx = z * torch.minimum(torch.maximum(x / z, -lim_x_neg), lim_x_pos)
    ty = z * torch.minimum(torch.maximum(y / z, -lim_y_neg), lim_y_pos)

    zeros = torch.zeros_like(z)
    jac = torch.stack(
        [fx / z, zeros, -fx * tx / (z * z), zeros, fy / z, -fy * ty / (z * z)], dim=-1
    ).reshape(*z.shape, 2, 3)  # [B, N, 2, 3]
    cov2d = jac @ covars_c @ jac.transpose(-1, -2)  # [B, N, 2, 2]
    a = cov2d[..., 0, 0] + eps2d
    b = 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0])
    c = cov2d[..., 1, 1] + eps2d
    det = a * c - b * b  # [B, N]
    valid = in_range & (det > 0)
    det = torch.where(valid, det, torch.ones_like(det))
    conics = torch.stack([c / det, -b / det, a / det], dim=-1)  # [B, N, 3]

    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], dim=-1)  # [B, N, 2]

    with torch.no_grad():
        mid = 0.5 * (a + c)
        lambda_max = mid + torch.sqrt(torch.clamp_min(mid * mid - det, 0.1))
        radius = torch.ceil(3.0 * torch.sqrt(lambda_max))  # [B, N]
        u, v = means2d.unbind(-1)
        on_screen = (u + radius > 0) & (u - radius < width) & (v + radius > 0) & (v - radius < height)
        visible = valid & on_screen
        radii = torch.where(visible, radius, torch.zeros_like(radius)).to(torch.int32)
    return means2d, conics, means_c[..., 2], radii, visible


def _composite_chunk(
    means2d: Tensor, conics: Tensor, opacities: Tensor, features: Tensor, pixels: Tensor
) -> tuple[Tensor, Tensor]:
    """Front-to-back compositing of depth-sorted Gaussians at a set of pixel centres.

    Args:
        means2d: [B, N, 2] sorted by depth.
        conics: [B, N, 3].
        opacities: [B, N], zero for Gaussians that are not drawn.
        features: [B, N, D] per-Gaussian values to composite (colour, depth).
        pixels: [P, 2] pixel centres.

    Returns:
        [B, P, D] composited features (no background) and [B, P] final transmittance.
    """
    delta = pixels[None, None, :, :] - means2d[:, :, None, :]  # [B, N, P, 2]
    dx, dy = delta.unbind(-1)
    ca, cb, cc = (t[..., None] for t in conics.unbind(-1))  # each [B, N, 1]
    sigma = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy  # [B, N, P]
    alpha = torch.clamp_max(opacities[..., None] * torch.exp(-sigma), MAX_ALPHA)
    keep = (sigma >= 0) & (alpha >= ALPHA_THRESHOLD)
    with torch.no_grad():
        # The CUDA kernels stop a pixel at the first Gaussian that would bring T below 1e-4;
        # the inclusive transmittance is non-increasing, so this keeps a prefix.
        trans_incl = torch.cumprod(1.0 - torch.where(keep, alpha, torch.zeros_like(alpha)), dim=1)
        keep = keep & (trans_incl >= TRANSMITTANCE_EPS)
    alpha = torch.where(keep, alpha, torch.zeros_like(alpha))  # [B, N, P]
    trans_incl = torch.cumprod(1.0 - alpha, dim=1)  # [B, N, P]
    trans_excl = torch.cat([torch.ones_like(trans_incl[:, :1]), trans_incl[:, :-1]], dim=1)
    weights = alpha * trans_excl  # [B, N, P]
    return torch.einsum("bnp,bnd->bpd", weights, features), trans_incl[:, -1]


def rasterize_pixels(
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    features: Tensor,
    depths: Tensor,
    width: int,
    height: int,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """Depth-sorted alpha compositing of projected Gaussians over the whole image.

    Args:
        means2d: [B, N, 2] projected centres; the pixel distances use this tensor.
        conics: [B, N, 3] inverse 2D covariances.
        opacities: [B, N] opacities, zero for Gaussians that are not drawn.
        features: [B, N, D] values to composite.
        depths: [B, N] camera depths, the sort key (front to back).
        width, height: image size.
        max_chunk_elements: bound on B * N * pixels per chunk.

    Returns:
        [B, H, W, D] composited features (no background) and [B, H, W] final transmittance.
    """
    if max_chunk_elements <= 0:
        raise ValueError(f"max_chunk_elements must be positive, got {max_chunk_elements}")
    b, n = depths.shape
    order = torch.sort(depths.detach(), dim=1, stable=True).indices  # [B, N]
    means2d = torch.gather(means2d, 1, order[..., None].expand(-1, -1, 2))
    conics = torch.gather(conics, 1, order[..., None].expand(-1, -1, 3))
    opacities = torch.gather(opacities, 1, order)
    features = torch.gather(features, 1, order[..., None].expand(-1, -1, features.shape[-1]))

    ys, xs = torch.meshgrid(
        torch.arange(height, device=depths.device, dtype=means2d.dtype),
        torch.arange(width, device=depths.device, dtype=means2d.dtype),
        indexing="ij",
    )
    pixels = torch.stack([xs, ys], dim=-1).reshape(-1, 2) + 0.5  # [HW, 2] pixel centres

    chunk = max(1, max_chunk_elements // max(1, b * n))
    use_checkpoint = torch.is_grad_enabled() and any(
        t.requires_grad for t in (means2d, conics, opacities, features)
    )
    feats_out, trans_out = [], []
    for start in range(0, pixels.shape[0], chunk):
        pix = pixels[start : start + chunk]
        if use_checkpoint:
            f, t = checkpoint(
                _composite_chunk, means2d, conics, opacities, features, pix, use_reentrant=False
            )
        else:
            f, t = _composite_chunk(means2d, conics, opacities, features, pix)
        feats_out.append(f)
        trans_out.append(t)
    feats = torch.cat(feats_out, dim=1).reshape(b, height, width, -1)
    trans = torch.cat(trans_out, dim=1).reshape(b, height, width)
    return feats, trans


def rasterize_torch(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    sh_coeffs: Tensor,
    sh_degree: int,
    viewmats: Tensor,
    Ks: Tensor,
    backgrounds: Tensor,
    width: int,
    height: int,
    near: float = 0.01,
    far: float = 100.0,
    eps2d: float = 0.3,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Renders N Gaussians into B cameras.

    Args:
        means: [N, 3]; quats: [N, 4] (w, x, y, z); scales: [N, 3]; opacities: [N];
        sh_coeffs: [N, K, 3]; sh_degree: 0..3 with (sh_degree + 1) ** 2 <= K.
        viewmats: [B, 4, 4] world-to-camera; Ks: [B, 3, 3]; backgrounds: [B, 3].
        width, height: image size; near, far: depth culling range; eps2d: dilation.
        max_chunk_elements: bound on B * N * pixels per pixel chunk.

    Returns:
        rgb [B, H, W, 3], accumulated depth [B, H, W, 1], alpha [B, H, W, 1],
        means2d [B, N, 2] (the tensor the rasterizer used; .retain_grad() called when it
        requires grad), radii [B, N] int32.
    """
    covars = quat_scale_to_covar(quats, scales)  # [N, 3, 3]
    means2d, conics, depths, radii, visible = project_gaussians(
        means, covars, viewmats, Ks, width, height, near, far, eps2d
    )
    if means2d.requires_grad:
        means2d.retain_grad()
    centers = -(viewmats[:, :3, :3].transpose(1, 2) @ viewmats[:, :3, 3:]).squeeze(-1)  # [B, 3]
    colors = sh_to_rgb(means, sh_coeffs, sh_degree, centers)  # [B, N, 3]
    opac = torch.where(visible, opacities[None, :].expand_as(depths), torch.zeros_like(depths))
    features = torch.cat([colors, depths[..., None]], dim=-1)  # [B, N, 4]
    feats, trans = rasterize_pixels(
        means2d, conics, opac, features, depths, width, height, max_chunk_elements
    )
    rgb = feats[..., :3] + trans[..., None] * backgrounds[:, None, None, :]
    return rgb, feats[..., 3:], (1.0 - trans)[..., None], means2d, radii
