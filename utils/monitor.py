"""What the user watches: a progress bar, TensorBoard scalars and images, the log file."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from utils.background_writer import BackgroundWriter
from utils.files import is_disk_full
from utils.media import encode_png, frame_grid, to_uint8

log = logging.getLogger(__name__)


class RunLogHandler(logging.FileHandler):
    """run_dir/train.log. On a full disk a line that cannot be written is dropped (the console still shows
    it): no '--- Logging error ---' traceback per line around the run's one disk-full message."""

    def handleError(self, record: logging.LogRecord) -> None:
        if is_disk_full(sys.exc_info()[1]):
            return
        super().handleError(record)


def setup_logging(run_dir: Path | None, quiet: bool = False) -> None:
    """Console (INFO, or WARNING when quiet) and, with a run folder, run_dir/train.log (DEBUG)."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    for handler in list(root.handlers):  # replace basicConfig's and earlier runs' handlers
        root.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    console._segmentdreamer = True
    root.addHandler(console)
    if run_dir is not None:
        file_handler = RunLogHandler(run_dir / "train.log")
        file_handler.setLevel(logging.DEBUG)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        file_handler._segmentdreamer = True
        root.addHandler(file_handler)
    for noisy in ("PIL", "matplotlib", "urllib3", "h5py", "tensorboard", "websockets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def scalar_values(scalars: dict[str, Tensor | float]) -> dict[str, float]:
    """Read logging scalars back to the host (the only sync of a logging iteration)."""
    tensors = {k: v for k, v in scalars.items() if isinstance(v, Tensor)}
    values = {k: float(v) for k, v in scalars.items() if not isinstance(v, Tensor)}
    if tensors:
        stacked = torch.stack([v.detach().float().reshape(()) for v in tensors.values()]).cpu()
        values.update(zip(tensors.keys(), stacked.tolist()))
    return values


def progress_fields(values: dict[str, float]) -> dict[str, str]:
    """Progress-bar fields: |g| (injected gradient norm), t (timestep), N (Gaussians), skipped steps if any."""
    fields = {}
    if "grad_norm" in values:
        fields["|g|"] = f"{values['grad_norm']:.3g}"
    if "t" in values:
        fields["t"] = f"{values['t']:.0f}"
    fields["N"] = str(int(values.get("scene/gaussians", 0)))
    if values.get("health/skipped_steps"):
        fields["skipped"] = str(int(values["health/skipped_steps"]))
    return fields


class Monitor:
    """TensorBoard + progress bar. Scalars are written every `log_interval` iterations.

    Names with a '/' keep it (loss/total, scene/gaussians, lr/xyz, health/skipped_steps); the loss's own
    terms go under guidance/. The progress bar shows what tells a user how the run goes: |g|, the mean
    norm of the gradient the distillation loss injects on the latents (it shrinks as the renders agree
    with the prior; the surrogate loss's value carries no such meaning), t the sampled timestep, N the
    number of Gaussians, and skipped NaN/Inf steps when there are any.
    """

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, log_interval: int, quiet: bool = False,
                 writes: BackgroundWriter | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writes = writes or BackgroundWriter(enabled=False)  # images are written by it (the caller closes it)
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1)
        self.log_interval = max(1, log_interval)
        self.bar = tqdm(total=total_steps, initial=start_step, disable=quiet, dynamic_ncols=True, unit="it")
        self._last_time = time.perf_counter()
        self._last_step = start_step

    def log_step(self, step: int, scalars: dict[str, Tensor | float], extra: dict[str, float]) -> None:
        self.bar.update(1)
        if step % self.log_interval != 0:
            return
        values = {**scalar_values(scalars), **extra}
        now = time.perf_counter()
        its = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        values["perf/it_per_s"] = its
        if torch.cuda.is_available():
            values["perf/max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        for name, value in values.items():
            self.writer.add_scalar(name if "/" in name else f"guidance/{name}", value, step)
        self.bar.set_postfix(progress_fields(values), refresh=False)

    def log_images(self, tag: str, images: Tensor, step: int) -> None:
        """[B, C, H, W] in [0, 1] as one grid image, 8 per row (every view, e.g. both test rings)."""
        self.log_frames(tag, to_uint8(images), step)

    def log_frames(self, tag: str, frames: np.ndarray, step: int) -> None:
        """[B, H, W, 3] uint8 frames as one grid image, 8 per row, encoded and written by `writes` (beside
        the training loop when it runs in the background: the frames must not change afterwards)."""
        self.writes.submit("tensorboard images", self._write_grid, tag, frames, step)

    def _write_grid(self, tag: str, frames: np.ndarray, step: int) -> None:
        """The summary SummaryWriter.add_image writes (torch.utils.tensorboard.summary.image: an RGB PNG),
        built here to encode the PNG at utils.media's fast level instead of PIL's default."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        grid = frame_grid(frames)  # [rows * H, per_row * W, 3]
        image = Summary.Image(height=grid.shape[0], width=grid.shape[1], colorspace=3,
                              encoded_image_string=encode_png(grid))
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def close(self) -> None:
        """Close the progress bar and TensorBoard (after `writes` has written the images handed to it)."""
        self.bar.close()
        self.writer.close()
