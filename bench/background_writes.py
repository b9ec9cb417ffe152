"""What the loop's files cost the training loop, written on its thread or beside it (issue 20).

    python bench/background_writes.py [--gaussians 128000,800000] [--iteration-ms 90] [--python-ms 15]
                                      [--size 512] [--repeats 3] [--out bench/results/background_writes_cpu.md]

A 5000-iteration run of config/bagel.yaml writes, from inside its loop, 50 TensorBoard previews (4 views,
RGB and depth), 6 evaluations (16 test views: 32 PNGs and 2 TensorBoard grids, metrics.json), 10
checkpoints (the Gaussians and their Adam state) and 2 point-cloud snapshots (PLY). train.py writes them
on a worker thread (`background_writes: true`, utils/background_writer.py) or, with false, on the
training thread. Each event goes through the functions TrainingRun uses, on a synthetic asset of the given
Gaussian count (bench/final_outputs.py's torus, SH degree 0 as the paper's configs, after one Adam step).

The training loop is modelled as on a GPU, where the training thread launches work and then waits for the
device: each iteration holds the GIL for --python-ms (Python work) and sleeps for the rest of
--iteration-ms (a wait on the GPU, GIL released). For each event kind and mode, a loop of --window
iterations runs with one event at its start; what the event cost the loop is that loop's wall time minus
the same loop without events (median of --repeats). So the background mode's figure includes what the
writer thread takes from the training thread (the GIL, the cores). The table projects the seconds per
5000-iteration run from the event counts above.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.final_outputs import torus_asset  # noqa: E402
from bench.image_logging import render_like  # noqa: E402
from bench.report import publish_table  # noqa: E402
from scene.ply_format import save_params_ply  # noqa: E402
from training.run import write_test_views  # noqa: E402
from training.run_dir import atomic_torch_save, host_copy  # noqa: E402
from utils.background_writer import BackgroundWriter  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.files import atomic_write_text  # noqa: E402
from utils.media import to_uint8  # noqa: E402
from utils.monitor import Monitor  # noqa: E402
from utils.threads import configure_threads  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PER_RUN = {"preview": 50, "evaluation": 6, "checkpoint": 10, "snapshot": 2}  # a 5000-iteration bagel run


def trained_model(n: int):
    """The torus asset with bagel's optimizer after one Adam step (so the checkpoint holds its moments)."""
    model = torus_asset(n)
    model.setup_optimizer(load_config(REPO / "config/bagel.yaml").optim, spatial_lr_scale=1.0)
    for tensor in model.params().values():
        tensor.grad = torch.randn_like(tensor) * 1e-3
    model.optimizer_step()
    return model


class Events:
    """The in-loop writes of TrainingRun (training/run.py), through `writes`."""

    def __init__(self, folder: Path, model, writes: BackgroundWriter, size: int):
        self.folder, self.model, self.writes = folder, model, writes
        self.monitor = Monitor(folder, total_steps=1, start_step=0, log_interval=1, quiet=True, writes=writes)
        self.train_rgb, self.train_depth = render_like(4, 3, size, 0), render_like(4, 1, size, 1)
        self.test_rgb, self.test_depth = render_like(16, 3, size, 2), render_like(16, 1, size, 3)
        self.count = 0

    def run(self, kind: str) -> None:
        self.count += 1
        k = self.count
        if kind == "preview":
            self.monitor.log_frames("train/rgb", to_uint8(self.train_rgb), k)
            self.monitor.log_frames("train/depth", to_uint8(self.train_depth), k)
        elif kind == "evaluation":
            rgb, depth = to_uint8(self.test_rgb), to_uint8(self.test_depth)
            self.writes.submit("test views", write_test_views, self.folder / f"views_{k}", rgb, depth)
            self.monitor.log_frames("test/rgb", rgb, k)
            self.monitor.log_frames("test/depth", depth, k)
            self.writes.submit("metrics", atomic_write_text, self.folder / "metrics.json",
                               json.dumps({f"iter_{k}": {"gaussians": self.model.num_points}}))
        elif kind == "checkpoint":
            state = host_copy({"step": k, "gaussians": self.model.state_dict()})
            self.writes.submit("checkpoint", atomic_torch_save, state, self.folder / "last.pt")
        elif kind == "snapshot":
            self.writes.submit("snapshot", save_params_ply, host_copy(self.model.params()), self.model.max_sh_degree,
                               self.folder / f"snap_{k}.ply")
        else:
            raise ValueError(f"unknown event kind {kind!r}")

    def close(self) -> None:
        self.writes.close()
        self.monitor.close()


