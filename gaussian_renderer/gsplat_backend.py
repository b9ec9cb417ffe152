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

import logging
import threading
import time

import torch

from gaussian_renderer.types import RasterizeInputs, RasterizeOutputs

__all__ = ["rasterize_gsplat", "gsplat_available", "build_gsplat_in_background"]

logger = logging.getLogger(__name__)


def gsplat_available() -> bool:
    """True when gsplat imports."""
    try:
        import gsplat  # noqa: F401
    except ImportError:
        return False
    return True


def build_gsplat_in_background() -> threading.Thread:
    """Import gsplat's CUDA extension in a daemon thread, so that its JIT build (1-2 minutes on a fresh
    machine; the gsplat wheel ships no binaries, `gsplat/cuda/_backend.py` compiles at import) overlaps the
    model load and torch.compile instead of stalling the first render. The build runs in nvcc/ninja
    subprocesses, so the thread holds no GIL meanwhile; a render that comes first waits on Python's
    import lock of the module. Errors are left to that render's own import, which reports them."""

    def build() -> None:
        t0 = time.perf_counter()
        try:
            import gsplat.cuda._backend  # noqa: F401
        except Exception as exc:  # the render's import raises it again, where the user sees it
            logger.debug("gsplat's background build failed: %s", exc)
            return
        logger.info("gsplat's CUDA extension ready (%.1f s in the background)", time.perf_counter() - t0)

    thread = threading.Thread(target=build, name="gsplat-build", daemon=True)
    thread.start()
    return thread


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
