"""Warm-up paid once: a sweep of N prompts x 1 loss against separate single runs (issue 11).

Paper settings (config/bagel.yaml: SCTD, 4 cameras at 512x512, CFG 7.5, the official schedules;
100k initial Gaussians on a sphere, since Point-E is not installed) on the SD 2.1-base architecture
with random weights, with the default speed levers (torch.compile, CUDA graphs, channels-last).

    python bench/sweep_benchmark.py --out bench/results/sweep_h200.md       # one H200: about 6-8 minutes
    python bench/sweep_benchmark.py --tiny --prompts 2 --iters 3 --single-runs 1   # CPU smoke test

The sweep runs in this process through training.sweep's worker (one prior built once, prompts swapped);
each single run is a fresh process (python -m bench.sweep_benchmark --single ...), as a hand-started
train.py is, started after the sweep so that it finds Inductor's disk cache warm (a first-ever run
compiles longer). Per run the table gives the wall time of train(), its loop time and ms per iteration,
the fixed cost outside the loop (folder, initial points, evaluations, PLY and turntable video), the
compile warm-up (the first iteration beyond the warm ms/it) and the model load; then minutes per
5000-iteration asset in a sweep (fixed costs per asset, model load and warm-up shared by the assets)
and as a single run (everything paid again). The ms/it is the loop's iterations after the first with
the run's in-loop work (test evaluations, point-cloud snapshots, checkpoints, TensorBoard previews)
taken out, from the run's metrics.json "timings" (training/run.py); the previews' time is then spread over
the iterations (one per preview_interval) and the rest of that work is counted in the fixed cost. The
ms/it at short iteration counts covers the first iterations only: densification grows the Gaussians
later in a 5000-iteration run.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.report import loop_split  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ASSET_ITERATIONS = 5000
log = logging.getLogger("sweep_benchmark")


@dataclass
class RunTiming:
    mode: str  # "sweep" or "single"
    index: int  # position in the sweep (0 = the run that pays the warm-up) or the single run's number
    prompt: str
    iterations: int
    wall_s: float  # train(): the whole run
    loop_s: float  # the training loop only
    model_load_s: float  # prior built for this run (0 when reused)
    ms_per_it: float  # iterations after the first, in-loop evaluations/snapshots/checkpoints taken out
    first_iteration_s: float  # the first iteration (compilation, CUDA-graph capture when not yet done)
    in_loop_s: float  # in-loop evaluations, snapshots and checkpoints
    process_s: float | None = None  # single runs: the whole process, from its start
    peak_gib: float | None = None

    @property
    def warmup_s(self) -> float:
        return max(self.first_iteration_s - self.ms_per_it / 1000.0, 0.0)

    @property
    def fixed_s(self) -> float:
        """Wall time that does not scale with the iterations, the first iteration's excess aside."""
        return self.wall_s - self.loop_s + self.in_loop_s


def overrides(args) -> list[str]:
    out = [f"OptimizationParams.iterations={args.iters}", "GenerateCamParams.init_shape=sphere",
           "GuidanceParams.model_key=random-weights", f"checkpoint_interval={args.iters}"]
    out += list(args.set or [])
    if args.tiny:
        out += ["GenerateCamParams.image_w=64", "GenerateCamParams.image_h=64", "GenerateCamParams.init_num_pts=500",
                "PipelineParams.compile=false", "video_frames=4"]
    return out


def prior_factory(tiny: bool):
    """make_prior(cfg, device) for the sweep worker: random-weight SD 2.1-base (or the tests' tiny SD)."""
    from bench.random_sd import random_sd_components
    from guidance.stable_diffusion import SDComponents, StableDiffusionPrior, resolve_dtype
    from training.trainer import apply_pipeline_options

    def make(cfg, device):
        if tiny:
            from tests.tiny_models import tiny_sd_pipeline

            pipe = tiny_sd_pipeline()
            components = SDComponents(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)
        else:
            components = random_sd_components()
        g = cfg.guidance
        prior = StableDiffusionPrior(components, text=g.text, negative=g.negative, inverse_text=g.inverse_text,
                                     perpneg=g.perpneg, negative_w=g.negative_w, clip_skip=g.clip_skip,
                                     device=device, dtype=resolve_dtype(g.precision, g.fp16, device))
        apply_pipeline_options(prior, cfg.pipeline)
        return prior

    return make


def sweep(args, prompts_file: Path, out: Path, mode: str) -> list[RunTiming]:
    """Train every prompt of the file with one worker (one prior); timings from each run's done.json."""
    from training.sweep.claims import ClaimStore
    from training.sweep.markers import DONE, read_marker
    from training.sweep.plan import SweepPlan
    from training.sweep.worker import SweepWorker, worker_env

    plan = SweepPlan.build(out, prompts_file, ["sctd"], [0], str(REPO / "config" / "bagel.yaml"), overrides(args))
    plan.write_manifest()
    worker = SweepWorker(plan, ClaimStore(out / ".claims"), worker_env({}), [], make_prior=prior_factory(args.tiny))
    timings, loaded = [], 0.0
    for i, run in enumerate(plan.runs):  # the only worker: no claims needed; one at a time, for the timings
        worker.execute(run)
        done = read_marker(plan.folder(run), DONE)
        if done is None:
            raise RuntimeError(f"{run.name} failed: see {plan.folder(run) / 'failed.json'}")
        split = json.loads((plan.folder(run) / "metrics.json").read_text())["timings"]
        first = split["first_iteration"] - split["loop_start"]
        ms_per_iteration, in_loop_fixed = loop_split(split)  # bench/report.py
        timings.append(RunTiming(mode, i, run.prompt.text, done["iterations"], done["wall_seconds"],
                                 done["train_seconds"], worker.model_load_seconds - loaded,
                                 ms_per_iteration, first, in_loop_fixed,
                                 peak_gib=done["peak_gpu_memory_gib"]))
        loaded = worker.model_load_seconds
    return timings


