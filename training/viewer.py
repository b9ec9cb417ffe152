"""Live browser view of the Gaussians while a run trains (``--viewer``), served with viser.

viser (https://viser.studio) serves the page, the GUI and the user's orbit camera; the images are ours:
each frame is rendered by :func:`gaussian_renderer.render` from a snapshot of the model and sent to the
page as its background image (the way gsplat's ``simple_trainer.py`` drives its viewer).

Threads and what they share:

- The training thread calls :meth:`LiveViewer.after_step` once per iteration. It does nothing unless
  the render thread has asked for a newer model (a ``threading.Event``) or the page paused training; then
  it copies the activated Gaussian tensors into an immutable :class:`Snapshot` (a few device memcpys) and,
  when paused, blocks until the page resumes.
- One render thread (per viewer, serving every connected page) renders the latest snapshot from each
  page's camera, at most ``viewer_max_fps`` frames per second and, while training runs, for at most
  ``viewer_render_share`` of the wall-clock time (on a CPU a frame costs about a training step), and asks
  for a newer snapshot after each frame. It never touches the live model, so the optimizer and
  densification cannot race with it.
- viser's own threads run the websocket server and the GUI callbacks (pause, resume, reset view).

nerfview (the wrapper gsplat's trainer uses) is not used: its lock is a module-level global shared by
every viewer, its render thread calls ``os._exit(1)`` on any render error, and it imports matplotlib,
splines and jaxtyping without declaring them.
"""
from __future__ import annotations

import contextlib
import errno
import io
import logging
import math
import socket
import threading
import time
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch

from gaussian_renderer import render
from scene.camera_sampler import look_at_cameras
from scene.cameras import Cameras
from scene.gaussian_model import GaussianModel, quat_to_rotmat
from scene.gaussian_tensors import GaussianTensors

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install viser"


class ViewerUnavailableError(RuntimeError):
    """--viewer was asked for but viser is not installed, or its address cannot be listened on."""


def import_viser():
    """The viser module, or ViewerUnavailableError with the install command."""
    try:
        import viser
    except ImportError as exc:
        raise ViewerUnavailableError(
            f"viewer=true (--viewer) needs the optional package viser, which is not installed: {INSTALL_HINT}"
        ) from exc
    return viser


def check_address(host: str, port: int) -> None:
    """ViewerUnavailableError unless this machine can listen on host:port (a busy port is fine: viser takes
    the next free one). viser's server thread retries a failing address forever, and the main thread
    waits for it, ignoring SIGTERM: the address is tried here, before the run folder exists."""
    fix = "use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface) or an address of this machine"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise ViewerUnavailableError(f"viewer_host={host!r} (--viewer_host) is not an address or a known host "
                                     f"name ({exc}): {fix}") from None
    with socket.socket(family, kind, proto) as sock:
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return
            if exc.errno == errno.EACCES:
                raise ViewerUnavailableError(f"viewer_port={port} (--viewer_port) cannot be opened here "
                                             f"({exc.strerror}; ports below 1024 need privileges): use a port "
                                             "from 1024 to 65535, e.g. 8080") from None
            raise ViewerUnavailableError(f"viewer_host={host!r} (--viewer_host) cannot be listened on "
                                         f"({exc.strerror}): {fix}") from None


@dataclass(frozen=True)
class ViewerSettings:
    """The viewer keys of a Config (taken from the command line, also when resuming a run)."""

    enabled: bool
    host: str
    port: int
    max_fps: float
    render_share: float
    resolution: int

    @staticmethod
    def from_config(cfg) -> "ViewerSettings":
        """The settings of cfg; raises ViewerUnavailableError (before any heavy work) when the viewer is
        on and viser is missing."""
        settings = ViewerSettings(enabled=cfg.viewer, host=cfg.viewer_host, port=cfg.viewer_port,
                                  max_fps=cfg.viewer_max_fps, render_share=cfg.viewer_render_share,
                                  resolution=cfg.viewer_resolution)
        if settings.enabled:
            import_viser()
            check_address(settings.host, settings.port)
        return settings


