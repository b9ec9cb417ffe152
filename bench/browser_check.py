"""Open our exports in real web clients in headless Chromium and check the screenshots' pixels.

    apt-get install -y chromium            # once
    python bench/browser_check.py glb [--glb mesh.glb | --texture 512] [--npm DIR] [--out shot.png]
    python bench/browser_check.py obj [--obj mesh.obj] [--npm DIR] [--out shot.png]
    python bench/browser_check.py ply [--ply point_cloud.ply] [--npm DIR] [--out shots_prefix]

glb: three.js's GLTFLoader, camera on the +Z side (the asset's front) with three.js's +Y up.
    Without --glb a tall test object is exported first (a column of Gaussians along the training
    world's z, red bottom, blue top: export/mesh.py).
obj: three.js's OBJLoader with the materials of MTLLoader (the MTL next to the OBJ and its map_Kd
    texture), lit by an ambient light of intensity pi (three.js's Lambert term divides by pi: the
    texture's colours as they are). Without --obj the tall test object's mesh.obj, which must show
    blue above red; the page also reports how many of the loaded materials carry a texture.
ply: the same column as a 3DGS PLY in GaussianSplats3D (mkkellogg, a three.js splat viewer):
    `ply_up_axis: y` with the viewer's defaults (camera up +y), and `ply_up_axis: -y` with the
    transform SuperSplat / PlayCanvas apply to every PLY they load (180 degrees about z) must
    stand upright; `-y` with the defaults must not (the check can fail). With --ply a run's PLY is
    shown as SuperSplat would place it (the screenshot is for the eye; only content is checked).

The npm packages (three, @mkkellogg/gaussian-splats-3d) come from the npm registry into a
temporary folder unless --npm names a folder where they are installed. Pages are served by
python's http.server on 127.0.0.1 (stopped by its PID). Checked on each screenshot: something is
drawn, the silhouette is taller than wide, blue above red. Prints the findings as JSON; exit
status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.headless_chromium import free_port  # noqa: E402


def three_page(imports: str, script: str) -> str:
    """A white page that loads three.js from ./npm, imports `imports` (loader modules), sets up a renderer
    and a scene, then runs `script` (which loads the model, renders and sets document.title)."""
    return THREE_HEAD + imports + THREE_SCENE + script + "</script></body></html>\n"


THREE_HEAD = """<!doctype html><html><head><meta charset="utf-8"><title>loading</title>
<script type="importmap">{"imports": {"three": "./npm/three/build/three.module.js",
                                      "three/addons/": "./npm/three/examples/jsm/"}}</script>
