"""Pure-PyTorch reference rasterizer for 3D Gaussians (CPU or GPU, differentiable by autograd).

It follows the 3DGS / gsplat "classic" pipeline, batched over B cameras without Python loops
over cameras:

1. means to camera space (OpenCV axes); Gaussians with depth outside (near, far] are culled (the
   official rasterizer culls z <= 0.2, `in_frustum`); scales may differ per camera ([B, N, 3]);
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

The pixel stage (``rasterize_pixels``) is sparse and fully vectorised: only the (camera,
Gaussian, image tile) pairs where alpha can reach 1/255 are enumerated and evaluated, in chunks
of at most about ``max_chunk_elements`` (pair, pixel) entries, each chunk under activation
checkpointing when there are several and gradients are needed; its backward pass is written out.
``_rasterize_pixels_dense`` is the dense reference ([B, N, pixels]: every Gaussian at every
pixel) that it reproduces (the tests compare both).

The accumulated depth's gradient reaches the Gaussians through the blend weights a_i T_i only, as
in the official rasterizer (LucidDreamer's diff-gaussian-rasterization fork, `backward.cu`), unless
``RasterizeInputs.depth_grad_to_z`` also passes it to the per-Gaussian depth z_i (the exact derivative).
Camera centres (for the SH directions) are the translation of the inverted view matrix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from gaussian_renderer.types import RasterizeInputs, RasterizeOutputs
from scene.cameras import centers_from_view_matrices
from scene.spherical_harmonics import spherical_harmonics

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
# Sparse rasterizer tiles: 4 x 4 pixels, or 8 x 8 when the Gaussians' mean pixel footprint
# (their alpha >= 1/255 bounding box) exceeds AUTO_TILE_AREA pixels (fewer rows to enumerate).
AUTO_TILE_AREA = 256.0



def quat_scale_to_covar(quats: Tensor, scales: Tensor) -> Tensor:
    """World-space covariances R S S^T R^T.

    Args:
        quats: [N, 4] rotations (w, x, y, z), normalised here.
        scales: [..., N, 3] standard deviations along the local axes (e.g. [B, N, 3], one set per camera).

    Returns:
        [..., N, 3, 3] covariances.
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
    m = rot * scales[..., None, :]  # [..., N, 3, 3] = R S
    return m @ m.transpose(-1, -2)


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
        covars: [N, 3, 3] world covariances, or [B, N, 3, 3] one set per camera.
        viewmats: [B, 4, 4] world-to-camera transforms (OpenCV axes).
        Ks: [B, 3, 3] pixel intrinsics.
        width, height: image size in pixels.
        near, far: depth range (near, far] kept; Gaussians outside it get radius 0.
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
    per_camera = "bnjk" if covars.dim() == 4 else "njk"
    covars_c = torch.einsum(f"bij,{per_camera},blk->bnil", rot, covars, rot)  # [B, N, 3, 3]
    x, y, z = means_c.unbind(-1)  # each [B, N]
    in_range = (z > near) & (z <= far)
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
    """min of sigma = 0.5 (a u^2 + c v^2) + b u v over [u0, u1] x [v0, v1] (positive definite conic).

    When the origin lies outside the rectangle, the minimum lies on an edge that faces it: at most
    one vertical edge u = ue (ue = u0 > 0 or u1 < 0) and one horizontal edge v = ve. Elsewhere ue
    (or ve) is 0 and the 'edge' is a segment through the rectangle, whose minimum is not below
    the rectangle's; inside, both are 0 and so is the minimum.
    """
    ue = u0.clamp_min(0.0) + u1.clamp_max(0.0)
    ve = v0.clamp_min(0.0) + v1.clamp_max(0.0)
    v_at = torch.minimum(torch.maximum(-cb * ue / cc, v0), v1)  # best v on the vertical edge
    u_at = torch.minimum(torch.maximum(-cb * ve / ca, u0), u1)
    on_u = 0.5 * (ca * ue * ue + cc * v_at * v_at) + cb * ue * v_at
    on_v = 0.5 * (ca * u_at * u_at + cc * ve * ve) + cb * u_at * ve
    return torch.minimum(on_u, on_v)


