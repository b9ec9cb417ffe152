"""What the user watches: a progress bar, TensorBoard scalars and images, the log file."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

log = logging.getLogger(__name__)


def setup_logging(run_dir: Path | None, quiet: bool = False) -> None:
    """Console (INFO, or WARNING when quiet) and, with a run folder, run_dir/train.log (DEBUG)."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    for handler in list(root.handlers):  # replace basicConfig's and earlier runs' handlers
        root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    console._segmentdreamer = True
    root.addHandler(console)
    if run_dir is not None:
        file_handler = logging.FileHandler(run_dir / "train.log")
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


class Monitor:
    """TensorBoard + progress bar. Scalars are written every `log_interval` iterations."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, log_interval: int, quiet: bool = False):
        from torch.utils.tensorboard import SummaryWriter

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
        # the surrogate's value is not a distance; |g| (the injected gradient's norm) shows convergence
        shown = {k: values[k] for k in ("loss", "grad_norm", "t") if k in values}
        self.bar.set_postfix({**{k: f"{v:.4g}" for k, v in shown.items()}, "N": int(values.get("gaussians", 0))},
                             refresh=False)

    def log_images(self, tag: str, images: Tensor, step: int) -> None:
        """[B, C, H, W] in [0, 1] as one horizontal strip."""
        strip = torch.cat(list(images.detach().float().clamp(0, 1).cpu()), dim=-1)
        if strip.shape[0] == 1:
            strip = strip.expand(3, -1, -1)
        self.writer.add_image(tag, strip, step)

    def close(self) -> None:
        self.bar.close()
        self.writer.close()
