"""Initial point clouds for the Gaussians (official `readCircleCamInfo`, reference section 2.1).

`initial_points(camera_cfg, generator)` returns positions and colours for
`GaussianModel.from_points`. Shapes (GenerateCamParams.init_shape):

    sphere       r ~ U(0, 0.5), theta ~ U(0, pi), phi ~ U(0, 2 pi) (official, not uniform in volume)
    box          U[-0.5, 0.5]^3
    rectangle_x  x in [-0.3, 0.3], y in [-0.6, 0.6], z in [-0.25, 0.25]
    rectangle_z  x in [-0.4, 0.4], y in [-0.3, 0.3], z in [-0.6, 0.6]
    scene        shell, r in [3 radius_range[1], 3 radius_range[1] + 1)
    ply          points and colours of GenerateCamParams.init_path (point cloud or 3DGS PLY)
    pointe       Point-E text-to-point-cloud (optional package), each point expanded to a ball

Primitives and Point-E (unless use_pointe_rgb) get the official near-grey colour
rgb = 0.5 + C0 * U(0, 1) / 255. All randomness comes from the given torch generator.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from scene.gaussian_model import sh_to_rgb
from scene.ply_format import read_ply

logger = logging.getLogger(__name__)

POINTE_MISSING = (
    "GenerateCamParams.init_shape: pointe needs the point-e package (not on PyPI): see "
    "submodules/README.md to install it, or set init_shape to one of sphere, box, rectangle_x, "
    "rectangle_z, ply"
)
SHAPEE_UNSUPPORTED = (
    "GenerateCamParams.init_shape: shapee is not supported (Shap-E is not packaged here): see "
    "submodules/README.md; use init_shape pointe, or export a Shap-E result as a coloured point-cloud "
    "PLY and use init_shape ply with init_path"
)
POINTE_POINTS = 4096  # base40M-textvec (1024) + upsample (3072)
POINTE_BALL_RADIUS = 0.05


def initial_points(camera_cfg: Any, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Initial point cloud for `camera_cfg.init_shape`.

    camera_cfg: GenerateCamParams section (init_shape, init_num_pts, init_prompt, init_path,
        use_pointe_rgb, radius_range).
    Returns xyz [N, 3] and rgb [N, 3] (float32, CPU).
    """
    shape = camera_cfg.init_shape
    if shape == "ply":
        return _ply_points(camera_cfg.init_path)
    if shape == "pointe":
        return _pointe_points(camera_cfg, generator)
    if shape == "shapee":
        raise RuntimeError(SHAPEE_UNSUPPORTED)
    if shape not in PRIMITIVES:
        valid = ", ".join([*PRIMITIVES, "ply", "pointe"])
        raise ValueError(f"GenerateCamParams.init_shape must be one of {valid}; got {shape!r}")
    n = int(camera_cfg.init_num_pts)
    if n <= 0:
        raise ValueError(f"GenerateCamParams.init_num_pts must be positive, got {camera_cfg.init_num_pts}")
    xyz = PRIMITIVES[shape](n, camera_cfg, generator)
    logger.info("Initial point cloud: %s with %d points", shape, n)
    return xyz.float(), grey_colors(n, generator)


# ---------------------------------------------------------------------- primitives


