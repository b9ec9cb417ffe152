"""How far a compressed splat file is from the splats it was written from: per-attribute errors and a
16-view render PSNR with our own rasterizer. Used by the round-trip tests and bench/splat_formats.py,
for every format (.spz, SOG).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from export.splat_data import SplatData
from gaussian_renderer import render_in_chunks
from scene.camera_sampler import orbit_cameras
from utils.metrics import psnr

SH_C0 = 0.28209479177387814  # the degree-0 SH basis function: colour = 0.5 + SH_C0 * f_dc


@dataclass(frozen=True)
class AttributeErrors:
    """Largest absolute error of each attribute over all splats."""

    position: float  # |dx| over the largest side of the splats' bounding box
    rotation_deg: float  # angle of the rotation between the two orientations, degrees
    log_scale: float  # natural-log units
    opacity: float  # sigmoid(logit), in [0, 1]
    color: float  # the DC colour SH_C0 * f_dc, RGB units (1 = full range)
    sh: float  # higher-degree coefficients (0 at SH degree 0)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x.astype(np.float64)))


def attribute_errors(reference: SplatData, decoded: SplatData) -> AttributeErrors:
    """The largest error of each attribute of `decoded` against `reference` (same splats, same order,
    same frame)."""
    if decoded.num_splats != reference.num_splats or decoded.up_axis != reference.up_axis:
        raise ValueError(f"cannot compare {decoded.num_splats} splats in frame {decoded.up_axis} with "
                         f"{reference.num_splats} in frame {reference.up_axis}")
    extent = float(np.ptp(reference.means, axis=0).max()) or 1.0
    dot = np.abs((decoded.quats.astype(np.float64) * reference.quats.astype(np.float64)).sum(axis=1))
    dot /= np.linalg.norm(decoded.quats, axis=1) * np.linalg.norm(reference.quats, axis=1)
    sh = np.abs(decoded.sh_rest - reference.sh_rest).max(initial=0.0)
    return AttributeErrors(
        position=float(np.abs(decoded.means - reference.means).max()) / extent,
        rotation_deg=float(np.degrees(2.0 * np.arccos(np.clip(dot, 0.0, 1.0))).max()),
        log_scale=float(np.abs(decoded.log_scales - reference.log_scales).max()),
        opacity=float(np.abs(_sigmoid(decoded.opacity_logits) - _sigmoid(reference.opacity_logits)).max()),
        color=float(SH_C0 * np.abs(decoded.sh_dc - reference.sh_dc).max()),
        sh=float(sh),
    )


def comparison_views(data: SplatData, size: int = 128):
    """16 cameras in the training world (z up) looking at the splats: two rings of 8, at 60 and 105
    degrees from the up axis, far enough for the whole bounding box at a 40-degree field of view."""
    means = data.to_model().means.detach()
    centre = 0.5 * (means.min(0).values + means.max(0).values)
    radius = float((means - centre).norm(dim=1).quantile(0.98)) * 3.0 + 1e-3
    polar = torch.tensor([60.0] * 8 + [105.0] * 8)
    azimuth = torch.arange(16, dtype=torch.float32) % 8 * 45.0 + (torch.arange(16) >= 8) * 22.5
    return orbit_cameras(torch.full((16,), radius), polar, azimuth, torch.full((16,), np.radians(40.0)),
                         size, size, target=centre.expand(16, 3))


@torch.no_grad()
def render_views(data: SplatData, cameras) -> torch.Tensor:
    """[16, 3, H, W] renders of the splats on black with the torch rasterizer, at their own SH degree."""
    model = data.to_model()
    gaussians = model.gaussian_tensors(sh_degree=model.max_sh_degree)
    return render_in_chunks(gaussians, cameras, torch.zeros(3), backend="torch").rgb.clamp(0.0, 1.0)


def render_psnr(reference: SplatData, decoded: SplatData, size: int = 128) -> float:
    """PSNR (dB, mean over 16 views) of `decoded`'s renders against `reference`'s, same cameras."""
    cameras = comparison_views(reference, size)
    return float(psnr(render_views(decoded, cameras), render_views(reference, cameras)))
