"""One training run end to end: the run folder, the loop, checkpoints, evaluation and outputs."""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from gaussian_renderer.gsplat_backend import build_gsplat_in_background
from scene.camera_sampler import evaluation_ring, orbit_cameras
from scene.cameras import Cameras
from scene.init_preview import record_initial_cloud
from scene.ply_format import save_gaussian_ply, save_params_ply
from training.distributed import ProcessGroup
from training.final_outputs import EVALUATION, MESH, POINT_CLOUD, VIDEO, FinalOutputs, wanted_outputs
from training.health import HealthReport, NonFiniteTrainingError, TrainingStopped, stop_message
from training.lock import RunLock
from training.loop_timing import LoopTiming
from training.memory import OutOfMemoryStop, out_of_memory_message
from training.preflight import preflight
from training.run_dir import append_command, atomic_torch_save, host_copy, new_run_dir, write_run_metadata
from training.stop import RunInterrupted, StopRequest, TrainingInterrupted, on_disk_after_stop
from training.trainer import CHECKPOINT_VERSION, Trainer
from training.viewer import ViewerSettings, open_viewer
from utils.background_writer import BackgroundWriter
from utils.checkpoint_file import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from utils.config import Config, ConfigError, cuda_only_changes, save_config
from utils.files import atomic_write_text, free_bytes, is_disk_full, remove_stale_temp_files
from utils.media import save_frames, to_uint8, write_video
from utils.metrics import psnr
from utils.monitor import Monitor, setup_logging
from utils.seeding import seed_everything
from utils.timeline import Timeline

log = logging.getLogger(__name__)


@dataclass
class RunOutputs:
    run_dir: Path
    point_cloud: Path
    video: Path | None
    metrics: dict = field(default_factory=dict)
    mesh: Path | None = None


def schedule_points(iterations: int, ratio: int) -> set[int]:
    """Official test/save iterations: [k * iters / ratio for k = 1..ratio-1] + [iters]."""
    return {int(k * iterations / ratio) for k in range(1, ratio)} | {iterations}


def write_test_views(folder: Path, rgb, depth) -> None:
    """folder/rgb_000.png ... and depth_000.png ... from [B, H, W, 3] uint8 frames."""
    save_frames(rgb, folder, "rgb")
    save_frames(depth, folder, "depth")


def run_name(cfg: Config, opt_path: str | None) -> str:
    stem = Path(opt_path).stem if opt_path else "default"
    return f"{stem}_{cfg.guidance.guidance_type}_s{cfg.seed}"


def evaluation_size(cfg: Config) -> tuple[int, int]:
    """(width, height) of test views and videos: eval_resolution as the height (aspect kept), or the training size."""
    cam = cfg.camera
    if cfg.eval_resolution is None:
        return int(cam.image_w), int(cam.image_h)
    return max(1, round(cfg.eval_resolution * cam.image_w / cam.image_h)), int(cfg.eval_resolution)


def checkpoint_for(cfg: Config, run_dir: Path) -> dict:
    """The checkpoint of a run to resume; ConfigError when it has nothing left to train."""
    checkpoint = load_checkpoint(run_dir / CHECKPOINT_NAME)
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {run_dir / CHECKPOINT_NAME} has format version {checkpoint.get('version')}, "
                              f"this train.py reads version {CHECKPOINT_VERSION}: resume it with the version of the "
                              "code that wrote it (environment.json records its git commit)")
    step, iters = int(checkpoint["step"]), cfg.optim.iterations
    if step > iters:
        raise ConfigError(f"--resume {run_dir}: OptimizationParams.iterations={iters} is below the checkpoint's "
                          f"step {step}")
    if step == iters:
        missing = FinalOutputs.read(run_dir, iters).missing(wanted_outputs(cfg.save_video, cfg.export_mesh))
        if not missing:
            raise ConfigError(f"--resume {run_dir}: the run already finished its {iters} iterations; to train "
                              f"further add e.g. OptimizationParams.iterations={2 * iters} after --resume")
    return checkpoint


