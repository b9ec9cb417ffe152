"""The final outputs of a run against the Gaussian count (issue 20): where `TrainingRun.finish`'s time goes.

    python bench/final_outputs.py [--gaussians 100000,330000,800000] [--device cpu|cuda] [--repeat 1]

For each count, a synthetic trained-looking asset (Gaussians on and near a torus: small scales that
shrink as the count grows, as densification's splits do, high opacities, a 2% tail of larger, fainter
Gaussians) goes through what `finish` does with the run's defaults (bagel config: 512x512 evaluation of
16 ring views, mesh_resolution 192, mesh_faces 50000, mesh_level 0.3, mesh_bake_views 12, no video):
the evaluation renders and PNGs, point_cloud.ply, and export/mesh.py `export_mesh` (GLB + textured
OBJ). The mesh export is split by wrapping its steps (times exclusive of the nested steps listed):
opacity grid, marching cubes, components + decimation, nearest-Gaussian colours (k-d tree), bake
renders (the Gaussian renderer), mesh z-buffer (export/mesh_render.py), bake sampling (the rest of
export/mesh_bake.py), UV unwrap (xatlas), texel rasterisation, GLB and OBJ writes.

The grid and the bake renders follow the Gaussians' device (`--device cuda` on a GPU: gsplat renders);
the rest runs on the CPU wherever the run trains. With --device cuda one more row, outside the totals,
times the mesh z-buffer of the bake views on the GPU for the same mesh: whether moving it there pays.
Prints one markdown table (seconds).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import export.gaussian_field  # noqa: E402
import export.mesh  # noqa: E402
import export.mesh_bake  # noqa: E402
import export.mesh_colors  # noqa: E402
import export.mesh_texture  # noqa: E402
from bench.report import publish_table  # noqa: E402
from export.mesh import export_mesh, options_from_config  # noqa: E402
from gaussian_renderer import render_in_chunks  # noqa: E402
from scene.camera_sampler import evaluation_ring  # noqa: E402
from scene.gaussian_model import GaussianModel, rgb_to_sh  # noqa: E402
from scene.ply_format import save_gaussian_ply  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.media import save_images  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAJOR, MINOR = 0.6, 0.25  # torus radii (world units): an object of about 1.7 x 1.7 x 0.5


def torus_asset(n: int, seed: int = 0, device: str = "cpu") -> GaussianModel:
    """n Gaussians that look like a trained asset: on and just under a torus surface, flattened along the
    normal, scales ~ the mean spacing, opacities 0.6-1; 2% larger (x4) and fainter (0.05-0.4)."""
    g = torch.Generator().manual_seed(seed)
    u, v = 2 * math.pi * torch.rand(n, generator=g), 2 * math.pi * torch.rand(n, generator=g)
    normal = torch.stack([u.cos() * v.cos(), u.sin() * v.cos(), v.sin()], dim=-1)  # [n, 3]
    ring = torch.stack([u.cos(), u.sin(), torch.zeros(n)], dim=-1)
    depth = -0.02 * torch.rand(n, generator=g)  # on the surface and up to 0.02 under it
    means = MAJOR * ring + (MINOR + depth)[:, None] * normal
    spacing = math.sqrt(4 * math.pi ** 2 * MAJOR * MINOR / n)
    scales = 1.5 * spacing * torch.exp(0.3 * torch.randn(n, 3, generator=g))
    scales[:, 2] *= 0.3  # thin along the local z, turned onto the normal below
    faint = torch.rand(n, generator=g) < 0.02
    scales[faint] *= 4.0
    opacity = torch.where(faint, 0.05 + 0.35 * torch.rand(n, generator=g), 0.6 + 0.4 * torch.rand(n, generator=g))
    quats = _rotation_onto(normal)
    colors = 0.5 + 0.4 * torch.stack([u.sin(), v.cos(), (u + v).sin()], dim=-1)
    params = {"xyz": means, "f_dc": rgb_to_sh(colors)[:, None], "f_rest": torch.zeros(n, 0, 3),
              "opacity": torch.logit(opacity)[:, None], "scaling": scales.log(), "rotation": quats}
    return GaussianModel.from_params({k: t.float().to(device) for k, t in params.items()}, device=device)


def _rotation_onto(normal: torch.Tensor) -> torch.Tensor:
    """[n, 4] (w, x, y, z) unit quaternions turning +z onto the unit vectors normal [n, 3]."""
    z = torch.tensor([0.0, 0.0, 1.0]).expand_as(normal)
    q = torch.cat([1.0 + (normal * z).sum(-1, keepdim=True), torch.linalg.cross(z, normal)], dim=-1)
    return torch.nn.functional.normalize(q + torch.tensor([1e-6, 1e-6, 0, 0]), dim=-1)


class PartTimer:
    """Exclusive wall time per named part, by wrapping module functions (nested calls subtract)."""

    def __init__(self, sync):
        self.seconds: dict[str, float] = {}
        self._stack: list[list[float]] = []
        self._sync = sync
        self._undo: list = []

    def wrap(self, module, attribute: str, part: str) -> None:
        if not hasattr(module, attribute):
            return
        original = getattr(module, attribute)

        def timed(*args, **kwargs):
            with self.part(part):
                return original(*args, **kwargs)

        setattr(module, attribute, timed)
        self._undo.append((module, attribute, original))

    @contextlib.contextmanager
    def part(self, name: str):
        self._sync()
        self._stack.append([time.perf_counter(), 0.0])  # start, time spent in nested parts
        try:
            yield
        finally:
            self._sync()
            start, nested = self._stack.pop()
            total = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + total - nested
            if self._stack:
                self._stack[-1][1] += total

    def restore(self) -> None:
        for module, attribute, original in reversed(self._undo):
            setattr(module, attribute, original)


MESH_PARTS = [  # (module, function, part) wrapped inside export_mesh
    (export.mesh, "opacity_grid", "opacity grid"),
    (export.mesh, "extract_surface", "marching cubes"),
    (export.mesh, "drop_small_components", "components + decimation"),
    (export.mesh, "decimate", "components + decimation"),
    (export.mesh_colors, "surface_colors", "nearest-Gaussian colours"),
    (export.mesh_bake, "rendered_colors", "bake sampling"),
    (export.mesh_bake, "baked_colors", "bake sampling"),
    (export.mesh_bake, "render_in_chunks", "bake renders"),
    (export.mesh_bake, "rasterize", "mesh z-buffer"),
    (export.mesh_bake, "depth_buffer", "mesh z-buffer"),
    (export.mesh_texture, "rasterize_flat", "texel rasterisation"),
    (export.mesh, "write_glb", "GLB write"),
    (export.mesh, "write_obj", "OBJ write"),
]


def measure(n: int, device: str, cfg, folder: Path) -> dict[str, float]:
    import xatlas

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    model = torus_asset(n, device=device)
    timer = PartTimer(sync)
    for module, attribute, part in MESH_PARTS:
        timer.wrap(module, attribute, part)
    timer.wrap(xatlas, "parametrize", "UV unwrap")
    background = torch.ones(3, device=device)
    try:
        with torch.no_grad():
            with timer.part("evaluation (16 views + PNGs)"):
                cams = evaluation_ring(cfg.camera, 8, cfg.camera.render_45, cfg.camera.image_w, cfg.camera.image_h)
                out = render_in_chunks(model.gaussian_tensors(), cams, background, 8)
                save_images(out.rgb, folder / "test_views", "rgb")
                save_images(out.depth, folder / "test_views", "depth")
            with timer.part("point_cloud.ply"):
                save_gaussian_ply(model, folder / "point_cloud.ply", pad_sh_degree=cfg.ply_sh_degree,
                                  up_axis=cfg.ply_up_axis)
            with timer.part("mesh: rest"):
                start = time.perf_counter()
                export_mesh(model.gaussian_tensors(), folder / "mesh", options_from_config(cfg))
                sync()
                mesh_total = time.perf_counter() - start
    finally:
        timer.restore()
    seconds = {**timer.seconds, "mesh total": mesh_total}
    if device.startswith("cuda"):  # a candidate, not part of the run: the z-buffer on the GPU instead of the CPU
        seconds[ZBUFFER_ON_DEVICE] = zbuffer_seconds(folder / "mesh" / "mesh.glb", options_from_config(cfg), device)
    return seconds


ZBUFFER_ON_DEVICE = "mesh z-buffer on the GPU (candidate, not in the totals)"


def zbuffer_seconds(glb: Path, options, device: str) -> float:
    """What export/mesh_bake.py's z-buffer of the bake views would take on `device` for the exported mesh
    (seconds, after one warm-up call; the run computes it on the CPU)."""
    import trimesh

    from export.mesh_bake import bake_views
    from export.mesh_render import depth_buffer

    mesh = trimesh.load(glb, force="mesh")
    vertices, faces = np.asarray(mesh.vertices, np.float32), np.asarray(mesh.faces, np.int64)
    cameras = bake_views(vertices, options.bake_views, options.bake_size).to(device)
    v, f = torch.from_numpy(vertices).to(device), torch.from_numpy(faces).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    depth_buffer(v, f, cameras)
    sync()
    start = time.perf_counter()
    depth_buffer(v, f, cameras)
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gaussians", default="100000,330000,800000", help="comma-separated Gaussian counts")
    parser.add_argument("--device", default="cpu", help="where the Gaussians live (cpu, cuda)")
    parser.add_argument("--config", type=Path, default=REPO / "config" / "bagel.yaml")
    parser.add_argument("--out", type=Path, help="write the table (markdown) here")
    args = parser.parse_args()
    cfg = load_config(args.config, warn_no_effect=False)
    counts = [int(c) for c in args.gaussians.split(",")]
    rows = {}
    for n in counts:
        with tempfile.TemporaryDirectory() as tmp:
            rows[n] = measure(n, args.device, cfg, Path(tmp))
        print(f"{n} Gaussians: {rows[n]['mesh total']:.2f} s mesh", file=sys.stderr, flush=True)
    parts = list(dict.fromkeys(p for row in rows.values() for p in row))
    parts.remove("mesh total")
    candidate = [p for p in parts if p == ZBUFFER_ON_DEVICE]
    parts = [p for p in parts if p != ZBUFFER_ON_DEVICE]
    device = (torch.cuda.get_device_name() if args.device.startswith("cuda")
              else f"CPU ({torch.get_num_threads()} threads)")
    lines = [f"Final outputs on {device}, {args.config.name} defaults (seconds):", "",
             "| part | " + " | ".join(f"{n:,}" for n in counts) + " |", "|---|" + "---|" * len(counts)]
    lines += [f"| {part} | " + " | ".join(f"{rows[n].get(part, 0.0):.2f}" for n in counts) + " |"
              for part in parts + ["mesh total"]]
    total = {n: sum(v for k, v in rows[n].items() if k not in ("mesh total", ZBUFFER_ON_DEVICE)) for n in counts}
    lines.append("| **all** | " + " | ".join(f"**{total[n]:.2f}**" for n in counts) + " |")
    lines += [f"| {part} | " + " | ".join(f"{rows[n].get(part, 0.0):.2f}" for n in counts) + " |" for part in candidate]
    publish_table("\n".join(lines) + "\n", args.out)

if __name__ == "__main__":
    main()
