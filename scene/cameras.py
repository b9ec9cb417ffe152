"""Camera batches: the one camera type every module shares.

A `Cameras` object is a batch of B pinhole cameras in the OpenCV convention
(x right, y down, z forward), placed in a z-up world. Azimuth 0 is the front
(+y side of the object); it drives the view-dependent prompts.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

# Gaussians at view depth <= 0.2 are culled, as the official rasterizer's `in_frustum` does
# (LucidDreamer's diff-gaussian-rasterization fork, `auxiliary.h`).
NEAR_PLANE = 0.2


def centers_from_view_matrices(world_to_camera: Tensor) -> Tensor:
    """[B, 4, 4] world-to-camera matrices -> [B, 3] camera centres, the translation of their inverse.

    This is the point the matrix maps to the camera origin, for any invertible matrix: the official
    `scene/cameras.py` and gsplat take the same inverse. -R^T t equals it only when R is orthonormal;
    the official sampler's jittered rotations are sheared (`scene/dataset_readers.py`), so it is not.
    """
    # inv_ex: no error check, so no host sync on CUDA (a view matrix is invertible by construction)
    return torch.linalg.inv_ex(world_to_camera).inverse[:, :3, 3]


@dataclass(frozen=True)
class Cameras:
    world_to_camera: Tensor  # [B, 4, 4] world-to-camera transform, OpenCV axes (rigid from our sampler)
    fov_x: Tensor  # [B] horizontal field of view, radians
    fov_y: Tensor  # [B] vertical field of view, radians
    azimuth_deg: Tensor  # [B] azimuth relative to the front, wrapped to (-180, 180]
    polar_deg: Tensor  # [B] polar angle from +z, degrees
    radius: Tensor  # [B] distance of the camera centre from the look-at target
    width: int
    height: int
    near: float = NEAR_PLANE
    far: float = 100.0

    def __post_init__(self) -> None:
        b = self.world_to_camera.shape[0]
        if self.world_to_camera.shape != (b, 4, 4):
            raise ValueError(f"world_to_camera must be [B, 4, 4], got {tuple(self.world_to_camera.shape)}")
        for name in ("fov_x", "fov_y", "azimuth_deg", "polar_deg", "radius"):
            value = getattr(self, name)
            if value.shape != (b,):
                raise ValueError(f"{name} must be [B={b}], got {tuple(value.shape)}")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"image size must be positive, got {self.width}x{self.height}")

    def __len__(self) -> int:
        return self.world_to_camera.shape[0]

    @property
    def device(self) -> torch.device:
        return self.world_to_camera.device

    def intrinsics(self) -> Tensor:
        """[B, 3, 3] pixel-space intrinsics; the principal point is the image centre."""
        fx = 0.5 * self.width / torch.tan(0.5 * self.fov_x)
        fy = 0.5 * self.height / torch.tan(0.5 * self.fov_y)
        k = torch.zeros(len(self), 3, 3, dtype=self.world_to_camera.dtype, device=self.device)
        k[:, 0, 0] = fx
        k[:, 1, 1] = fy
        k[:, 0, 2] = 0.5 * self.width
        k[:, 1, 2] = 0.5 * self.height
        k[:, 2, 2] = 1.0
        return k

    def camera_centers(self) -> Tensor:
        """[B, 3] camera centres in world coordinates (see centers_from_view_matrices)."""
        return centers_from_view_matrices(self.world_to_camera)

    def to(self, device: torch.device | str) -> "Cameras":
        return replace(
            self,
            world_to_camera=self.world_to_camera.to(device),
            fov_x=self.fov_x.to(device),
            fov_y=self.fov_y.to(device),
            azimuth_deg=self.azimuth_deg.to(device),
            polar_deg=self.polar_deg.to(device),
            radius=self.radius.to(device),
        )

    def __getitem__(self, index: int | slice | Tensor) -> "Cameras":
        if isinstance(index, int):
            index = slice(index, index + 1)
        return replace(
            self,
            world_to_camera=self.world_to_camera[index],
            fov_x=self.fov_x[index],
            fov_y=self.fov_y[index],
            azimuth_deg=self.azimuth_deg[index],
            polar_deg=self.polar_deg[index],
            radius=self.radius[index],
        )

    @staticmethod
    def cat(batches: list["Cameras"]) -> "Cameras":
        first = batches[0]
        if any((c.width, c.height) != (first.width, first.height) for c in batches):
            raise ValueError("cannot concatenate camera batches of different image sizes")
        return replace(
            first,
            world_to_camera=torch.cat([c.world_to_camera for c in batches]),
            fov_x=torch.cat([c.fov_x for c in batches]),
            fov_y=torch.cat([c.fov_y for c in batches]),
            azimuth_deg=torch.cat([c.azimuth_deg for c in batches]),
            polar_deg=torch.cat([c.polar_deg for c in batches]),
            radius=torch.cat([c.radius for c in batches]),
        )
