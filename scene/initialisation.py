"""Initial point clouds for the Gaussians (official `readCircleCamInfo`, zjhJOJO/SegmentDreamer
`scene/dataset_readers.py`).

`initial_points(camera_cfg, generator)` returns positions and colours for
`GaussianModel.from_points`. Shapes (GenerateCamParams.init_shape):

    sphere       r ~ U(0, 0.5), theta ~ U(0, pi), phi ~ U(0, 2 pi) (official, not uniform in volume)
    box          U[-0.5, 0.5]^3
    rectangle_x  x in [-0.3, 0.3], y in [-0.6, 0.6], z in [-0.25, 0.25]
    rectangle_z  x in [-0.4, 0.4], y in [-0.3, 0.3], z in [-0.6, 0.6]
    scene        shell, r in [3 radius_range[1], 3 radius_range[1] + 1)
    ply          points and colours of GenerateCamParams.init_path (point cloud or 3DGS PLY), as they are
    pointe       Point-E text-to-point-cloud (optional package): 4096 points
    shapee       Shap-E text-to-mesh (diffusers): its vertices, 4096 drawn when it has more than 10,000
    mesh         4096 points on the surface of the mesh / point cloud in init_path (PLY, OBJ, GLB, ...)

pointe, shapee and mesh expand each of their points into the same ball of int(init_num_pts / 5000)
points of radius 0.05 (official; below 5000, init_num_pts of their points are kept, one each); pointe
and shapee are also mirrored in y and raised by 0.15 in z (official: their generators' frame to the
training cameras' frame). Primitives, and the others unless use_pointe_rgb, get the official near-grey
colour rgb = 0.5 + C0 * U(0, 1) / 255. All randomness comes from the given torch generator.
"""
from __future__ import annotations

import collections
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
    "submodules/README.md to install it, or set init_shape to shapee (Shap-E through diffusers), mesh "
    "(a mesh or point-cloud file in init_path), ply, or one of sphere, box, rectangle_x, rectangle_z"
)
POINTE_POINTS = 4096  # base40M-textvec (1024) + upsample (3072)
BALL_RADIUS = 0.05
BALL_DIVISOR = 5000  # points per ball = int(init_num_pts / 5000)
SHAPEE_MAX_VERTICES = 10000  # official: above this, POINTE_POINTS vertices are drawn
MESH_POINTS = POINTE_POINTS  # surface samples of a mesh file: the Point-E density the settings were tuned for
GENERATOR_SHIFT_Z = 0.15
MAX_COORDINATE = 1e4  # an initial point farther out cannot belong to an object seen by cameras at radius ~3.5
IN_GENERATOR_FRAME = ("pointe", "shapee")  # shapes whose points need generator_to_training_frame


