"""The live viewer in a real browser (headless Chromium, software WebGL), on 127.0.0.1.

Three coloured blobs are served; after the page has streamed a frame, a screenshot must show each blob's
colour where the page's camera projects it, equal the server's own render of that camera pixel for
pixel (up to JPEG, and to resampling when a moving page reports a smaller canvas), and differ from the
empty page. The page's Pause/Resume buttons must pause and
release the training hook, a mouse drag on the canvas must turn the camera and bring a frame of the new
view, and Reset view must bring the first view back.
Skips when no Chromium is installed (apt-get install chromium).
"""
import importlib.util
import threading
import time

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from bench.headless_chromium import HeadlessChromium, find_chromium
from scene.gaussian_model import GaussianModel
from training.viewer import HomeView, LiveViewer, ViewerCamera, ViewerSettings, orbit_position, render_image

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(find_chromium() is None, reason="no Chromium on PATH (apt-get install chromium)"),
    pytest.mark.skipif(importlib.util.find_spec("viser") is None, reason="viser is not installed"),
]

# world positions and colours; the home camera looks from +y at the origin with z up, so world -x is
# on the image's right
BLOBS = {"red": ((0.0, 0.0, 0.55), (0.95, 0.1, 0.1)), "green": ((-0.6, 0.0, -0.35), (0.1, 0.9, 0.1)),
         "blue": ((0.6, 0.0, -0.35), (0.1, 0.15, 0.95))}
WHITE = np.array([255, 255, 255])


def blobs_model(per_blob: int = 150) -> GaussianModel:
    g = torch.Generator().manual_seed(0)
    xyz = torch.cat([torch.tensor(c) + 0.08 * torch.randn(per_blob, 3, generator=g) for c, _ in BLOBS.values()])
    rgb = torch.tensor([colour for _, colour in BLOBS.values()]).repeat_interleave(per_blob, 0)
    return GaussianModel.from_points(xyz, rgb, 0, opacity=0.6)


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"waited {timeout} s for {what}")


def only_client(viewer: LiveViewer):
    clients = viewer.server.get_clients()
    return next(iter(clients.values())) if len(clients) == 1 else None


def settled_and_shown(viewer: LiveViewer, client) -> ViewerCamera | None:
    """The page's camera once it has stopped moving for a second (orbit controls damp a drag, and a slow
    software-WebGL page reports the motion late) and the last frame sent shows it; else None."""
    camera = ViewerCamera.of(client.camera)
    time.sleep(1.0)
    still = ViewerCamera.of(client.camera) == camera
    return camera if still and viewer.shown_camera(client.client_id) == camera else None


def click_button(browser: HeadlessChromium, label: str) -> bool:
    return browser.evaluate(
        f"(() => {{ const b = [...document.querySelectorAll('button')].find(b => b.innerText.includes('{label}'));"
        f" if (!b) return false; b.click(); return true; }})()")


def drag(browser: HeadlessChromium, start: tuple[int, int], end: tuple[int, int], steps: int = 10) -> None:
    browser.call("Input.dispatchMouseEvent", type="mousePressed", x=start[0], y=start[1], button="left",
                 buttons=1, clickCount=1)
    for i in range(1, steps + 1):
        x = start[0] + (end[0] - start[0]) * i / steps
        y = start[1] + (end[1] - start[1]) * i / steps
        browser.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y, button="left", buttons=1)
        time.sleep(0.03)
    browser.call("Input.dispatchMouseEvent", type="mouseReleased", x=end[0], y=end[1], button="left",
                 buttons=0, clickCount=1)


def projected_pixels(camera: ViewerCamera) -> dict[str, tuple[int, int]]:
    """(x, y) pixel of each blob centre on the canvas."""
    cams = camera.cameras(max(camera.width, camera.height), torch.device("cpu"))
    points = torch.tensor([c for c, _ in BLOBS.values()])
    cam_points = (cams.world_to_camera[0, :3, :3] @ points.T).T + cams.world_to_camera[0, :3, 3]
    uvw = (cams.intrinsics()[0] @ cam_points.T).T
    uv = (uvw[:, :2] / uvw[:, 2:]).round().int().tolist()
    return {name: (u, v) for name, (u, v) in zip(BLOBS, uv, strict=True)}