class DiskFullStopped(TrainingStopped):
    """A file of the run could not be written: its disk is full."""


class TrainingRun:
    """Runs a Trainer for cfg.optim.iterations steps and writes everything into run_dir."""

    def __init__(self, cfg: Config, run_dir: Path, trainer: Trainer, quiet: bool = False,
                 viewer: ViewerSettings | None = None, timeline: Timeline | None = None):
        self.cfg, self.run_dir, self.trainer, self.quiet = cfg, run_dir, trainer, quiet
        self.viewer = viewer or ViewerSettings.from_config(cfg)
        self.timeline = timeline or Timeline(time.time(), "the run's start")
        self.timing = LoopTiming(self.timeline, self.synchronize)
        iters = cfg.optim.iterations
        self.test_steps = {1} | schedule_points(iters, cfg.test_ratio)
        self.save_steps = schedule_points(iters, cfg.save_ratio)
        self.background = (torch.ones(3) if cfg.model.white_background else torch.zeros(3)).to(trainer.device)
        self.width, self.height = evaluation_size(cfg)
        self.metrics_path = run_dir / "metrics.json"
        self.metrics = json.loads(self.metrics_path.read_text()) if self.metrics_path.exists() else {}
        self.steps_done = 0  # iterations completed in this session
        self.checkpoint_step = trainer.step if trainer.step > 0 else None  # step of checkpoints/last.pt
        self.lrs: dict[str, float] = {}
        # the loop's files (checkpoints, snapshots, test views, TensorBoard images, metrics.json) are written
        # beside it, in order, until train() closes this; the final outputs are written on this thread
        self.writes = BackgroundWriter(enabled=cfg.background_writes)

    def write_metrics(self) -> None:
        self.writes.submit("metrics", atomic_write_text, self.metrics_path, json.dumps(self.metrics, indent=2) + "\n")

    def test_cameras(self) -> Cameras:
        return evaluation_ring(self.cfg.camera, 8, self.cfg.camera.render_45, self.width, self.height)

    def evaluate(self, step: int, monitor: Monitor | None) -> dict:
        """Test views to disk and TensorBoard; PSNR against the hidden scene if known."""
        out = self.trainer.render_views(self.test_cameras(), self.background)
        rgb, depth = to_uint8(out.rgb), to_uint8(out.depth)  # host copies: the PNGs are encoded beside the loop
        self.writes.submit("test views", write_test_views, self.run_dir / "test_views" / f"iter_{step:05d}", rgb,
                           depth)
        metrics = {"gaussians": self.trainer.gaussians.num_points}
        heldout_psnr = self.heldout_psnr()
        if heldout_psnr is not None:
            metrics["psnr_heldout"] = heldout_psnr
        if monitor is not None:
            monitor.log_frames("test/rgb", rgb, step)
            monitor.log_frames("test/depth", depth, step)
            for name, value in metrics.items():
                monitor.writer.add_scalar(f"test/{name}", value, step)
        return metrics

    def heldout_views(self):
        """8 views between the test ring's azimuths, at the middle of the training polar range."""
        cam = self.cfg.camera
        n = 8
        azimuth = torch.arange(n, dtype=torch.float32) * (360.0 / n) + 22.5
        polar = torch.full((n,), 0.5 * (cam.theta_range[0] + cam.theta_range[1]))
        return orbit_cameras(torch.full((n,), float(cam.default_radius)), polar, azimuth,
                             torch.full((n,), float(cam.default_fovy)), self.width, self.height)

    @torch.no_grad()
    def heldout_psnr(self) -> float | None:
        """PSNR of the held-out views against the prior's reference images; None when it has none."""
        cams = self.heldout_views()
        target = self.trainer.prior.reference_images(cams, self.background.expand(len(cams), 3))
        if target is None:
            return None
        pred = self.trainer.render_views(cams, self.background).rgb
        return float(psnr(pred, target))

    def healthy_state(self, what: str) -> bool:
        """Whether the Gaussians may be written now (finite, and the last step was applied); warns if not."""
        report = self.trainer.health.report_now()
        if report.parameters_finite and report.streak == 0:
            return True
        log.warning("step %d: %s not written: the last %d iteration(s) were skipped for NaN/Inf",
                    self.trainer.step, what, report.streak)
        return False

    def save_checkpoint(self, wait: bool = False) -> None:
        """checkpoints/last.pt from a host copy of the state, written beside the loop (wait: until it is on
        disk). checkpoint_step moves once the file is complete."""
        if self.healthy_state("checkpoint"):
            self.writes.submit("checkpoint", self._write_checkpoint, host_copy(self.trainer.state_dict()),
                               self.trainer.step)
        if wait:
            self.writes.wait()

    def _write_checkpoint(self, state: dict, step: int) -> None:
        atomic_torch_save(state, self.run_dir / CHECKPOINT_NAME)
        self.checkpoint_step = step

    def save_point_cloud(self, path: Path) -> None:
        save_gaussian_ply(self.trainer.gaussians, path, pad_sh_degree=self.cfg.ply_sh_degree,
                          up_axis=self.cfg.ply_up_axis)

    def save_snapshot(self, step: int) -> None:
        """point_cloud/iteration_<step>/point_cloud.ply, taken before this step's densification and opacity
        reset (as 3DGS's train.py saves), so a snapshot is never the nearly transparent post-reset state.
        The Gaussians are copied to the host here; the PLY is built and written beside the loop."""
        if self.healthy_state("point cloud"):
            gaussians = self.trainer.gaussians
            self.writes.submit("snapshot", save_params_ply, host_copy(gaussians.params()), gaussians.max_sh_degree,
                               self.run_dir / "point_cloud" / f"iteration_{step}" / "point_cloud.ply",
                               self.cfg.ply_sh_degree, self.cfg.ply_up_axis)

    def write_splat_formats(self, ply: Path) -> list[Path]:
        """The compressed splat files of `export_formats` next to the final PLY, in its up axis."""
        formats = [fmt for fmt in dict.fromkeys(self.cfg.export_formats) if fmt != "ply"]
        if not formats or not ply.is_file():
            return []
        from export.splat import default_output, load_splats, write_splats

        try:
            data = load_splats(ply, self.cfg.ply_up_axis)
            paths = [write_splats(data, default_output(ply, fmt), fmt) for fmt in formats]
        except ValueError as exc:  # splats no compressed file can hold (e.g. beyond .spz's coordinate range)
            log.warning("no %s written: %s", "/".join(formats), exc)
            return []
        for path in paths:
            log.info("splats: %s (%.2fx smaller than the PLY)", path, ply.stat().st_size / path.stat().st_size)
        return paths

    def write_mesh(self) -> Path | None:
        """mesh/mesh.glb and mesh/mesh.obj; None (with a warning) when the Gaussians have no surface."""
        from export.mesh import export_mesh, options_from_config

        with torch.no_grad():
            gaussians = self.trainer.gaussians.gaussian_tensors()
        try:
            return export_mesh(gaussians, self.run_dir / "mesh", options_from_config(self.cfg))["glb"]
        except ValueError as exc:
            log.warning("no mesh written: %s", exc)
            return None

    def write_turntable(self) -> Path:
        cams = evaluation_ring(self.cfg.camera, self.cfg.video_frames, False, self.width, self.height)
        out = self.trainer.render_views(cams, self.background)
        frames = to_uint8(torch.cat([out.rgb, out.depth.expand(-1, 3, -1, -1)], dim=-1))
        return write_video(frames, self.run_dir / "videos" / "turntable.mp4")

    def check_health(self, step: int, monitor: Monitor) -> None:
        """At log intervals: report skipped steps (log + TensorBoard); stop when NaN/Inf persists."""
        report = self.trainer.health.report()
        if report.skipped_new:
            log.warning("step %d: %d iteration(s) since the last report had NaN/Inf gradients or Gaussians and "
                        "were skipped (%d in all)", step, report.skipped_new, report.skipped_total)
        self.stop_if_broken(step, report)

    def stop_if_broken(self, step: int, report: HealthReport) -> None:
        patience = self.cfg.nonfinite_patience
        if not report.parameters_finite or report.worst_streak >= patience:
            raise NonFiniteTrainingError(stop_message(report, step, patience, self.lrs, self.checkpoint_step))

    def synchronize(self) -> None:
        """Wait for the queued device work, so that a wall-clock reading covers it (timing milestones only)."""
        if self.trainer.device.type == "cuda":
            torch.cuda.synchronize(self.trainer.device)

    def after_step(self, step: int, result, monitor: Monitor) -> None:
        """Logging and checkpoints due at this step (after its update)."""
        cfg = self.cfg
        self.lrs = {k.split("/", 1)[1]: v for k, v in result.scalars.items() if k.startswith("lr/")}
        monitor.log_step(step, {"loss/total": result.loss, **result.scalars,
                                "health/skipped_steps": self.trainer.health.skipped},
                         {"scene/gaussians": self.trainer.gaussians.num_points})
        if step % monitor.log_interval == 0:
            self.check_health(step, monitor)
        if cfg.preview_interval and step % cfg.preview_interval == 0:
            with self.timing.work("preview"):
                monitor.log_frames("train/rgb", to_uint8(result.render.rgb), step)
                monitor.log_frames("train/depth", to_uint8(result.render.depth), step)
        if step == cfg.optim.iterations or (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0):
            with self.timing.work("checkpoint"):
                self.save_checkpoint()

    def before_update(self, step: int, monitor: Monitor) -> None:
        """Test views and snapshots due at this step, taken after its backward pass and before its
        densification, opacity reset and optimizer step, where the official train.py takes them
        (`training_report` and `scene.save` come before the densification block): the test views of
        iteration k show the Gaussians that iteration k rendered."""
        if step in self.test_steps:
            with self.timing.work("evaluation"):
                self.metrics[f"iter_{step}"] = self.evaluate(step, monitor)
                self.write_metrics()
        if step in self.save_steps:
            with self.timing.work("snapshot"):
                self.save_snapshot(step)

    def loop(self, monitor: Monitor, stop: StopRequest, viewer) -> None:
        trainer = self.trainer
        for step in range(trainer.step + 1, self.cfg.optim.iterations + 1):
            due = step in self.test_steps or step in self.save_steps
            hook = functools.partial(self.before_update, step, monitor) if due else None
            result = trainer.train_step(step, before_update=hook)
            trainer.step = step
            self.steps_done += 1
            if self.steps_done == 1:
                self.timing.first_iteration_done()
            if trainer.compiled_prior_step == step:  # this step adopted the background compilation's programs
                self.timing.compiled_iteration_done(step, self.steps_done)
            viewer.after_step(step, trainer.gaussians)  # publishes a copy when asked; waits while paused
            self.after_step(step, result, monitor)
            if stop.requested:
                self.save_checkpoint(wait=True)
                raise TrainingInterrupted(step, stop.requested, self.run_dir, self.checkpoint_step)

    def record_timings(self) -> None:
        """metrics.json "timings": this session's milestones and its loop split (training/loop_timing.py)."""
        self.metrics["timings"] = self.timing.timings(self.steps_done, self.trainer.compiled_prior_step,
                                                      self.writes.seconds_by_kind)

    def record_session(self, start: int, seconds: float) -> None:
        sessions = self.metrics.setdefault("sessions", [])
        sessions.append({"start_step": start, "end_step": self.trainer.step, "seconds": round(seconds, 3)})
        self.metrics["train_seconds"] = sum(s["seconds"] for s in sessions)
        self.metrics["iterations"] = self.trainer.step
        self.metrics["skipped_steps"] = self.trainer.health.report_now().skipped_total
        self.write_metrics()

    def run(self, stop: StopRequest) -> RunOutputs:
        """Train to cfg.optim.iterations, then write the final outputs this run folder lacks."""
        start = self.trainer.step
        try:
            self.train(stop)
            return self.finish(start)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            raise DiskFullStopped(self.disk_full_message(exc)) from None

    def train(self, stop: StopRequest) -> None:
        trainer, cfg = self.trainer, self.cfg
        iters, start = cfg.optim.iterations, trainer.step
        monitor = Monitor(self.run_dir, iters, start, cfg.log_interval, self.quiet, writes=self.writes)
        viewer = open_viewer(self.viewer, cfg, trainer.device, iters)
        t0 = time.perf_counter()
        failed: BaseException | None = None
        try:
            if start == 0:
                record_initial_cloud(trainer.gaussians, cfg.camera, self.run_dir, monitor)
                self.metrics["initial"] = self.evaluate(0, monitor)
                self.write_metrics()
                self.timeline.log("renderer_ready", "initial evaluation done")
            self.timeline.mark("loop_start")
            self.loop(monitor, stop, viewer)
            self.synchronize()
            self.timeline.mark("loop_end")
        except BaseException as exc:
            failed = exc
            raise
        finally:
            write_error = self.finish_writes(failed)
            failed = failed or write_error
            # after a full disk, what still cannot be written (TensorBoard, metrics) must not hide which file failed
            with _disk_full_ignored(failed is not None):
                viewer.close()
            with _disk_full_ignored(failed is not None):
                monitor.close()
            if self.steps_done:
                with _disk_full_ignored(failed is not None):
                    self.record_timings()
                    self.record_session(start, time.perf_counter() - t0)
            if write_error is not None:
                raise write_error

    def finish_writes(self, failed: BaseException | None) -> BaseException | None:
        """Wait for the loop's background writes and stop their thread: whatever the loop handed over before
        a crash or a second Ctrl-C (a checkpoint) still lands. A failed write is returned to be raised, or
        only logged when the run already failed (`failed`: that first error, which it must not hide)."""
        try:
            self.writes.close()
        except Exception as exc:
            if failed is None:
                return exc
            log.warning("a file written beside the loop failed as well: %s", exc)
        return None

    def finish(self, start: int) -> RunOutputs:
        """The final outputs, each recorded in final_outputs.json once written: a run stopped between its last
        checkpoint and here gets on --resume exactly those it lacks. All come from one model, the state of the
        last iteration's snapshot (the last iteration updates nothing, see Trainer.train_step)."""
        cfg, iters = self.cfg, self.cfg.optim.iterations
        self.stop_if_broken(iters, self.trainer.health.report_now())
        record = FinalOutputs.read(self.run_dir, iters)
        missing = record.missing(wanted_outputs(cfg.save_video, cfg.export_mesh))
        if start == iters:  # resumed after its training ended
            log.info("the run trained its %d iterations but stopped before writing %s: writing them now", iters,
                     ", ".join(missing))
        if EVALUATION in missing:
            views = self.run_dir / "test_views" / f"iter_{iters:05d}"
            final = self.metrics.get(f"iter_{iters}") if views.is_dir() else None
            self.metrics["final"] = final or self.evaluate(iters, None)
            self.metrics["iterations"] = self.trainer.step
            self.write_metrics()
            record.mark(EVALUATION, views)
        ply = self.run_dir / "point_cloud.ply"
        if POINT_CLOUD in missing:
            self.save_point_cloud(ply)
            self.write_splat_formats(ply)
            record.mark(POINT_CLOUD, ply)
        if VIDEO in missing:
            record.mark(VIDEO, self.write_turntable())
        if MESH in missing:
            record.mark(MESH, self.write_mesh())
        if missing:
            self.metrics.setdefault("timings", {})["outputs_written"] = self.timeline.log("outputs_written",
                                                                                          "outputs written")
            self.write_metrics()
        written = {name: None if path is None else self.run_dir / path for name, path in record.written.items()}
        outputs = RunOutputs(run_dir=self.run_dir, point_cloud=ply, video=written.get(VIDEO), metrics=self.metrics,
                             mesh=written.get(MESH))
        log_summary(outputs, start)
        return outputs

    def disk_full_message(self, exc: OSError) -> str:
        """What could not be written, what was kept, and what to do."""
        run_dir = self.run_dir
        failed = Path(exc.filename) if exc.filename else None
        what = (f"could not write {failed}" if failed is not None
                else f"could not write a file in {run_dir} (e.g. its TensorBoard log)")
        free = free_bytes(run_dir)
        space = f" ({free / 2**20:.1f} MiB free there now)" if free is not None else ""
        head = f"training stopped at step {self.trainer.step}: the disk is full: {what}{space}. "
        if self.checkpoint_step is None:
            return head + ("No checkpoint was written yet, so nothing can be resumed: free some space and start "
                           "the run again")
        kept = f"Kept: the checkpoint of step {self.checkpoint_step} ({run_dir / CHECKPOINT_NAME}), intact"
        if self.checkpoint_step == self.cfg.optim.iterations:
            kept += ": the run finished training and --resume writes the final outputs it lacks"
        return head + f"{kept}. Free some space, then continue with: python train.py --resume {run_dir}"