@dataclass(frozen=True)
class Snapshot:
    """A copy of the model at one training step, owned by the viewer."""

    step: int
    tensors: GaussianTensors
    time: float  # time.perf_counter() when it was taken

    @staticmethod
    @torch.no_grad()
    def of(model: GaussianModel, step: int) -> "Snapshot":
        live = model.gaussian_tensors()
        # means is the optimizer's leaf tensor (updated in place); the others are fresh activations,
        # cloned as well so the snapshot never aliases the model.
        tensors = replace(live, means=live.means.detach().clone(), quats=live.quats.clone(),
                          scales=live.scales.clone(), opacities=live.opacities.clone(),
                          sh_coeffs=live.sh_coeffs.clone())
        return Snapshot(step=step, tensors=tensors, time=time.perf_counter())

    @property
    def num_gaussians(self) -> int:
        return self.tensors.means.shape[0]


@dataclass(frozen=True)
class ViewerCamera:
    """A page's camera as viser reports it: OpenCV axes (x right, y down, z forward)."""

    wxyz: tuple[float, float, float, float]  # rotation camera -> world, (w, x, y, z)
    position: tuple[float, float, float]  # camera centre in world coordinates
    fov_y: float  # vertical field of view, radians
    width: int  # canvas size in pixels
    height: int

    @staticmethod
    def of(camera) -> "ViewerCamera":
        """From a viser CameraHandle."""
        return ViewerCamera(wxyz=tuple(float(v) for v in camera.wxyz),
                            position=tuple(float(v) for v in camera.position), fov_y=float(camera.fov),
                            width=int(camera.image_width), height=int(camera.image_height))

    def image_size(self, max_side: int) -> tuple[int, int]:
        """(width, height) with the canvas's aspect and the longer side at most max_side."""
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"canvas size must be positive, got {self.width}x{self.height}")
        scale = min(1.0, max_side / max(self.width, self.height))
        return max(1, round(self.width * scale)), max(1, round(self.height * scale))

    def cameras(self, max_side: int, device: torch.device) -> Cameras:
        """One camera [B=1] for the renderer, on device."""
        width, height = self.image_size(max_side)
        rot = quat_to_rotmat(torch.tensor([self.wxyz], dtype=torch.float64))[0]  # [3, 3] columns = camera axes
        center = torch.tensor([self.position], dtype=torch.float64)  # [1, 3]
        forward, down = rot[:, 2][None], rot[:, 1][None]  # [1, 3]
        radius = center.norm(dim=-1)  # [1]
        polar = torch.rad2deg(torch.acos((center[:, 2] / radius.clamp_min(1e-12)).clamp(-1.0, 1.0)))
        azimuth = torch.rad2deg(torch.atan2(center[:, 0], center[:, 1]))
        cams = look_at_cameras(center, center + forward, -down, torch.tensor([self.fov_y], dtype=torch.float64),
                               width, height, azimuth, polar, radius)
        return replace(cams, world_to_camera=cams.world_to_camera.float(), fov_x=cams.fov_x.float(),
                       fov_y=cams.fov_y.float(), azimuth_deg=cams.azimuth_deg.float(),
                       polar_deg=cams.polar_deg.float(), radius=cams.radius.float()).to(device)


class ShownFrame(NamedTuple):
    """What a frame sent to a page showed; the page gets a new one when any of this changes."""

    snapshot_time: float
    camera: ViewerCamera
    max_side: int


