"""View-dependent prompt weights (official train.py and guidance/perpneg_utils.py; stable-dreamfusion logic).

Pure tensor functions of the camera azimuth (degrees, 0 = front), vectorised over the
batch with `torch.where` so that they never synchronise with the host.

Embedding order everywhere: 0 = front, 1 = side, 2 = back.

Positive embedding (front half, -90 <= a < 90): r = 1 - |a|/90, pos = r front + (1 - r) side;
back half: r = 1 - (|a| - 90)/90, pos = r side + (1 - r) back. Continuous at +-90 and +-180.
"""
from __future__ import annotations

import torch
from torch import Tensor

FRONT, SIDE, BACK = 0, 1, 2


def _wrap_degrees(azimuth_deg: Tensor) -> Tensor:
    """Azimuth wrapped to [-180, 180) (180 maps to -180, which is the same back view)."""
    return torch.remainder(azimuth_deg.float() + 180.0, 360.0) - 180.0


def _halves(azimuth_deg: Tensor) -> tuple[Tensor, Tensor]:
    """(front_half [B] bool, r [B]) where r is the official interpolation ratio of each half."""
    wrapped = _wrap_degrees(azimuth_deg)
    front_half = (wrapped >= -90.0) & (wrapped < 90.0)
    a = wrapped.abs()
    r = torch.where(front_half, 1.0 - a / 90.0, 1.0 - (a - 90.0) / 90.0)
    return front_half, r


def view_interpolation(azimuth_deg: Tensor) -> Tensor:
    """Weights [B, 3] of the (front, side, back) embeddings for azimuths [B]; each row sums to 1."""
    front_half, r = _halves(azimuth_deg)
    zero = torch.zeros_like(r)
    front_w = torch.stack([r, 1.0 - r, zero], dim=-1)  # [B, 3]
    back_w = torch.stack([zero, r, 1.0 - r], dim=-1)  # [B, 3]
    return torch.where(front_half[:, None], front_w, back_w)


def perp_neg_weights(
    azimuth_deg: Tensor,
    negative_w: float = -2.0,
    front_decay: float = 2.0,
    side_decay: float = 10.0,
) -> tuple[Tensor, Tensor]:
    """Perp-Neg components and weights per view.

    Returns (component_ids [B, 2] long, weights [B, 2] float32).
    Front half: components [front, side],
        w_front = 0 if r > 0.8 else negative_w exp(-front_decay r),
        w_side  = 0 if r < 0.2 else negative_w exp(-side_decay (1 - r)).
    Back half: components [side, front],
        w_side  = 0 if r > 0.8 else negative_w exp(-side_decay r) / 2,
        w_front = negative_w.
    At the defaults these are the official numbers (back half: w_side = -exp(-10 r), w_front = -2).
    """
    front_half, r = _halves(azimuth_deg)
    zero = torch.zeros_like(r)
    front_w1 = torch.where(r > 0.8, zero, negative_w * torch.exp(-front_decay * r))
    front_w2 = torch.where(r < 0.2, zero, negative_w * torch.exp(-side_decay * (1.0 - r)))
    back_w1 = torch.where(r > 0.8, zero, negative_w * torch.exp(-side_decay * r) / 2.0)
    back_w2 = torch.full_like(r, negative_w)
    weights = torch.where(
        front_half[:, None],
        torch.stack([front_w1, front_w2], dim=-1),
        torch.stack([back_w1, back_w2], dim=-1),
    )  # [B, 2]
    front_ids = torch.tensor([FRONT, SIDE], device=r.device)
    back_ids = torch.tensor([SIDE, FRONT], device=r.device)
    component_ids = torch.where(front_half[:, None], front_ids, back_ids)  # [B, 2]
    return component_ids, weights


def view_embeddings(front: Tensor, side: Tensor, back: Tensor, azimuth_deg: Tensor) -> Tensor:
    """Positive embeddings [B, L, D] interpolated from front/side/back [1, L, D] at azimuths [B]."""
    stack = torch.cat([front, side, back], dim=0)  # [3, L, D]
    weights = view_interpolation(azimuth_deg.to(stack.device)).to(stack.dtype)  # [B, 3]
    return torch.einsum("bk,kld->bld", weights, stack)
