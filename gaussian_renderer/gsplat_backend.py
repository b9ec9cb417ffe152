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
  channel whose gradient also reaches z_i; the official rasterizer (LucidDreamer's fork of
  diff-gaussian-rasterization, ``backward.cu``) passes the depth image's gradient only into the
  blend weights. So colours are evaluated here (the same SH evaluation and clamp gsplat's wrapper
  runs before its kernels) and the view depth z_i goes in as a fourth feature channel, detached
  unless ``depth_grad_to_z``: the compositing still carries the depth's gradient into alpha
  (opacity, conic, 2D mean), as the fork does;
- the projection uses an opacity-aware box (extent sqrt(2 ln(255 o)) <= 3.33 sigma per axis)
  and culls Gaussians with depth outside [near, far] or whose box misses the image;
- batch dimensions: means [..., N, 3] with viewmats [..., C, 4, 4]. One scale set per camera
  (the official per-camera scale noise) is rendered as B batches of one camera each, still one
  call: means / quats / opacities broadcast (expand, no copy), scales [B, N, 3];
- ``meta["means2d"]`` is the [..., C, N, 2] tensor the rasterizer reads; its .grad is dL/dmeans2d
  in pixels; ``meta["radii"]`` is int32 [..., C, N, 2] in 1.5 ([..., C, N] in older releases).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Iterator

import torch

from gaussian_renderer.torch_backend import sh_to_rgb
from gaussian_renderer.types import RasterizeInputs, RasterizeOutputs
from scene.cameras import centers_from_view_matrices

__all__ = ["rasterize_gsplat", "gsplat_arguments", "gsplat_available", "build_gsplat_in_background"]

logger = logging.getLogger(__name__)


def gsplat_available() -> bool:
    """True when gsplat imports."""
    try:
        import gsplat  # noqa: F401
    except ImportError:
        return False
    return True


def gsplat_arguments(inputs: RasterizeInputs) -> dict:
    """Keyword arguments of ``gsplat.rasterization`` for these inputs (pure PyTorch: runs on any device).

    Colours [B, N, 3] and the view depth z [B, N] (detached unless inputs.depth_grad_to_z) are
    rendered as four feature channels (render_mode "RGB"); with per-camera scales every camera
    is its own batch entry (leading dimension B, C = 1).
    """
    g = inputs.gaussians
    viewmats = inputs.viewmats  # [B, 4, 4]
    b = viewmats.shape[0]
    colors = sh_to_rgb(g.means, g.sh_coeffs, g.sh_degree, centers_from_view_matrices(viewmats))  # [B, N, 3]
    z = torch.einsum("bj,nj->bn", viewmats[:, 2, :3], g.means) + viewmats[:, 2, 3:]  # [B, N] view depth
    if not inputs.depth_grad_to_z:
        z = z.detach()
    features = torch.cat([colors, z[..., None]], dim=-1)  # [B, N, 4]
    backgrounds = torch.cat([inputs.backgrounds, inputs.backgrounds.new_zeros(b, 1)], dim=-1)  # [B, 4], depth 0
    args = dict(means=g.means, quats=g.quats, scales=g.scales, opacities=g.opacities, colors=features,
                viewmats=viewmats, Ks=inputs.Ks, backgrounds=backgrounds)
    if inputs.per_camera_scales:  # B batches of one camera: [B, N, ...] Gaussians, [B, 1, ...] cameras
        n = g.means.shape[0]
        args.update(means=g.means.expand(b, n, 3), quats=g.quats.expand(b, n, 4), opacities=g.opacities.expand(b, n),
                    colors=features[:, None], viewmats=viewmats[:, None], Ks=inputs.Ks[:, None],
                    backgrounds=backgrounds[:, None])
    return dict(args, width=inputs.width, height=inputs.height, near_plane=inputs.near, far_plane=inputs.far,
                eps2d=inputs.eps2d, sh_degree=None, packed=False, render_mode="RGB", rasterize_mode="classic")


def build_gsplat_in_background() -> threading.Thread:
    """Import gsplat's CUDA extension in a daemon thread, so that its JIT build (1-2 minutes on a fresh
    machine; the gsplat wheel ships no binaries, `gsplat/cuda/_backend.py` compiles at import) overlaps the
    model load and torch.compile instead of stalling the first render. The build runs in nvcc/ninja
    subprocesses, so the thread holds no GIL meanwhile; a render that comes first waits on Python's
    import lock of the module. Errors are left to that render's own import, which reports them.

    Without MAX_JOBS in the environment, gsplat builds with 10 parallel jobs; the build here uses one job
    per CPU core instead (a user's MAX_JOBS is kept) and leaves the environment as it found it."""

    def build() -> None:
        t0 = time.perf_counter()
        try:
            with build_jobs(os.cpu_count() or 1):
                import gsplat.cuda._backend  # noqa: F401
        except Exception as exc:  # the render's import raises it again, where the user sees it
            logger.debug("gsplat's background build failed: %s", exc)
            return
        logger.info("gsplat's CUDA extension ready (%.1f s in the background)", time.perf_counter() - t0)

    thread = threading.Thread(target=build, name="gsplat-build", daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def build_jobs(default: int) -> Iterator[None]:
    """MAX_JOBS (parallel nvcc/c++ jobs of torch's JIT build) set to `default` inside the block unless the
    user set it; removed again afterwards."""
    if os.environ.get("MAX_JOBS"):
        yield
        return
    os.environ["MAX_JOBS"] = str(default)
    try:
        yield
    finally:
        os.environ.pop("MAX_JOBS", None)


def rasterize_gsplat(inputs: RasterizeInputs) -> RasterizeOutputs:
    """Renders N Gaussians into B cameras with gsplat; the same outputs as ``torch_backend.rasterize_torch``."""
    g = inputs.gaussians
    if g.means.dtype != torch.float32:
        raise ValueError(f"the gsplat backend renders float32 only, got gaussians of dtype {g.means.dtype}")
    from gsplat import rasterization

    b, n = inputs.viewmats.shape[0], g.means.shape[0]
    render, alphas, meta = rasterization(**gsplat_arguments(inputs))  # [B, (1,) H, W, 4], [B, (1,) H, W, 1]
    render = render.reshape(b, inputs.height, inputs.width, 4)
    alphas = alphas.reshape(b, inputs.height, inputs.width, 1)
    means2d = meta["means2d"]  # [B, N, 2] or [B, 1, N, 2]
    if means2d.requires_grad:
        means2d.retain_grad()
    radii = meta["radii"]
    if radii.shape[-1] == 2 and radii.dim() == means2d.dim():  # gsplat >= 1.5: per-axis radii [..., N, 2]
        radii = radii.amax(dim=-1)
    return RasterizeOutputs(render[..., :3], render[..., 3:4], alphas, means2d, radii.reshape(b, n).int())