def write_prompts(prompts: list[str], path: Path) -> Path:
    path.write_text("\n".join(prompts) + "\n")
    return path


def single_runs(args, prompts: list[str], work: Path) -> list[RunTiming]:
    """Each in a fresh process: python start, imports, model load and compile paid again."""
    timings = []
    for k in range(args.single_runs):
        result = work / f"single_{k}.json"
        cmd = [sys.executable, "-m", "bench.sweep_benchmark", "--single", "--prompt", prompts[k % len(prompts)],
               "--iters", str(args.iters), "--result", str(result), "--work", str(work / f"single_{k}")]
        cmd += ["--tiny"] if args.tiny else []
        cmd += [f"--set={item}" for item in args.set or []]
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True)
        timing = RunTiming(**json.loads(result.read_text()))
        timing.index, timing.process_s = k, time.perf_counter() - t0
        timings.append(timing)
    return timings


def minutes_per_asset(sweep_runs: list[RunTiming], singles: list[RunTiming], n_assets: int) -> dict[str, float]:
    """Minutes per 5000-iteration asset: ms/it and fixed costs, plus what is paid once (sweep, shared
    by n_assets) or every time (single run: the whole process beyond its iterations)."""
    warm = sweep_runs[1:] or sweep_runs
    ms_it = statistics.median(r.ms_per_it for r in sweep_runs)  # the first iteration is out of every run's
    fixed = statistics.median(r.fixed_s + r.warmup_s for r in warm)
    first = sweep_runs[0]
    once = first.model_load_s + first.warmup_s
    out = {"ms_per_it": ms_it, "fixed_s": fixed, "paid_once_s": once,
           "sweep": (fixed + ASSET_ITERATIONS * ms_it / 1000.0 + once / n_assets) / 60.0}
    if singles:
        overhead = statistics.median(r.process_s - (r.iterations - 1) * r.ms_per_it / 1000.0 for r in singles)
        out["single_overhead_s"] = overhead
        out["single"] = (overhead + (ASSET_ITERATIONS - 1) * ms_it / 1000.0) / 60.0
    return out


def format_table(runs: list[RunTiming], summary: dict, gpu: str, args) -> str:
    lines = [f"# Sweep vs single runs: {gpu}", "",
             f"SCTD, config/bagel.yaml (sphere init), {args.iters} iterations per run, "
             f"{'tiny random SD (CPU smoke test)' if args.tiny else 'random-weight SD 2.1-base'}.", "",
             "| mode | run | prompt | wall s | loop s | ms/it | fixed s | warm-up s | model load s | process s "
             "| peak GiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    ms_it = summary["ms_per_it"]
    for r in runs:
        warmup = r.warmup_s
        process = "-" if r.process_s is None else f"{r.process_s:.1f}"
        peak = "-" if r.peak_gib is None else f"{r.peak_gib:.2f}"
        lines.append(f"| {r.mode} | {r.index} | {r.prompt[:40]} | {r.wall_s:.1f} | {r.loop_s:.1f} | "
                     f"{r.ms_per_it:.1f} | {r.fixed_s:.1f} | {warmup:.1f} | {r.model_load_s:.2f} | {process} "
                     f"| {peak} |")
    lines += ["", f"Warm ms/it {ms_it:.1f}; fixed cost per asset {summary['fixed_s']:.1f} s; paid once per worker "
              f"(model load + compile warm-up) {summary['paid_once_s']:.1f} s.",
              f"Minutes per {ASSET_ITERATIONS}-iteration asset in a sweep of {args.assets} assets: "
              f"{summary['sweep']:.2f}"]
    if "single" in summary:
        lines.append(f"Minutes per {ASSET_ITERATIONS}-iteration asset as a single run (process overhead "
                     f"{summary['single_overhead_s']:.1f} s): {summary['single']:.2f}")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=3, help="prompts in the sweep (the paper's first N)")
    p.add_argument("--iters", type=int, default=100, help="iterations per run")
    p.add_argument("--single-runs", type=int, default=1, help="separate single-run processes to time")
    p.add_argument("--assets", type=int, default=200, help="assets sharing the sweep's one-off costs (Table 1: 200)")
    p.add_argument("--tiny", action="store_true", help="tiny random SD at 64x64, no compile (CPU smoke test)")
    p.add_argument("--out", type=Path, help="write the table (markdown) here")
    p.add_argument("--set", action="append", metavar="Section.key=value",
                   help="extra config override for every run (repeatable), e.g. save_video=false")
    p.add_argument("--work", type=Path, help="folder for the run folders (default: a temporary one)")
    p.add_argument("--single", action="store_true", help=argparse.SUPPRESS)  # one run in this process
    p.add_argument("--prompt", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.prompts < 1 or args.iters < 1 or args.single_runs < 0 or args.assets < 1:
        p.error("--prompts, --iters and --assets must be >= 1, --single-runs >= 0")
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.single:
            (timing,) = sweep(args, write_prompts([args.prompt], work / "prompt.txt"), work / "sweep", "single")
            args.result.write_text(json.dumps(asdict(timing)))
            return 0
        from training.sweep.plan import load_prompts

        prompts = [p.text for p in load_prompts(REPO / "config" / "paper_prompts.yaml")][:args.prompts]
        runs = sweep(args, write_prompts(prompts, work / "prompts.txt"), work / "sweep", "sweep")
        singles = single_runs(args, prompts, work)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    table = format_table(runs + singles, minutes_per_asset(runs, singles, args.assets), gpu, args)
    from bench.report import publish_table

    publish_table(table, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
