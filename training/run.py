"""One training run end to end: the run folder, the loop, checkpoints, evaluation and outputs."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scene.camera_sampler import evaluation_ring, orbit_cameras
from utils.config import Config, load_config, save_config
from utils.media import save_images, to_uint8, write_video
from utils.metrics import psnr
from utils.monitor import Monitor
from training.run_dir import atomic_torch_save, atomic_write_text, new_run_dir, write_run_metadata
from utils.seeding import seed_everything
from training.trainer import Trainer
from training.viewer import ViewerSettings, open_viewer

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoints/last.pt"


@dataclass
class RunOutputs:
    run_dir: Path
    point_cloud: Path
    video: Path | None
    metrics: dict = field(default_factory=dict)


def schedule_points(iterations: int, ratio: int) -> set[int]:
    """Official test/save iterations: [k * iters / ratio for k = 1..ratio-1] + [iters]."""
    return {int(k * iterations / ratio) for k in range(1, ratio)} | {iterations}


def run_name(cfg: Config, opt_path: str | None) -> str:
    stem = Path(opt_path).stem if opt_path else "default"
    return f"{stem}_{cfg.guidance.guidance_type}_s{cfg.seed}"


def open_run(cfg: Config, opt_path: str | None, argv: list[str], resume: str | None) -> tuple[Config, Path, dict | None]:
    """A fresh run folder (never reusing one), or the folder and checkpoint of a run to resume."""
    if resume:
        run_dir = Path(resume)
        checkpoint = run_dir / CHECKPOINT_NAME
        if not checkpoint.is_file():
            raise FileNotFoundError(f"--resume {resume}: no checkpoint at {checkpoint.resolve()}")
        cfg = load_config(run_dir / "config.yaml", warn_no_effect=False)
        return cfg, run_dir, torch.load(checkpoint, map_location="cpu", weights_only=False)
    run_dir = new_run_dir(Path(cfg.output_dir), cfg.model.workspace, run_name(cfg, opt_path))
    save_config(cfg, run_dir / "config.yaml")
    write_run_metadata(run_dir, argv)
    return cfg, run_dir, None


class TrainingRun:
    """Runs a Trainer for cfg.optim.iterations steps and writes everything into run_dir."""

    def __init__(self, cfg: Config, run_dir: Path, trainer: Trainer, quiet: bool = False,
                 viewer: ViewerSettings | None = None):
        self.cfg, self.run_dir, self.trainer, self.quiet = cfg, run_dir, trainer, quiet
        self.viewer = viewer or ViewerSettings.from_config(cfg)
        iters = cfg.optim.iterations
        self.test_steps = {1} | schedule_points(iters, cfg.test_ratio)
        self.save_steps = schedule_points(iters, cfg.save_ratio)
        self.white = torch.ones(3, device=trainer.device)

    def evaluate(self, step: int, monitor: Monitor | None) -> dict:
        """Test views (white background) to disk and TensorBoard; PSNR against the hidden scene if known."""
        cams = self.trainer.test_cameras()
        out = self.trainer.render_views(cams, self.white)
        folder = self.run_dir / "test_views" / f"iter_{step:05d}"
        save_images(out.rgb, folder, "rgb")
        save_images(out.depth, folder, "depth")
        metrics = {"gaussians": self.trainer.gaussians.num_points}
        if hasattr(self.trainer.prior, "target_images"):
            metrics["psnr_heldout"] = self.heldout_psnr()
        if monitor is not None:
            monitor.log_images("test/rgb", out.rgb[:8], step)
            monitor.log_images("test/depth", out.depth[:8], step)
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
                             torch.full((n,), float(cam.default_fovy)), cam.image_w, cam.image_h)

    @torch.no_grad()
    def heldout_psnr(self) -> float:
        cams = self.heldout_views()
        bg = self.white.expand(len(cams), 3)
        pred = self.trainer.render_views(cams, self.white).rgb
        target = self.trainer.prior.target_images(cams, bg)
        return float(psnr(pred, target))

    def save_checkpoint(self) -> None:
        atomic_torch_save(self.trainer.state_dict(), self.run_dir / CHECKPOINT_NAME)

    def write_turntable(self) -> Path:
        cams = evaluation_ring(self.cfg.camera, self.cfg.video_frames, False)
        out = self.trainer.render_views(cams, self.white)
        frames = to_uint8(torch.cat([out.rgb, out.depth.expand(-1, 3, -1, -1)], dim=-1))
        return write_video(frames, self.run_dir / "videos" / "turntable.mp4")

    def run(self) -> RunOutputs:
        trainer, cfg = self.trainer, self.cfg
        iters, start = cfg.optim.iterations, trainer.step
        metrics_path = self.run_dir / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        monitor = Monitor(self.run_dir, iters, start, cfg.log_interval, self.quiet)
        viewer = open_viewer(self.viewer, cfg, trainer.device, iters)
        try:
            if start == 0:
                metrics["initial"] = self.evaluate(0, monitor)
                atomic_write_text(metrics_path, json.dumps(metrics, indent=2) + "\n")
            t0 = time.perf_counter()
            for step in range(start + 1, iters + 1):
                result = trainer.train_step(step)
                trainer.step = step
                viewer.after_step(step, trainer.gaussians)  # publishes a copy when asked; waits while paused
                monitor.log_step(step, {"loss": result.loss, **result.scalars},
                                 {"gaussians": trainer.gaussians.num_points})
                if cfg.preview_interval and step % cfg.preview_interval == 0:
                    monitor.log_images("train/rgb", result.render.rgb, step)
                    monitor.log_images("train/depth", result.render.depth, step)
                if step in self.test_steps:
                    metrics[f"iter_{step}"] = self.evaluate(step, monitor)
                if step in self.save_steps:
                    trainer.gaussians.save_ply(self.run_dir / "point_cloud" / f"iteration_{step}" / "point_cloud.ply",
                                               pad_sh_degree=cfg.ply_sh_degree)
                if step == iters or (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0):
                    self.save_checkpoint()
            elapsed = time.perf_counter() - t0
        finally:
            viewer.close()
            monitor.close()
        metrics["final"] = metrics[f"iter_{iters}"] if f"iter_{iters}" in metrics else self.evaluate(iters, None)
        metrics["train_seconds"] = elapsed
        metrics["iterations"] = iters - start
        ply = self.run_dir / "point_cloud.ply"
        trainer.gaussians.save_ply(ply, pad_sh_degree=cfg.ply_sh_degree)
        video = self.write_turntable() if cfg.save_video else None
        atomic_write_text(metrics_path, json.dumps(metrics, indent=2) + "\n")
        return RunOutputs(run_dir=self.run_dir, point_cloud=ply, video=video, metrics=metrics)


def train(cfg: Config, opt_path: str | None, argv: list[str], resume: str | None = None,
          quiet: bool = False, prior=None) -> RunOutputs:
    """Build everything from cfg and run it (the body of train.py)."""
    from utils.monitor import setup_logging

    if prior is None and cfg.guidance.prior == "stable_diffusion" and not resume:
        from guidance.stable_diffusion import check_model_available

        g = cfg.guidance
        check_model_available(g.model_key, g.is_safe_tensor, g.base_model_key)  # before any folder or model
    viewer = ViewerSettings.from_config(cfg)  # from the command line, also on --resume; checks viser is installed
    cfg, run_dir, checkpoint = open_run(cfg, opt_path, argv, resume)
    setup_logging(run_dir, quiet)
    log.info("run folder: %s", run_dir.resolve())
    seed_everything(cfg.seed)
    trainer = Trainer(cfg, prior=prior)
    if checkpoint is not None:
        trainer.load_state_dict(checkpoint)
        log.info("resumed from step %d", trainer.step)
    log.info("%s loss, %s prior, %d Gaussians, %d iterations on %s", cfg.guidance.guidance_type,
             cfg.guidance.prior, trainer.gaussians.num_points, cfg.optim.iterations, trainer.device)
    return TrainingRun(cfg, run_dir, trainer, quiet, viewer).run()
