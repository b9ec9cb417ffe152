"""Differentiable Gaussian-splatting renderer: ``render(gaussians, cameras, background)``.

Two backends produce the same outputs: gsplat (CUDA kernels) and a pure-PyTorch reference
(any device, used by the CPU tests). Both composite colour, accumulated depth and alpha; the
depth is then turned into the official normalised disparity (``depth.normalized_disparity``).
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from gaussian_renderer.depth import normalized_disparity
from gaussian_renderer.gsplat_backend import gsplat_available, rasterize_gsplat
from gaussian_renderer.torch_backend import rasterize_torch
from gaussian_renderer.types import RasterizeInputs, RenderOutput
from scene.cameras import Cameras
from scene.gaussian_tensors import GaussianTensors

__all__ = ["render", "render_in_chunks", "resolve_backend", "RenderOutput", "normalized_disparity"]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "gsplat")
_warned_no_gsplat = False


def resolve_backend(backend: str, device: torch.device) -> str:
    """Maps "auto" to "gsplat" on CUDA when gsplat imports, else "torch"; validates the name."""
    global _warned_no_gsplat
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        if gsplat_available():
            return "gsplat"
        if not _warned_no_gsplat:
            logger.warning("gsplat is not importable; rendering on CUDA with the slow PyTorch backend")
            _warned_no_gsplat = True
        return "torch"
    if backend == "gsplat":
        if device.type != "cuda":
            raise ValueError(f"backend 'gsplat' needs CUDA tensors, got device {device}")
        if not gsplat_available():
            raise ValueError("backend 'gsplat' requested but gsplat is not importable (pip install gsplat)")
    return backend


def render(
    gaussians: GaussianTensors,
    cameras: Cameras,
    background: Tensor,
    backend: str = "auto",
    depth_grad_to_z: bool = False,
) -> RenderOutput:
    """Renders the Gaussians into every camera of the batch.

    Args:
        gaussians: activated parameters (N Gaussians) on the cameras' device; scales [N, 3], or
            [B, N, 3] for one set per camera (the official per-camera scale augmentation).
        cameras: B cameras, all of one image size.
        background: [3] or [B, 3] background colour(s).
        backend: "auto" (gsplat on CUDA when it imports, else "torch"), "torch" or "gsplat".
        depth_grad_to_z: False (the official rasterizer's rule): the depth image's gradient reaches
            the Gaussians through the blend weights only; True: also through their view depth z.

    Returns:
        RenderOutput with rgb [B, 3, H, W], normalised disparity [B, 1, H, W], alpha
        [B, 1, H, W], means2d [B, N, 2] (holds .grad after backward) and radii [B, N].
        ``means2d.grad`` is dL/d(pixel position); the 3DGS rasterizer's viewspace-point
        gradient (the one its densification threshold refers to) is dL/d(NDC), i.e. this
        gradient times (W / 2, H / 2).
    """
    inputs = RasterizeInputs.from_cameras(gaussians, cameras, background, depth_grad_to_z=depth_grad_to_z)
    name = resolve_backend(backend, cameras.device)
    rasterize = rasterize_gsplat if name == "gsplat" else rasterize_torch
    rgb, accum_depth, alpha, means2d, radii = rasterize(inputs)  # channels last, see RasterizeOutputs
    accum_depth = accum_depth.permute(0, 3, 1, 2)
    alpha = alpha.permute(0, 3, 1, 2)
    return RenderOutput(
        rgb=rgb.permute(0, 3, 1, 2),
        depth=normalized_disparity(accum_depth, alpha, cameras.fov_x),
        alpha=alpha,
        means2d=means2d,
        radii=radii,
    )


def render_in_chunks(
    gaussians: GaussianTensors,
    cameras: Cameras,
    background: Tensor,
    chunk: int = 8,
    backend: str = "auto",
) -> RenderOutput:
    """Renders many cameras (evaluation rings, videos) `chunk` at a time to bound memory.

    Args:
        gaussians: activated parameters on the device to render on.
        cameras: any number of cameras, on any device (each chunk is moved to the Gaussians' device).
        background: [3] colour shared by every view.
    """
    device = gaussians.means.device
    outs = []
    for start in range(0, len(cameras), chunk):
        batch = cameras[start:start + chunk].to(device)
        outs.append(render(gaussians, batch, background.expand(len(batch), 3), backend=backend))
    return RenderOutput.concat(outs)
