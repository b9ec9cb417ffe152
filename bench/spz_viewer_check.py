"""Open our .spz files in the web clients that read them, in headless Chromium, next to our own render.

    apt-get install -y chromium            # once
    python bench/spz_viewer_check.py [--ply point_cloud.ply] [--npm DIR] [--out shots/spz]

.spz version 3 in Spark 2.x (@sparkjsdev/spark, a three.js renderer) and .spz version 4 in the
PlayCanvas engine (its SpzParser, playcanvas/scripts/esm/parsers/spz-parser.mjs, reads only v4; its
zstd streams are decoded by the zstd decoder three.js ships, handed to the engine as its
ZstdDecoderModule). Both files are written by export/spz.py from a "-y" PLY (the run's default), and
both clients are given the rotation Spark's README gives for such files (180 degrees about x), the
camera on the scene's -z side looking at the origin with +y up. That camera is the training world's
azimuth-0 view (front, z up), so our torch render from there is the reference picture.

Shown: the tall test column of bench/browser_check.py (red bottom, blue top: checked upright by its
pixels) and, with --ply, a run's PLY (compared with our render: PSNR and silhouette IoU; and look at
the screenshots). Prints one JSON line per screenshot; exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.browser_check import Site, inspect, tall_test_ply  # noqa: E402
from export.splat_data import SplatData  # noqa: E402
from export.spz import write_spz  # noqa: E402
from gaussian_renderer import render  # noqa: E402
from scene.camera_sampler import orbit_cameras  # noqa: E402

SIZE = 512
FOV_DEG = 40.0

SPARK_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>loading</title>
<script type="importmap">{"imports": {"three": "./npm/three/build/three.module.js",
  "three/addons/": "./npm/three/examples/jsm/", "@sparkjsdev/spark": "./npm/@sparkjsdev/spark/dist/spark.module.js"}}
</script><style>body { margin: 0; background: #fff; }</style></head><body>
<script type="module">
import * as THREE from 'three';
import { SparkRenderer, SplatMesh } from '@sparkjsdev/spark';
const query = new URLSearchParams(location.search);
const distance = parseFloat(query.get('d'));
const renderer = new THREE.WebGLRenderer({ antialias: false, preserveDrawingBuffer: true });
renderer.setPixelRatio(1);
renderer.setSize(window.innerWidth, window.innerHeight);
document.body.appendChild(renderer.domElement);
const scene = new THREE.Scene();
scene.background = new THREE.Color(0xffffff);
scene.add(new SparkRenderer({ renderer }));
const camera = new THREE.PerspectiveCamera(FOV, window.innerWidth / window.innerHeight, 0.01, 100);
camera.position.set(0, 0, -distance);
camera.lookAt(0, 0, 0);
const splats = new SplatMesh({ url: query.get('f') });
splats.quaternion.set(1, 0, 0, 0);  // Spark's README: 180 degrees about x for files in the PLY's frame
scene.add(splats);
splats.initialized.then(() => {
  renderer.setAnimationLoop(() => renderer.render(scene, camera));
  setTimeout(() => { document.title = 'ready'; }, 1500);
}).catch((e) => { document.title = 'error ' + e; });
</script></body></html>
""".replace("FOV", str(FOV_DEG))

