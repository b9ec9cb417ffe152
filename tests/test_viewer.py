"""The live viewer without a browser: camera conversion (known answer against the evaluation cameras),
snapshots, the training hook (publish on request, pause/resume), the server's URL and SSH hint, the
command-line keys, a missing viser, and a run with --viewer giving the same result as without.
The real-browser check is tests/test_viewer_browser.py."""
import importlib.util
import logging
import socket
import sys
import threading
from pathlib import Path

import pytest
import torch

import train
from bench.headless_chromium import free_port
from gaussian_renderer import render
from scene.camera_sampler import evaluation_ring
from scene.gaussian_model import GaussianModel
from training.viewer import (
    HomeView,
    LiveViewer,
    NoViewer,
    Snapshot,
    ViewerCamera,
    ViewerSettings,
    ViewerUnavailableError,
    frame_interval,
    open_viewer,
    orbit_position,
    page_url,
    render_image,
    ssh_hint,
)
from utils.config import ConfigError, load_config, parse_cli

requires_viser = pytest.mark.skipif(importlib.util.find_spec("viser") is None, reason="viser is not installed")

TINY_RUN = [
    "--quiet", "GuidanceParams.prior=analytic", "GuidanceParams.C_batch_size=2", "GenerateCamParams.image_w=32",
    "GenerateCamParams.image_h=32", "GenerateCamParams.init_num_pts=300", "OptimizationParams.iterations=4",
    "OptimizationParams.densify_from_iter=1", "OptimizationParams.densification_interval=2",
    "OptimizationParams.warmup_iter=2", "save_video=false", "export_mesh=false",
]


def blob_model(n: int = 400, seed: int = 0) -> GaussianModel:
    g = torch.Generator().manual_seed(seed)
    return GaussianModel.from_points(torch.randn(n, 3, generator=g) * 0.3, torch.rand(n, 3, generator=g), 0,
                                     opacity=0.5)


def viewer_camera_of(cameras, index: int) -> ViewerCamera:
    """What viser would report for cameras[index]: rotation camera -> world as (w, x, y, z) and the centre."""
    from viser.transforms import SO3

    rot_world_camera = cameras.world_to_camera[index, :3, :3].T.double().numpy()
    wxyz = SO3.from_matrix(rot_world_camera).wxyz
    center = cameras.camera_centers()[index]
    return ViewerCamera(tuple(float(v) for v in wxyz), tuple(float(v) for v in center),
                        float(cameras.fov_y[index]), cameras.width, cameras.height)


def start_viewer(port: int | None = None) -> LiveViewer:
    """A viewer on 127.0.0.1 for a 10-step run, the home camera on the evaluation orbit."""
    settings = ViewerSettings(enabled=True, host="127.0.0.1", port=port or free_port(), max_fps=20.0,
                              render_share=1.0, resolution=256)
    return LiveViewer(settings, HomeView(orbit_position(3.5, 90.0, 0.0), 0.55), torch.ones(3), total_steps=10)


@pytest.fixture
def viewer():
    live = start_viewer()
    yield live
    live.close()


