"""Convolutions computed as one GEMM over an NHWC patch matrix (im2col + cuBLAS): a measured experiment,
not used by the trainer.

The question: the SD UNet's convolutions are half its FLOPs; would cuBLAS, running them as plain matmuls,
beat cuDNN's channels-last kernels, at least at the small 16x16 and 8x8 levels where few tiles keep the
SMs busy? Measured on an H200 (bench/results/unet_convs_h200.md): no. cuDNN already reaches 47-65% of the
fp16 peak on the 3x3 convolutions; the bare GEMM on a ready patch matrix would save at most 0.8 ms per
B=4 forward, and gathering the matrix costs more than that (compiled UNet: 9.34 ms with cuDNN, 9.50 ms
with GEMMs up to 16x16, 10.73 ms with GEMMs everywhere).

The patch matrix is laid out [N*Ho*Wo, kh*kw*C] with the channel fastest, so it is gathered with
coalesced reads from a channels-last input, and it multiplies the weight viewed as [O, kh*kw*C], which is
free when the weight itself is channels-last (`module.to(memory_format=torch.channels_last)`).
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


def conv2d_as_gemm(x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int],
                   padding: tuple[int, int]) -> Tensor:
    """x [N, C, H, W], weight [O, C, kh, kw], bias [O] or None -> [N, O, Ho, Wo] in channels-last memory.

    Same result as F.conv2d(x, weight, bias, stride, padding) with zero padding, dilation 1, groups 1.
    """
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"conv2d_as_gemm: expected 4-D input and weight, got {tuple(x.shape)} and {tuple(weight.shape)}")
    n, c, _, _ = x.shape
    o, c_w, kh, kw = weight.shape
    if c != c_w:
        raise ValueError(f"conv2d_as_gemm: input has {c} channels, weight expects {c_w}")
    (sh, sw), (ph, pw) = stride, padding
    x_nhwc = x.permute(0, 2, 3, 1)  # [N, H, W, C], a view when x is channels-last
    if ph or pw:
        x_nhwc = F.pad(x_nhwc, (0, 0, pw, pw, ph, ph))
    # [N, Ho, Wo, C, kh, kw] -> [N, Ho, Wo, kh, kw, C]: channel fastest, matching the weight's NHWC order
    patches = x_nhwc.unfold(1, kh, sh).unfold(2, kw, sw).permute(0, 1, 2, 4, 5, 3)
    _, ho, wo = patches.shape[:3]
    cols = patches.reshape(n * ho * wo, kh * kw * c)
    w_mat = weight.permute(0, 2, 3, 1).reshape(o, kh * kw * c)
    out = F.linear(cols, w_mat, bias)  # [N*Ho*Wo, O]
    return out.view(n, ho, wo, o).permute(0, 3, 1, 2)


class GemmConv2d(nn.Conv2d):
    """nn.Conv2d that runs as conv2d_as_gemm on inputs of at most `gemm_max_pixels` (H*W) pixels.

    Same parameters and state-dict keys as the Conv2d it replaces (see `convs_as_gemm`).
    """

    gemm_max_pixels: float = 0

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] * x.shape[-1] > self.gemm_max_pixels:
            return super().forward(x)
        return conv2d_as_gemm(x, self.weight, self.bias, self.stride, self.padding)


def gemm_compatible(conv: nn.Conv2d) -> bool:
    """Zero padding given as numbers, no dilation, one group: what conv2d_as_gemm computes."""
    return (conv.groups == 1 and tuple(conv.dilation) == (1, 1) and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


def convs_as_gemm(module: nn.Module, max_pixels: float = math.inf) -> int:
    """Let every compatible Conv2d of `module` run as a GEMM on inputs of at most max_pixels (H*W) pixels,
    in place (0 turns it off again); returns how many convolutions it applies to."""
    if max_pixels < 0:
        raise ValueError(f"convs_as_gemm: max_pixels must be >= 0, got {max_pixels}")
    count = 0
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d) and type(conv) in (nn.Conv2d, GemmConv2d) and gemm_compatible(conv):
            conv.__class__ = GemmConv2d  # same attributes and parameters: only forward changes
            conv.gemm_max_pixels = max_pixels
            count += 1
    return count
