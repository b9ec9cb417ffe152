"""Regularisers of the training loop (official utils/loss_utils.py)."""
from __future__ import annotations

from torch import Tensor


def tv_loss(x: Tensor) -> Tensor:
    """Squared-difference total variation, [B, C, H, W] -> scalar.

    2 [sum (d_y x)^2 / (C (H-1) W) + sum (d_x x)^2 / (C H (W-1))] / B, as the official code.
    """
    b, c, h, w = x.shape
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).square().sum() / (c * (h - 1) * w)
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).square().sum() / (c * h * (w - 1))
    return 2.0 * (dy + dx) / b