@requires_viser
def test_viewer_camera_reproduces_the_evaluation_cameras():
    cfg = load_config(None, ["GenerateCamParams.image_w=48", "GenerateCamParams.image_h=32"])
    ring = evaluation_ring(cfg.camera, 5, True)
    model = blob_model()
    for i in range(len(ring)):
        cam = viewer_camera_of(ring, i).cameras(max_side=48, device=torch.device("cpu"))
        assert (cam.width, cam.height) == (48, 32)
        torch.testing.assert_close(cam.world_to_camera[0], ring.world_to_camera[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(cam.intrinsics()[0], ring[i].intrinsics()[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(cam.polar_deg, ring.polar_deg[i:i + 1], atol=1e-3, rtol=0)
        torch.testing.assert_close(cam.radius, ring.radius[i:i + 1], atol=1e-5, rtol=0)
    # the viewer's image is the renderer's image of that camera
    white = torch.ones(3)
    expected = render(model.gaussian_tensors(), ring[3], white).rgb[0]  # [3, H, W]
    image = render_image(Snapshot.of(model, 1), viewer_camera_of(ring, 3), 48, white)
    assert image.shape == (32, 48, 3)
    assert (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - expected).abs().max() <= 0.5 / 255 + 1e-6


def test_image_size_keeps_the_canvas_aspect_and_caps_the_longer_side():
    cam = ViewerCamera((1.0, 0.0, 0.0, 0.0), (0.0, 0.0, -3.0), 0.6, 1024, 625)
    assert cam.image_size(512) == (512, 312)
    assert cam.image_size(4096) == (1024, 625)  # never upsampled
    assert ViewerCamera((1.0, 0.0, 0.0, 0.0), (0.0, 0.0, -3.0), 0.6, 300, 900).image_size(300) == (100, 300)
    with pytest.raises(ValueError, match="canvas size must be positive, got 0x625"):
        ViewerCamera((1.0, 0.0, 0.0, 0.0), (0.0, 0.0, -3.0), 0.6, 0, 625).image_size(512)


def test_frames_are_paced_by_max_fps_and_by_the_render_share_while_training():
    assert frame_interval(0.001, 10.0, 0.25, training=True) == pytest.approx(0.1)  # fast renders: the fps cap
    assert frame_interval(0.3, 10.0, 0.25, training=True) == pytest.approx(1.2)  # slow: 0.3 s of every 1.2 s
    assert frame_interval(0.3, 10.0, 0.25, training=False) == pytest.approx(0.1)  # paused: only the cap
    assert frame_interval(0.3, 2.0, 1.0, training=True) == pytest.approx(0.5)


def test_snapshot_is_a_copy_the_optimizer_cannot_change():
    model = blob_model()
    live = model.gaussian_tensors()
    snap = Snapshot.of(model, 7)
    assert snap.step == 7 and snap.num_gaussians == 400
    for name in ("means", "quats", "scales", "opacities", "sh_coeffs"):
        torch.testing.assert_close(getattr(snap.tensors, name), getattr(live, name).detach())
        assert not getattr(snap.tensors, name).requires_grad
    means_before = snap.tensors.means.clone()
    with torch.no_grad():
        model.params()["xyz"].add_(1.0)  # what an optimizer step does to the leaf tensor
    torch.testing.assert_close(snap.tensors.means, means_before)


@requires_viser
def test_after_step_copies_the_model_only_when_asked(viewer):
    model = blob_model()
    for step in range(1, 4):
        viewer.after_step(step, model)
    assert viewer.latest() is None  # no page connected: nothing copied
    viewer.request_snapshot()
    viewer.after_step(4, model)
    viewer.after_step(5, model)
    assert viewer.latest().step == 4  # one copy per request
    viewer.after_step(10, model)  # the last step is always shown
    assert viewer.latest().step == 10


@requires_viser
def test_pause_blocks_the_training_hook_until_resumed(viewer):
    model = blob_model()
    viewer.pause()
    assert viewer.paused
    hook = threading.Thread(target=viewer.after_step, args=(3, model))
    hook.start()
    hook.join(timeout=0.5)
    assert hook.is_alive()  # training waits
    assert viewer.latest().step == 3  # and the page can still look at the paused model
    viewer.resume()
    hook.join(timeout=5.0)
    assert not hook.is_alive() and not viewer.paused


@requires_viser
def test_close_releases_a_paused_training_thread():
    live = start_viewer()
    live.pause()
    hook = threading.Thread(target=live.after_step, args=(2, blob_model()))
    hook.start()
    live.close()
    hook.join(timeout=5.0)
    assert not hook.is_alive()


@requires_viser
def test_viewer_logs_its_url_and_the_ssh_port_forward(caplog):
    port = free_port()
    with caplog.at_level(logging.INFO, logger="training.viewer"):
        live = start_viewer(port)
        try:
            assert live.port == port and live.url == f"http://127.0.0.1:{port}"
            with socket.create_connection(("127.0.0.1", port), timeout=5):  # it listens
                pass
        finally:
            live.close()
    text = caplog.text
    assert f"http://127.0.0.1:{port}" in text and f"ssh -N -L {port}:127.0.0.1:{port}" in text
    with pytest.raises(OSError):  # and stopped listening
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_url_and_ssh_hint_for_every_interface_or_one_address():
    assert page_url("127.0.0.1", 8080) == "http://127.0.0.1:8080"
    assert page_url("0.0.0.0", 8081) == f"http://{socket.gethostname()}:8081"
    assert ssh_hint("0.0.0.0", 8081).startswith("ssh -N -L 8081:127.0.0.1:8081 ")
    assert ssh_hint("10.1.2.3", 9000).startswith("ssh -N -L 9000:10.1.2.3:9000 ")
    assert ssh_hint("127.0.0.1", 9000).endswith("then open http://localhost:9000")


@requires_viser
def test_a_busy_port_moves_to_the_next_free_one(viewer):
    second = start_viewer(viewer.port)
    try:
        assert second.port > viewer.port
    finally:
        second.close()


def test_viewer_keys_on_the_command_line():
    cfg, _ = parse_cli([])
    assert (cfg.viewer, cfg.viewer_host, cfg.viewer_port) == (False, "127.0.0.1", 8080)
    assert isinstance(open_viewer(ViewerSettings.from_config(cfg), cfg, torch.device("cpu"), 5), NoViewer)
    cfg, _ = parse_cli(["--viewer", "--viewer_port", "9123", "--viewer_host", "0.0.0.0", "viewer_max_fps=4"])
    assert (cfg.viewer, cfg.viewer_host, cfg.viewer_port, cfg.viewer_max_fps) == (True, "0.0.0.0", 9123, 4.0)
    with pytest.raises(ConfigError, match="viewer_port"):
        parse_cli(["--viewer_port", "0"])
    with pytest.raises(ConfigError, match="viewer_max_fps"):
        parse_cli(["viewer_max_fps=0"])
    with pytest.raises(ConfigError, match="viewer_render_share"):
        parse_cli(["viewer_render_share=1.5"])


def test_missing_viser_is_reported_before_any_work(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "viser", None)  # import viser -> ImportError
    cfg, _ = parse_cli(["--viewer"])
    with pytest.raises(ViewerUnavailableError, match="pip install viser"):
        ViewerSettings.from_config(cfg)
    assert train.main([*TINY_RUN, f"output_dir={tmp_path}", "--viewer"]) == 2
    assert "pip install viser" in caplog.text
    assert not list(Path(tmp_path).iterdir())  # no run folder was made
    assert ViewerSettings.from_config(parse_cli([])[0]).enabled is False  # off: viser is not needed


@requires_viser
def test_a_run_with_the_viewer_on_trains_exactly_as_without(tmp_path):
    port = free_port()
    assert train.main([*TINY_RUN, f"output_dir={tmp_path / 'on'}", "--viewer", "--viewer_port", str(port)]) == 0
    assert train.main([*TINY_RUN, f"output_dir={tmp_path / 'off'}"]) == 0
    on, off = (next((tmp_path / mode).glob("*/*")) for mode in ("on", "off"))
    log_text = (on / "train.log").read_text()
    assert f"viewer: http://127.0.0.1:{port}" in log_text and "viewer: stopped" in log_text
    assert "viewer:" not in (off / "train.log").read_text()
    assert (on / "point_cloud.ply").read_bytes() == (off / "point_cloud.ply").read_bytes()


def test_the_page_starts_at_the_first_evaluation_camera():
    cfg = load_config(None, ["GenerateCamParams.default_polar=70", "GenerateCamParams.default_radius=4"])
    home = HomeView.from_config(cfg)
    ring = evaluation_ring(cfg.camera, 8, False)
    torch.testing.assert_close(torch.tensor(home.position), ring.camera_centers()[0], atol=1e-5, rtol=0)
    assert home.fov_y == cfg.camera.default_fovy


@requires_viser
def test_viewer_flags_apply_when_resuming(tmp_path):
    assert train.main([*TINY_RUN, f"output_dir={tmp_path}"]) == 0
    run = next(tmp_path.glob("*/*"))
    port = free_port()
    # a finished run resumes only to train further
    assert train.main(["--resume", str(run), "--quiet", "--viewer", "--viewer_port", str(port),
                       "OptimizationParams.iterations=6"]) == 0
    assert f"viewer: http://127.0.0.1:{port}" in (run / "train.log").read_text()


@requires_viser
def test_the_speed_bench_times_every_mode_and_compares_the_trained_gaussians():
    from bench import viewer_speed

    cfg = load_config("config/demo.yaml", ["viewer=true", "GenerateCamParams.image_w=32",
                                           "GenerateCamParams.image_h=32", "GenerateCamParams.init_num_pts=200"])
    modes = list(viewer_speed.MODES[:2])
    results = viewer_speed.measure(cfg, modes, iterations=3, repeats=1)
    assert list(results) == modes
    assert results[modes[0]].same_gaussians is None and results[modes[1]].same_gaussians is True
    assert all(t.ms_per_iteration > 0 and t.cpu_ms_per_iteration > 0 and t.frames == 0 for t in results.values())
    table = viewer_speed.table(results, cfg, 3, 1, "CPU").splitlines()
    assert table[2].startswith("| mode | ms / iteration | vs off |") and len(table) == 6
    assert table[4].startswith("| viewer off |") and "| +0.0% |" in table[4] and table[5].endswith("| yes |")


@requires_viser
def test_an_address_that_cannot_be_listened_on_is_a_user_error_before_training(tmp_path):
    """999.1.1.1 used to hang forever in viser's retry loop (SIGTERM ignored): a subprocess with a timeout,
    so a regression fails instead of hanging the suite."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "train.py", *TINY_RUN, f"output_dir={out}", "--viewer",
                           "--viewer_host", "999.1.1.1"], cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "viewer_host='999.1.1.1' (--viewer_host) is not an address" in proc.stderr, proc.stderr[-3000:]
    assert "use 127.0.0.1 (this machine only) or 0.0.0.0" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir())  # no run folder


def test_the_viewer_address_is_checked_before_the_run():
    from training.viewer import check_address

    unbound = r"viewer_host='192.0.2.1' \(--viewer_host\) cannot be listened on"
    with pytest.raises(ViewerUnavailableError, match=unbound):
        check_address("192.0.2.1", free_port())  # TEST-NET-1 (RFC 5737): on no machine's interfaces
    with pytest.raises(ViewerUnavailableError, match="is not an address or a known host name"):
        check_address("no-such-host.invalid", free_port())
    check_address("127.0.0.1", free_port())
    with socket.socket() as busy:  # a busy port is fine: viser moves to the next free one
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        check_address("127.0.0.1", busy.getsockname()[1])
