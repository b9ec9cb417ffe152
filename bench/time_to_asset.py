"""Time to asset: `train.py` run as a user runs it, from the command to the mesh (issue 20).

The paper's command line on config/bagel.yaml, with a random-weight SD 2.1-base saved as a diffusers
folder (the real model's cost; no weights are downloaded) and a sphere start (Point-E is not installed):

    python train.py --opt config/bagel.yaml --guidance_type sctd --phase_num 5 --num_ddim_timesteps 50 \
        --guid_scale 7.5 GuidanceParams.model_key=<folder> GenerateCamParams.init_shape=sphere \
        OptimizationParams.iterations=<--iters>

each in a fresh process, first on fresh caches (empty TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR,
CUDA_CACHE_PATH, TORCH_EXTENSIONS_DIR and XDG_CACHE_HOME, where train.py keeps its portable compile cache,
in a temporary folder: a new machine, or a new version of torch) and then on the caches that run left
(warm: every later run on that machine). "portable" is a new machine whose home folder is shared with the
runs before (a cluster node): the machine's own caches (Inductor, Triton, CUDA) empty, gsplat's build and
the portable compile cache (PipelineParams.compile_cache) kept.

    python bench/time_to_asset.py --set save_video=false --out bench/results/time_to_asset_h100.md  # ~5 min
    python bench/time_to_asset.py --iters 200 --set save_video=false --caches user  # your own caches
    python bench/time_to_asset.py --caches fresh,warm,portable --set save_video=false  # a cluster's next node
    python bench/time_to_asset.py --tiny --iters 3 --caches fresh                  # CPU smoke test

The table splits the launch-to-first-iteration time with the milestones train.py logs (metrics.json
"timings", utils/timeline.py): imports; model load (the folder read, the Gaussians built); compile ahead
(torch.compile of the UNet and the VAE encoder and their CUDA graphs before the first render, while
gsplat builds in the background; with PipelineParams.compile_in_background=true, the uncompiled path's
CUDA graphs and cuDNN autotuning instead, the compilation then running beside the loop); the first render
(the initial evaluation; on a fresh machine it waits for gsplat's CUDA build); the first iteration
(whatever was not compiled ahead, cuDNN autotuning). Then the loop's ms/iteration over the other
iterations with the in-loop evaluations, snapshots, checkpoints and previews taken out (reported apart, and
included in "ms/it with in-loop work"), the final
outputs (evaluation, PLY, video, mesh) and the process's wall time. The ms/iteration is at the start of a
run (~100k Gaussians; densification grows them later in a 5000-iteration run: bench/benchmark.py
--gaussians measures larger counts).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import loop_split, publish_table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PAPER_COMMAND = ["--opt", "config/bagel.yaml", "--guidance_type", "sctd", "--phase_num", "5",
                 "--num_ddim_timesteps", "50", "--guid_scale", "7.5"]
# the machine's own compile caches, and those a home folder keeps (gsplat's build; XDG_CACHE_HOME holds
# train.py's portable compile cache)
MACHINE_CACHES = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton", "CUDA_CACHE_PATH": "cuda"}
HOME_CACHES = {"TORCH_EXTENSIONS_DIR": "torch_extensions", "XDG_CACHE_HOME": "home_cache"}
CACHE_MODES = ("fresh", "warm", "portable", "user")
TINY_OVERRIDES = ["GenerateCamParams.image_w=64", "GenerateCamParams.image_h=64",
                  "GenerateCamParams.init_num_pts=500", "PipelineParams.compile=false", "video_frames=4",
                  "export_mesh=false", "save_video=false"]
ASSET_ITERATIONS = 5000


@dataclass
class RunTimes:
    """One train.py process: its milestones (seconds since launch) and loop split, from metrics.json."""

    caches: str  # one of CACHE_MODES
    process_s: float  # wall time of the whole process, measured from outside
    timings: dict  # metrics.json "timings"

    def at(self, name: str) -> float:
        return float(self.timings[name])

    @property
    def imports_s(self) -> float:
        return self.at("imports")

    @property
    def model_s(self) -> float:
        return self.at("model_loaded") - self.at("imports")

    @property
    def compile_ahead_s(self) -> float:
        """The UNet and VAE encoder compiled (or, compiling in the background, warmed up uncompiled) before
        the first render; 0 for code that does neither."""
        for name in ("prior_compiled", "prior_warmed_up"):
            if name in self.timings:
                return self.at(name) - self.at("model_loaded")
        return 0.0

    @property
    def first_render_s(self) -> float:
        return self.at("renderer_ready") - self.at("model_loaded") - self.compile_ahead_s

    @property
    def first_iteration_s(self) -> float:
        return self.at("first_iteration") - self.at("loop_start")

    @property
    def outputs_s(self) -> float:
        return self.at("outputs_written") - self.at("loop_end")

    @property
    def switched(self) -> bool:
        """Compiled in the background and switched to the compiled programs during the run."""
        return "ms_per_iteration_compiled" in self.timings

    @property
    def loop_ms(self) -> float:
        """ms/iteration of the loop's steady state: the compiled programs' when the run switched to them."""
        return self.timings["ms_per_iteration_compiled" if self.switched else "ms_per_iteration"]

    @property
    def loop_all_in_ms(self) -> float:
        """ms/iteration from the first iteration's end to the loop's, in-loop work included: what a whole run
        averages (issue 20's goal 2)."""
        return 1000.0 * (self.at("loop_end") - self.at("first_iteration")) / max(self.timings["iterations"] - 1, 1)

    def switch_cell(self) -> str:
        t = self.timings
        if "compiled_from_step" not in t:
            return "-"
        return f"it {t['compiled_from_step']} at {self.at('compiled_iteration'):.1f} s"

    def projected_s(self, iterations: int = ASSET_ITERATIONS) -> float:
        """Launch to outputs for `iterations` at this run's steady ms/iteration (the same evaluations and
        outputs; the in-loop work before a switch is counted twice: an upper bound by ~1 s)."""
        start, done = ((self.at("compiled_iteration"), self.timings["compiled_from_step"]) if self.switched
                       else (self.at("first_iteration"), 1))
        with_previews_ms, fixed_s = loop_split(self.timings)  # previews: one per preview_interval iterations
        previews_ms = with_previews_ms - self.timings["ms_per_iteration"]
        return start + (iterations - done) * (self.loop_ms + previews_ms) / 1000.0 + fixed_s + self.outputs_s


def make_model_folder(folder: Path, tiny: bool) -> Path:
    """A diffusers Stable Diffusion folder with random weights (fp16 for the full-size one)."""
    import torch
    from diffusers import StableDiffusionPipeline

    if tiny:
        from tests.tiny_models import tiny_sd_pipeline

        pipe = tiny_sd_pipeline("epsilon")
    else:
        from bench.random_sd import random_sd_components

        parts = random_sd_components()
        pipe = StableDiffusionPipeline(**parts._asdict(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False).to(dtype=torch.float16)
    pipe.save_pretrained(folder)
    return folder


def cache_environment(caches: str, machine_root: Path, home_root: Path) -> dict[str, str]:
    """The process environment: the user's caches ("user"), or the machine's compile caches under machine_root
    and the home folder's under home_root."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if caches != "user":
        env.update({name: str(machine_root / sub) for name, sub in MACHINE_CACHES.items()})
        env.update({name: str(home_root / sub) for name, sub in HOME_CACHES.items()})
    return env


def train_command(model: Path, iters: int, output_dir: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "train.py", *PAPER_COMMAND, f"GuidanceParams.model_key={model}",
            "GenerateCamParams.init_shape=sphere", f"OptimizationParams.iterations={iters}",
            f"output_dir={output_dir}", *extra]


def run_train(command: list[str], env: dict[str, str], caches: str, log_path: Path) -> RunTimes:
    """Run train.py to its end; its metrics.json "timings" and the process's wall time."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log_file:
        proc = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log_file, text=True)
    process_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"train.py exited with {proc.returncode}; its log: {log_path}")
    match = re.search(r"^run folder:\s+(.+)$", proc.stdout, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"train.py printed no run folder; its output:\n{proc.stdout}")
    metrics = json.loads((Path(match.group(1).strip()) / "metrics.json").read_text())
    return RunTimes(caches, process_s, metrics["timings"])


