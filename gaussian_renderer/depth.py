"""Normalised disparity: the depth image the official SegmentDreamer renderer returns.

Both rasterizer backends produce the accumulated camera-space depth D = sum_i z_i a_i T_i
and the accumulated opacity. The official code turns them into a disparity normalised to
[0, 1] per image (background and farthest opaque point -> 0, nearest point -> 1):

    T      = 1 - alpha                      (final transmittance)
    focal  = 1 / (2 tan(fov_x / 2))
    disp   = focal / (D + 10 T + 1e-5)
    min_d  = min disp over pixels with T <= 0.1 (global min if there are none)
    depth  = clamp((disp - min_d) / (max disp - min_d), 0, 1)

The result is differentiable, also through the min and the max.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["normalized_disparity"]

_BACKGROUND_DEPTH = 10.0
_DISP_EPS = 1e-5
_OPAQUE_T = 0.1
# Only guards the degenerate image whose disparity is constant (e.g. nothing rendered), where
# the official formula divides 0 by 0; any other image is unaffected.
_RANGE_EPS = 1e-12


def normalized_disparity(accum_depth: Tensor, alpha: Tensor, fov_x: Tensor) -> Tensor:
    """Official normalised disparity.

    Args:
        accum_depth: [B, 1, H, W] accumulated depth sum_i z_i a_i T_i.
        alpha: [B, 1, H, W] accumulated opacity 1 - T.
        fov_x: [B] horizontal field of view in radians.

    Returns:
        [B, 1, H, W] normalised disparity in [0, 1].
    """
    if accum_depth.dim() != 4 or accum_depth.shape[1] != 1:
        raise ValueError(f"accum_depth must be [B, 1, H, W], got {tuple(accum_depth.shape)}")
    if alpha.shape != accum_depth.shape:
        raise ValueError(
            f"alpha must have the shape of accum_depth {tuple(accum_depth.shape)}, got {tuple(alpha.shape)}"
        )
    b = accum_depth.shape[0]
    if fov_x.shape != (b,):
        raise ValueError(f"fov_x must be [B={b}], got {tuple(fov_x.shape)}")

    transmittance = 1.0 - alpha  # [B, 1, H, W]
    focal = (0.5 / torch.tan(0.5 * fov_x)).to(accum_depth.dtype).view(b, 1, 1, 1)  # [B, 1, 1, 1]
    disp = focal / (accum_depth + _BACKGROUND_DEPTH * transmittance + _DISP_EPS)  # [B, 1, H, W]

    flat = disp.reshape(b, -1)  # [B, HW]
    opaque = (transmittance <= _OPAQUE_T).reshape(b, -1)  # [B, HW]
    inf = torch.full_like(flat, float("inf"))
    opaque_min = torch.where(opaque, flat, inf).amin(dim=1)  # [B], +inf where no opaque pixel
    global_min = flat.amin(dim=1)  # [B]
    min_d = torch.where(opaque.any(dim=1), opaque_min, global_min).view(b, 1, 1, 1)
    max_d = flat.amax(dim=1).view(b, 1, 1, 1)
    return ((disp - min_d) / (max_d - min_d).clamp_min(_RANGE_EPS)).clamp(0.0, 1.0)