@contextlib.contextmanager
def _disk_full_ignored(ignore: bool):
    """Swallow (with a debug line) a full-disk OSError when `ignore`: a cleanup after a failure."""
    try:
        yield
    except OSError as exc:
        if not (ignore and is_disk_full(exc)):
            raise
        log.debug("not written either, the disk being full: %s", exc)


def log_summary(outputs: RunOutputs, start: int) -> None:
    """End-of-run summary in train.log (and on the console)."""
    m = outputs.metrics
    seconds = m.get("train_seconds", 0.0)
    log.info("finished: %d iterations (this session from step %d), %.1f s of training in %d session(s), "
             "%.2f it/s overall", m.get("iterations", 0), start, seconds, len(m.get("sessions", [])),
             m.get("iterations", 0) / max(seconds, 1e-9))
    final, initial = m.get("final", {}), m.get("initial", {})
    log.info("Gaussians: %s; skipped NaN/Inf steps: %d", final.get("gaussians"), m.get("skipped_steps", 0))
    if "psnr_heldout" in final and "psnr_heldout" in initial:
        log.info("held-out PSNR: %.2f dB -> %.2f dB", initial["psnr_heldout"], final["psnr_heldout"])
    log.info("point cloud: %s", outputs.point_cloud.resolve())
    if outputs.video is not None:
        log.info("video: %s", outputs.video.resolve())


