"""The opacity field of a set of 3D Gaussians, sampled on a regular grid (for mesh extraction).

    alpha(x) = 1 - prod_i (1 - o_i exp(-1/2 (x - mu_i)^T Sigma_i^-1 (x - mu_i)))

is the opacity a thin slab at x would get from the Gaussians: 0 in empty space, close to 1
inside a solid. Each Gaussian only touches the voxels within 3 sigma of its centre, so the sum
of log-transmittances is splatted Gaussian by Gaussian (grouped by their box size, chunked to
bound memory) instead of evaluating every Gaussian at every voxel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gaussian_renderer.torch_backend import quat_scale_to_covar
from scene.gaussian_tensors import GaussianTensors

SIGMA_CUTOFF = 3.0  # a Gaussian's support: its 3-sigma ellipsoid
MAX_ALPHA = 0.999  # keeps log(1 - alpha) finite
MIN_OPACITY = 0.01  # Gaussians below this opacity are ignored (the renderer's 1/255 alpha cutoff is close)


class NoSurfaceError(ValueError):
    """The Gaussians have no surface to extract (none opaque enough, or the field never reaches the level)."""


@dataclass
class OpacityGrid:
    values: Tensor  # [R, R, R] opacity in [0, 1); index (i, j, k) is the point origin + (i, j, k) * voxel
    origin: Tensor  # [3] world position of voxel (0, 0, 0)
    voxel: float  # edge length of a voxel (world units)

    def to_world(self, index_coords: Tensor) -> Tensor:
        """[..., 3] fractional grid indices -> world positions."""
        return self.origin.to(index_coords) + index_coords * self.voxel


def content_bounds(gaussians: GaussianTensors, quantile: float = 0.002, margin: float = 0.05) -> tuple[Tensor, Tensor]:
    """([3], [3]) box around the visible Gaussians: per-axis quantiles of their centres (a few far
    floaters do not blow up the box), padded by 3 sigma of a typical Gaussian and a relative margin."""
    keep = gaussians.opacities >= MIN_OPACITY
    if not bool(keep.any()):
        raise NoSurfaceError("no Gaussian has opacity >= 0.01: nothing to extract")
    means = gaussians.means[keep].float()
    q = torch.tensor([quantile, 1.0 - quantile], device=means.device)
    lo, hi = torch.quantile(means, q, dim=0)  # [3] each
    pad = SIGMA_CUTOFF * gaussians.scales[keep].float().amax(dim=1).median() + margin * (hi - lo).amax()
    return lo - pad, hi + pad


def opacity_grid(gaussians: GaussianTensors, resolution: int, max_radius: int = 48,
                 chunk_elements: int = 1 << 22) -> OpacityGrid:
    """Sample alpha(x) on a resolution^3 grid spanning content_bounds (cubic voxels).

    max_radius: a Gaussian's box is at most (2 max_radius + 1)^3 voxels (the largest ones are cut).
    chunk_elements: Gaussian-voxel pairs evaluated at once (memory bound).
    """
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8, got {resolution}")
    lo, hi = content_bounds(gaussians)
    voxel = float((hi - lo).amax()) / (resolution - 1)
    centre = 0.5 * (lo + hi)
    origin = centre - 0.5 * voxel * (resolution - 1)
    keep = gaussians.opacities >= MIN_OPACITY
    means = gaussians.means[keep].float()  # [N, 3]
    inv_cov = torch.linalg.inv(quat_scale_to_covar(gaussians.quats[keep].float(),
                                                   gaussians.scales[keep].float().clamp_min(1e-3 * voxel)))
    opacity = gaussians.opacities[keep].float()  # [N]
    radius = torch.ceil(SIGMA_CUTOFF * gaussians.scales[keep].float().amax(dim=1) / voxel)
    radius = radius.clamp(0, max_radius).long()  # [N] box half-width in voxels
    log_transmittance = torch.zeros(resolution ** 3, device=means.device)
    for r in torch.unique(radius).tolist():
        members = torch.nonzero(radius == r).squeeze(1)
        offsets = _box_offsets(r, means.device)  # [K, 3]
        per_chunk = max(1, chunk_elements // offsets.shape[0])
        for start in range(0, members.shape[0], per_chunk):
            idx = members[start:start + per_chunk]
            _splat(log_transmittance, means[idx], inv_cov[idx], opacity[idx], offsets, origin, voxel, resolution)
    values = -torch.expm1(log_transmittance).reshape(resolution, resolution, resolution)
    return OpacityGrid(values=values, origin=origin, voxel=voxel)


def _box_offsets(r: int, device: torch.device) -> Tensor:
    """[K, 3] integer offsets within distance r + sqrt(3)/2 of the origin: a Gaussian's 3-sigma
    ellipsoid lies within r voxels of its centre, which is at most sqrt(3)/2 from its rounded voxel."""
    axis = torch.arange(-r, r + 1, device=device)
    cube = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    return cube[cube.square().sum(-1) <= (r + 0.87) ** 2]


def _splat(target: Tensor, means: Tensor, inv_cov: Tensor, opacity: Tensor, offsets: Tensor,
           origin: Tensor, voxel: float, resolution: int) -> None:
    """Add log(1 - o_i g_i(x)) of Gaussians [n] to the flat grid `target` [R^3] over their boxes."""
    centre = torch.round((means - origin) / voxel).long()  # [n, 3]
    cells = centre[:, None, :] + offsets[None]  # [n, K, 3]
    delta = origin + cells.float() * voxel - means[:, None, :]  # [n, K, 3]
    mahalanobis = torch.einsum("nki,nij,nkj->nk", delta, inv_cov, delta)  # [n, K]
    alpha = opacity[:, None] * torch.exp(-0.5 * mahalanobis)
    inside = ((cells >= 0) & (cells < resolution)).all(-1) & (mahalanobis <= SIGMA_CUTOFF ** 2)
    flat = (cells[..., 0] * resolution + cells[..., 1]) * resolution + cells[..., 2]  # [n, K]
    target.index_add_(0, flat[inside], torch.log1p(-alpha[inside].clamp_max(MAX_ALPHA)))