PLAYCANVAS_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>loading</title>
<script type="importmap">{"imports": {"playcanvas": "./npm/playcanvas/build/playcanvas.mjs"}}</script>
<style>body { margin: 0; background: #fff; } canvas { width: 100vw; height: 100vh; display: block; }</style>
</head><body><canvas id="c"></canvas>
<script type="module">
import * as pc from 'playcanvas';
import { SpzParser } from './npm/playcanvas/scripts/esm/parsers/spz-parser.mjs';
import { ZSTDDecoder } from './npm/three/examples/jsm/libs/zstddec.module.js';
const query = new URLSearchParams(location.search);
const distance = parseFloat(query.get('d'));
// the engine loads 'ZstdDecoderModule' as an Emscripten-style factory named on window: hand it three.js's
const zstd = new ZSTDDecoder();
await zstd.init();
window.ZstdDecoderModule = () => Promise.resolve({ decompress: (src, size) => zstd.decode(src, size) });
pc.WasmModule.setConfig('ZstdDecoderModule', { glueUrl: 'glue.js', wasmUrl: 'glue.wasm' });
const canvas = document.getElementById('c');
const app = new pc.Application(canvas, { graphicsDeviceOptions: { antialias: false, preserveDrawingBuffer: true,
                                                                   deviceTypes: ['webgl2'] } });
app.setCanvasFillMode(pc.FILLMODE_FILL_WINDOW);
app.setCanvasResolution(pc.RESOLUTION_AUTO);
app.graphicsDevice.maxPixelRatio = 1;
app.loader.getHandler('gsplat').addParser(new SpzParser(app));
const camera = new pc.Entity('camera');
camera.addComponent('camera', { clearColor: new pc.Color(1, 1, 1), fov: FOV, nearClip: 0.01, farClip: 100 });
camera.setPosition(0, 0, -distance);
camera.lookAt(0, 0, 0);
app.root.addChild(camera);
const asset = new pc.Asset('splats', 'gsplat', { url: query.get('f') });
asset.on('error', (err) => { document.title = 'error ' + err; });
asset.ready(() => {
  const splats = new pc.Entity('splats');
  splats.addComponent('gsplat', { asset });
  splats.setLocalEulerAngles(180, 0, 0);  // the same 180 degrees about x as in Spark
  app.root.addChild(splats);
  setTimeout(() => { document.title = 'ready'; }, 3000);
});
app.assets.add(asset);
app.assets.load(asset);
app.start();
</script></body></html>
""".replace("FOV", str(FOV_DEG))

CLIENTS = {"spz": ("Spark 2.x (three.js)", SPARK_PAGE, 3), "spz4": ("PlayCanvas engine SpzParser", PLAYCANVAS_PAGE, 4)}


def install_packages(folder: Path) -> Path:
    """node_modules with three, @sparkjsdev/spark and playcanvas from the npm registry."""
    subprocess.run(["npm", "install", "--silent", "--prefix", str(folder), "three", "@sparkjsdev/spark",
                    "playcanvas"], check=True)
    return folder / "node_modules"


def viewing_distance(data: SplatData) -> float:
    """Camera distance at which the splats (98 % of them, around the origin) fill about two thirds of the
    view's height."""
    radius = float(np.quantile(np.linalg.norm(data.means, axis=1), 0.98))
    return 1.5 * radius / math.sin(math.radians(FOV_DEG) / 2)


@torch.no_grad()
def our_render(data: SplatData, distance: float, size: tuple[int, int], out: Path) -> Path:
    """Our torch render from the clients' camera (the training world's azimuth-0 view, z up, the vertical
    field of view FOV_DEG), on white, at the clients' viewport size (width, height)."""
    camera = orbit_cameras(torch.tensor([distance]), torch.tensor([90.0]), torch.tensor([0.0]),
                           torch.tensor([math.radians(FOV_DEG)]), size[0], size[1])
    model = data.to_model()
    rgb = render(model.gaussian_tensors(sh_degree=model.max_sh_degree), camera, torch.ones(1, 3),
                 backend="torch").rgb[0]
    Image.fromarray((rgb.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)).save(out)
    return out


def compare(shot: Path, ours: Path) -> dict:
    """PSNR of the client's screenshot against our render, and the IoU of their silhouettes."""
    a = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32) / 255.0
    b = np.asarray(Image.open(ours).convert("RGB"), dtype=np.float32) / 255.0
    mse = float(((a - b) ** 2).mean())
    mask_a, mask_b = (a < 0.97).any(-1), (b < 0.97).any(-1)
    iou = float((mask_a & mask_b).sum() / max((mask_a | mask_b).sum(), 1))
    return {"psnr_vs_ours_db": round(-10 * math.log10(max(mse, 1e-10)), 2), "silhouette_iou": round(iou, 3)}


def check(data: SplatData, name: str, out: Path, node_modules: Path, test_object: bool) -> list[dict]:
    distance = viewing_distance(data)
    work = Path(tempfile.mkdtemp())
    rows, ours = [], None
    for fmt, (client, page, version) in CLIENTS.items():
        spz = write_spz(data, work / f"{name}.spz", version)
        (work / "glue.js").write_text("// the zstd decoder is set up by the page\n")
        shot = out.with_name(f"{out.stem}_{name}_{fmt}.png")
        with Site(page, node_modules, {"model.spz": spz, "glue.js": work / "glue.js"}) as site:
            site.screenshot(f"f=model.spz&d={distance:.4f}", shot, size=SIZE)
        found = inspect(shot, test_object=test_object)
        if ours is None:  # the page's viewport is the window less the browser's own bars
            ours = our_render(data, distance, Image.open(shot).size, out.with_name(f"{out.stem}_{name}_ours.png"))
        rows.append({"asset": name, "format": f".spz v{version}", "client": client, "screenshot": str(shot),
                     "ours": str(ours), **compare(shot, ours), **found})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ply", type=Path, help="also show this PLY (a run's point_cloud.ply)")
    parser.add_argument("--npm", type=Path, help="node_modules with three, @sparkjsdev/spark and playcanvas "
                                                 "(default: npm install into a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path("spz_check.png"), help="screenshot path prefix")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        node_modules = args.npm or install_packages(Path(tmp) / "npm")
        column = SplatData.from_ply(tall_test_ply(Path(tmp) / "column.ply", "-y"), "-y")
        rows = check(column, "column", args.out, node_modules, test_object=True)
        if args.ply is not None:
            rows += check(SplatData.from_ply(args.ply, "-y"), args.ply.parent.name or "ply", args.out,
                          node_modules, test_object=False)
    for row in rows:
        print(json.dumps(row))
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
