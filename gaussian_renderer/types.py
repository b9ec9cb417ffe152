"""What goes into and out of the Gaussian rasterizer.

`RasterizeInputs` is the one structure every backend takes (N Gaussians seen by B cameras), validated
in one place (its ``__post_init__``); `RasterizeOutputs` is what every backend returns; `RenderOutput`
is what ``render`` hands to the trainer (channels first, depth normalised).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from scene.cameras import NEAR_PLANE, Cameras
from scene.gaussian_tensors import GaussianTensors

# the 3DGS rasterizer's low-pass dilation added to every 2D covariance (pixels^2)
EPS2D = 0.3


@dataclass(frozen=True)
class RasterizeInputs:
    """N Gaussians and B pinhole cameras of one image size, on one device; raises ValueError when they
    do not fit together (the field named, with the shape expected and the one given)."""

    gaussians: GaussianTensors  # N activated Gaussians
    viewmats: Tensor  # [B, 4, 4] world-to-camera transforms (OpenCV axes)
    Ks: Tensor  # [B, 3, 3] pixel intrinsics
    backgrounds: Tensor  # [B, 3] background colours ([3] is broadcast to every camera)
    width: int  # image size in pixels
    height: int
    near: float = NEAR_PLANE  # camera depths kept: (near, far]; Gaussians outside are culled
    far: float = 100.0
    eps2d: float = EPS2D
    # False (official): the depth image's gradient reaches the Gaussians only through the blend weights
    # (opacity, shape, 2D position), never their view depth z; True: also through z (the exact derivative)
    depth_grad_to_z: bool = False

    @classmethod
    def from_cameras(cls, gaussians: GaussianTensors, cameras: Cameras, background: Tensor,
                     eps2d: float = EPS2D, depth_grad_to_z: bool = False) -> "RasterizeInputs":
        """The cameras' matrices and the background in the Gaussians' dtype."""
        dtype = gaussians.means.dtype
        return cls(gaussians, cameras.world_to_camera.to(dtype), cameras.intrinsics().to(dtype),
                   background.to(dtype), cameras.width, cameras.height, cameras.near, cameras.far, eps2d,
                   depth_grad_to_z)

    @property
    def per_camera_scales(self) -> bool:
        """Whether the Gaussians carry one set of scales per camera ([B, N, 3], the official per-camera
        scale augmentation) rather than one shared set ([N, 3])."""
        return self.gaussians.scales.dim() == 3

    @property
    def device(self) -> torch.device:
        return self.viewmats.device

    def __post_init__(self) -> None:
        b = self.viewmats.shape[0]
        self._check_gaussians(b)
        if self.viewmats.shape != (b, 4, 4):
            raise ValueError(f"viewmats must be [B, 4, 4], got {tuple(self.viewmats.shape)}")
        if self.Ks.shape != (b, 3, 3):
            raise ValueError(f"Ks must be [B={b}, 3, 3], got {tuple(self.Ks.shape)}")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"image size must be positive, got {self.width}x{self.height}")
        background = self.backgrounds
        if background.device != self.device:
            raise ValueError(f"background is on {background.device} but cameras are on {self.device}")
        if background.shape == (3,):
            object.__setattr__(self, "backgrounds", background[None].expand(b, 3))
        elif background.shape != (b, 3):
            raise ValueError(f"background must be [3] or [B={b}, 3], got {tuple(background.shape)}")

    def _check_gaussians(self, b: int) -> None:
        gaussians = self.gaussians
        means = gaussians.means
        if means.dim() != 2 or means.shape[1] != 3:
            raise ValueError(f"gaussians.means must be [N, 3], got {tuple(means.shape)}")
        n = means.shape[0]
        for name, shape in {"quats": (n, 4), "opacities": (n,)}.items():
            value = getattr(gaussians, name)
            if tuple(value.shape) != shape:
                raise ValueError(f"gaussians.{name} must be {list(shape)} (N={n}), got {tuple(value.shape)}")
        if tuple(gaussians.scales.shape) not in ((n, 3), (b, n, 3)):
            raise ValueError(f"gaussians.scales must be [N={n}, 3] or one set per camera [B={b}, N={n}, 3], "
                             f"got {tuple(gaussians.scales.shape)}")
        sh = gaussians.sh_coeffs
        if sh.dim() != 3 or sh.shape[0] != n or sh.shape[2] != 3:
            raise ValueError(f"gaussians.sh_coeffs must be [N={n}, K, 3], got {tuple(sh.shape)}")
        degree = gaussians.sh_degree
        if not isinstance(degree, int) or not 0 <= degree <= 3:
            raise ValueError(f"gaussians.sh_degree must be an int in 0..3, got {degree!r}")
        if (degree + 1) ** 2 > sh.shape[1]:
            raise ValueError(
                f"gaussians.sh_degree={degree} needs K >= {(degree + 1) ** 2} SH coefficients, "
                f"got sh_coeffs {tuple(sh.shape)}"
            )
        for name in ("means", "quats", "scales", "opacities", "sh_coeffs"):
            value = getattr(gaussians, name)
            if not value.is_floating_point():
                raise ValueError(f"gaussians.{name} must be floating point, got {value.dtype}")
            if value.device != self.device:
                raise ValueError(f"gaussians.{name} is on {value.device} but cameras are on {self.device}")


class RasterizeOutputs(NamedTuple):
    """What every backend returns (channels last, as gsplat does)."""

    rgb: Tensor  # [B, H, W, 3] composited colour, background included
    accum_depth: Tensor  # [B, H, W, 1] sum_i z_i a_i T_i (background 0)
    alpha: Tensor  # [B, H, W, 1] accumulated opacity 1 - T_final
    # [B, N, 2] projected centres in pixels ([B, 1, N, 2] from gsplat with per-camera scales: the tensor
    # its rasterizer reads); .retain_grad() called when it requires grad
    means2d: Tensor
    radii: Tensor  # [B, N] int32 screen radius in pixels; 0 = not drawn


@dataclass
class RenderOutput:
    rgb: Tensor  # [B, 3, H, W] composited colour, background included
    depth: Tensor  # [B, 1, H, W] normalised disparity in [0, 1] (official formula; 1 = nearest)
    alpha: Tensor  # [B, 1, H, W] accumulated opacity (1 - final transmittance)
    means2d: Tensor  # [B, N, 2] (or [B, 1, N, 2], see RasterizeOutputs) projected centres; .grad after backward
    radii: Tensor  # [B, N] integer screen radius in pixels; 0 = not visible
    parts: "list[RenderOutput] | None" = None  # the per-call renders this batch was concatenated from

    def means2d_grad(self) -> Tensor | None:
        """[B, N, 2] dL/dmeans2d after backward (gathered from the parts of a concatenated render)."""
        if self.parts is None:
            grad = self.means2d.grad
            return None if grad is None else grad.reshape(self.radii.shape + (2,))
        grads = [p.means2d_grad() for p in self.parts]
        if any(g is None for g in grads):
            return None
        return torch.cat(grads)

    @staticmethod
    def concat(outs: "list[RenderOutput]") -> "RenderOutput":
        """Concatenate renders of camera batches along the camera axis."""
        if len(outs) == 1:
            return outs[0]
        return RenderOutput(rgb=torch.cat([o.rgb for o in outs]), depth=torch.cat([o.depth for o in outs]),
                            alpha=torch.cat([o.alpha for o in outs]), means2d=torch.cat([o.means2d for o in outs]),
                            radii=torch.cat([o.radii for o in outs]), parts=outs)
