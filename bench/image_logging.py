"""What writing images costs the training loop (issue 20): TensorBoard previews and test-view PNGs.

    python bench/image_logging.py [--size 512] [--repeats 3] [--out bench/results/image_logging_cpu.md]

A train.py run encodes these PNGs (on a worker thread since background_writes; on its training thread with
background_writes=false, as before): every preview_interval iterations (100) the 4 training
views' RGB and depth as two TensorBoard grids, and at every evaluation (iterations/test_ratio: 6 in a
5000-iteration run, plus the final one) the 16 test views' RGB and depth PNGs and two grids. The PNGs are
encoded at zlib level 1 (utils/media.py PNG_COMPRESS_LEVEL); before, at PIL's default level 6, through
SummaryWriter.add_image and imageio. Both paths run here on the same render-like images (smooth gradients
with a little noise), median of --repeats, and the table projects the seconds a 5000-iteration run spends.
CPU work only: the GPU's renders are not part of it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import publish_table  # noqa: E402
from utils.media import save_images, to_uint8  # noqa: E402
from utils.monitor import Monitor  # noqa: E402
from utils.threads import configure_threads  # noqa: E402

PREVIEWS_PER_RUN = 50  # 5000 iterations / preview_interval 100
EVALUATIONS_PER_RUN = 7  # iterations 1, 1000, ..., 5000 (test_ratio 5) and the final outputs' evaluation


def render_like(views: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """[views, channels, size, size] in [0, 1]: smooth gradients plus 2% noise, as renders compress."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    base = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
                        ramp[None, :] * ramp[:, None]])[:channels]
    return (base[None] * torch.rand(views, 1, 1, 1, generator=g) + 0.02 * torch.rand(views, channels, size, size,
                                                                                     generator=g)).clamp(0, 1)


def float_grid(images: torch.Tensor, per_row: int = 8) -> torch.Tensor:
    """The earlier grid: [B, C, H, W] floats copied to the CPU, then a [3, rows * H, per_row * W] float grid."""
    x = images.detach().float().clamp(0, 1).cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    b, c, h, w = x.shape
    rows, cols = -(-b // per_row), min(b, per_row)
    padded = torch.cat([x, x.new_zeros(rows * cols - b, c, h, w)])
    return padded.reshape(rows, cols, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w)


def write_before(monitor: Monitor, folder: Path | None, rgb: torch.Tensor, depth: torch.Tensor, step: int) -> None:
    """The earlier path: SummaryWriter.add_image and imageio at PNG's default level."""
    import imageio.v3 as iio

    monitor.writer.add_image("rgb", float_grid(rgb), step)
    monitor.writer.add_image("depth", float_grid(depth), step)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        for name, batch in (("rgb", rgb), ("depth", depth)):
            for i, frame in enumerate(to_uint8(batch)):
                (folder / f"{name}_{i:03d}.png").write_bytes(iio.imwrite("<bytes>", frame, extension=".png"))


def write_after(monitor: Monitor, folder: Path | None, rgb: torch.Tensor, depth: torch.Tensor, step: int) -> None:
    monitor.log_images("rgb", rgb, step)
    monitor.log_images("depth", depth, step)
    if folder is not None:
        save_images(rgb, folder, "rgb")
        save_images(depth, folder, "depth")


def seconds(write, views: int, size: int, with_files: bool, repeats: int) -> float:
    rgb, depth = render_like(views, 3, size, 0), render_like(views, 1, size, 1)
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        monitor = Monitor(Path(tmp), total_steps=repeats, start_step=0, log_interval=1, quiet=True)
        for k in range(repeats):
            t0 = time.perf_counter()
            write(monitor, Path(tmp) / f"views_{k}" if with_files else None, rgb, depth, k)
            times.append(time.perf_counter() - t0)  # TensorBoard's own thread writes the events to disk
            monitor.writer.flush()
        monitor.close()
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512, help="view width and height (config/bagel.yaml: 512)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, help="write the table (markdown) here")
    args = p.parse_args(argv)
    configure_threads()
    rows = []
    for name, views, files, per_run in (("preview (4 views, 2 grids)", 4, False, PREVIEWS_PER_RUN),
                                        ("evaluation (16 views: 32 PNGs, 2 grids)", 16, True, EVALUATIONS_PER_RUN)):
        before = seconds(write_before, views, args.size, files, args.repeats)
        after = seconds(write_after, views, args.size, files, args.repeats)
        rows.append((name, before, after, per_run))
    lines = [f"# Image writing on the training thread ({torch.get_num_threads()} torch threads, CPU)", "",
             f"`python bench/image_logging.py --size {args.size} --repeats {args.repeats}`: seconds per event "
             f"(median), and per 5000-iteration run ({PREVIEWS_PER_RUN} previews, {EVALUATIONS_PER_RUN} "
             "evaluations).", "",
             "| event | before (PNG level 6) s | after (level 1) s | per run before s | per run after s |",
             "|---|---|---|---|---|"]
    for name, before, after, per_run in rows:
        lines.append(f"| {name} | {before:.3f} | {after:.3f} | {before * per_run:.1f} | {after * per_run:.1f} |")
    total_before = sum(b * n for _, b, _, n in rows)
    total_after = sum(a * n for _, _, a, n in rows)
    lines.append(f"| **5000-iteration run** | | | **{total_before:.1f}** | **{total_after:.1f}** |")
    publish_table("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