_SCAN_BLOCK = 16  # rows per scan block; each tile's list of rows is padded to a multiple of it


def _block_scan(x: Tensor, block_first: Tensor, inplace: bool = False) -> Tensor:
    """Inclusive cumulative sums over dim 0 of x [nb * K, P], restarting at each segment.

    Segments are runs of whole blocks of K = _SCAN_BLOCK rows; block_first [nb] is the first
    block of each block's segment. Sums inside a block are taken in x's dtype (at most K terms),
    the block offsets in float64, so no precision is lost to the sums of earlier segments.
    (torch.cumsum over dim 0 of a row-major [Q, P] array is also several times slower.)
    With inplace, x (contiguous) is overwritten with the result.
    """
    local = x.view(-1, _SCAN_BLOCK, x.shape[1])  # [nb, K, P]
    local = local.cumsum_(dim=1) if inplace else torch.cumsum(local, dim=1)
    local += _sum_of_earlier_blocks(local[:, -1, :].double(), block_first).to(x.dtype)[:, None, :]
    return local.view_as(x)


def _sum_of_earlier_blocks(totals: Tensor, block_first: Tensor) -> Tensor:
    """totals [nb, P] per block -> [nb, P] sums over the earlier blocks of the same segment
    (block_first [nb]: the first block of each block's segment)."""
    before = torch.cumsum(totals, dim=0).sub_(totals)  # over all earlier blocks
    return before.sub_(before.index_select(0, block_first))


def _float_below(value: float, dtype: torch.dtype) -> float:
    """The largest `dtype` number below value: torch.threshold(x, it, 0) keeps x >= value."""
    return torch.nextafter(torch.tensor(value, dtype=dtype), torch.tensor(0.0, dtype=dtype)).item()


