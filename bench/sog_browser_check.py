"""Open a .sog in real clients (Spark on three.js, the PlayCanvas engine) in headless Chromium, next to our
own render from the same camera.

    apt-get install -y chromium            # once
    npm install --prefix DIR three @sparkjsdev/spark playcanvas
    python bench/sog_browser_check.py --ply outputs/demo/RUN/point_cloud.ply --npm DIR/node_modules \\
        --out bench/results/sog_browser.png

The PLY is written as a .sog in the "-y" frame (the frame PLY viewers assume) and placed as each client's
documentation places such files: Spark rotates the mesh 180 degrees about x (three.js, +y up), PlayCanvas /
SuperSplat 180 degrees about z. Both cameras look at the origin from the asset's front (training world: the
+y side, z up), which our torch rasterizer renders from azimuth 0 at the same distance and vertical field
of view. The output image holds, left to right: ours, Spark, PlayCanvas. Printed: each client's PSNR
against ours (the clients differ from 3DGS rasterization in details: a coarse agreement number) and
whether it drew anything; whether the asset stands upright is for the eye.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.browser_check import Site  # noqa: E402
from export.sog import write_sog  # noqa: E402
from export.splat_data import SplatData  # noqa: E402
from gaussian_renderer import render  # noqa: E402
from scene.camera_sampler import orbit_cameras  # noqa: E402
from utils.threads import configure_threads  # noqa: E402

IMPORTS = """<script type="importmap">{"imports": {"three": "./npm/three/build/three.module.js",
  "three/addons/": "./npm/three/examples/jsm/",
  "@sparkjsdev/spark": "./npm/@sparkjsdev/spark/dist/spark.module.js"}}</script>"""

SPARK_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>loading</title>IMPORTS
<style>body { margin: 0; background: #fff; }</style></head><body>
<script type="module">
import * as THREE from 'three';
import { SparkRenderer, SplatMesh } from '@sparkjsdev/spark';
const query = new URLSearchParams(location.search);
const renderer = new THREE.WebGLRenderer({ antialias: false, preserveDrawingBuffer: true });
renderer.setSize(SIZE, SIZE);
document.body.appendChild(renderer.domElement);
const scene = new THREE.Scene();
scene.background = new THREE.Color(0xffffff);
scene.add(new SparkRenderer({ renderer }));
const camera = new THREE.PerspectiveCamera(+query.get('fov'), 1, 0.01, 100);
camera.position.set(0, 0, -query.get('d'));  // the asset's front after the rotation below
camera.lookAt(0, 0, 0);
const splat = new SplatMesh({ url: query.get('f') });
splat.quaternion.set(1, 0, 0, 0);  // 180 degrees about x: Spark's placement of PLY-frame (-y up) files
scene.add(splat);
splat.initialized.then(() => {
  renderer.setAnimationLoop(() => renderer.render(scene, camera));
  setTimeout(() => { document.title = 'ready'; }, 1500);
}).catch((e) => { document.title = 'error ' + e; });
</script></body></html>
""".replace("IMPORTS", IMPORTS)

PLAYCANVAS_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>loading</title>
<style>body { margin: 0; background: #fff; }</style></head><body>
<canvas id="c" width="SIZE" height="SIZE"></canvas>
<script type="module">
import * as pc from './npm/playcanvas/build/playcanvas.mjs';
const query = new URLSearchParams(location.search);
const canvas = document.getElementById('c');
const app = new pc.Application(canvas, { graphicsDeviceOptions: { preserveDrawingBuffer: true, antialias: false } });
app.setCanvasFillMode(pc.FILLMODE_NONE);
app.setCanvasResolution(pc.RESOLUTION_FIXED, SIZE, SIZE);
app.start();
const camera = new pc.Entity();
camera.addComponent('camera', { clearColor: new pc.Color(1, 1, 1), fov: +query.get('fov'), nearClip: 0.01,
                                farClip: 100, toneMapping: pc.TONEMAP_NONE });
camera.setPosition(0, 0, +query.get('d'));
camera.lookAt(0, 0, 0);
app.root.addChild(camera);
const asset = new pc.Asset('splat', 'gsplat', { url: query.get('f') });
asset.on('error', (e) => { document.title = 'error ' + e; });
asset.ready(() => {
  const entity = new pc.Entity();
  entity.addComponent('gsplat', { asset });
  entity.setLocalEulerAngles(0, 0, 180);  // as SuperSplat places every PLY-frame file
  app.root.addChild(entity);
  setTimeout(() => { document.title = 'ready'; }, 3000);
});
app.assets.add(asset);
app.assets.load(asset);
</script></body></html>
"""


def our_render(data: SplatData, distance: float, fov_deg: float, size: int) -> np.ndarray:
    """[size, size, 3] uint8: the torch rasterizer from the asset's front (azimuth 0, horizontal)."""
    one = torch.ones(1)
    camera = orbit_cameras(distance * one, 90.0 * one, 0.0 * one, math.radians(fov_deg) * one, size, size)
    with torch.no_grad():
        rgb = render(data.to_model().gaussian_tensors(), camera, torch.ones(3), backend="torch").rgb[0]
    return (rgb.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255 ** 2 / max(mse, 1e-10)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ply", type=Path, required=True)
    parser.add_argument("--npm", type=Path, required=True, help="node_modules with three, @sparkjsdev/spark, "
                                                                 "playcanvas")
    parser.add_argument("--distance", type=float, default=3.0)
    parser.add_argument("--fov", type=float, default=40.0, help="vertical field of view, degrees")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("sog_browser.png"))
    args = parser.parse_args()
    configure_threads()
    data = SplatData.from_ply(args.ply, up_axis="-y")
    ours = our_render(data, args.distance, args.fov, args.size)
    shots = {}
    with tempfile.TemporaryDirectory() as folder:
        sog = Path(folder) / "asset.sog"
        write_sog(data, sog, progress=False)
        query = f"f=asset.sog&d={args.distance}&fov={args.fov}"
        for name, page in (("spark", SPARK_PAGE), ("playcanvas", PLAYCANVAS_PAGE)):
            page = page.replace("SIZE", str(args.size))  # a fixed canvas, cropped from a larger window
            with Site(page, args.npm, {"asset.sog": sog}) as site:
                png = site.screenshot(query, Path(folder) / f"{name}.png", size=args.size + 256, settle_s=4.0)
                shots[name] = np.asarray(Image.open(png).convert("RGB"))[: args.size, : args.size]
    findings = {}
    for name, shot in shots.items():
        findings[name] = {"psnr_vs_ours_db": round(psnr(shot, ours), 2),
                          "drawn": bool((shot < 250).any(axis=2).mean() > 0.01)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([ours, shots["spark"], shots["playcanvas"]], axis=1)).save(args.out)
    print(json.dumps({"image": str(args.out), "left_to_right": ["ours", "spark", "playcanvas"], **findings},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
