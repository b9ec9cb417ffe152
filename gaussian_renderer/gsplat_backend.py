"""gsplat (CUDA) backend: the same outputs as the PyTorch reference through ``gsplat.rasterization``.

gsplat is imported lazily, on the first render, so that CPU-only installs never touch it
(its CUDA kernels are compiled on first use).

Notes on gsplat 1.5 (checked in its source, ``gsplat/rendering.py`` and
``gsplat/cuda/csrc/*3DGS*.cu``):
- with ``sh_degree`` set, ``colors`` are SH coefficients [N, K, 3] evaluated in the direction
  mean - camera centre, and the colour is ``torch.clamp_min(colors + 0.5, 0.0)``, the same
  +0.5 offset and lower clamp as the 3DGS rasterizer (no upper clamp);
- pixel centres are (x + 0.5, y + 0.5); alpha = min(0.999, o G) (the 3DGS fork caps at 0.99;
  only opacities above 0.99 tell them apart), dropped below 1/255, and a pixel stops before
  the Gaussian that would bring T to 1e-4 or below;
- ``render_mode="RGB+D"`` appends the accumulated z-depth sum_i z_i a_i T_i as a fourth
  channel (its background is 0); the depth gradient reaches z_i;
- the projection uses an opacity-aware box (extent sqrt(2 ln(255 o)) <= 3.33 sigma per axis)
  and culls Gaussians with depth outside [near, far] or whose box misses the image;
- ``meta["means2d"]`` is the [C, N, 2] tensor the rasterizer reads; its .grad is dL/dmeans2d
  in pixels; ``meta["radii"]`` is int32 [C, N, 2] in 1.5 ([C, N] in older releases).
"""
from __future__ import annotations

import torch

from gaussian_renderer.types import RasterizeInputs, RasterizeOutputs

__all__ = ["rasterize_gsplat", "gsplat_available"]


def gsplat_available() -> bool:
    """True when gsplat imports."""
    try:
        import gsplat  # noqa: F401
    except ImportError:
        return False
    return True


def rasterize_gsplat(inputs: RasterizeInputs) -> RasterizeOutputs:
    """Renders N Gaussians into B cameras with gsplat; the same outputs as ``torch_backend.rasterize_torch``."""
    g = inputs.gaussians
    if g.means.dtype != torch.float32:
        raise ValueError(f"the gsplat backend renders float32 only, got gaussians of dtype {g.means.dtype}")
    from gsplat import rasterization

    render, alphas, meta = rasterization(
        means=g.means,
        quats=g.quats,
        scales=g.scales,
        opacities=g.opacities,
        colors=g.sh_coeffs,
        viewmats=inputs.viewmats,
        Ks=inputs.Ks,
        width=inputs.width,
        height=inputs.height,
        near_plane=inputs.near,
        far_plane=inputs.far,
        eps2d=inputs.eps2d,
        sh_degree=g.sh_degree,
        packed=False,
        backgrounds=inputs.backgrounds,
        render_mode="RGB+D",
        rasterize_mode="classic",
    )  # render [B, H, W, 4], alphas [B, H, W, 1]
    means2d = meta["means2d"]  # [B, N, 2]
    if means2d.requires_grad:
        means2d.retain_grad()
    radii = meta["radii"]
    if radii.dim() == 3:  # gsplat >= 1.5: per-axis radii [B, N, 2]
        radii = radii.amax(dim=-1)
    return RasterizeOutputs(render[..., :3], render[..., 3:4], alphas, means2d, radii.int())