def initial_points(camera_cfg: Any, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Initial point cloud for `camera_cfg.init_shape`.

    camera_cfg: GenerateCamParams section (init_shape, init_num_pts, init_prompt, init_path,
        use_pointe_rgb, radius_range, shapee_model_key, mesh_up_axis, mesh_fit_radius).
    Returns xyz [N, 3] and rgb [N, 3] (float32, CPU).
    """
    shape = camera_cfg.init_shape
    if shape == "ply":
        xyz, rgb = _ply_points(camera_cfg.init_path)
        return xyz, grey_colors(xyz.shape[0], generator) if rgb is None else rgb
    if shape in GENERATED:
        return _generated_points(shape, camera_cfg, generator)
    if shape not in PRIMITIVES:
        valid = ", ".join([*PRIMITIVES, "ply", *GENERATED])
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
    return torch.stack(
        [radius * sin_theta * torch.sin(phi), radius * sin_theta * torch.cos(phi), radius * torch.cos(theta)], -1
    )


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


def check_points(xyz: Tensor, source: str, scale_hint: str | None) -> None:
    """A file's points [N, 3] must exist, be finite and, unless rescaled (scale_hint None), lie where the
    cameras (radius about 3.5) can see them: ValueError naming `source` and what to do otherwise."""
    if xyz.shape[0] == 0:
        raise ValueError(f"{source}: the file holds 0 points; export the shape again, or choose another init_shape")
    bad = int((~torch.isfinite(xyz).all(dim=1)).sum())
    if bad:
        raise ValueError(f"{source}: {bad} of {xyz.shape[0]} points have NaN or infinite coordinates; repair or "
                         "re-export the file")
    extent = float(xyz.abs().max())
    if scale_hint is not None and extent > MAX_COORDINATE:
        raise ValueError(f"{source}: coordinates reach {extent:.3g}, far beyond the scene the cameras see (about "
                         f"1 unit around the origin, cameras at radius 3 to 4); {scale_hint}")


def _ply_points(init_path: str | None) -> tuple[Tensor, Tensor | None]:
    """Points and colours of a point-cloud PLY (x, y, z, red, green, blue) or a 3DGS PLY (f_dc_*); colours
    None when the file has none (the caller gives them the official grey)."""
    if not init_path:
        raise ValueError("GenerateCamParams.init_path must name a PLY file when init_shape is ply")
    path = Path(init_path).expanduser()
    vertex = read_ply(path, "GenerateCamParams.init_path")["vertex"]
    names = [prop.name for prop in vertex.properties]
    if not {"x", "y", "z"} <= set(names):
        raise ValueError(f"GenerateCamParams.init_path {str(path)!r}: no x, y, z properties (found {names})")
    xyz = torch.from_numpy(_stack(vertex, ("x", "y", "z")))
    check_points(xyz, f"GenerateCamParams.init_path {str(path)!r}", "scale the point cloud in the file")
    logger.info("Initial point cloud: %d points from %s", xyz.shape[0], path)
    rgb = _ply_colors(vertex, names, path)
    return xyz.float(), None if rgb is None else torch.from_numpy(rgb).float()


def _ply_colors(vertex, names: list[str], path: Path) -> np.ndarray | None:
    if {"red", "green", "blue"} <= set(names):
        rgb = _stack(vertex, ("red", "green", "blue"))
        dtype = np.asarray(vertex["red"]).dtype
        return rgb / np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else rgb
    if {"f_dc_0", "f_dc_1", "f_dc_2"} <= set(names):
        return sh_to_rgb(_stack(vertex, ("f_dc_0", "f_dc_1", "f_dc_2")))
    logger.warning("GenerateCamParams.init_path %r: no colours (no red, green, blue or f_dc_0..2); the points "
                   "start grey", str(path))
    return None


def read_initial_file(camera_cfg: Any) -> None:
    """Read and check the file of init_shape 'ply' or 'mesh' (preflight: before a run folder exists);
    FileNotFoundError / ValueError naming GenerateCamParams.init_path and what is wrong."""
    if camera_cfg.init_shape == "ply":
        _ply_points(camera_cfg.init_path)
    elif camera_cfg.init_shape == "mesh":
        _mesh_file(camera_cfg)


def _stack(vertex, names: tuple[str, ...]) -> np.ndarray:
    return np.stack([np.asarray(vertex[name], dtype=np.float64) for name in names], axis=1)


# ---------------------------------------------------------------------- generated shapes


def _generated_points(shape: str, camera_cfg: Any, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Base points of a generator or file, expanded to balls (official `readCircleCamInfo`).

    Below BALL_DIVISOR points (a quick CPU run, config/demo.yaml) the official int(init_num_pts / 5000)
    would be 0 points per ball: init_num_pts of the base points are drawn instead, one point each."""
    coords, colors = GENERATED[shape](camera_cfg, generator)  # [P, 3], [P, 3] or None
    per_point = int(camera_cfg.init_num_pts / BALL_DIVISOR)
    if per_point < 1:
        index = torch.randperm(coords.shape[0], generator=generator)[: int(camera_cfg.init_num_pts)]
        coords, colors = coords[index], None if colors is None else colors[index]
        per_point = 1
        logger.info("GenerateCamParams.init_num_pts=%d < %d: %d of the %s points, one each (no balls)",
                    camera_cfg.init_num_pts, BALL_DIVISOR, coords.shape[0], shape)
    if shape in IN_GENERATOR_FRAME:
        coords = generator_to_training_frame(coords)
    xyz, rgb = expand_to_balls(coords, colors, per_point, bool(camera_cfg.use_pointe_rgb), generator)
    logger.info("Initial point cloud: %s (%d base points), %d points", shape, coords.shape[0], xyz.shape[0])
    return xyz, rgb


def generator_to_training_frame(coords: Tensor) -> Tensor:
    """Point-E / Shap-E frame -> training frame: y mirrored, z + 0.15 (official). [P, 3] -> [P, 3]"""
    out = coords.clone()
    out[:, 1] = -out[:, 1]
    out[:, 2] = out[:, 2] + GENERATOR_SHIFT_Z
    return out


def expand_to_balls(coords: Tensor, colors: Tensor | None, per_point: int, keep_colors: bool,
                    generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Each point replaced by the same pattern of `per_point` points in a ball of radius 0.05 (official).

    coords [P, 3], colors [P, 3] or None -> xyz [P * per_point, 3], rgb [P * per_point, 3] (float32).
    rgb: the points' colours plus U(0, 1e-4) jitter when keep_colors and colours exist, else near-grey.
    """
    ball = _random_spherical(per_point, 0.0, BALL_RADIUS, generator)  # [M, 3]
    xyz = (coords[:, None, :] + ball[None, :, :]).reshape(-1, 3)
    if keep_colors and colors is None:
        logger.warning("GenerateCamParams.use_pointe_rgb: the initial shape has no colours; using grey")
    if keep_colors and colors is not None:
        jitter = _uniform((coords.shape[0], per_point, 3), generator) * 1e-4
        rgb = (colors[:, None, :] + jitter).reshape(-1, 3).float()
    else:
        rgb = grey_colors(xyz.shape[0], generator)
    return xyz.float(), rgb


def _pointe_points(camera_cfg: Any, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Official Point-E initialisation: 4096 points and their colours (Point-E's frame)."""
    try:
        import point_e  # noqa: F401
    except ImportError as error:
        raise RuntimeError(POINTE_MISSING) from error
    return _run_pointe(str(camera_cfg.init_prompt), generator)


def _shapee_points(camera_cfg: Any, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Official Shap-E initialisation: the mesh's vertices, POINTE_POINTS of them drawn without replacement
    when there are more than SHAPEE_MAX_VERTICES (Shap-E's frame)."""
    from scene.text_to_3d_init import shapee_mesh

    mesh = shapee_mesh(str(camera_cfg.init_prompt), camera_cfg.shapee_model_key, generator)
    verts, colours = mesh.verts, mesh.colours
    if verts.shape[0] > SHAPEE_MAX_VERTICES:
        index = torch.randperm(verts.shape[0], generator=generator)[:POINTE_POINTS]
        verts, colours = verts[index], colours[index]
    return verts, colours


def _mesh_points(camera_cfg: Any, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
    """MESH_POINTS points on the surface of the init_path file, oriented and fitted as configured."""
    from scene.mesh_file import sample_surface

    xyz, rgb = sample_surface(_mesh_file(camera_cfg), MESH_POINTS, generator)
    xyz = to_z_up(xyz, camera_cfg.mesh_up_axis)
    if camera_cfg.mesh_fit_radius > 0:
        xyz = fit_to_radius(xyz, float(camera_cfg.mesh_fit_radius))
    return xyz, rgb


def _mesh_file(camera_cfg: Any):
    """The init_path mesh, its vertices checked (a file at any scale is fine when mesh_fit_radius rescales it)."""
    from scene.mesh_file import load_mesh_file

    if not camera_cfg.init_path:
        raise ValueError("GenerateCamParams.init_path must name a mesh or point-cloud file when init_shape is mesh")
    mesh = load_mesh_file(camera_cfg.init_path)
    check_points(mesh.verts, f"GenerateCamParams.init_path {str(camera_cfg.init_path)!r}",
                 None if camera_cfg.mesh_fit_radius > 0 else
                 "set GenerateCamParams.mesh_fit_radius (e.g. 1.0) to scale it into the scene")
    return mesh


def to_z_up(xyz: Tensor, up_axis: str) -> Tensor:
    """A y-up file (glTF convention: y up, front +z) rotated into the z-up training frame with its front
    towards the azimuth-0 camera (+y): (x, y, z) -> (-x, z, y), a proper rotation. [N, 3] -> [N, 3]"""
    if up_axis == "z":
        return xyz
    if up_axis == "y":
        return torch.stack([-xyz[:, 0], xyz[:, 2], xyz[:, 1]], dim=1)
    raise ValueError(f"GenerateCamParams.mesh_up_axis must be 'z' or 'y', got {up_axis!r}")


def fit_to_radius(xyz: Tensor, radius: float) -> Tensor:
    """Centre the bounding box on the origin and scale the farthest point to `radius`. [N, 3] -> [N, 3]"""
    centred = xyz - 0.5 * (xyz.amin(0) + xyz.amax(0))
    extent = float(centred.norm(dim=1).max())
    if extent == 0.0:
        raise ValueError("GenerateCamParams.mesh_fit_radius: the mesh's points all coincide")
    return centred * (radius / extent)


GENERATED: dict[str, Callable[[Any, torch.Generator], tuple[Tensor, Tensor | None]]] = {
    "pointe": _pointe_points,
    "shapee": _shapee_points,
    "mesh": _mesh_points,
}


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
        # the progressive sampler yields every denoising step; the last one is the result
        steps = sampler.sample_batch_progressive(batch_size=1, model_kwargs={"texts": [prompt]})
        samples = collections.deque(steps, maxlen=1).pop()
    cloud = sampler.output_to_point_clouds(samples)[0]
    coords = torch.from_numpy(np.asarray(cloud.coords, dtype=np.float64))
    colors = torch.from_numpy(np.stack([np.asarray(cloud.channels[c], dtype=np.float64) for c in "RGB"], axis=1))
    return coords, colors
