"""GroupNorm with an optional fused SiLU for channels-last activations, forward and backward in Triton.

Why: at 512x512 the VAE encoder's convolutions run natively in NHWC, but with contiguous (NCHW)
activations cuDNN converts every input and gradient to NHWC and back (27% of the compiled encoder's
forward+backward on an H200, bench/results/components_vae_h200.md), and with channels-last
activations PyTorch's and Inductor's GroupNorm reduce over strided groups of C/G channels. These
kernels read whole [rows, C] tiles of the NHWC layout, so every load is coalesced, reduce all G groups
of a tile at once, and fuse the SiLU that follows every norm but one in the encoder.

Maths, per sample n and group g over its M = (H W) (C / G) values, in float32:
    mean, rstd = 1 / sqrt(var + eps)       (two-level: per-tile mean and M2, combined by Chan's formula)
    xhat = (x - mean) rstd,   u = w xhat + b,   y = silu(u) if fused else u
    backward: du = dy silu'(u),  a = w du,  dx = rstd (a - mean_g(a) - xhat mean_g(a xhat))
The affine parameters are constants here (the VAE is frozen): `GroupNormAct` uses PyTorch's
GroupNorm whenever they require grad, or Triton is missing, or the input is not channels-last.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: GroupNormAct runs PyTorch's GroupNorm
    triton = None

TILE_ELEMENTS = 8192  # values per program: a [TILE_ELEMENTS / C, C] tile of the NHWC layout
NUM_WARPS = 8


def _power_of_two(k: int) -> bool:
    return k > 0 and k & (k - 1) == 0


def triton_installed() -> bool:
    """Triton imports (torch.compile's GPU code generator and these kernels need it)."""
    return triton is not None


def triton_ready(x: Tensor) -> bool:
    """Triton kernels can run on x's device (CUDA, or the CPU under TRITON_INTERPRET=1 for tests)."""
    if not triton_installed():
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def is_channels_last(x: Tensor) -> bool:
    """[N, C, *spatial] stored as [N, *spatial, C] contiguous (channels-last 2D, or [B, C, L] transposed)."""
    return x.dim() >= 3 and x.movedim(1, -1).is_contiguous()


if triton is not None:

    @triton.jit
    def _tile(n, chunk, HW, C: tl.constexpr, ROWS: tl.constexpr):
        """Offsets [ROWS, C] of one tile of sample n, and its row mask [ROWS, 1]."""
        rows = chunk * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, C)
        offsets = n.to(tl.int64) * HW * C + rows[:, None].to(tl.int64) * C + cols[None, :]
        return offsets, (rows < HW)[:, None]

    @triton.jit
    def _group_sum(v, G: tl.constexpr, C: tl.constexpr, ROWS: tl.constexpr):
        """[ROWS, C] -> [G]: the sum over rows and over the C / G channels of each group."""
        return tl.sum(tl.sum(tl.reshape(v, (ROWS, G, C // G)), axis=2), axis=0)

    @triton.jit
    def _per_channel(group_values, G: tl.constexpr, C: tl.constexpr):
        """[G] -> [C]: each group's value repeated over its C / G channels."""
        return tl.reshape(tl.broadcast_to(group_values[:, None], (G, C // G)), (C,))

    @triton.jit
    def _group_norm_stats_kernel(x_ptr, mean_ptr, m2_ptr, HW,
                                 C: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr):
        n, chunk = tl.program_id(0), tl.program_id(1)
        offsets, valid = _tile(n, chunk, HW, C, ROWS)
        x = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        count = (tl.minimum(HW - chunk * ROWS, ROWS) * (C // G)).to(tl.float32)
        mean = _group_sum(x, G, C, ROWS) / count  # [G]
        centred = tl.where(valid, x - _per_channel(mean, G, C)[None, :], 0.0)
        m2 = _group_sum(centred * centred, G, C, ROWS)
        out = (n * tl.num_programs(1) + chunk) * G + tl.arange(0, G)
        tl.store(mean_ptr + out, mean)
        tl.store(m2_ptr + out, m2)

    @triton.jit
    def _normalised(x_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, n, offsets, valid,
                    C: tl.constexpr, G: tl.constexpr):
        """xhat and u = w xhat + b of one tile, float32 [ROWS, C]."""
        cols = tl.arange(0, C)
        group = cols // (C // G)
        mean = tl.load(mean_ptr + n * G + group)
        rstd = tl.load(rstd_ptr + n * G + group)
        w = tl.load(w_ptr + cols).to(tl.float32)
        b = tl.load(b_ptr + cols).to(tl.float32)
        x = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        xhat = (x - mean[None, :]) * rstd[None, :]
        return xhat, xhat * w[None, :] + b[None, :], w

    @triton.jit
    def _group_norm_forward_kernel(x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, HW,
                                   C: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, SILU: tl.constexpr):
        n, chunk = tl.program_id(0), tl.program_id(1)
        offsets, valid = _tile(n, chunk, HW, C, ROWS)
        _, u, _ = _normalised(x_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, n, offsets, valid, C, G)
        if SILU:
            u = u * tl.sigmoid(u)
        tl.store(y_ptr + offsets, u.to(y_ptr.dtype.element_ty), mask=valid)

    @triton.jit
    def _grad_xhat(dy_ptr, x_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, n, offsets, valid,
                   C: tl.constexpr, G: tl.constexpr, SILU: tl.constexpr):
        """xhat and a = w du (zero on rows past the end) of one tile, float32 [ROWS, C]."""
        xhat, u, w = _normalised(x_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, n, offsets, valid, C, G)
        du = tl.load(dy_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        if SILU:
            s = tl.sigmoid(u)
            du = du * s * (1.0 + u * (1.0 - s))
        return xhat, tl.where(valid, du * w[None, :], 0.0)

    @triton.jit
    def _group_norm_backward_sums_kernel(dy_ptr, x_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, sum_a_ptr, sum_ax_ptr,
                                         HW, C: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr,
                                         SILU: tl.constexpr):
        n, chunk = tl.program_id(0), tl.program_id(1)
        offsets, valid = _tile(n, chunk, HW, C, ROWS)
        xhat, a = _grad_xhat(dy_ptr, x_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, n, offsets, valid, C, G, SILU)
        out = (n * tl.num_programs(1) + chunk) * G + tl.arange(0, G)
        tl.store(sum_a_ptr + out, _group_sum(a, G, C, ROWS))
        tl.store(sum_ax_ptr + out, _group_sum(a * xhat, G, C, ROWS))

    @triton.jit
    def _group_norm_backward_kernel(dy_ptr, x_ptr, dx_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, mean_a_ptr,
                                    mean_ax_ptr, HW, C: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr,
                                    SILU: tl.constexpr):
        n, chunk = tl.program_id(0), tl.program_id(1)
        offsets, valid = _tile(n, chunk, HW, C, ROWS)
        xhat, a = _grad_xhat(dy_ptr, x_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, n, offsets, valid, C, G, SILU)
        group = tl.arange(0, C) // (C // G)
        rstd = tl.load(rstd_ptr + n * G + group)
        mean_a = tl.load(mean_a_ptr + n * G + group)
        mean_ax = tl.load(mean_ax_ptr + n * G + group)
        dx = rstd[None, :] * (a - mean_a[None, :] - xhat * mean_ax[None, :])
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=valid)


class _Tiling(NamedTuple):
    n: int  # samples
    hw: int  # spatial positions per sample (rows of the NHWC layout)
    c: int  # channels
    rows: int  # rows per tile
    chunks: int  # tiles per sample


def _layout(x: Tensor, groups: int) -> _Tiling:
    """The tiling of a channels-last [N, C, *spatial] tensor (validated once per forward or backward)."""
    if not is_channels_last(x):
        raise ValueError(f"group_norm_act_nhwc needs a channels-last [N, C, *spatial] input; got shape "
                         f"{tuple(x.shape)} with strides {x.stride()}")
    n, c = x.shape[:2]
    if not (_power_of_two(c) and _power_of_two(groups) and c >= groups):
        raise ValueError(f"group_norm_act_nhwc needs power-of-two channels >= groups; got C={c}, groups={groups}")
    hw, rows = x.numel() // max(n * c, 1), max(TILE_ELEMENTS // c, 1)
    return _Tiling(n, hw, c, rows, triton.cdiv(hw, rows))


def _chunk_counts(hw: int, rows: int, chunks: int, values_per_row: int, device) -> Tensor:
    """[K] number of values of one group in each tile (the last tile may be partial)."""
    counts = torch.full((chunks,), float(rows * values_per_row), device=device)
    counts[-1] = float((hw - (chunks - 1) * rows) * values_per_row)
    return counts


def group_norm_statistics(x: Tensor, groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """Channels-last x [N, C, *spatial] -> (mean, rstd), float32 [N, G]."""
    return _statistics(x, groups, eps, _layout(x, groups))


def _statistics(x: Tensor, groups: int, eps: float, t: _Tiling) -> tuple[Tensor, Tensor]:
    partial_mean = torch.empty(t.n, t.chunks, groups, device=x.device, dtype=torch.float32)
    partial_m2 = torch.empty_like(partial_mean)
    _group_norm_stats_kernel[(t.n, t.chunks)](x, partial_mean, partial_m2, t.hw, C=t.c, G=groups, ROWS=t.rows,
                                              num_warps=NUM_WARPS)
    counts = _chunk_counts(t.hw, t.rows, t.chunks, t.c // groups, x.device)[None, :, None]  # [1, K, 1]
    total = counts.sum()
    mean = (partial_mean * counts).sum(1) / total  # Chan's parallel combination of the tiles
    m2 = partial_m2.sum(1) + ((partial_mean - mean[:, None]).square() * counts).sum(1)
    return mean, torch.rsqrt(m2 / total + eps)


def _forward(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, silu: bool):
    t = _layout(x, groups)
    mean, rstd = _statistics(x, groups, eps, t)
    y = torch.empty_like(x)
    _group_norm_forward_kernel[(t.n, t.chunks)](x, y, mean, rstd, weight, bias, t.hw, C=t.c, G=groups,
                                                ROWS=t.rows, SILU=silu, num_warps=NUM_WARPS)
    return y, mean, rstd


def _backward(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor, groups: int,
              silu: bool) -> Tensor:
    dy = dy.movedim(1, -1).contiguous().movedim(-1, 1)  # x's channels-last strides (a no-op when it has them)
    t = _layout(x, groups)
    sum_a = torch.empty(t.n, t.chunks, groups, device=x.device, dtype=torch.float32)
    sum_ax = torch.empty_like(sum_a)
    meta = dict(C=t.c, G=groups, ROWS=t.rows, SILU=silu, num_warps=NUM_WARPS)
    _group_norm_backward_sums_kernel[(t.n, t.chunks)](dy, x, mean, rstd, weight, bias, sum_a, sum_ax, t.hw, **meta)
    values = t.hw * (t.c // groups)
    dx = torch.empty_like(x)
    _group_norm_backward_kernel[(t.n, t.chunks)](dy, x, dx, mean, rstd, weight, bias, sum_a.sum(1) / values,
                                                 sum_ax.sum(1) / values, t.hw, **meta)
    return dx


class _GroupNormActFunction(torch.autograd.Function):
    """Plain Triton calls inside an autograd.Function: torch.compile traces them and launches the kernels
    from its generated code, fusing the small statistics ops around them (a custom operator would stay
    an opaque Python call, whose launch overhead left the GPU idle a quarter of the encoder's time)."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float, silu: bool):
        y, mean, rstd = _forward(x, weight, bias, groups, eps, silu)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.groups, ctx.silu = groups, silu
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        return _backward(dy, x, weight, bias, mean, rstd, ctx.groups, ctx.silu), None, None, None, None, None


def group_norm_act_nhwc(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float = 1e-5,
                        silu: bool = False) -> Tensor:
    """Channels-last x [N, C, *spatial] -> y like x; differentiable in x only (weight, bias constant)."""
    return _GroupNormActFunction.apply(x, weight, bias, groups, eps, silu)


class GroupNormAct(nn.GroupNorm):
    """nn.GroupNorm, optionally followed by SiLU, with the Triton NHWC kernels where they apply.

    Same parameters and state-dict keys as the GroupNorm it replaces (`from_group_norm` shares them).
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 silu: bool = False, device=None, dtype=None):
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.silu = silu

    @classmethod
    def from_group_norm(cls, norm: nn.GroupNorm, silu: bool) -> "GroupNormAct":
        fused = cls(norm.num_groups, norm.num_channels, norm.eps, norm.affine, silu, device="meta")
        fused.weight, fused.bias = norm.weight, norm.bias
        return fused

    def uses_triton(self, x: Tensor) -> bool:
        c, g = self.num_channels, self.num_groups
        return (self.affine and not self.weight.requires_grad and not self.bias.requires_grad
                and _power_of_two(c) and _power_of_two(g) and triton_ready(x) and is_channels_last(x))

    def forward(self, x: Tensor) -> Tensor:
        if self.uses_triton(x):
            return group_norm_act_nhwc(x, self.weight, self.bias, self.num_groups, self.eps, self.silu)
        y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.silu(y) if self.silu else y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", silu={self.silu}"


def fuse_encoder_norms(encoder: nn.Module) -> int:
    """Swap a diffusers VAE Encoder's GroupNorms for GroupNormAct, in place; returns how many were swapped.

    ResNet blocks without a time embedding apply `nonlinearity` only right after norm1 and norm2, so
    a SiLU nonlinearity moves into both norms and becomes Identity; conv_norm_out absorbs conv_act the
    same way; attention group norms are swapped without activation. Other modules are left alone.
    """
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    swapped = 0
    for module in encoder.modules():
        if (isinstance(module, ResnetBlock2D) and module.time_emb_proj is None
                and isinstance(module.nonlinearity, nn.SiLU) and type(module.norm1) is nn.GroupNorm
                and type(module.norm2) is nn.GroupNorm):
            module.norm1 = GroupNormAct.from_group_norm(module.norm1, silu=True)
            module.norm2 = GroupNormAct.from_group_norm(module.norm2, silu=True)
            module.nonlinearity = nn.Identity()
            swapped += 2
        elif isinstance(module, Attention) and type(module.group_norm) is nn.GroupNorm:
            module.group_norm = GroupNormAct.from_group_norm(module.group_norm, silu=False)
            swapped += 1
    norm_out, act = getattr(encoder, "conv_norm_out", None), getattr(encoder, "conv_act", None)
    if type(norm_out) is nn.GroupNorm and isinstance(act, nn.SiLU):
        encoder.conv_norm_out = GroupNormAct.from_group_norm(norm_out, silu=True)
        encoder.conv_act = nn.Identity()
        swapped += 1
    return swapped