def format_table(runs: list[RunTimes], device: str, args) -> str:
    lines = [
        f"# Time to asset: {device}", "",
        f"`python bench/time_to_asset.py {' '.join(args.argv)}`: train.py {' '.join(PAPER_COMMAND)} "
        f"GuidanceParams.model_key=<random-weight {'tiny SD' if args.tiny else 'SD 2.1-base, fp16'}> "
        f"GenerateCamParams.init_shape=sphere OptimizationParams.iterations={args.iters}"
        + "".join(f" {item}" for item in args.set or []) + ". Seconds unless marked.", "",
        "| caches | launch to 1st iteration | imports | model load | compile (or warm-up) ahead "
        "| first render (gsplat build) | 1st iteration | ms/it uncompiled | compiled from | ms/it after "
        "| in-loop work s (n) | ms/it with in-loop work | outputs "
        f"| process total | {ASSET_ITERATIONS} its projected |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        t = r.timings
        lines.append(
            f"| {r.caches} | **{r.at('first_iteration'):.1f}** | {r.imports_s:.1f} | {r.model_s:.1f} "
            f"| {r.compile_ahead_s:.1f} | {r.first_render_s:.1f} | {r.first_iteration_s:.1f} "
            f"| {t.get('ms_per_iteration_uncompiled', '-')} | {r.switch_cell()} | **{r.loop_ms:.1f}** "
            f"| {t['in_loop_work_seconds']:.1f} ({t['in_loop_work_count']}) | {r.loop_all_in_ms:.1f} "
            f"| {r.outputs_s:.1f} "
            f"| {r.process_s:.1f} | {r.projected_s() / 60:.1f} min |")
    split = [f"{r.caches}: " + ", ".join(f"{v['count']} {k} {v['seconds']:.1f} s"
                                         for k, v in r.timings["in_loop_work"].items())
             for r in runs if r.timings.get("in_loop_work")]
    if split:
        lines += ["", "In-loop work by kind (taken out of ms/it): " + "; ".join(split) + "."]
    beside = [f"{r.caches}: " + ", ".join(f"{v['count']} {k} {v['seconds']:.1f} s"
                                          for k, v in r.timings["background_writes"].items())
              for r in runs if r.timings.get("background_writes")]
    if beside:
        lines += ["", "Written beside the loop (background_writes; the worker thread's seconds, not the loop's): "
                  + "; ".join(beside) + "."]
    lines += ["", "With PipelineParams.compile_in_background=true (opt-in) the UNet and the VAE encoder compile in "
              "a background thread while the first iterations run uncompiled (\"ms/it uncompiled\", compilation "
              "beside them); \"compiled from\" is the iteration that switched and when; \"ms/it after\" is the "
              "compiled loop's.",
              f"Projected: launch to outputs at the steady ms/it for {ASSET_ITERATIONS} iterations "
              "(the previews' cost spread over them, the same evaluations and outputs); densification "
              "grows the Gaussians in a real run, "
              "which raises the later iterations' cost (bench/benchmark.py --gaussians)."]
    return "\n".join(lines) + "\n"


def device_name() -> str:
    """The GPU's name (this process touches CUDA only once a run has finished), else "CPU"."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=200, help="OptimizationParams.iterations of each run")
    p.add_argument("--caches", default="fresh,warm",
                   help="runs in order, comma-separated: fresh (empty compile caches), warm (the caches the "
                        "runs before left), portable (the machine's caches empty, the home folder's kept: "
                        "gsplat's build and the portable compile cache), user (your own caches, untouched)")
    p.add_argument("--model", type=Path, help="a Stable Diffusion folder (default: random weights, saved once)")
    p.add_argument("--set", action="append", metavar="Section.key=value",
                   help="extra config override for every run (repeatable), e.g. save_video=false")
    p.add_argument("--tiny", action="store_true", help="tiny random SD at 64x64, no compile (CPU smoke test)")
    p.add_argument("--out", type=Path, help="write the table (markdown) here")
    p.add_argument("--work", type=Path, help="folder for the model, caches and run folders (default: temporary)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    order = args.caches.split(",")
    if args.iters < 2 or not order or any(c not in CACHE_MODES for c in order):
        p.error(f"--iters must be >= 2; --caches a comma-separated list of {', '.join(CACHE_MODES)}")
    if order[0] in ("warm", "portable"):
        p.error(f"--caches: '{order[0]}' reuses caches of the runs before it; start with 'fresh' (or use 'user')")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    extra = (TINY_OVERRIDES if args.tiny else []) + list(args.set or [])
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = args.model or make_model_folder(work / "model", args.tiny)
        runs, machine_root, home_root = [], work / "caches_0", work / "caches_0"
        order = args.caches.split(",")
        for k, caches in enumerate(order):
            if caches in ("fresh", "portable"):
                machine_root = work / f"caches_{k}"  # new and empty
            if caches == "fresh":
                home_root = machine_root
            command = train_command(model, args.iters, work / f"outputs_{k}", extra)
            env = cache_environment(caches, machine_root, home_root)
            run = run_train(command, env, caches, work / f"train_{k}.log")
            print(f"{caches:6s} first iteration {run.at('first_iteration'):7.1f} s after launch, "
                  f"{run.timings['ms_per_iteration']:.1f} ms/it, process {run.process_s:.1f} s", flush=True)
            runs.append(run)
            # the table so far after every run: a call cut short by its time limit keeps the finished rows
            publish_table(format_table(runs, device_name(), args), args.out, quiet=k + 1 < len(order))
    return 0


if __name__ == "__main__":
    sys.exit(main())
