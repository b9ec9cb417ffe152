"""Where a training step makes the CPU wait for the GPU (issue 20), by call site.

    python bench/step_syncs.py [--mode no-compile] [--steps 5] [--out bench/results/step_syncs_h200.md]

Every synchronizing CUDA call drains the GPU's queue: until the CPU has launched the next kernels, the GPU
idles. A blocking host-to-device copy (`cpu_tensor.to("cuda")` from pageable memory), `.item()`,
`nonzero`, a boolean-mask index all synchronize. The benchmark's "other" time (wall minus the timed
sections, ~3 ms of an 86 ms iteration on an H100) is the bound of what removing them can buy, and a
`train.py` loop (91 ms/it) does more work between iterations than the benchmark. This script runs
`Trainer.train_step` of bench/benchmark.py's setup (random-weight SD 2.1-base, 4 cameras at 512x512,
~100k Gaussians) under `torch.cuda.set_sync_debug_mode("warn")` after --warmup steps, and lists each
synchronizing call by the innermost frame of this repository that led to it and the innermost frame
of all (e.g. gsplat's), per iteration. CUDA only: a CPU has nothing to synchronize.
"""
from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.benchmark import MODES, apply_pipeline_options, build_config, make_prior  # noqa: E402
from bench.random_sd import random_sd_components  # noqa: E402
from bench.report import publish_table  # noqa: E402
from training.trainer import Trainer  # noqa: E402

SYNC_WARNING = "synchroniz"  # torch: "called a synchronizing CUDA operation"


def call_site(stack: list[traceback.FrameSummary], repo: Path = REPO) -> tuple[str, str]:
    """(innermost frame of `repo` outside bench/ and this check, innermost frame of all) of a warning's
    stack, as "path:line function"; "-" when the repository has no frame in it."""
    def name(frame: traceback.FrameSummary) -> str:
        path = Path(frame.filename)
        shown = path.relative_to(repo) if path.is_relative_to(repo) else Path(*path.parts[-2:])
        return f"{shown}:{frame.lineno} {frame.name}"

    frames = [f for f in stack if f.filename != __file__ and "warnings.py" not in f.filename]
    ours = [f for f in frames if Path(f.filename).is_relative_to(repo) and not Path(f.filename).is_relative_to(
        repo / "bench")]
    return (name(ours[-1]) if ours else "-"), (name(frames[-1]) if frames else "-")


def count_syncs(step, steps: list[int]) -> Counter:
    """{(our frame, innermost frame): count} of the synchronizing CUDA calls made by step(k) for k in steps."""
    sites: Counter = Counter()
    previous = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if SYNC_WARNING in str(message):
            sites[call_site(traceback.extract_stack()[:-1])] += 1
        else:
            previous(message, category, filename, lineno, file, line)

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record  # catch_warnings restores it on exit
            for k in steps:
                step(k)
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sites


def table(sites: Counter, steps: int, args) -> str:
    lines = [f"# Synchronizing CUDA calls of a training step: {torch.cuda.get_device_name()}", "",
             f"`python bench/step_syncs.py --mode {args.mode} --steps {args.steps} --warmup {args.warmup}`: "
             f"bench/benchmark.py's setup in mode {args.mode}, {steps} steps after {args.warmup} warm-up steps "
             f"from iteration {args.start_step}. Calls per iteration.", "",
             "| this repository's frame | innermost frame | per iteration |", "|---|---|---|"]
    for (ours, innermost), count in sites.most_common():
        lines.append(f"| {ours} | {innermost} | {count / steps:.2f} |")
    lines.append(f"| **all** | | **{sum(sites.values()) / steps:.2f}** |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="no-compile", choices=sorted(MODES),
                   help="bench/benchmark.py mode (no-compile: no compilation wait; the sync sites outside the "
                        "UNet are the same)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--start-step", type=int, default=1001)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU: a CPU step has nothing to synchronize")
    bench_args = argparse.Namespace(batch=4, resolution=512, gaussians=[100_000])
    cfg = build_config("sctd", args.mode, bench_args)
    device = torch.device("cuda")
    prior = make_prior(cfg, random_sd_components(), device, torch.float16)
    apply_pipeline_options(prior, cfg.pipeline)
    torch.manual_seed(0)
    trainer = Trainer(cfg, prior=prior, device=device)
    for k in range(args.start_step, args.start_step + args.warmup):
        trainer.train_step(k)
    first = args.start_step + args.warmup
    sites = count_syncs(trainer.train_step, list(range(first, first + args.steps)))
    publish_table(table(sites, args.steps, args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