def stretched(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[H, W, 3] uint8 image resized (bilinear) to size = (height, width), as the page shows it."""
    if image.shape[:2] == tuple(size):
        return image
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    resized = torch.nn.functional.interpolate(tensor, size=size, mode="bilinear", align_corners=False)
    return resized[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def patch_mean(image: np.ndarray, xy: tuple[int, int], half: int = 6) -> np.ndarray:
    x, y = xy
    return image[y - half:y + half + 1, x - half:x + half + 1].reshape(-1, 3).mean(0)


def test_the_viewer_page_shows_the_gaussians_and_controls_training(tmp_path):
    settings = ViewerSettings(enabled=True, host="127.0.0.1", port=18090, max_fps=10.0, render_share=1.0,
                              resolution=2048)
    viewer = LiveViewer(settings, HomeView(orbit_position(3.5, 90.0, 0.0), 0.55), torch.ones(3), total_steps=100)
    model = blobs_model()
    try:
        with HeadlessChromium(1024, 768) as browser:
            browser.open(viewer.url)
            client = wait_until(lambda: only_client(viewer), 60, "the page to connect")
            time.sleep(1.0)
            empty = browser.screenshot()
            iio.imwrite(tmp_path / "viewer_empty.png", empty)

            viewer.after_step(1, model)  # the page asked for a snapshot when it connected
            assert viewer.latest() is not None and viewer.latest().step == 1
            wait_until(lambda: viewer.frames_sent >= 1, 30, "the first frame")
            camera = ViewerCamera.of(client.camera)
            wait_until(lambda: np.abs(browser.screenshot().astype(int) - empty).mean() > 5, 20,
                       "the frame to appear in the page")
            time.sleep(0.5)
            shot = browser.screenshot()
            iio.imwrite(tmp_path / "viewer_scene.png", shot)
            height, width = shot.shape[:2]
            expected = stretched(render_image(viewer.latest(), camera, 2048, torch.ones(3)), (height, width))

            # the frame fills the canvas: same aspect as the page's camera (and, at rest, the same size)
            assert abs(camera.width / camera.height - width / height) < 0.01
            scale = width / camera.width
            pixels = {name: (round(x * scale), round(y * scale)) for name, (x, y) in projected_pixels(camera).items()}
            assert pixels["green"][0] > width // 2 > pixels["blue"][0]  # world -x on the right
            assert pixels["red"][1] < height // 2 < pixels["green"][1]  # z up
            for name, xy in pixels.items():
                colour = patch_mean(shot, xy)
                channel = ("red", "green", "blue").index(name)
                assert colour[channel] > 150 and colour[channel] - np.delete(colour, channel).max() > 80, \
                    (name, colour)
                assert np.abs(patch_mean(empty, xy) - WHITE).max() < 10  # nothing there on the empty page
            # pixel for pixel against the server's render, away from the GUI panel and notices
            rows, cols = slice(160, height - 80), slice(330, 680)
            diff = np.abs(shot[rows, cols].astype(int) - expected[rows, cols].astype(int))
            assert diff.mean() < 4 and np.percentile(diff, 99) < 40, (diff.mean(), np.percentile(diff, 99))
            assert np.abs(shot[rows, cols].astype(int) - empty[rows, cols].astype(int)).mean() > 20

            # Pause and Resume from the page
            assert click_button(browser, "Pause training")
            wait_until(lambda: viewer.paused, 10, "the page's pause")
            hook = threading.Thread(target=viewer.after_step, args=(2, model))
            hook.start()
            hook.join(timeout=1.0)
            assert hook.is_alive()
            assert click_button(browser, "Resume training")
            hook.join(timeout=10.0)
            assert not hook.is_alive() and not viewer.paused

            # the user's camera: a drag orbits it around the look-at point, and a frame of the new view follows
            before = np.array(client.camera.position)
            drag(browser, (300, 420), (700, 420))
            wait_until(lambda: np.abs(np.array(client.camera.position) - before).max() > 0.5, 20,
                       "the camera to move")
            moved = wait_until(lambda: settled_and_shown(viewer, client), 30, "the new view to settle and show")
            assert abs(np.linalg.norm(client.camera.position - client.camera.look_at) - 3.5) < 0.05
            time.sleep(1.0)
            turned = browser.screenshot()
            iio.imwrite(tmp_path / "viewer_turned.png", turned)
            assert ViewerCamera.of(client.camera) == moved
            # the page may report a smaller canvas while it moves (viser lowers its pixel ratio); the image
            # it is sent is stretched over the canvas
            expected = stretched(render_image(viewer.latest(), moved, 2048, torch.ones(3)), turned.shape[:2])
            diff = np.abs(turned[rows, cols].astype(int) - expected[rows, cols].astype(int))
            assert diff.mean() < 4 and np.percentile(diff, 99) < 40, (diff.mean(), np.percentile(diff, 99))
            assert np.abs(turned[rows, cols].astype(int) - shot[rows, cols].astype(int)).mean() > 10

            # Reset view brings back the first view
            assert click_button(browser, "Reset view")
            wait_until(lambda: np.abs(np.array(client.camera.position) - before).max() < 1e-3, 20,
                       "the camera to return home")
            wait_until(lambda: settled_and_shown(viewer, client), 30, "the home view to show")
            home = browser.screenshot()
            assert np.abs(home[rows, cols].astype(int) - shot[rows, cols].astype(int)).mean() < 4
    finally:
        viewer.close()