def resumed_trainer_config(cfg: Config) -> Config:
    """A resumed run's Gaussians come from its checkpoint: its Trainer starts from a sphere instead of
    running the configured generator (Point-E, Shap-E) or reading init_path again."""
    return replace(cfg, camera=replace(cfg.camera, init_shape="sphere"))


def _build_trainer(cfg: Config, checkpoint: dict | None, prior, group: ProcessGroup, device) -> Trainer:
    seed_everything(cfg.seed)
    trainer = Trainer(cfg if checkpoint is None else resumed_trainer_config(cfg), prior=prior, device=device,
                      group=group)
    if trainer.device.type != "cuda":
        for setting in cuda_only_changes(cfg.pipeline):
            log.warning("%s has no effect on a %s run: the key acts on CUDA only", setting,
                        trainer.device.type.upper())
    group.broadcast_tensors(list(trainer.gaussians.params().values()))  # rank 0's start on every process
    return trainer


def _build(cfg: Config, run_dir: Path, checkpoint: dict | None, quiet: bool, prior, group: ProcessGroup,
           device, viewer: ViewerSettings | None = None, timeline: Timeline | None = None) -> TrainingRun:
    timeline = timeline or Timeline(time.time(), "the run's start")
    trainer = _build_trainer(cfg, checkpoint, prior, group, device)
    timeline.log("model_loaded", "model and Gaussians ready")
    if cfg.pipeline.compile_in_background:
        trainer.warm_up_prior(background=True)
        timeline.log("prior_warmed_up", "UNet and VAE encoder warmed up uncompiled; compiling in the background")
    else:
        trainer.warm_up_prior()
        timeline.log("prior_compiled", "UNet and VAE encoder compiled")
    if checkpoint is not None:
        try:
            trainer.load_state_dict(checkpoint)
        except (KeyError, ValueError, RuntimeError) as exc:  # e.g. a file from an edited config or other code
            raise CheckpointError(f"checkpoint {run_dir / CHECKPOINT_NAME} does not fit this run's configuration "
                                  f"({type(exc).__name__}: {exc})") from None
        log.info("resumed from step %d", trainer.step)
    log.info("%s loss, %s prior, %d Gaussians, %d iterations on %s%s", cfg.guidance.guidance_type,
             cfg.guidance.prior, trainer.gaussians.num_points, cfg.optim.iterations, trainer.device,
             f" and {group.world_size - 1} more processes" if group.distributed else "")
    return TrainingRun(cfg, run_dir, trainer, quiet, viewer, timeline)


