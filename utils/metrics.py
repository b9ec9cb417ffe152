"""Image metrics."""
from __future__ import annotations

import torch
from torch import Tensor


def psnr(prediction: Tensor, target: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB of images in [0, 1], averaged over the batch. [B, C, H, W] -> scalar."""
    if prediction.shape != target.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(prediction.shape)} vs {tuple(target.shape)}")
    mse = (prediction.float() - target.float()).square().flatten(1).mean(1).clamp_min(1e-10)
    return (-10.0 * torch.log10(mse)).mean()