def hold_gil(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def loop_seconds(iterations: int, iteration_s: float, python_s: float, event=None) -> float:
    """Wall time of `iterations` modelled iterations, `event()` run on the training thread at the first."""
    t0 = time.perf_counter()
    for i in range(iterations):
        if i == 0 and event is not None:
            event()
        hold_gil(python_s)
        time.sleep(max(iteration_s - python_s, 0.0))
    return time.perf_counter() - t0


def measure(n: int, args) -> dict:
    """{kind: {mode: (loop seconds lost, writer seconds, outlasted the window)}} for n Gaussians."""
    model = trained_model(n)
    iteration_s, python_s = args.iteration_ms / 1000.0, args.python_ms / 1000.0
    baseline = statistics.median(loop_seconds(args.window, iteration_s, python_s) for _ in range(args.repeats))
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in PER_RUN:
            for mode, enabled in (("training thread", False), ("background", True)):
                lost, busy, late = [], [], False
                for r in range(args.repeats):
                    events = Events(Path(tmp) / f"{kind}_{mode[0]}_{r}", model, BackgroundWriter(enabled), args.size)
                    seconds = loop_seconds(args.window, iteration_s, python_s, functools.partial(events.run, kind))
                    t_close = time.perf_counter()
                    events.writes.close()
                    late = late or time.perf_counter() - t_close > 0.01  # the write outlasted the window
                    events.close()
                    lost.append(seconds - baseline)
                    busy.append(sum(s for s, _ in events.writes.seconds_by_kind.values()))
                results.setdefault(kind, {})[mode] = (statistics.median(lost), statistics.median(busy), late)
    return results


def table(rows: dict, args) -> str:
    head = (f"# The loop's files: written on the training thread or beside it ({torch.get_num_threads()} torch "
            "threads, CPU)\n\n"
            f"`python bench/background_writes.py --gaussians {args.gaussians} --iteration-ms {args.iteration_ms:g} "
            f"--python-ms {args.python_ms:g} --size {args.size} --repeats {args.repeats} --window {args.window}`. "
            f"Modelled iterations of {args.iteration_ms:g} ms ({args.python_ms:g} ms of them holding the GIL). "
            "\"lost\": seconds the event added to the loop's wall time (median); \"writer\": seconds the writes "
            "themselves took; per run: x the event's count in a 5000-iteration run "
            f"({', '.join(f'{v} {k}s' for k, v in PER_RUN.items())}).\n\n"
            "| Gaussians | event | lost, training thread s | lost, background s | writer s | per run, training "
            "thread s | per run, background s |\n|---|---|---|---|---|---|---|\n")
    lines = []
    for n, kinds in rows.items():
        total_inline = total_background = 0.0
        for kind, modes in kinds.items():
            inline, _, _ = modes["training thread"]
            background, busy, late = modes["background"]
            total_inline += inline * PER_RUN[kind]
            total_background += background * PER_RUN[kind]
            note = " (outlasted the window)" if late else ""
            lines.append(f"| {n:,} | {kind} | {inline:.3f} | {background:.3f}{note} | {busy:.3f} | "
                         f"{inline * PER_RUN[kind]:.1f} | {background * PER_RUN[kind]:.1f} |")
        lines.append(f"| {n:,} | **5000-iteration run** | | | | **{total_inline:.1f}** | **{total_background:.1f}** |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gaussians", default="128000,800000", help="comma-separated Gaussian counts")
    p.add_argument("--iteration-ms", type=float, default=90.0, help="modelled iteration (H100: ~91 ms)")
    p.add_argument("--python-ms", type=float, default=15.0, help="of which the training thread holds the GIL")
    p.add_argument("--size", type=int, default=512, help="view width and height (config/bagel.yaml: 512)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--window", type=int, default=60, help="iterations per measured loop")
    p.add_argument("--out", type=Path, help="write the table (markdown) here")
    args = p.parse_args(argv)
    if args.python_ms > args.iteration_ms:
        p.error(f"--python-ms {args.python_ms:g} exceeds --iteration-ms {args.iteration_ms:g}")
    configure_threads()
    counts = [int(c) for c in args.gaussians.split(",") if c.strip()]
    rows: dict = {}
    for n in counts:
        rows[n] = measure(n, args)
        publish_table(table(rows, args), args.out, quiet=n != counts[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
