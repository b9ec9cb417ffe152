"""Orbit cameras for training and evaluation (official SegmentDreamer / LucidDreamer sampler).

World convention: z up; a camera at polar angle theta (from +z) and azimuth phi sits at
C = r (sin theta sin phi, sin theta cos phi, cos theta), so azimuth 0 is the +y side, the
object's front. Cameras look at a target (the origin unless jittered) with OpenCV axes
(x right, y down, z forward towards the target).

Training cameras come in stacks of ``stack_size`` (ModelParams.batch = 10) sharing one random
field of view; ``sample(count)`` pops cameras from random positions of the current stack and
starts a new stack when it runs empty, so one batch may mix two stacks. ``update_ranges`` is
the official progressive view expansion; new ranges apply only to stacks generated later.

The official code draws the stack's fov as FoVx and derives FoVy; here it is the vertical fov
and FoVx is derived. The two coincide at the square images every config uses.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from scene.cameras import Cameras

__all__ = [
    "wrap_degrees",
    "look_at_cameras",
    "orbit_cameras",
    "gen_random_pos",
    "OrbitCameraSampler",
    "evaluation_ring",
]

logger = logging.getLogger(__name__)

_RANGE_NAMES = ("radius_range", "theta_range", "phi_range", "fovy_range")


def wrap_degrees(angle_deg: Tensor) -> Tensor:
    """Maps angles in degrees to (-180, 180]."""
    return 180.0 - torch.remainder(180.0 - angle_deg, 360.0)


def look_at_cameras(
    centers: Tensor,
    targets: Tensor,
    up: Tensor,
    fov_y: Tensor,
    width: int,
    height: int,
    azimuth_deg: Tensor,
    polar_deg: Tensor,
    radius: Tensor,
) -> Cameras:
    """Cameras at ``centers`` looking at ``targets`` with OpenCV axes.

    Args:
        centers: [B, 3] camera centres (world).
        targets: [B, 3] look-at points.
        up: [B, 3] approximate up directions (need not be unit or orthogonal).
        fov_y: [B] vertical field of view in radians; fov_x follows through the focal length.
        width, height: image size.
        azimuth_deg, polar_deg, radius: [B] bookkeeping stored on the cameras (azimuth is
            wrapped to (-180, 180] here).

    Returns:
        Cameras with world_to_camera [B, 4, 4].
    """
    b = centers.shape[0]
    for name, value in (("centers", centers), ("targets", targets), ("up", up)):
        if value.shape != (b, 3):
            raise ValueError(f"{name} must be [B={b}, 3], got {tuple(value.shape)}")
    forward = F.normalize(targets - centers, dim=-1)  # [B, 3] camera +z
    right = torch.linalg.cross(forward, up, dim=-1)  # [B, 3] camera +x
    # Looking along the up vector leaves right undefined: fall back to world +y as up.
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    fallback = torch.linalg.cross(forward, torch.tensor([0.0, 1.0, 0.0]).to(forward).expand_as(forward), dim=-1)
    right = F.normalize(torch.where(degenerate, fallback, right), dim=-1)
    down = torch.linalg.cross(forward, right, dim=-1)  # [B, 3] camera +y
    rot = torch.stack([right, down, forward], dim=1)  # [B, 3, 3] rows = camera axes in world
    w2c = torch.zeros(b, 4, 4, dtype=centers.dtype, device=centers.device)
    w2c[:, :3, :3] = rot
    w2c[:, :3, 3] = -(rot @ centers[..., None]).squeeze(-1)
    w2c[:, 3, 3] = 1.0
    focal_y = 0.5 * height / torch.tan(0.5 * fov_y)
    fov_x = 2.0 * torch.atan(0.5 * width / focal_y)
    return Cameras(
        world_to_camera=w2c,
        fov_x=fov_x,
        fov_y=fov_y,
        azimuth_deg=wrap_degrees(azimuth_deg),
        polar_deg=polar_deg,
        radius=radius,
        width=width,
        height=height,
    )


def _orbit_positions(radius: Tensor, polar_deg: Tensor, azimuth_deg: Tensor) -> Tensor:
    theta = torch.deg2rad(polar_deg)
    phi = torch.deg2rad(azimuth_deg)
    return radius[:, None] * torch.stack(
        [torch.sin(theta) * torch.sin(phi), torch.sin(theta) * torch.cos(phi), torch.cos(theta)], dim=-1
    )  # [B, 3]


def orbit_cameras(
    radius: Tensor,
    polar_deg: Tensor,
    azimuth_deg: Tensor,
    fov_y: Tensor,
    width: int,
    height: int,
    target: Tensor | None = None,
    up: Tensor | None = None,
) -> Cameras:
    """Cameras on a sphere around the origin looking at ``target``.

    Args:
        radius, polar_deg, azimuth_deg, fov_y: [B] (degrees for the angles, radians for fov).
        width, height: image size.
        target: [B, 3] look-at points, default the origin.
        up: [B, 3] up directions, default +z.

    Returns:
        Cameras at C = r (sin t sin p, sin t cos p, cos t).
    """
    b = radius.shape[0]
    for name, value in (("polar_deg", polar_deg), ("azimuth_deg", azimuth_deg), ("fov_y", fov_y)):
        if value.shape != (b,):
            raise ValueError(f"{name} must be [B={b}] like radius, got {tuple(value.shape)}")
    centers = _orbit_positions(radius, polar_deg, azimuth_deg)
    if target is None:
        target = torch.zeros_like(centers)
    if up is None:
        up = torch.zeros_like(centers)
        up[:, 2] = 1.0
    return look_at_cameras(centers, target, up, fov_y, width, height, azimuth_deg, polar_deg, radius)


def gen_random_pos(
    count: int, value_range: tuple[float, float], gamma: float, generator: torch.Generator
) -> Tensor:
    """mid + sign * u ** gamma * half_width, u ~ U(0, 1), sign = +-1 equally likely.

    Returns:
        [count] float32 samples within ``value_range``.
    """
    lo, hi = float(value_range[0]), float(value_range[1])
    u = torch.rand(count, generator=generator)
    sign = torch.where(torch.rand(count, generator=generator) > 0.5, -1.0, 1.0)
    return 0.5 * (lo + hi) + sign * u.pow(gamma) * 0.5 * (hi - lo)


def _pair(value: Any) -> list[float]:
    lo, hi = value
    return [float(lo), float(hi)]


class OrbitCameraSampler:
    """Official random training cameras with stacks and progressive range expansion.

    Args:
        camera_cfg: GenerateCamParams-like object (radius_range, theta_range, phi_range,
            fovy_range and their max_* bounds, rand_cam_gamma, jitter_*, image_w, image_h,
            default_azimuth).
        optim_cfg: OptimizationParams-like object (use_progressive, progressive_view_iter,
            scale_up_cameras_iter, scale_up_factor, fovy_scale_up_factor, phi_scale_up_factor).
        generator: CPU torch.Generator driving every random draw of this sampler.
        stack_size: cameras per stack (ModelParams.batch).
    """

    def __init__(self, camera_cfg: Any, optim_cfg: Any, generator: torch.Generator, stack_size: int = 10):
        if stack_size <= 0:
            raise ValueError(f"stack_size must be positive, got {stack_size}")
        self.camera_cfg = camera_cfg
        self.optim_cfg = optim_cfg
        self.generator = generator
        self.stack_size = stack_size
        self.radius_range = _pair(camera_cfg.radius_range)
        self.theta_range = _pair(camera_cfg.theta_range)
        self.phi_range = _pair(camera_cfg.phi_range)
        self.fovy_range = _pair(camera_cfg.fovy_range)
        self.stack: Cameras | None = None

    def generate_stack(self) -> Cameras:
        """A fresh stack of ``stack_size`` cameras from the current ranges (one shared fov)."""
        cfg = self.camera_cfg
        n, g = self.stack_size, self.generator
        gamma = float(cfg.rand_cam_gamma)
        radius = gen_random_pos(n, self.radius_range, 1.0, g)
        theta = gen_random_pos(n, self.theta_range, gamma, g)
        phi = gen_random_pos(n, self.phi_range, gamma, g)
        phi = torch.where(phi < 0, phi + 360.0, phi)
        centers = _orbit_positions(radius, theta, phi)  # [n, 3]
        targets = torch.zeros_like(centers)
        up = torch.zeros_like(centers)
        up[:, 2] = 1.0
        if cfg.jitter_pose:
            jc = float(cfg.jitter_center)
            centers = centers + torch.rand(n, 3, generator=g) * jc - 0.5 * jc
            targets = targets + torch.randn(n, 3, generator=g) * float(cfg.jitter_target)
            up = up + torch.randn(n, 3, generator=g) * float(cfg.jitter_up)
        lo, hi = self.fovy_range
        fov = lo + (hi - lo) * torch.rand(1, generator=g)
        azimuth = phi - float(getattr(cfg, "default_azimuth", 0.0))
        return look_at_cameras(
            centers, targets, up, fov.expand(n).clone(), int(cfg.image_w), int(cfg.image_h), azimuth, theta, radius
        )

    def sample(self, count: int) -> Cameras:
        """Pops ``count`` cameras, each from a random position of the current stack."""
        if count <= 0:
            raise ValueError(f"count must be positive, got {count}")
        picked = []
        for _ in range(count):
            if self.stack is None or len(self.stack) == 0:
                self.stack = self.generate_stack()
            m = len(self.stack)
            i = int(torch.randint(m, (1,), generator=self.generator))
            picked.append(self.stack[i])
            keep = torch.cat([torch.arange(i), torch.arange(i + 1, m)])
            self.stack = self.stack[keep]
        return Cameras.cat(picked)

    def update_ranges(self, step: int) -> bool:
        """Official progressive view expansion; returns True when the ranges changed.

        Active when ``optim_cfg.use_progressive`` is False (the official flag is inverted), at
        steps >= progressive_view_iter that are multiples of scale_up_cameras_iter.
        """
        opt, cfg = self.optim_cfg, self.camera_cfg
        if opt.use_progressive:
            return False
        if step < opt.progressive_view_iter or step % opt.scale_up_cameras_iter != 0:
            return False
        fovy_lo_f, fovy_hi_f = _pair(opt.fovy_scale_up_factor)
        scale, phi_f = float(opt.scale_up_factor), float(opt.phi_scale_up_factor)
        max_fovy, max_radius = _pair(cfg.max_fovy_range), _pair(cfg.max_radius_range)
        max_theta, max_phi = _pair(cfg.max_theta_range), _pair(cfg.max_phi_range)
        self.fovy_range = [
            max(max_fovy[0], self.fovy_range[0] * fovy_lo_f),
            min(max_fovy[1], self.fovy_range[1] * fovy_hi_f),
        ]
        self.radius_range = [
            max(max_radius[0], self.radius_range[0] * scale),
            max(max_radius[1], self.radius_range[1] * scale),
        ]
        self.theta_range = [
            max(max_theta[0], self.theta_range[0] / phi_f),
            min(max_theta[1], self.theta_range[1] * phi_f),
        ]
        self.phi_range = [
            max(max_phi[0], self.phi_range[0] * phi_f),
            min(max_phi[1], self.phi_range[1] * phi_f),
        ]
        logger.info(
            "step %d: camera ranges radius %s theta %s phi %s fovy %s",
            step, self.radius_range, self.theta_range, self.phi_range, self.fovy_range,
        )
        return True

    def state_dict(self) -> dict[str, Any]:
        """Ranges, the current stack and the generator state: enough to resume identically."""
        state: dict[str, Any] = {name: list(getattr(self, name)) for name in _RANGE_NAMES}
        state["stack_size"] = self.stack_size
        state["generator_state"] = self.generator.get_state()
        if self.stack is None:
            state["stack"] = None
        else:
            s = self.stack
            state["stack"] = {
                "world_to_camera": s.world_to_camera.clone(),
                "fov_x": s.fov_x.clone(),
                "fov_y": s.fov_y.clone(),
                "azimuth_deg": s.azimuth_deg.clone(),
                "polar_deg": s.polar_deg.clone(),
                "radius": s.radius.clone(),
                "width": s.width,
                "height": s.height,
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in _RANGE_NAMES:
            setattr(self, name, _pair(state[name]))
        self.stack_size = int(state["stack_size"])
        if state.get("generator_state") is not None:
            self.generator.set_state(state["generator_state"])
        stack = state["stack"]
        self.stack = None if stack is None else Cameras(**stack)


def evaluation_ring(
    camera_cfg: Any, n_views: int, with_45: bool, width: int | None = None, height: int | None = None
) -> Cameras:
    """Evenly spaced views around the object (official GenerateCircleCameras).

    Polar ``default_polar``, radius ``default_radius``, fov ``default_fovy``, azimuths i/n*360.
    With ``with_45`` a second ring at polar floor(default_polar * 2 / 3) (60 for 90) follows.

    Returns:
        Cameras with n_views (or 2 n_views) entries.
    """
    if n_views <= 0:
        raise ValueError(f"n_views must be positive, got {n_views}")
    width = int(camera_cfg.image_w) if width is None else width
    height = int(camera_cfg.image_h) if height is None else height
    polars = [float(camera_cfg.default_polar)]
    if with_45:
        polars.append(float(math.floor(float(camera_cfg.default_polar) * 2 / 3)))
    azimuth = torch.arange(n_views, dtype=torch.float32) / n_views * 360.0
    azimuth = azimuth.repeat(len(polars))
    polar = torch.tensor(polars).repeat_interleave(n_views)
    total = azimuth.shape[0]
    radius = torch.full((total,), float(camera_cfg.default_radius))
    fov = torch.full((total,), float(camera_cfg.default_fovy))
    az_rel = azimuth - float(getattr(camera_cfg, "default_azimuth", 0.0))
    centers = _orbit_positions(radius, polar, azimuth)
    up = torch.zeros_like(centers)
    up[:, 2] = 1.0
    return look_at_cameras(centers, torch.zeros_like(centers), up, fov, width, height, az_rel, polar, radius)