@torch.no_grad()
def render_image(snapshot: Snapshot, camera: ViewerCamera, max_side: int, background: torch.Tensor,
                 backend: str = "auto") -> np.ndarray:
    """[H, W, 3] uint8 image of the snapshot seen from camera (background: [3] on the snapshot's device)."""
    device = snapshot.tensors.means.device
    out = render(snapshot.tensors, camera.cameras(max_side, device), background, backend=backend)
    return (out.rgb[0].permute(1, 2, 0).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu().numpy()


def frame_interval(render_seconds: float, max_fps: float, render_share: float, training: bool) -> float:
    """Seconds from the start of one frame to the start of the next: at most max_fps frames per second
    and, while training runs, rendering for at most render_share of the time."""
    interval = 1.0 / max_fps
    return max(interval, render_seconds / render_share) if training else interval


def orbit_position(radius: float, polar_deg: float, azimuth_deg: float) -> tuple[float, float, float]:
    """C = r (sin t sin p, sin t cos p, cos t), the training cameras' orbit (z up, azimuth 0 at +y)."""
    t, p = math.radians(polar_deg), math.radians(azimuth_deg)
    return (radius * math.sin(t) * math.sin(p), radius * math.sin(t) * math.cos(p), radius * math.cos(t))


WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def page_url(host: str, port: int) -> str:
    """The page's address; a server on every interface is named by this machine's host name."""
    return f"http://{socket.gethostname() if host in WILDCARD_HOSTS else host}:{port}"


def ssh_hint(host: str, port: int) -> str:
    """How to open the page from another machine through an SSH port-forward."""
    target = "127.0.0.1" if host in WILDCARD_HOSTS else host
    return f"ssh -N -L {port}:{target}:{port} <user>@<this machine>, then open http://localhost:{port}"


@dataclass(frozen=True)
class HomeView:
    """The camera a page starts with (and 'Reset view' returns to): the first camera of the evaluation ring."""

    position: tuple[float, float, float]
    fov_y: float

    @staticmethod
    def from_config(cfg) -> "HomeView":
        cam = cfg.camera
        return HomeView(orbit_position(cam.default_radius, cam.default_polar, 0.0), float(cam.default_fovy))


class LiveViewer:
    """A viser server showing the training Gaussians; see the module docstring for the threads."""

    def __init__(self, settings: ViewerSettings, home: HomeView, background: torch.Tensor,
                 total_steps: int, backend: str = "auto"):
        viser = import_viser()
        self.settings, self.home, self.background = settings, home, background
        self.total_steps, self.backend = total_steps, backend
        self._latest: Snapshot | None = None
        self._lock = threading.Lock()  # guards _latest
        self._frame_wanted = threading.Event()  # render thread -> training thread: publish a snapshot
        self._running = threading.Event()  # cleared while the page has paused training
        self._running.set()
        self._wake = threading.Event()  # anything -> render thread: something changed
        self._stop = threading.Event()
        self._shown: dict[int, ShownFrame] = {}  # client id -> what its last frame showed
        self._finished = False
        self.frames_sent = 0
        self.render_seconds = 0.0  # spent in render_image, all frames
        with contextlib.redirect_stdout(io.StringIO()):  # viser prints a banner; we log the URL instead
            self.server = viser.ViserServer(host=settings.host, port=settings.port, label="SegmentDreamer",
                                            verbose=False)
        self._build_gui(viser.Icon)
        self._thread = self._start_render_thread()
        log.info("viewer: %s (from another machine: %s)", self.url, ssh_hint(settings.host, self.port))

    # ------------------------------------------------------------------ public

    @property
    def port(self) -> int:
        """The port served (viser takes the next free one when the asked one is busy)."""
        return self.server.get_port()

    @property
    def url(self) -> str:
        return page_url(self.settings.host, self.port)

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def pause(self) -> None:
        self._running.clear()
        self._show_pause_state()

    def resume(self) -> None:
        self._running.set()
        self._show_pause_state()

    def request_snapshot(self) -> None:
        """Ask the training thread for a copy of the model at its next step (the render thread does after
        each frame, a page when it connects)."""
        self._frame_wanted.set()

    def shown_camera(self, client_id: int) -> ViewerCamera | None:
        """The camera of the last frame sent to a page."""
        shown = self._shown.get(client_id)
        return None if shown is None else shown.camera

    def latest(self) -> Snapshot | None:
        with self._lock:
            return self._latest

    def after_step(self, step: int, model: GaussianModel) -> None:
        """The training loop's hook, once per iteration: publish a snapshot if the render thread asked
        for one (or this is the last step), and wait here while the page has training paused."""
        if step >= self.total_steps:
            self._finished = True
            self._pause_button.visible = self._resume_button.visible = False
            self.publish(step, model)
            return
        if self._frame_wanted.is_set():
            self.publish(step, model)
        if not self._running.is_set():
            self.publish(step, model)
            log.info("viewer: training paused at step %d", step)
            self._running.wait()
            log.info("viewer: training resumed")

    def publish(self, step: int, model: GaussianModel) -> None:
        """Hand the render thread a copy of the model as it is at this step."""
        self._frame_wanted.clear()
        snapshot = Snapshot.of(model, step)
        with self._lock:
            self._latest = snapshot
        self._wake.set()

    def close(self) -> None:
        """Stop the render thread and the server; unblock a paused training thread."""
        self._stop.set()
        self._running.set()
        self._wake.set()
        self._thread.join(timeout=10.0)
        with contextlib.redirect_stdout(io.StringIO()):
            self.server.stop()
        log.info("viewer: stopped (%d frames sent)", self.frames_sent)

    # ------------------------------------------------------------------ GUI (viser's callback threads)

    def _build_gui(self, icons) -> None:
        gui = self.server.gui
        self.server.scene.set_up_direction("+z")
        self.server.initial_camera.position = self.home.position
        self.server.initial_camera.look_at = (0.0, 0.0, 0.0)
        self.server.initial_camera.fov = self.home.fov_y
        self._status = gui.add_markdown("waiting for the first step")
        self._pause_button = gui.add_button("Pause training", icon=icons.PLAYER_PAUSE)
        self._resume_button = gui.add_button("Resume training", icon=icons.PLAYER_PLAY, visible=False)
        self._pause_button.on_click(lambda _: self.pause())
        self._resume_button.on_click(lambda _: self.resume())
        reset = gui.add_button("Reset view", icon=icons.HOME)
        reset.on_click(lambda event: self._reset_view(event.client))
        self._resolution = gui.add_slider("Max resolution", min=64, max=2048, step=32,
                                          initial_value=self.settings.resolution)
        self._resolution.on_update(lambda _: self._wake.set())
        self.server.on_client_connect(self._on_connect)
        self.server.on_client_disconnect(lambda client: self._shown.pop(client.client_id, None))

    def _on_connect(self, client) -> None:
        client.camera.on_update(lambda _: self._wake.set())
        self.request_snapshot()
        self._wake.set()

    def _reset_view(self, client) -> None:
        if client is None:
            return
        client.camera.position = self.home.position
        client.camera.look_at = (0.0, 0.0, 0.0)
        client.camera.up_direction = (0.0, 0.0, 1.0)
        client.camera.fov = self.home.fov_y

    def _show_pause_state(self) -> None:
        self._pause_button.visible = not self.paused
        self._resume_button.visible = self.paused
        self._wake.set()

    # ------------------------------------------------------------------ render thread

    def _start_render_thread(self) -> threading.Thread:
        device = self.background.device
        cuda_index = None if device.type != "cuda" else (
            device.index if device.index is not None else torch.cuda.current_device())
        thread = threading.Thread(target=self._render_loop, args=(cuda_index,), name="viewer-render", daemon=True)
        thread.start()
        return thread

    def _render_loop(self, cuda_index: int | None) -> None:
        if cuda_index is not None:  # a new thread starts on device 0
            torch.cuda.set_device(cuda_index)
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            started, rendering_before = time.perf_counter(), self.render_seconds
            snapshot = self.latest()
            clients = self.server.get_clients()
            if snapshot is None or not clients:
                continue
            try:
                for client_id, client in clients.items():
                    self._render_for(client_id, client, snapshot)
                self._status.content = self._status_text(snapshot)
            except Exception:  # a failed frame must not end the run: log it and keep serving
                log.exception("viewer: rendering a frame failed")
            if not self._finished:
                self.request_snapshot()
            training = not (self.paused or self._finished)
            interval = frame_interval(self.render_seconds - rendering_before, self.settings.max_fps,
                                      self.settings.render_share, training)
            self._stop.wait(max(0.0, interval - (time.perf_counter() - started)))

    def _render_for(self, client_id: int, client, snapshot: Snapshot) -> None:
        if client.camera.image_width <= 0 or client.camera.image_height <= 0:
            return
        camera = ViewerCamera.of(client.camera)
        max_side = int(self._resolution.value)
        key = ShownFrame(snapshot.time, camera, max_side)
        if self._shown.get(client_id) == key:
            return
        started = time.perf_counter()
        image = render_image(snapshot, camera, max_side, self.background, self.backend)
        self.render_seconds += time.perf_counter() - started
        client.scene.set_background_image(image, format="jpeg", jpeg_quality=85)
        self._shown[client_id] = key
        self.frames_sent += 1

    def _status_text(self, snapshot: Snapshot) -> str:
        state = "finished" if self._finished else ("paused" if self.paused else "training")
        return (f"**{state}** · step {snapshot.step} / {self.total_steps} · "
                f"{snapshot.num_gaussians:,} Gaussians")


class NoViewer:
    """Stands in for LiveViewer when the viewer is off, so the loop needs no branches."""

    def after_step(self, step: int, model: GaussianModel) -> None:
        pass

    def close(self) -> None:
        pass


def open_viewer(settings: ViewerSettings, cfg, device: torch.device, total_steps: int) -> LiveViewer | NoViewer:
    """A LiveViewer serving cfg's run when settings.enabled, else a NoViewer."""
    if not settings.enabled:
        return NoViewer()
    background = torch.full((3,), 1.0 if cfg.model.white_background else 0.0, device=device)
    return LiveViewer(settings, HomeView.from_config(cfg), background, total_steps, backend=cfg.pipeline.renderer)
