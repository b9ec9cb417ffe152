"""Training speed with the live viewer off, on without a page, and on with a page open in headless Chromium.

Each mode trains the same config from the same seed for N iterations with the training loop's own hook
(``viewer.after_step`` after ``trainer.train_step``) and reports ms per iteration, the frames the viewer
sent meanwhile, and whether the trained Gaussians equal those of the run without a viewer. The modes
run interleaved, ``--repeats`` times each, and the median is reported. The browser runs on this
machine, so its own work (decoding JPEG frames, software WebGL) competes with training here; over an
SSH port-forward it runs on the user's machine instead.

    python bench/viewer_speed.py                                   # config/demo.yaml, 100 iterations
    python bench/viewer_speed.py --iterations 200 --repeats 3 --out bench/results/viewer_speed_cpu.md
    python bench/viewer_speed.py viewer_resolution=256 viewer_max_fps=5    # any config override
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.headless_chromium import HeadlessChromium, find_chromium  # noqa: E402
from training.trainer import Trainer  # noqa: E402
from training.viewer import NoViewer, ViewerSettings, open_viewer  # noqa: E402
from utils.config import Config, load_config  # noqa: E402
from utils.seeding import seed_everything  # noqa: E402

MODES = ("viewer off", "viewer on, no page", "viewer on, page open (headless Chromium)")


@dataclass
class RunRecord:
    """One timed run."""

    seconds: float
    cpu_seconds: float  # CPU time of this process (training and viewer threads; not the browser)
    frames: int  # frames the viewer sent during the timed iterations
    render_seconds: float  # the viewer's time in render_image during them
    params: dict[str, torch.Tensor]  # the trained Gaussians


@dataclass
class Timing:
    ms_per_iteration: float
    cpu_ms_per_iteration: float
    frames: int
    render_ms: float | None  # the viewer's render time per frame
    same_gaussians: bool | None  # equal to the first 'viewer off' run (None for that mode)


def connect_page(browser: HeadlessChromium, viewer, model, timeout: float = 60.0) -> None:
    """Open the viewer in the browser and wait for its first frame (serving the page's snapshot request)."""
    browser.open(viewer.url)
    deadline = time.monotonic() + timeout
    while viewer.frames_sent == 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the page got no frame in {timeout} s")
        viewer.after_step(0, model)
        time.sleep(0.1)


def train_once(cfg: Config, mode: str, iterations: int) -> RunRecord:
    """Train from the seed for `iterations` steps in one mode, with the training loop's viewer hook."""
    seed_everything(cfg.seed)
    trainer = Trainer(cfg)
    settings = ViewerSettings.from_config(cfg)
    viewer = NoViewer() if mode == MODES[0] else open_viewer(settings, cfg, trainer.device, iterations)
    with contextlib.ExitStack() as stack:
        stack.callback(viewer.close)
        if mode == MODES[2]:
            connect_page(stack.enter_context(HeadlessChromium(1024, 768)), viewer, trainer.gaussians)
        frames_before, render_before = getattr(viewer, "frames_sent", 0), getattr(viewer, "render_seconds", 0.0)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        for step in range(1, iterations + 1):
            trainer.train_step(step)
            trainer.step = step
            viewer.after_step(step, trainer.gaussians)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        return RunRecord(seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu_start,
                         frames=getattr(viewer, "frames_sent", 0) - frames_before,
                         render_seconds=getattr(viewer, "render_seconds", 0.0) - render_before,
                         params={name: p.detach().cpu() for name, p in trainer.gaussians.params().items()})


def summary(records: list[RunRecord], iterations: int, reference: dict[str, torch.Tensor] | None) -> Timing:
    render = [1000.0 * r.render_seconds / r.frames for r in records if r.frames]
    same = None if reference is None else all(
        r.params.keys() == reference.keys() and all(torch.equal(r.params[k], reference[k]) for k in reference)
        for r in records)
    return Timing(1000.0 * statistics.median(r.seconds for r in records) / iterations,
                  1000.0 * statistics.median(r.cpu_seconds for r in records) / iterations,
                  int(statistics.median(r.frames for r in records)),
                  statistics.median(render) if render else None, same)


def measure(cfg: Config, modes: list[str], iterations: int, repeats: int) -> dict[str, Timing]:
    """Each mode `repeats` times, interleaved so that a change in the machine's load hits every mode."""
    records = {mode: [] for mode in modes}
    for _ in range(repeats):
        for mode in modes:
            records[mode].append(train_once(cfg, mode, iterations))
    reference = records[modes[0]][0].params
    return {mode: summary(runs, iterations, None if mode == modes[0] else reference)
            for mode, runs in records.items()}


def table(results: dict[str, Timing], cfg: Config, iterations: int, repeats: int, device: str) -> str:
    base = next(iter(results.values())).ms_per_iteration
    lines = [f"Viewer cost per training iteration: {iterations} iterations, median of {repeats}, on {device}; "
             f"viewer_resolution={cfg.viewer_resolution}, viewer_max_fps={cfg.viewer_max_fps:g}, "
             f"viewer_render_share={cfg.viewer_render_share:g}, browser window 1024x768. CPU ms: this "
             f"process's CPU time (training and viewer threads, not the browser).", "",
             "| mode | ms / iteration | vs off | CPU ms / iteration | frames sent | render ms / frame | "
             "Gaussians equal to 'off' |", "|---|---:|---:|---:|---:|---:|---|"]
    for mode, t in results.items():
        same = "-" if t.same_gaussians is None else ("yes" if t.same_gaussians else "NO")
        render = "-" if t.render_ms is None else f"{t.render_ms:.1f}"
        lines.append(f"| {mode} | {t.ms_per_iteration:.1f} | {t.ms_per_iteration / base - 1.0:+.1%} | "
                     f"{t.cpu_ms_per_iteration:.1f} | {t.frames} | {render} | {same} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--opt", default="config/demo.yaml", help="YAML config (default: the offline demo)")
    parser.add_argument("--iterations", type=int, default=100, help="timed iterations per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode (the median is reported)")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    parser.add_argument("overrides", nargs="*", metavar="Section.key=value", help="config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.opt, ["viewer=true", f"OptimizationParams.iterations={args.iterations}", *args.overrides])
    modes = list(MODES)
    if find_chromium() is None:
        print("no Chromium on PATH (apt-get install chromium): the page-open mode is left out", file=sys.stderr)
        modes.remove(MODES[2])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"
    text = table(measure(cfg, modes, args.iterations, args.repeats), cfg, args.iterations, args.repeats, device)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