def _uniform(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """U[0, 1) in float64 on the CPU, drawn from `generator`."""
    return torch.rand(shape, generator=generator, dtype=torch.float64, device=generator.device).cpu()


def spherical_points(radius: Tensor, theta: Tensor, phi: Tensor) -> Tensor:
    """Official parameterisation r (sin t sin p, sin t cos p, cos t). [N] x 3 -> [N, 3]"""
    sin_theta = torch.sin(theta)
    return torch.stack([radius * sin_theta * torch.sin(phi), radius * sin_theta * torch.cos(phi), radius * torch.cos(theta)], -1)


def _random_spherical(n: int, r_min: float, r_span: float, generator: torch.Generator) -> Tensor:
    """r ~ U(r_min, r_min + r_span), theta ~ U(0, pi), phi ~ U(0, 2 pi), in the official draw order."""
    theta = _uniform((n,), generator) * math.pi
    phi = _uniform((n,), generator) * 2 * math.pi
    radius = _uniform((n,), generator) * r_span + r_min
    return spherical_points(radius, theta, phi)


def _box_points(low: tuple[float, float, float], high: tuple[float, float, float]) -> Callable:
    def sample(n: int, camera_cfg: Any, generator: torch.Generator) -> Tensor:
        lo, hi = torch.tensor(low, dtype=torch.float64), torch.tensor(high, dtype=torch.float64)
        return _uniform((n, 3), generator) * (hi - lo) + lo

    return sample


def _sphere(n: int, camera_cfg: Any, generator: torch.Generator) -> Tensor:
    return _random_spherical(n, 0.0, 0.5, generator)


def _scene(n: int, camera_cfg: Any, generator: torch.Generator) -> Tensor:
    return _random_spherical(n, 3.0 * float(camera_cfg.radius_range[1]), 1.0, generator)


PRIMITIVES: dict[str, Callable[[int, Any, torch.Generator], Tensor]] = {
    "sphere": _sphere,
    "box": _box_points((-0.5, -0.5, -0.5), (0.5, 0.5, 0.5)),
    "rectangle_x": _box_points((-0.3, -0.6, -0.25), (0.3, 0.6, 0.25)),
    "rectangle_z": _box_points((-0.4, -0.3, -0.6), (0.4, 0.3, 0.6)),
    "scene": _scene,
}


def grey_colors(n: int, generator: torch.Generator) -> Tensor:
    """Official initial colour: SH value U(0, 1) / 255 converted to RGB (about 0.5). -> [N, 3]"""
    return sh_to_rgb(_uniform((n, 3), generator) / 255.0).float()


# ---------------------------------------------------------------------- PLY


def _ply_points(init_path: str | None) -> tuple[Tensor, Tensor]:
    """Points and colours of a point-cloud PLY (x, y, z, red, green, blue) or a 3DGS PLY (f_dc_*)."""
    if not init_path:
        raise ValueError("GenerateCamParams.init_path must name a PLY file when init_shape is ply")
    path = Path(init_path).expanduser()
    vertex = read_ply(path, "GenerateCamParams.init_path")["vertex"]
    names = [prop.name for prop in vertex.properties]
    if not {"x", "y", "z"} <= set(names):
        raise ValueError(f"GenerateCamParams.init_path {str(path)!r}: no x, y, z properties (found {names})")
    xyz = _stack(vertex, ("x", "y", "z"))
    logger.info("Initial point cloud: %d points from %s", xyz.shape[0], path)
    return torch.from_numpy(xyz).float(), torch.from_numpy(_ply_colors(vertex, names, path)).float()


def _ply_colors(vertex, names: list[str], path: Path) -> np.ndarray:
    if {"red", "green", "blue"} <= set(names):
        rgb = _stack(vertex, ("red", "green", "blue"))
        dtype = np.asarray(vertex["red"]).dtype
        return rgb / np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else rgb
    if {"f_dc_0", "f_dc_1", "f_dc_2"} <= set(names):
        return sh_to_rgb(_stack(vertex, ("f_dc_0", "f_dc_1", "f_dc_2")))
    raise ValueError(
        f"GenerateCamParams.init_path {str(path)!r}: no colours (need red, green, blue or f_dc_0..2; found {names})"
    )


def _stack(vertex, names: tuple[str, ...]) -> np.ndarray:
    return np.stack([np.asarray(vertex[name], dtype=np.float64) for name in names], axis=1)


# ---------------------------------------------------------------------- Point-E


def _pointe_points(camera_cfg: Any, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Official Point-E initialisation: 4096 points, mirrored in y, z + 0.15, each replaced by the
    same pattern of int(init_num_pts / 5000) points in a ball of radius 0.05."""
    try:
        import point_e  # noqa: F401
    except ImportError as error:
        raise RuntimeError(POINTE_MISSING) from error
    per_point = int(camera_cfg.init_num_pts / 5000)
    if per_point < 1:
        raise ValueError(f"GenerateCamParams.init_num_pts must be >= 5000 for pointe, got {camera_cfg.init_num_pts}")
    coords, colors = _run_pointe(str(camera_cfg.init_prompt), generator)  # [P, 3] each
    coords[:, 1] = -coords[:, 1]
    coords[:, 2] = coords[:, 2] + 0.15
    ball = _random_spherical(per_point, 0.0, POINTE_BALL_RADIUS, generator)  # [M, 3]
    xyz = (coords[:, None, :] + ball[None, :, :]).reshape(-1, 3)
    n = xyz.shape[0]
    if camera_cfg.use_pointe_rgb:
        jitter = _uniform((coords.shape[0], per_point, 3), generator) * 1e-4
        rgb = (colors[:, None, :] + jitter).reshape(-1, 3).float()
    else:
        rgb = grey_colors(n, generator)
    logger.info("Initial point cloud: Point-E %r, %d points", camera_cfg.init_prompt, n)
    return xyz.float(), rgb


def _run_pointe(prompt: str, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """base40M-textvec (guidance 3.0) + upsample (guidance 0.0), aux R, G, B. -> [4096, 3] x 2 (float64)"""
    from point_e.diffusion.configs import DIFFUSION_CONFIGS, diffusion_from_config
    from point_e.diffusion.sampler import PointCloudSampler
    from point_e.models.configs import MODEL_CONFIGS, model_from_config
    from point_e.models.download import load_checkpoint

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models, diffusions = [], []
    for name in ("base40M-textvec", "upsample"):
        model = model_from_config(MODEL_CONFIGS[name], device)
        model.eval()
        model.load_state_dict(load_checkpoint(name, device))
        models.append(model)
        diffusions.append(diffusion_from_config(DIFFUSION_CONFIGS[name]))
    sampler = PointCloudSampler(
        device=device,
        models=models,
        diffusions=diffusions,
        num_points=[1024, POINTE_POINTS - 1024],
        aux_channels=["R", "G", "B"],
        guidance_scale=[3.0, 0.0],
        model_kwargs_key_filter=("texts", ""),
    )
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        samples = None
        for samples in sampler.sample_batch_progressive(batch_size=1, model_kwargs={"texts": [prompt]}):
            pass
    cloud = sampler.output_to_point_clouds(samples)[0]
    coords = torch.from_numpy(np.asarray(cloud.coords, dtype=np.float64))
    colors = torch.from_numpy(np.stack([np.asarray(cloud.channels[c], dtype=np.float64) for c in "RGB"], axis=1))
    return coords, colors
