"""Open an exported GLB in three.js's GLTFLoader in headless Chromium and check the screenshot.

    apt-get install -y chromium            # once
    python bench/browser_check_glb.py [--glb mesh.glb] [--three DIR] [--out shot.png]

Without --glb a tall test object is exported first (a column of Gaussians along the training
world's z, red bottom, blue top: utils/mesh_export.py). three.js comes from the npm registry
(`npm install three` into a temporary folder unless --three names an installed package folder).
The page is served by python's http.server on 127.0.0.1 (stopped by its PID afterwards); the
camera looks at the object's front (+Z side) with three.js's default +Y up. Checked on the
screenshot: something is drawn, and for the test object the drawn silhouette is taller than wide
(upright) with blue above red. Prints the findings as JSON; exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>loading</title>
<script type="importmap">{"imports": {"three": "./three/build/three.module.js",
                                      "three/addons/": "./three/examples/jsm/"}}</script>
<style>body { margin: 0; background: #fff; }</style></head><body>
<script type="module">
import * as THREE from 'three';
import { GLTFLoader } from 'three/addons/loaders/GLTFLoader.js';
const renderer = new THREE.WebGLRenderer({ antialias: false, preserveDrawingBuffer: true });
renderer.setSize(window.innerWidth, window.innerHeight);
document.body.appendChild(renderer.domElement);
const scene = new THREE.Scene();
scene.background = new THREE.Color(0xffffff);
scene.add(new THREE.AmbientLight(0xffffff, 2.0));
const camera = new THREE.PerspectiveCamera(35, window.innerWidth / window.innerHeight, 0.01, 100);
new GLTFLoader().load('model.glb', (gltf) => {
  scene.add(gltf.scene);
  const box = new THREE.Box3().setFromObject(gltf.scene);
  const centre = box.getCenter(new THREE.Vector3());
  const size = box.getSize(new THREE.Vector3()).length();
  camera.position.set(centre.x, centre.y, centre.z + 1.6 * size);  // front view, default up +Y
  camera.lookAt(centre);
  renderer.render(scene, camera);
  document.title = 'ready';
}, undefined, (err) => { document.title = 'error: ' + err; });
</script></body></html>
"""


def tall_test_glb(folder: Path) -> Path:
    """The column of tests/test_mesh_export.py as a GLB (tall along +Y in the file)."""
    import torch

    from gaussian_renderer.types import GaussianTensors
    from scene.gaussian_model import rgb_to_sh
    from utils.mesh_export import MeshOptions, export_mesh

    zs = torch.linspace(-0.6, 0.6, 24)
    xy = torch.linspace(-0.25, 0.25, 6)
    grid = torch.stack(torch.meshgrid(xy, xy, zs, indexing="ij"), dim=-1).reshape(-1, 3)
    means = grid[grid[:, :2].norm(dim=1) <= 0.25 + 1e-6]
    n = means.shape[0]
    colors = torch.where((means[:, 2] > 0)[:, None], torch.tensor([0.1, 0.2, 0.9]), torch.tensor([0.9, 0.1, 0.1]))
    column = GaussianTensors(means=means, quats=torch.tensor([1.0, 0, 0, 0]).expand(n, 4).contiguous(),
                             scales=torch.full((n, 3), 0.06), opacities=torch.full((n,), 0.95),
                             sh_coeffs=rgb_to_sh(colors)[:, None], sh_degree=0)
    return export_mesh(column, folder, MeshOptions(resolution=64, faces=5000))["glb"]


def install_three(folder: Path) -> Path:
    subprocess.run(["npm", "install", "--silent", "--prefix", str(folder), "three"], check=True)
    return folder / "node_modules" / "three"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def screenshot(glb: Path, three: Path, out: Path, size: int = 512) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        raise SystemExit("no chromium on PATH: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as site:
        root = Path(site)
        (root / "three").symlink_to(three.resolve())
        shutil.copy(glb, root / "model.glb")
        (root / "index.html").write_text(PAGE)
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                                  cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.0)
            subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu-sandbox",
                            "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--hide-scrollbars",
                            f"--window-size={size},{size}", "--virtual-time-budget=15000",
                            f"--screenshot={out.resolve()}", f"http://127.0.0.1:{port}/index.html"],
                           check=True, timeout=120, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finally:
            server.terminate()
            server.wait(timeout=10)


def inspect(path: Path, test_object: bool) -> dict:
    """Pixel checks: drawn area, silhouette box, and (test object) blue above red."""
    img = np.asarray(Image.open(path).convert("RGB")).astype(np.float32) / 255.0
    drawn = (img < 0.97).any(-1)
    result = {"drawn_fraction": float(drawn.mean())}
    if not drawn.any():
        result["ok"] = False
        return result
    rows, cols = np.nonzero(drawn)
    height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
    result.update(silhouette_height=height, silhouette_width=width)
    ok = result["drawn_fraction"] > 0.005
    if test_object:
        mid = (rows.min() + rows.max()) // 2
        top, bottom = img[: mid][drawn[: mid]].mean(0), img[mid:][drawn[mid:]].mean(0)
        result.update(top_rgb=top.round(3).tolist(), bottom_rgb=bottom.round(3).tolist())
        ok = ok and height > 1.5 * width and top[2] > top[0] and bottom[0] > bottom[2]
    result["ok"] = bool(ok)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--glb", type=Path, help="GLB to open (default: a tall test object exported now)")
    parser.add_argument("--three", type=Path, help="an installed three npm package folder (default: npm install)")
    parser.add_argument("--out", type=Path, default=Path("glb_screenshot.png"), help="screenshot path")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        glb = args.glb or tall_test_glb(Path(work) / "test_object")
        three = args.three or install_three(Path(work) / "npm")
        screenshot(glb, three, args.out)
    result = {"glb": str(args.glb or "tall test object"), "screenshot": str(args.out),
              **inspect(args.out, test_object=args.glb is None)}
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