def _remove_unstarted(run_dir: Path, quiet: bool) -> None:
    """A fresh run that failed before its first step leaves nothing behind."""
    setup_logging(None, quiet)  # closes train.log before the folder goes
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in (run_dir.parent, run_dir.parent.parent):  # the workspace and output folders, if now empty
        try:
            parent.rmdir()
        except OSError:
            break
    log.info("removed %s: the run failed before its first step", run_dir)


def fixed_run_dir(run_dir: Path) -> Path:
    """A run folder named by the caller (a sweep): created, and refused unless it is new or empty."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if any(run_dir.iterdir()):
        raise FileExistsError(f"run folder {run_dir.resolve()} is not empty: pass resume= to continue it")
    return run_dir


def uses_gsplat(cfg: Config) -> bool:
    """Whether this run renders with gsplat (a CUDA device and a renderer that is not the PyTorch one)."""
    return (cfg.pipeline.renderer != "torch" and cfg.pipeline.device != "cpu" and torch.cuda.is_available())


def follow_steps(trainer: Trainer, iterations: int) -> None:
    """A process other than rank 0 of a multi-process run: take its share of every step, write nothing."""
    for step in range(trainer.step + 1, iterations + 1):
        trainer.train_step(step)
        trainer.step = step


def stopped_run_error(exc: BaseException, cfg: Config, run_dir: Path, run: TrainingRun | None,
                      removed: bool) -> BaseException | None:
    """The exception that tells the user what an unexpected end left on disk (out of GPU memory, Ctrl-C
    that did not wait for a checkpoint); None to re-raise `exc` as it is."""
    checkpoint_step = None if run is None else run.checkpoint_step
    if isinstance(exc, torch.OutOfMemoryError):
        return OutOfMemoryStop(out_of_memory_message(cfg, None if run is None else run.trainer.device,
                                                     None if run is None else run.trainer.step, run_dir,
                                                     checkpoint_step, removed))
    if type(exc) is KeyboardInterrupt:
        step = "before the first step" if run is None else f"after step {run.trainer.step}"
        return RunInterrupted(f"interrupted {step}: {on_disk_after_stop(run_dir, checkpoint_step, removed)}")
    return None


def train(cfg: Config, opt_path: str | None, argv: list[str], resume: str | None = None,
          quiet: bool = False, prior=None, group: ProcessGroup | None = None,
          run_dir: Path | None = None, timeline: Timeline | None = None) -> RunOutputs | None:
    """Check, build everything from cfg and run it (the body of train.py).

    A fresh run gets a new folder (or `run_dir`, new or empty, from a sweep that also passes its loaded
    `prior`); with `resume`, cfg is the run folder's config (see utils.config.load_run_config) and
    training continues from its checkpoint. Under torchrun (`group`, default one process) the processes
    share each step's cameras (training.distributed); rank 0 writes and returns the outputs, the
    other ranks return None. `timeline` (train.py: seconds since launch) logs the start-up milestones.
    """
    group = group or ProcessGroup()
    timeline = timeline or Timeline(time.time(), "the start of train()")
    if uses_gsplat(cfg):
        build_gsplat_in_background()  # overlaps the model load and compilation (issue 20)
    device = None
    if group.distributed:
        device = group.device(cfg.pipeline.device)
        group.start(device)
        if not group.is_writer:
            _train_follower(cfg, resume, prior, group, device)
            group.barrier(device)  # rank 0 still evaluates and writes: leave together
            return None
    outputs = _train_writer(cfg, opt_path, argv, resume, quiet, prior, group, device, run_dir, timeline)
    group.barrier(device)
    return outputs


def _train_follower(cfg: Config, resume: str | None, prior, group: ProcessGroup, device) -> None:
    run_dir = group.broadcast_object(None)
    if run_dir is None:  # rank 0 refused the run before creating it, and reports why
        raise SystemExit(2)
    checkpoint = load_checkpoint(Path(run_dir) / CHECKPOINT_NAME) if resume else None
    trainer = None
    try:
        trainer = _build_trainer(cfg, checkpoint, prior, group, device)
        trainer.warm_up_prior(background=cfg.pipeline.compile_in_background)  # as rank 0: the steps wait for all
        if checkpoint is not None:
            trainer.load_state_dict(checkpoint)
        follow_steps(trainer, cfg.optim.iterations)
    except torch.OutOfMemoryError:  # rank 0 says what was kept; this rank says where it failed
        raise OutOfMemoryStop(out_of_memory_message(cfg, device, None if trainer is None else trainer.step,
                                                    None)) from None
    except KeyboardInterrupt:
        raise RunInterrupted(f"rank {group.rank} interrupted: it writes nothing, rank 0's message says what the "
                             "run folder holds") from None
    return None


def _train_writer(cfg: Config, opt_path: str | None, argv: list[str], resume: str | None, quiet: bool, prior,
                  group: ProcessGroup, device, run_dir: Path | None, timeline: Timeline) -> RunOutputs:
    try:
        preflight(cfg, resume=bool(resume), prior_given=prior is not None)
        viewer = ViewerSettings.from_config(cfg)  # also on --resume; checks that viser is installed
        if resume:
            run_dir = Path(resume)
        elif run_dir is not None:
            run_dir = fixed_run_dir(run_dir)
        else:
            run_dir = new_run_dir(Path(cfg.output_dir).expanduser(), cfg.model.workspace, run_name(cfg, opt_path))
        checkpoint = checkpoint_for(cfg, run_dir) if resume else None  # a refused resume leaves the folder untouched
    except BaseException:
        group.broadcast_object(None)  # the other processes stop too
        raise
    group.broadcast_object(str(run_dir))
    run = None
    with RunLock(run_dir), StopRequest() as stop:
        try:
            setup_logging(run_dir, quiet)
            log.info("run folder: %s", run_dir.resolve())
            if resume:  # left by a process killed mid-write (their final names hold the previous versions)
                for stale in remove_stale_temp_files(run_dir):
                    log.info("removed the temporary file %s left by an interrupted write", stale)
            save_config(cfg, run_dir / "config.yaml")
            (append_command if resume else write_run_metadata)(run_dir, argv)
            run = _build(cfg, run_dir, checkpoint, quiet, prior, group, device, viewer, timeline)
            return run.run(stop)
        except BaseException as exc:
            removed = not resume and (run is None or run.steps_done == 0)
            if removed:
                _remove_unstarted(run_dir, quiet)
            error = stopped_run_error(exc, cfg, run_dir, run, removed)
            if error is None:
                raise
            raise error from None