def _tile_basis(tile_size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[6, t*t] monomials 1, ox, oy, ox^2, ox oy, oy^2 of the pixel centres' offsets from the tile centre."""
    t = tile_size
    step = torch.arange(t, dtype=torch.float64, device=device) + 0.5 - 0.5 * t
    ox, oy = step.repeat(t), step.repeat_interleave(t)
    return torch.stack([torch.ones_like(ox), ox, oy, ox * ox, ox * oy, oy * oy]).to(dtype)


class _CompositeTiles(torch.autograd.Function):
    """Front-to-back compositing of (tile, Gaussian) rows sorted by tile, then depth.

    Row q is one Gaussian evaluated at the t*t pixel centres of one tile ([Q, t*t] arrays). With
    (u, v) = tile centre - mean and (ox, oy) a pixel centre's offset from the tile centre, sigma
    is a quadratic in (ox, oy) whose 6 coefficients depend on the row only, so
    log(o) - sigma = coefficients [Q, 6] @ monomials [6, t*t], one matrix product. Each tile's
    rows are padded to whole blocks of K = _SCAN_BLOCK rows (padding rows have opacity 0), so
    that transmittances are products inside blocks times per-block factors, and each block's
    contribution to its tile is one small matrix product. The backward pass is written out (the
    3DGS rasterizer's backward, vectorised with segmented sums). Work is done in place on a few
    [Q, t*t] buffers: on CPU every fresh large buffer costs page faults.
    """

    @staticmethod
    def forward(ctx, means, conics, opacities, feats, geometry, num_tiles, tile_size, width, height):
        """Args:
            means [Q, 2], conics [Q, 3], opacities [Q], feats [Q, D]: the rows' Gaussians.
            geometry: int64 tile_x, tile_y [Q] (tile coordinates of each row), block_tile,
                block_first, block_last [Q / K] (each block's output tile, and the first and last
                block of that tile).
            num_tiles, tile_size, width, height: output size and tile side.

        Returns:
            [num_tiles, t*t, D + 1]: composited features, then the accumulated alpha
            (1 - final transmittance).
        """
        tile_x, tile_y, block_tile, block_first, block_last = geometry
        t, k = tile_size, _SCAN_BLOCK
        dtype, device = means.dtype, means.device
        nb, p = block_tile.shape[0], t * t
        basis = _tile_basis(t, dtype, device)  # [6, t*t]
        u = (tile_x * t + 0.5 * t).to(dtype) - means[:, 0]  # tile centre - mean
        v = (tile_y * t + 0.5 * t).to(dtype) - means[:, 1]
        ca, cb, cc = conics.unbind(-1)
        dsdx, dsdy = ca * u + cb * v, cb * u + cc * v  # d sigma / d(ox, oy) at the tile centre
        log_o = torch.log(opacities).clamp_min_(-1e4)  # padding rows: o = 0
        coef = torch.stack([log_o - 0.5 * (u * dsdx + v * dsdy), -dsdx, -dsdy, -0.5 * ca, -cb, -0.5 * cc], dim=-1)
        alpha = torch.mm(coef, basis).exp_()  # o exp(-sigma), [Q, t*t]
        needs_grad = any(ctx.needs_input_grad[:4])
        unclamped = alpha <= MAX_ALPHA if needs_grad else None  # d alpha / d(o exp(-sigma)) = 1 there
        # alpha >= 1/255 is kept: threshold keeps values above the float just below it.
        alpha = torch.threshold_(alpha, _float_below(ALPHA_THRESHOLD, dtype), 0.0).clamp_max_(MAX_ALPHA)
        if width % t or height % t:
            step = torch.arange(t, device=device)
            inside_x = (tile_x * t)[:, None] + step.repeat(t) < width
            alpha.mul_(inside_x & ((tile_y * t)[:, None] + step.repeat_interleave(t) < height))
        # Transmittance after each row: products of (1 - alpha) inside each block, times the
        # product over the tile's earlier blocks (in log space, float64).
        one_minus = 1.0 - alpha  # [Q, t*t]
        trans = torch.cumprod(one_minus.view(nb, k, p), dim=1)  # [nb, K, t*t]
        log_block = torch.log(trans[:, -1, :].double())  # [nb, t*t], > log(0.01) * K: no underflow
        trans.mul_(torch.exp(_sum_of_earlier_blocks(log_block, block_first)).to(dtype)[:, None, :])
        trans = trans.view(-1, p)
        # A pixel stops at the first Gaussian that would bring T below 1e-4 (a prefix per pixel):
        # T after it is set to 0, and so is T before it, its weight, and those of the rows after.
        torch.threshold_(trans, _float_below(TRANSMITTANCE_EPS, dtype), 0.0)
        weights = trans.div_(one_minus).mul_(alpha)  # alpha T_before, [Q, t*t]
        del one_minus
        feats1 = torch.cat([feats, torch.ones_like(feats[:, :1])], dim=1).view(nb, k, -1)  # [nb, K, D + 1]
        block_sums = torch.bmm(weights.view(nb, k, p).transpose(1, 2), feats1)  # [nb, t*t, D + 1]
        out = torch.zeros(num_tiles, p, feats1.shape[2], dtype=dtype, device=device)
        out.index_add_(0, block_tile, block_sums)
        if needs_grad:
            ctx.save_for_backward(
                u, v, conics, opacities, feats1, alpha, weights, unclamped, basis, block_tile, block_first, block_last
            )
        return out

    @staticmethod
    def backward(ctx, grad_out):
        u, v, conics, opacities, feats1, alpha, weights, unclamped, basis, block_tile, block_first, block_last = (
            ctx.saved_tensors
        )
        nb, k, _ = feats1.shape
        grad_blocks = grad_out.contiguous().index_select(0, block_tile)  # [nb, t*t, D + 1]
        grad_feats = torch.bmm(weights.view(nb, k, -1), grad_blocks).view(nb * k, -1)[:, :-1]  # [Q, D]
        grad_w = torch.bmm(feats1, grad_blocks.transpose(1, 2)).view_as(weights)  # dL/dweight, [Q, t*t]
        # dL/dlog(1 - alpha_i) = sum over the later rows j of the pixel of dL/dw_j w_j (only the
        # kept rows have weights: the pixel's earlier rows).
        incl = _block_scan(grad_w * weights, block_first, inplace=True)
        blocks = incl.view(nb, k, -1)  # [nb, K, t*t]
        later = torch.sub(blocks[:, -1, :].index_select(0, block_last)[:, None, :], blocks, out=blocks).view_as(incl)
        # dL/dalpha = dL/dw T_before - dL/dlog(1 - alpha) / (1 - alpha), and where alpha is not
        # capped, alpha = o exp(-sigma): dL/do = sum dL/dalpha alpha / o, dL/d(-sigma) = dL/dalpha alpha
        # (alpha T_before = w; the rows not drawn or past the stop have w = 0 and later = 0).
        grad_neg_sigma = grad_w.mul_(weights).sub_(later.mul_(alpha).div_(1.0 - alpha)).mul_(unclamped)
        moments = torch.mm(grad_neg_sigma, basis.t()).double()  # dL/d(log o - sigma coefficients), [Q, 6]
        o = opacities.double()
        grad_opac = torch.where(o > 0, moments[:, 0] / o, torch.zeros_like(o))
        ca, cb, cc = conics.double().unbind(-1)
        u, v = u.double(), v.double()
        m0, m1, m2, m3, m4, m5 = moments.neg_().unbind(-1)  # dL/d(sigma coefficients)
        dsdx, dsdy = ca * u + cb * v, cb * u + cc * v
        grad_means = torch.stack([m0 * dsdx + m1 * ca + m2 * cb, m0 * dsdy + m1 * cb + m2 * cc], dim=-1).neg_()
        grad_conics = torch.stack(
            [0.5 * (m0 * u * u + m3) + m1 * u, m0 * u * v + m1 * v + m2 * u + m4, 0.5 * (m0 * v * v + m5) + m2 * v],
            dim=-1,
        )
        dtype = conics.dtype
        grads = (grad_means.to(dtype), grad_conics.to(dtype), grad_opac.to(dtype), grad_feats)
        return grads + (None,) * 5


def rasterize_pixels(
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    features: Tensor,
    depths: Tensor,
    width: int,
    height: int,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
    tile_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Depth-sorted alpha compositing of projected Gaussians, sparse over image tiles.

    Same results as the dense evaluation (``_rasterize_pixels_dense``) without evaluating every
    Gaussian at every pixel:

    1. (no gradients) per camera and drawn Gaussian, the rectangle of pixels it can reach
       (``_pixel_ranges``) is rounded out to tile_size squares; the (camera, Gaussian, tile)
       intersections are enumerated (counts / offsets, repeat_interleave), those whose tile
       misses the Gaussian's alpha >= 1/255 ellipse are dropped, and the rest are sorted by
       (camera, tile) with one stable sort: Gaussians are enumerated in depth order per camera,
       so each tile's rows come out front to back;
    2. each row is evaluated at the tile_size^2 pixel centres of its tile: alpha =
       min(0.99, o exp(-sigma)), zero below 1/255;
    3. per pixel, T = segmented cumulative product of (1 - alpha) over the tile's rows (products
       inside blocks of _SCAN_BLOCK rows, block offsets in float64 log space); pairs are kept
       while T after them stays >= 1e-4 (the dense rule);
    4. the weights alpha T_before, times the features, are summed per tile pixel (per-block
       matrix products, then index_add), and the final transmittance is 1 - sum of the weights.
    The one difference from the dense code: it also drops a pixel where rounding makes sigma
    slightly negative (possible only at the centre of a nearly degenerate conic); here such a
    pixel is drawn.
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
        tile_size: side of the square tiles; None picks 4 or 8 from the footprints (AUTO_TILE_AREA).

    Returns:
        [B, H, W, D] composited features (no background) and [B, H, W] final transmittance.
    """
    if max_chunk_elements <= 0:
        raise ValueError(f"max_chunk_elements must be positive, got {max_chunk_elements}")
    if tile_size is not None and tile_size <= 0:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    b, n = depths.shape
    d = features.shape[-1]
    k = _SCAN_BLOCK
    device, dtype = depths.device, features.dtype
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
        t = tile_size
        if t is None:
            area = (nx * ny).sum() / drawn.sum().clamp_min(1)
            t = 8 if float(area) > AUTO_TILE_AREA else 4
        tiles_x, tiles_y = -(-width // t), -(-height // t)
        num_tiles = b * tiles_x * tiles_y
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
            g = geom.index_select(0, slot)  # (margins cover the rounding of this dtype)
            cx, cy = (tile_x * t).to(g.dtype) + 0.5 - g[:, 0], (tile_y * t).to(g.dtype) + 0.5 - g[:, 1]
            low = _rect_min_sigma(cx, cx + (t - 1), cy, cy + (t - 1), g[:, 2], g[:, 3], g[:, 4])
            hit = low <= slack.to(g.dtype).index_select(0, slot) * 1.001 + 1e-4
            slot, tile_x, tile_y = slot[hit], tile_x[hit], tile_y[hit]
        tile = (torch.div(slot, n, rounding_mode="floor") * tiles_y + tile_y) * tiles_x + tile_x
        # Rows come in slot (camera, depth) order: a stable sort by tile keeps depth order.
        key = tile.to(torch.int32) if num_tiles < 2**31 else tile
        perm = torch.sort(key, stable=True).indices
        tile = tile.index_select(0, perm)
        # Pad every tile's rows to whole scan blocks; padding rows use table row B*N (zeros).
        rows_per_tile = torch.bincount(tile, minlength=num_tiles)
        padded = torch.div(rows_per_tile + (k - 1), k, rounding_mode="floor") * k
        shift = (torch.cumsum(padded, 0) - padded) - (torch.cumsum(rows_per_tile, 0) - rows_per_tile)
        position = torch.arange(tile.shape[0], device=device) + shift.index_select(0, tile)
        entry = torch.full((int(padded.sum()),), b * n, dtype=torch.long, device=device)
        entry[position] = slot_entry.index_select(0, slot.index_select(0, perm))
        tile = torch.repeat_interleave(torch.arange(num_tiles, device=device), padded)  # [Q]
        block_tile = tile[::k].contiguous()
        tile_in_image = tile % (tiles_x * tiles_y)
        tile_x, tile_y = tile_in_image % tiles_x, torch.div(tile_in_image, tiles_x, rounding_mode="floor")
        # Blocks of K rows; each tile's blocks are consecutive.
        num_blocks = block_tile.shape[0]
        is_first = torch.ones(num_blocks, dtype=torch.bool, device=device)
        is_first[1:] = block_tile[1:] != block_tile[:-1]
        first_blocks = torch.nonzero(is_first).squeeze(1)  # [S] first block of each non-empty tile
        last_blocks = torch.cat([first_blocks[1:] - 1, first_blocks.new_full((min(num_blocks, 1),), num_blocks - 1)])
        # Chunks of whole tiles, about max_chunk_elements (row, pixel) pairs each.
        bounds = [0, num_blocks]
        per_chunk = max(1, max_chunk_elements // (k * t * t))
        if num_blocks > per_chunk:
            marks = torch.arange(per_chunk, num_blocks, per_chunk, device=device)
            cuts = first_blocks.index_select(0, (torch.searchsorted(first_blocks, marks, right=True) - 1).clamp_min(0))
            bounds = sorted(set(cuts.tolist()) | {0, num_blocks})
        segment = torch.cumsum(is_first, 0) - 1
        block_first = first_blocks.index_select(0, segment)  # [num_blocks] first / last block of its tile
        block_last = last_blocks.index_select(0, segment)

    table = torch.cat(
        [means2d.reshape(-1, 2), conics.reshape(-1, 3), opacities.reshape(-1, 1), features.reshape(-1, d)], dim=-1
    ).to(dtype)
    table = torch.cat([table, table.new_zeros(1, table.shape[1])])  # [B*N + 1, 6 + D]

    def chunk(lo: int, hi: int, table: Tensor) -> Tensor:
        rows = slice(lo * k, hi * k)
        g = table.index_select(0, entry[rows])
        geometry = (tile_x[rows], tile_y[rows], block_tile[lo:hi], block_first[lo:hi] - lo, block_last[lo:hi] - lo)
        return _CompositeTiles.apply(g[:, 0:2], g[:, 2:5], g[:, 5], g[:, 6:], geometry, num_tiles, t, width, height)

    use_checkpoint = len(bounds) > 2 and torch.is_grad_enabled() and table.requires_grad
    out = table.new_zeros(num_tiles, t * t, d + 1)
    if table.requires_grad:  # keep the output attached to the graph even when nothing is drawn
        out = out + table[:0].sum()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi > lo:
            part = checkpoint(chunk, lo, hi, table, use_reentrant=False) if use_checkpoint else chunk(lo, hi, table)
            out = part if len(bounds) == 2 else out + part
    # [B * tiles_y * tiles_x, t * t, D + 1] -> [B, H, W, D + 1]
    out = out.reshape(b, tiles_y, tiles_x, t, t, d + 1).transpose(2, 3).reshape(b, tiles_y * t, tiles_x * t, d + 1)
    out = out[:, :height, :width]
    return out[..., :d], 1.0 - out[..., d]


def rasterize_torch(
    inputs: RasterizeInputs, max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS
) -> RasterizeOutputs:
    """Renders N Gaussians into B cameras (see ``RasterizeInputs`` and ``RasterizeOutputs`` for the shapes).

    max_chunk_elements bounds the (Gaussian-tile pair, pixel) entries rasterized at once.
    """
    g, viewmats = inputs.gaussians, inputs.viewmats
    width, height = inputs.width, inputs.height
    covars = quat_scale_to_covar(g.quats, g.scales)  # [N, 3, 3], or [B, N, 3, 3] with per-camera scales
    means2d, conics, depths, radii, visible = project_gaussians(
        g.means, covars, viewmats, inputs.Ks, width, height, inputs.near, inputs.far, inputs.eps2d
    )
    if means2d.requires_grad:
        means2d.retain_grad()
    colors = sh_to_rgb(g.means, g.sh_coeffs, g.sh_degree, centers_from_view_matrices(viewmats))  # [B, N, 3]
    opac = torch.where(visible, g.opacities[None, :].expand_as(depths), torch.zeros_like(depths))
    # The depth channel composites z_i; detached, its gradient still reaches the blend weights
    # (means2d, conics, opacities) through the compositing, as in the official rasterizer.
    z = depths if inputs.depth_grad_to_z else depths.detach()
    features = torch.cat([colors, z[..., None]], dim=-1)  # [B, N, 4]
    feats, trans = rasterize_pixels(
        means2d, conics, opac, features, depths, width, height, max_chunk_elements
    )
    rgb = feats[..., :3] + trans[..., None] * inputs.backgrounds[:, None, None, :]
    return RasterizeOutputs(rgb, feats[..., 3:], (1.0 - trans)[..., None], means2d, radii)