<style>body { margin: 0; background: #fff; }</style></head><body>
<script type="module">
import * as THREE from 'three';
"""
THREE_SCENE = """const renderer = new THREE.WebGLRenderer({ antialias: false, preserveDrawingBuffer: true });
renderer.setSize(window.innerWidth, window.innerHeight);
document.body.appendChild(renderer.domElement);
const scene = new THREE.Scene();
scene.background = new THREE.Color(0xffffff);
"""

GLB_PAGE = three_page("""import { GLTFLoader } from 'three/addons/loaders/GLTFLoader.js';
""", """scene.add(new THREE.AmbientLight(0xffffff, 2.0));
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
""")

OBJ_PAGE = three_page("""import { OBJLoader } from 'three/addons/loaders/OBJLoader.js';
import { MTLLoader } from 'three/addons/loaders/MTLLoader.js';
""", """scene.add(new THREE.AmbientLight(0xffffff, Math.PI));
const camera = new THREE.PerspectiveCamera(35, window.innerWidth / window.innerHeight, 0.01, 100);
const fail = (err) => { document.title = 'error: ' + err; };
new MTLLoader().load('model.mtl', (materials) => {
  materials.preload();
  new OBJLoader().setMaterials(materials).load('model.obj', (object) => {
    scene.add(object);
    const box = new THREE.Box3().setFromObject(object);
    const centre = box.getCenter(new THREE.Vector3());
    const size = box.getSize(new THREE.Vector3()).length();
    camera.position.set(centre.x, centre.y, centre.z + 1.6 * size);  // front view, default up +Y
    camera.lookAt(centre);
    const used = [];
    object.traverse((o) => { if (o.isMesh) used.push(...[o.material].flat()); });
    const textured = used.filter((m) => m.map).length;
    const waitForTextures = () => {
      if (used.every((m) => !m.map || (m.map.image && m.map.image.complete !== false))) {
        renderer.render(scene, camera);
        document.title = `ready materials=${used.length} textured=${textured}`;
      } else { setTimeout(waitForTextures, 100); }
    };
    waitForTextures();
  }, undefined, fail);
}, undefined, fail);
""")

# ?f=FILE&rot=1 loads FILE rotated 180 degrees about z (quaternion x, y, z, w = 0, 0, 1, 0), as SuperSplat does.
PLY_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>loading</title>
<script type="importmap">{"imports": {"three": "./npm/three/build/three.module.js"}}</script>
<style>body { margin: 0; background: #fff; }</style></head><body>
<script type="module">
import * as GS from './npm/@mkkellogg/gaussian-splats-3d/build/gaussian-splats-3d.module.js';
const query = new URLSearchParams(location.search);
const viewer = new GS.Viewer({initialCameraPosition: [0, 0, 4], initialCameraLookAt: [0, 0, 0],
  sharedMemoryForWorkers: false, gpuAcceleratedSort: false, useBuiltInControls: false});
const rotation = query.get('rot') === '1' ? [0, 0, 1, 0] : [0, 0, 0, 1];
viewer.addSplatScene(query.get('f'), {showLoadingUI: false, progressiveLoad: false, rotation}).then(() => {
  viewer.start(); document.title = 'ready';
}).catch((e) => { document.title = 'error ' + e; });
</script></body></html>
"""


def tall_column():
    """Opaque Gaussians filling a column along the training world's z: red bottom half, blue top half."""
    import torch

    from gaussian_renderer.types import GaussianTensors
    from scene.gaussian_model import rgb_to_sh

    zs = torch.linspace(-0.6, 0.6, 24)
    xy = torch.linspace(-0.25, 0.25, 6)
    grid = torch.stack(torch.meshgrid(xy, xy, zs, indexing="ij"), dim=-1).reshape(-1, 3)
    means = grid[grid[:, :2].norm(dim=1) <= 0.25 + 1e-6]
    n = means.shape[0]
    colors = torch.where((means[:, 2] > 0)[:, None], torch.tensor([0.1, 0.2, 0.9]), torch.tensor([0.9, 0.1, 0.1]))
    return GaussianTensors(means=means, quats=torch.tensor([1.0, 0, 0, 0]).expand(n, 4).contiguous(),
                           scales=torch.full((n, 3), 0.06), opacities=torch.full((n,), 0.95),
                           sh_coeffs=rgb_to_sh(colors)[:, None], sh_degree=0)


def tall_test_glb(folder: Path, texture: int = 0) -> Path:
    from export.mesh import MeshOptions, export_mesh

    return export_mesh(tall_column(), folder, MeshOptions(resolution=64, faces=5000, texture=texture))["glb"]


def tall_test_obj(folder: Path) -> Path:
    """The tall test object's mesh.obj (with its MTL and texture) as export_mesh writes it by default."""
    from export.mesh import MeshOptions, export_mesh

    return export_mesh(tall_column(), folder, MeshOptions(resolution=64, faces=5000))["obj"]


def tall_test_ply(path: Path, up_axis: str) -> Path:
    import math

    import torch

    from scene.gaussian_model import GaussianModel
    from scene.ply_format import save_gaussian_ply

    column = tall_column()
    model = GaussianModel.from_points(column.means, torch.full_like(column.means, 0.5), 0)
    with torch.no_grad():
        model._features_dc.copy_(column.sh_coeffs)
        model._opacity.fill_(math.log(0.95 / 0.05))
        model._scaling.fill_(math.log(0.06))
    save_gaussian_ply(model, path, up_axis=up_axis)
    return path


def install_packages(folder: Path) -> Path:
    """node_modules with three and @mkkellogg/gaussian-splats-3d from the npm registry."""
    subprocess.run(["npm", "install", "--silent", "--prefix", str(folder), "three",
                    "@mkkellogg/gaussian-splats-3d"], check=True)
    return folder / "node_modules"


class Site:
    """A temporary folder served on 127.0.0.1 with the page, the npm packages and the files to show."""

    def __init__(self, page: str, node_modules: Path, files: dict[str, Path]):
        self.page, self.node_modules, self.files = page, node_modules, files

    def __enter__(self) -> "Site":
        self._tmp = tempfile.TemporaryDirectory()
        root = Path(self._tmp.name)
        (root / "npm").symlink_to(self.node_modules.resolve())
        for name, source in self.files.items():
            shutil.copy(source, root / name)
        (root / "index.html").write_text(self.page)
        self.port = free_port()
        self._server = subprocess.Popen([sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1"],
                                        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        return self

    def __exit__(self, *exc) -> None:
        self._server.terminate()
        self._server.wait(timeout=10)
        self._tmp.cleanup()

    def screenshot(self, query: str, out: Path, size: int = 512, settle_s: float = 3.0) -> Path:
        self.title = ""  # the page's title once loaded ('ready ...' with what it reports)
        """Open the page in headless Chromium, wait until it sets its title to 'ready' (loaders and
        workers done), let it draw settle_s more seconds, and save a PNG. Driven over the DevTools
        protocol, since Chromium's --screenshot fires at the load event, before asynchronous loads end."""
        chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
        if chromium is None:
            raise SystemExit("no chromium on PATH: apt-get install -y chromium")
        port = free_port()
        with tempfile.TemporaryDirectory() as profile:
            browser = subprocess.Popen([chromium, "--headless", "--no-sandbox", "--use-angle=swiftshader",
                                        "--enable-unsafe-swiftshader", "--hide-scrollbars",
                                        f"--window-size={size},{size}",
                                        f"--remote-debugging-port={port}", f"--user-data-dir={profile}", "about:blank"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                devtools = DevTools(_page_websocket(port))
                devtools.call("Page.navigate", url=f"http://127.0.0.1:{self.port}/index.html?{query}")
                title = devtools.wait_for_title(("ready", "error"), timeout_s=120)
                if not title.startswith("ready"):
                    raise RuntimeError(f"page did not load: {title!r}")
                self.title = title
                time.sleep(settle_s)
                png = devtools.call("Page.captureScreenshot", format="png")["data"]
                out.write_bytes(base64.b64decode(png))
                devtools.close()
            finally:
                browser.terminate()
                browser.wait(timeout=30)
        return out


def _page_websocket(port: int, timeout_s: float = 30) -> str:
    """The DevTools websocket URL of the browser's first page."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as response:
                pages = [t for t in json.load(response) if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("Chromium's DevTools endpoint did not come up")
        time.sleep(0.3)


class DevTools:
    """Minimal Chrome DevTools protocol client (request/response over one websocket)."""

    def __init__(self, url: str):
        from websockets.sync.client import connect

        self._ws = connect(url, max_size=None)
        self._next_id = 0

    def call(self, method: str, **params) -> dict:
        self._next_id += 1
        self._ws.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv(timeout=120))
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def wait_for_title(self, prefixes: tuple[str, ...], timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        title = ""
        while time.monotonic() < deadline:
            title = self.call("Runtime.evaluate", expression="document.title")["result"].get("value", "")
            if title.startswith(prefixes):
                return title
            time.sleep(0.5)
        return title

    def close(self) -> None:
        self._ws.close()


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


def check_glb(args, node_modules: Path, work: Path) -> list[dict]:
    glb = args.glb or tall_test_glb(work / "test_object", args.texture)
    out = args.out.with_suffix(".png")
    with Site(GLB_PAGE, node_modules, {"model.glb": glb}) as site:
        site.screenshot("", out)
    return [{"client": "three.js GLTFLoader", "glb": str(args.glb or "tall test object"), "screenshot": str(out),
             **inspect(out, test_object=args.glb is None)}]


def obj_files(obj: Path) -> dict[str, Path]:
    """The OBJ, its MTL and the textures the MTL names, under the names OBJ_PAGE loads."""
    mtl = obj.with_suffix(".mtl")
    files = {"model.obj": obj, "model.mtl": mtl}
    for line in mtl.read_text().splitlines():
        if line.startswith("map_Kd "):
            name = line.split(maxsplit=1)[1].strip()
            files[name] = obj.parent / name
    return files


def check_obj(args, node_modules: Path, work: Path) -> list[dict]:
    obj = args.obj or tall_test_obj(work / "test_object")
    files = obj_files(obj)
    # the OBJ names its MTL by the file name it was written under: serve the text with model.mtl instead
    renamed = work / "served.obj"
    renamed.write_text(obj.read_text().replace(f"mtllib {obj.with_suffix('.mtl').name}", "mtllib model.mtl"))
    files["model.obj"] = renamed
    out = args.out.with_suffix(".png")
    with Site(OBJ_PAGE, node_modules, files) as site:
        site.screenshot("", out)
        title = site.title
    report = dict(item.split("=") for item in title.split()[1:])
    found = inspect(out, test_object=args.obj is None)
    return [{"client": "three.js OBJLoader + MTLLoader", "obj": str(args.obj or "tall test object"),
             "screenshot": str(out), **report, **found, "ok": found["ok"] and int(report["textured"]) > 0}]


def check_given_ply(args, node_modules: Path) -> list[dict]:
    """A PLY of ours in GaussianSplats3D, as SuperSplat would place it (-y: rolled 180 degrees about z)
    or as is (y); the pixels are only checked for content: look at the screenshot."""
    from plyfile import PlyData

    up_axis = next((c.split()[1] for c in PlyData.read(str(args.ply)).comments if c.startswith("up_axis ")), None)
    if up_axis not in ("y", "-y"):
        raise SystemExit(f"{args.ply}: header records up axis {up_axis!r}; only y and -y files are shown upright")
    out = args.out.with_name(f"{args.out.stem}_ply.png")
    with Site(PLY_PAGE, node_modules, {"model.ply": args.ply}) as site:
        found = inspect(site.screenshot("f=model.ply" + ("&rot=1" if up_axis == "-y" else ""), out), test_object=False)
    return [{"client": "GaussianSplats3D", "ply": str(args.ply), "up_axis": up_axis, "screenshot": str(out), **found}]


def check_ply(args, node_modules: Path, work: Path) -> list[dict]:
    if args.ply is not None:
        return check_given_ply(args, node_modules)
    files = {name: tall_test_ply(work / name, axis) for name, axis in [("column_y.ply", "y"),
                                                                       ("column_minus_y.ply", "-y")]}
    cases = [("ply_up_axis y, viewer defaults", "f=column_y.ply", True),
             ("ply_up_axis -y, SuperSplat's load transform (180 deg about z)", "f=column_minus_y.ply&rot=1", True),
             ("ply_up_axis -y, viewer defaults (expected upside down)", "f=column_minus_y.ply", False)]
    results = []
    with Site(PLY_PAGE, node_modules, files) as site:
        for i, (name, query, upright) in enumerate(cases):
            out = args.out.with_name(f"{args.out.stem}_ply_{i}.png")
            found = inspect(site.screenshot(query, out), test_object=True)
            drawn = found["drawn_fraction"] > 0.005
            results.append({"client": "GaussianSplats3D", "case": name, "screenshot": str(out),
                            **found, "ok": drawn and found["ok"] == upright})
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("glb", "obj", "ply"))
    parser.add_argument("--glb", type=Path, help="glb mode: GLB to open (default: a tall test object exported now)")
    parser.add_argument("--obj", type=Path, help="obj mode: OBJ to open, its MTL and texture next to it (default: "
                                                 "the tall test object exported now)")
    parser.add_argument("--ply", type=Path, help="ply mode: show this exported PLY (default: the test column cases)")
    parser.add_argument("--texture", type=int, default=0, help="glb mode: bake the test object's colours into a "
                                                                   "UV texture of this size")
    parser.add_argument("--npm", type=Path, help="a node_modules folder with three and @mkkellogg/gaussian-splats-3d "
                                                 "(default: npm install into a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path("browser_check.png"), help="screenshot path (prefix)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        node_modules = args.npm or install_packages(work / "npm")
        results = {"glb": check_glb, "obj": check_obj, "ply": check_ply}[args.mode](args, node_modules, work)
    for row in results:
        print(json.dumps(row))
    return 0 if all(row["ok"] for row in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
