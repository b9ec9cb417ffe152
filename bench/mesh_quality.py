"""Mesh export quality: renders of the exported mesh against renders of the Gaussians it came from.

    python bench/mesh_quality.py [--runs RUN_DIR ...] [--size 256] [--resolution 192] [--faces 50000] [--texture 1024]

For each source (the analytic prior's hidden procedural scenes, and every run folder given, e.g.
a `python train.py --opt config/demo.yaml` run) the mesh is extracted with export/mesh.py
and both are rendered from the evaluation ring (8 views at default_polar, 8 at the 2/3 ring, the
demo config's radius and fov; white background). Printed per source: silhouette IoU (Gaussian
alpha > 0.5 vs mesh coverage), PSNR of the mesh render against the Gaussian render, face count and
extraction time, and the PSNR over the pixels where the splats are opaque (alpha > 0.95) and the
mesh is drawn: colour alone, without the splats' soft rims (there the white background shows
through the splats but not through the mesh). The procedural scenes use sh_degree 0, so both renders are
view-independent.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.mesh import MeshOptions, find_source, load_gaussians, mesh_from_gaussians  # noqa: E402
from export.mesh_render import render_mesh, render_textured  # noqa: E402
from export.mesh_texture import bake_texture  # noqa: E402
from gaussian_renderer import render_in_chunks  # noqa: E402
from guidance.analytic_prior import PROCEDURAL_SCENES, procedural_scene  # noqa: E402
from scene.camera_sampler import evaluation_ring  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.metrics import psnr  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def compare(gaussians, camera_cfg, size: int, options: MeshOptions) -> dict:
    """IoU, PSNR, faces and seconds for one set of Gaussians."""
    t0 = time.perf_counter()
    mesh = mesh_from_gaussians(gaussians, options)
    if options.texture:
        mesh = bake_texture(gaussians, mesh.vertices, mesh.faces, options)
    seconds = time.perf_counter() - t0
    cams = evaluation_ring(camera_cfg, 8, True, size, size)
    white = torch.ones(3)
    splat = render_in_chunks(gaussians, cams, white, chunk=4, backend="torch")
    vertices, faces = torch.from_numpy(mesh.vertices), torch.from_numpy(mesh.faces)
    if options.texture:
        image = torch.from_numpy(mesh.image).permute(2, 0, 1).float() / 255.0
        rgb, mask = render_textured(vertices, faces, torch.from_numpy(mesh.uv), image, cams, white)
    else:
        rgb, mask = render_mesh(vertices, faces, torch.from_numpy(mesh.colors), cams, white)
    gs_mask = splat.alpha > 0.5
    mesh_mask = mask > 0.5
    iou = float((gs_mask & mesh_mask).sum() / (gs_mask | mesh_mask).sum().clamp_min(1))
    opaque = ((splat.alpha > 0.95) & mesh_mask).float()  # [B, 1, H, W] colour alone, without the soft rims
    inside_mse = float(((rgb - splat.rgb).square() * opaque).sum() / (3 * opaque.sum()).clamp_min(1))
    return {"iou": iou, "psnr": float(psnr(rgb, splat.rgb)), "psnr_inside": -10.0 * math.log10(inside_mse),
            "faces": len(mesh.faces), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="*", type=Path, default=[], help="run folders (or PLY files) to measure")
    parser.add_argument("--size", type=int, default=256, help="render size (pixels)")
    parser.add_argument("--resolution", type=int, default=MeshOptions.resolution)
    parser.add_argument("--faces", type=int, default=MeshOptions.faces)
    parser.add_argument("--level", type=float, default=MeshOptions.level)
    parser.add_argument("--texture", type=int, default=0, help="bake and render a UV texture of this size")
    parser.add_argument("--bake-views", type=int, default=MeshOptions.bake_views,
                        help="views per ring of the colour bake (0 = colours from the nearby Gaussians only)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    options = MeshOptions(resolution=args.resolution, faces=args.faces, level=args.level, texture=args.texture,
                          bake_views=args.bake_views)
    demo_cameras = load_config(REPO / "config" / "demo.yaml").camera
    sources = [(f"procedural:{name}", procedural_scene(name)) for name in PROCEDURAL_SCENES]
    sources += [(str(run), load_gaussians(find_source(run)[0])) for run in args.runs]
    print(f"mesh options: {options}; {args.size}x{args.size} renders, 16 ring views (demo cameras)")
    print("| source | Gaussians | faces | silhouette IoU | PSNR (dB) | PSNR where the splats are opaque (dB) "
          "| extraction (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, gaussians in sources:
        row = compare(gaussians, demo_cameras, args.size, options)
        print(f"| {name} | {gaussians.means.shape[0]} | {row['faces']} | {row['iou']:.3f} | "
              f"{row['psnr']:.2f} | {row['psnr_inside']:.2f} | {row['seconds']:.1f} |")


if __name__ == "__main__":
    main()
