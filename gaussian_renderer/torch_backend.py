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

import math

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
DEFAULT_TILE_SIZE = 4

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


def _rasterize_pixels_dense(
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    features: Tensor,
    depths: Tensor,
    width: int,
    height: int,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """Dense reference: every Gaussian evaluated at every pixel ([B, N, pixels] chunks).

    Same arguments and results as ``rasterize_pixels``; kept for the tests.

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


def _pixel_ranges(
    means2d: Tensor, conics: Tensor, opacities: Tensor, width: int, height: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per projected Gaussian, a pixel rectangle holding every pixel centre it draws.

    A pixel is drawn only where min(0.99, o exp(-sigma)) >= 1/255, i.e. sigma <= log(255 o),
    sigma = 0.5 d^T conic d. That set is an ellipse whose axis-aligned half extents are
    sqrt(2 log(255 o) cov_xx) and sqrt(2 log(255 o) cov_yy), cov = conic^-1; the threshold
    and the rectangle get a small margin (they only have to contain those pixels: the alpha test
    itself is redone per pixel). Unlike the 3-sigma screen radius, this contains every pixel that
    the dense evaluation draws, so the sparse result is exactly the dense one.

    Args (no gradients taken): means2d [M, 2], conics [M, 3], opacities [M], image size.

    Returns:
        x0, y0 first pixel column / row, nx, ny rectangle size (0 = nothing drawn), int64 [M];
        the sigma threshold with its margin, float64 [M].
    """
    m = means2d.double()
    ca, cb, cc = conics.double().unbind(-1)
    det = ca * cc - cb * cb
    slack = torch.log(torch.clamp_min(255.0 * opacities.double(), 1e-300)) + 1e-3
    active = (slack > 0) & (det > 0) & (ca > 0) & (cc > 0) & torch.isfinite(m).all(-1) & torch.isfinite(det)
    slack = torch.where(active, slack, torch.zeros_like(slack))
    det = torch.where(active, det, torch.ones_like(det))
    half = torch.stack([torch.sqrt(2.0 * slack * cc / det), torch.sqrt(2.0 * slack * ca / det)], dim=-1)
    half = 1.001 * half + 1e-2  # [M, 2]
    size = torch.tensor([width, height], dtype=m.dtype, device=m.device)
    # Pixel i is drawn only if its centre i + 0.5 lies in [mean - half, mean + half].
    lo = torch.minimum(torch.ceil(torch.clamp_min(m - half - 0.5, 0.0)), size)
    hi = torch.maximum(torch.floor(torch.minimum(m + half - 0.5, size - 1.0)), torch.full_like(size, -1.0))
    count = torch.clamp_min(hi - lo + 1.0, 0.0) * active[:, None]
    lo, count = lo.long(), count.long()
    return lo[:, 0], lo[:, 1], count[:, 0], count[:, 1], slack


def _rect_min_sigma(u0: Tensor, u1: Tensor, v0: Tensor, v1: Tensor, ca: Tensor, cb: Tensor, cc: Tensor) -> Tensor:
    """min of 0.5 (a u^2 + c v^2) + b u v over [u0, u1] x [v0, v1] (positive definite conic).

    Zero when the rectangle holds the origin, else the least of the four edge minima.
    """

    def form(u: Tensor, v: Tensor) -> Tensor:
        return 0.5 * (ca * u * u + cc * v * v) + cb * u * v

    edges = [
        form(u, torch.minimum(torch.maximum(-cb * u / cc, v0), v1)) for u in (u0, u1)
    ] + [form(torch.minimum(torch.maximum(-cb * v / ca, u0), u1), v) for v in (v0, v1)]
    best = torch.minimum(torch.minimum(edges[0], edges[1]), torch.minimum(edges[2], edges[3]))
    inside = (u0 <= 0) & (u1 >= 0) & (v0 <= 0) & (v1 >= 0)
    return torch.where(inside, torch.zeros_like(best), best)


class _CompositeTiles(torch.autograd.Function):
    """Front-to-back compositing of (tile, Gaussian) rows sorted by tile, then depth.

    Each row is one Gaussian evaluated at the t*t pixels of one tile ([Q, t*t] arrays). The
    backward pass is written out (the 3DGS rasterizer's, vectorised with segmented sums).
    """

    @staticmethod
    def forward(ctx, means, conics, opacities, feats, geometry, num_tiles, tile_size, width, height):
        """Args:
            means [Q, 2], conics [Q, 3], opacities [Q], feats [Q, D]: the rows' Gaussians.
            geometry: (tile_x, tile_y, tile, start, end) int64 [Q]: tile coordinates, tile index in
                the output, first and last row of the same tile (within these rows).
            num_tiles, tile_size, width, height: output size and tile side.

        Returns:
            [D, num_tiles, t*t] composited features and [num_tiles, t*t] float64 log transmittance.
        """
        tile_x, tile_y, tile, start, end = geometry
        t = tile_size
        dtype, device = means.dtype, means.device
        step = torch.arange(t, device=device, dtype=dtype)
        off_x, off_y = step.repeat(t), step.repeat_interleave(t)  # [t*t] pixel offsets in a tile
        mx, my = means[:, 0:1], means[:, 1:2]
        ca, cb, cc = conics[:, 0:1], conics[:, 1:2], conics[:, 2:3]
        # Same arithmetic as the dense path: (pixel + 0.5) - mean (exact up to the subtraction).
        dx = ((tile_x * t).to(dtype) + 0.5)[:, None].add(off_x).sub_(mx)  # [Q, t*t]
        dy = ((tile_y * t).to(dtype) + 0.5)[:, None].add(off_y).sub_(my)
        # sigma = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
        sigma = (ca * dx).mul_(dx).add_((cc * dy).mul_(dy)).mul_(0.5).add_((cb * dx).mul_(dy))
        raw = torch.neg(sigma).exp_().mul_(opacities[:, None])  # o exp(-sigma)
        alpha = torch.clamp_max(raw, MAX_ALPHA)
        drawn = (sigma >= 0) & (alpha >= ALPHA_THRESHOLD)
        del sigma
        if width % t or height % t:
            drawn &= (dx + mx < width) & (dy + my < height)
        alpha.masked_fill_(~drawn, 0.0)
        # Log transmittance per pixel (column) and tile (segment of rows), in float64 so that the
        # cumulative sum over all rows keeps its precision.
        log_t = torch.neg(alpha.double()).log1p_()  # [Q, t*t] (alpha.double() may be alpha itself)
        log_before = torch.cumsum(log_t, dim=0).sub_(log_t)
        log_before = log_before.sub_(log_before.index_select(0, start))
        # A pixel stops at the first Gaussian that would bring T below 1e-4 (a prefix per pixel).
        kept = (log_before + log_t) >= math.log(TRANSMITTANCE_EPS)
        alpha.masked_fill_(~kept, 0.0)
        log_t.masked_fill_(~kept, 0.0)
        trans = log_before.exp_().to(dtype)  # T before each row
        del log_before
        weights = alpha * trans
        feats_t = feats.t()  # [D, Q]
        out = torch.zeros(feats.shape[1], num_tiles, t * t, dtype=dtype, device=device)
        for channel, values in zip(out, feats_t):  # D channels: [Q, t*t] products are cheap, [Q, t*t, D] not
            channel.index_add_(0, tile, weights * values[:, None])
        log_final = torch.zeros(num_tiles, t * t, dtype=torch.float64, device=device).index_add_(0, tile, log_t)
        if any(ctx.needs_input_grad[:4]):
            grad_mask = drawn & kept & (raw <= MAX_ALPHA)  # where alpha depends on its inputs
            ctx.save_for_backward(means, conics, opacities, feats, dx, dy, alpha, trans, weights, grad_mask, tile, end)
        return out, log_final

    @staticmethod
    def backward(ctx, grad_out, grad_log):
        means, conics, opacities, feats, dx, dy, alpha, trans, weights, grad_mask, tile, end = ctx.saved_tensors
        grad_w = torch.zeros_like(weights)  # dL/dweight, [Q, t*t]
        grad_feats = torch.empty_like(feats.t())  # [D, Q]
        for grad_channel, values, grad_values in zip(grad_out, feats.t(), grad_feats):
            grad_rows = grad_channel.index_select(0, tile)  # [Q, t*t]
            grad_w.addcmul_(grad_rows, values[:, None])
            torch.sum(grad_rows.mul_(weights), dim=1, out=grad_values)
        # dL/dlog(1 - alpha_i) = sum over the later rows j of the pixel of dL/dw_j w_j, plus the
        # final transmittance's share; in float64 (cumulative sums over all rows).
        later = torch.cumsum((grad_w * weights).double(), dim=0)
        later = later.index_select(0, end).sub_(later)
        later += grad_log.index_select(0, tile)
        # dL/dalpha = dL/dw T - dL/dlog(1 - alpha) / (1 - alpha)
        grad_alpha = (grad_w * trans).sub_(later.div_(1.0 - alpha.double()).to(alpha.dtype))
        grad_alpha.masked_fill_(~grad_mask, 0.0)
        # alpha = o exp(-sigma): dalpha/do = alpha / o, dalpha/dsigma = -alpha.
        grad_sigma_neg = grad_alpha.mul_(alpha)  # -dL/dsigma
        grad_opac = grad_sigma_neg.sum(1) / opacities
        gx = grad_sigma_neg * dx
        gy = grad_sigma_neg * dy
        sx, sy = gx.sum(1), gy.sum(1)
        sxx, syy, sxy = (gx * dx).sum(1), (gy * dy).sum(1), (gx * dy).sum(1)
        ca, cb, cc = conics.unbind(-1)
        # sigma = 0.5 (a dx^2 + c dy^2) + b dx dy, dx = px - mx.
        grad_means = torch.stack([ca * sx + cb * sy, cb * sx + cc * sy], dim=-1)
        grad_conics = -torch.stack([0.5 * sxx, sxy, 0.5 * syy], dim=-1)
        return grad_means, grad_conics, grad_opac, grad_feats.t(), None, None, None, None, None


def rasterize_pixels(
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    features: Tensor,
    depths: Tensor,
    width: int,
    height: int,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
    tile_size: int = DEFAULT_TILE_SIZE,
) -> tuple[Tensor, Tensor]:
    """Depth-sorted alpha compositing of projected Gaussians, sparse over tiles.

    Same results as the dense evaluation (``_rasterize_pixels_dense``) without evaluating every
    Gaussian at every pixel:

    1. (no gradients) per camera and drawn Gaussian, the rectangle of pixels it can reach
       (``_pixel_ranges``) is rounded out to tile_size squares; the (camera, Gaussian, tile)
       intersections are enumerated (counts / offsets, repeat_interleave), those whose tile
       misses the Gaussian's alpha >= 1/255 ellipse are dropped, and the rest are sorted by
       (camera, tile) with one stable sort: Gaussians are enumerated in depth order per camera,
       so each tile's rows come out front to back;
    2. each row is evaluated at the tile_size^2 pixels of its tile: alpha = min(0.99, o G),
       zero below 1/255 (same arithmetic as the dense path);
    3. per pixel, log T = segmented exclusive cumulative sum of log(1 - alpha) over the tile's
       rows (float64); pairs are kept while T after them stays >= 1e-4;
    4. weights alpha T and log(1 - alpha) are summed per tile pixel with index_add.
    Gradients flow to means2d, conics, opacities and features (hand-written backward of steps
    2-4, ``_CompositeTiles``). Rows are processed in chunks of whole tiles of about
    max_chunk_elements (row, pixel) pairs, under activation checkpointing when there are several
    and gradients are needed.

    Args:
        means2d: [B, N, 2] projected centres; the pixel distances use this tensor.
        conics: [B, N, 3] inverse 2D covariances.
        opacities: [B, N] opacities, zero for Gaussians that are not drawn.
        features: [B, N, D] values to composite.
        depths: [B, N] camera depths, the sort key (front to back, ties by index).
        width, height: image size.
        max_chunk_elements: bound on the (row, pixel) pairs evaluated at once.
        tile_size: side of the square tiles.

    Returns:
        [B, H, W, D] composited features (no background) and [B, H, W] final transmittance.
    """
    if max_chunk_elements <= 0:
        raise ValueError(f"max_chunk_elements must be positive, got {max_chunk_elements}")
    if tile_size <= 0:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    b, n = depths.shape
    d = features.shape[-1]
    t = tile_size
    device, dtype = depths.device, features.dtype
    tiles_x, tiles_y = -(-width // t), -(-height // t)
    num_tiles = b * tiles_x * tiles_y
    with torch.no_grad():
        order = torch.sort(depths.detach(), dim=1, stable=True).indices  # [B, N]
        # Slot s = camera * N + depth rank; slot_entry[s] = camera * N + Gaussian index.
        slot_entry = (order + n * torch.arange(b, device=device)[:, None]).reshape(-1)
        geom = torch.cat(
            [means2d.detach().reshape(-1, 2), conics.detach().reshape(-1, 3), opacities.detach().reshape(-1, 1)],
            dim=-1,
        ).index_select(0, slot_entry)  # [B*N, 6] in slot order
        x0, y0, nx, ny, slack = _pixel_ranges(geom[:, :2], geom[:, 2:5], geom[:, 5], width, height)
        drawn = (nx > 0) & (ny > 0)
        tx0, ty0 = x0 // t, y0 // t
        ntx = torch.where(drawn, (x0 + nx - 1) // t - tx0 + 1, torch.zeros_like(nx))
        nty = torch.where(drawn, (y0 + ny - 1) // t - ty0 + 1, torch.zeros_like(ny))
        counts = ntx * nty  # [B*N] tiles per slot
        slot = torch.repeat_interleave(counts)  # [Q] slot of each (camera, Gaussian, tile) row
        local = torch.arange(slot.shape[0], device=device) - (torch.cumsum(counts, 0) - counts).index_select(0, slot)
        ntx_row = ntx.index_select(0, slot)
        row_y = torch.div(local, ntx_row, rounding_mode="floor")
        tile_x = tx0.index_select(0, slot) + (local - row_y * ntx_row)
        tile_y = ty0.index_select(0, slot) + row_y
        if t > 1:
            # Drop the tiles whose pixel centres all lie outside the ellipse sigma <= threshold.
            g = geom.double().index_select(0, slot)
            cx, cy = (tile_x * t).double() + 0.5 - g[:, 0], (tile_y * t).double() + 0.5 - g[:, 1]
            low = _rect_min_sigma(cx, cx + (t - 1), cy, cy + (t - 1), g[:, 2], g[:, 3], g[:, 4])
            hit = low <= slack.index_select(0, slot) * 1.001 + 1e-6
            slot, tile_x, tile_y = slot[hit], tile_x[hit], tile_y[hit]
        tile = (torch.div(slot, n, rounding_mode="floor") * tiles_y + tile_y) * tiles_x + tile_x
        # Rows come in slot (camera, depth) order: a stable sort by tile keeps depth order.
        key = tile.to(torch.int32) if num_tiles < 2**31 else tile
        perm = torch.sort(key, stable=True).indices
        entry = slot_entry.index_select(0, slot.index_select(0, perm))
        tile, tile_x, tile_y = tile.index_select(0, perm), tile_x.index_select(0, perm), tile_y.index_select(0, perm)
        tile_rows = torch.bincount(tile, minlength=num_tiles)
        tile_end = torch.cumsum(tile_rows, 0)
        start = (tile_end - tile_rows).index_select(0, tile)  # first row of the same tile
        end = tile_end.index_select(0, tile) - 1  # last row of the same tile
        # Chunks of whole tiles, about max_chunk_elements (row, pixel) pairs each.
        rows = tile.shape[0]
        bounds = [0, rows]
        per_chunk = max(1, max_chunk_elements // (t * t))
        if rows > per_chunk:
            firsts = torch.unique_consecutive(start)  # first row of each non-empty tile, increasing
            marks = torch.arange(per_chunk, rows, per_chunk, device=device)
            cuts = firsts.index_select(0, (torch.searchsorted(firsts, marks, right=True) - 1).clamp_min(0))
            bounds = sorted(set(cuts.tolist()) | {0, rows})

    table = torch.cat(
        [means2d.reshape(-1, 2), conics.reshape(-1, 3), opacities.reshape(-1, 1), features.reshape(-1, d)], dim=-1
    ).to(dtype)  # [B*N, 6 + D]

    def chunk(lo: int, hi: int, table: Tensor) -> tuple[Tensor, Tensor]:
        g = table.index_select(0, entry[lo:hi])
        geometry = (tile_x[lo:hi], tile_y[lo:hi], tile[lo:hi], start[lo:hi] - lo, end[lo:hi] - lo)
        return _CompositeTiles.apply(g[:, 0:2], g[:, 2:5], g[:, 5], g[:, 6:], geometry, num_tiles, t, width, height)

    use_checkpoint = len(bounds) > 2 and torch.is_grad_enabled() and table.requires_grad
    feats, log_final = None, None
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if use_checkpoint:
            f, log_t = checkpoint(chunk, lo, hi, table, use_reentrant=False)
        else:
            f, log_t = chunk(lo, hi, table)
        feats = f if feats is None else feats + f
        log_final = log_t if log_final is None else log_final + log_t
    # [B * tiles_y * tiles_x, t * t] -> [B, H, W]
    feats = feats.reshape(d, b, tiles_y, tiles_x, t, t).permute(1, 2, 4, 3, 5, 0).reshape(b, tiles_y * t, tiles_x * t, d)
    trans = torch.exp(log_final).to(dtype)
    trans = trans.reshape(b, tiles_y, tiles_x, t, t).permute(0, 1, 3, 2, 4).reshape(b, tiles_y * t, tiles_x * t)
    return feats[:, :height, :width], trans[:, :height, :width]


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
