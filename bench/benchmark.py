"""Speed and memory of a training iteration, per loss, on one GPU.

Full-size SD 2.1-base architecture with random weights (the real model's cost), ~100k Gaussians,
4 cameras at 512x512, CFG 7.5, densification on. Modes (MODES below) run in this process side by
side: "default" (the schema defaults: torch.compile + CUDA graphs, channels-last UNet, matmul VAE
attention, channels-last VAE encoder with Triton NHWC GroupNorm kernels, one batched rasterizer call),
"no-compile", "regional" (only the UNet's transformer blocks compiled), "contiguous-vae", the low-VRAM
and large-GPU overlays, and a "straightforward" one (fp16 eager, one rasterizer call per camera, no CUDA
graphs, no channels-last, diffusers' default VAE attention, cuDNN autotuning off) so that speed-ups are
ratios measured together.

    python bench/benchmark.py --out bench/results.md            # on an H100/H200
    python bench/benchmark.py --tiny --steps 3 --warmup 1       # CPU smoke test of the script itself
    python bench/benchmark.py --modes default --losses sctd --gaussians 128000,400000,800000
                                                                # cost against the Gaussian count
    torchrun --standalone --nproc_per_node=2 bench/benchmark.py --modes default --losses sctd
                                                                # one asset on 2 GPUs (cameras split)

Per configuration: median and p10/p90 of ms per iteration over --steps iterations after --warmup,
the mean of each section (render, VAE encode, each UNet call, backward = VAE-encoder backward +
rasterizer backward, optimizer + densification, the rest), peak GPU memory, the FLOPs of an
iteration and their share of the GPU's peak, the warm-up time (compilation), and the GPU name. The
median leaves out densification steps (every densification_interval iterations), whose time is given
apart, as is the render of the 8 evaluation views an in-loop test evaluation makes. With several
--gaussians counts, one prior per mode and loss serves every count (compiled and graphed once).
Under torchrun each process trains the same asset on its share of the cameras (training/distributed.py);
rank 0 prints the table with the number of GPUs, the largest peak memory of any GPU and the time spent
in communication (gradient all-reduce and gathering the densification statistics).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.flops import NetworkFlops, dense_fp16_peak_tflops, network_flops  # noqa: E402
from bench.random_sd import random_sd_components  # noqa: E402
from guidance.stable_diffusion import SDComponents, StableDiffusionPrior  # noqa: E402
from training.distributed import ProcessGroup  # noqa: E402
from training.trainer import Trainer, apply_pipeline_options  # noqa: E402
from utils.config import Config, load_config  # noqa: E402

log = logging.getLogger("benchmark")

LOSSES = {  # label -> GuidanceParams overrides
    "sctd": {"guidance_type": "sctd", "perpneg": False},
    "sctd+perpneg": {"guidance_type": "sctd", "perpneg": True},
    "ism": {"guidance_type": "ism", "perpneg": False},
    "sds": {"guidance_type": "sds", "perpneg": False},
    "cds": {"guidance_type": "cds", "perpneg": False},
    "gcs": {"guidance_type": "gcs", "perpneg": False},
}
MODES = {  # label -> overrides of the schema defaults ("key" is PipelineParams.key, "Section.key" another)
    "default": {},  # compile + CUDA graphs + channels-last UNet + matmul VAE attention + batched rendering
    "no-compile": {"compile": False},
    "regional": {"compile_regions": True},  # only the UNet's repeated transformer blocks compiled
    "no-cudnn-benchmark": {"cudnn_benchmark": False},  # cuDNN's heuristics: no autotuning in every new process
    "straightforward": {"compile": False, "cuda_graphs": False, "channels_last": False, "cudnn_benchmark": False,
                        "render_per_camera": True, "vae_attention": "sdpa", "vae_channels_last": False},
    "contiguous-vae": {"vae_channels_last": False},  # the default before the Triton NHWC GroupNorm kernels
    "low-vram": {"encode_chunk": 1},  # config/low_vram.yaml
    "large-gpu": {"GuidanceParams.C_batch_size": 8},  # config/large_gpu.yaml
}


class EventTimer:
    """Records CUDA events around named sections; read once after the last step (no syncs meanwhile)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.records: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            yield
        finally:
            end.record()
            self.records.append((name, start, end))

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for name, start, end in self.records:
            out[name] += start.elapsed_time(end)
        return out


def instrument_unet(prior: StableDiffusionPrior, timer: EventTimer) -> dict[str, int]:
    """Time every predict_noise call, labelled by its position in the step and its batch; the returned
    dict counts the UNet samples ("samples") run since the timer was last cleared."""
    original = prior.predict_noise
    counter = {"k": 0, "samples": 0}

    prior._bench_timer = timer

    def timed(z_t, t, cond, branches):
        counter["k"] += 1
        counter["samples"] += len(branches) * z_t.shape[0]
        with prior._bench_timer(f"unet#{counter['k']} [{len(branches)}x{z_t.shape[0]}]"):
            return original(z_t, t, cond, branches)

    prior.predict_noise = timed
    prior._reset_unet_counter = lambda: counter.update(k=0)
    return counter


@dataclass
class Result:
    mode: str
    loss: str
    step_ms: list[float]
    wall_ms: float
    sections: dict[str, float]
    peak_gib: float
    gaussians: int
    tflop: float  # UNet + VAE-encoder FLOPs per iteration (bench/flops.py)
    cameras: int  # camera batch of an iteration
    warmup_s: float  # wall time of the warm-up iterations: compilation, graph capture, cuDNN autotuning
    gpus: int = 1  # processes (GPUs) sharing each step's cameras
    notes: list[str] = field(default_factory=list)
    densify_ms: list[float] = field(default_factory=list)  # timed steps that densified (not in step_ms)
    eval_render_ms: float = float("nan")  # rendering the 8 evaluation views (training/run.py test_cameras)
    prior: object = field(default=None, repr=False)  # the compiled prior, for the next Gaussian count


def build_config(loss: str, mode: str, args, gaussians: int | None = None) -> Config:
    overrides = [f"GuidanceParams.{k}={v}" for k, v in LOSSES[loss].items()]
    overrides += [
        "GuidanceParams.prior=stable_diffusion", f"GuidanceParams.C_batch_size={args.batch}",
        "GuidanceParams.guidance_scale=7.5", "GuidanceParams.lambda_guidance=0.1", "GuidanceParams.fix_noise=true",
        "GuidanceParams.phase_num=5", "GuidanceParams.text='a DSLR photo of a bagel'",
        "GuidanceParams.negative='unrealistic, blurry, low quality'",
        f"GenerateCamParams.image_w={args.resolution}", f"GenerateCamParams.image_h={args.resolution}",
        "GenerateCamParams.init_shape=sphere", f"GenerateCamParams.init_num_pts={gaussians or args.gaussians[0]}",
        "ModelParams.bg_aug_ratio=0.66", "OptimizationParams.iterations=5000",
        "OptimizationParams.densify_until_iter=5000", "PipelineParams.renderer=auto",
    ]
    overrides += [f"{k if '.' in k else 'PipelineParams.' + k}={v}" for k, v in MODES[mode].items()]
    return load_config(None, overrides, warn_no_effect=False)


def make_prior(cfg, components, device, dtype) -> StableDiffusionPrior:
    g = cfg.guidance
    return StableDiffusionPrior(
        components, text=g.text, negative=g.negative, inverse_text=g.inverse_text, perpneg=g.perpneg,
        device=device, dtype=dtype,
    )


def densifies(cfg: Config, step: int) -> bool:
    """Whether Trainer.after_backward densifies at `step` (and syncs)."""
    o = cfg.optim
    return step < o.densify_until_iter and step > o.densify_from_iter and step % o.densification_interval == 0


def evaluation_render_ms(trainer: Trainer, cfg: Config, device: torch.device) -> float:
    """The render of an in-loop test evaluation: the 8 evaluation-ring views (PNG writing aside)."""
    from scene.camera_sampler import evaluation_ring

    cams = evaluation_ring(cfg.camera, 8, cfg.camera.render_45, cfg.camera.image_w, cfg.camera.image_h)
    background = torch.zeros(3, device=device)
    trainer.render_views(cams, background)  # warm
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    trainer.render_views(cams, background)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000


def run_config(loss: str, mode: str, components, args, device, dtype, flops: NetworkFlops,
               group: ProcessGroup | None = None, gaussians: int | None = None, prior=None) -> Result:
    """One configuration; `prior` (from an earlier call of the same mode and loss) skips building and
    compiling it again."""
    group = group or ProcessGroup()
    cfg = build_config(loss, mode, args, gaussians)
    if prior is None:
        prior = make_prior(cfg, components, device, dtype)
        apply_pipeline_options(prior, cfg.pipeline)
        prior._bench_counter = instrument_unet(prior, EventTimer(False))
    timer = EventTimer(device.type == "cuda")
    prior._bench_timer = timer  # instrument_unet's wrapper reads the current timer
    unet_counter = prior._bench_counter
    torch.manual_seed(0)
    trainer = Trainer(cfg, prior=prior, device=device, group=group)
    trainer.timer = timer
    start = args.start_step
    warm_start = time.perf_counter()
    for step in range(start, start + args.warmup):  # captures graphs, autotunes cuDNN
        prior._reset_unet_counter()
        trainer.train_step(step)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warmup_s = time.perf_counter() - warm_start
    timer.records.clear()
    unet_counter["samples"] = 0
    boundaries = []
    timed_steps = list(range(start + args.warmup, start + args.warmup + args.steps))
    t0 = time.perf_counter()
    for step in timed_steps:
        prior._reset_unet_counter()
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            boundaries.append(event)
        trainer.train_step(step)
    if device.type == "cuda":
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        boundaries.append(end)
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1000 / args.steps
    all_ms = [a.elapsed_time(b) for a, b in zip(boundaries, boundaries[1:])]  # CUDA only
    step_ms = [ms for step, ms in zip(timed_steps, all_ms) if not densifies(cfg, step)] or all_ms or [wall_ms]
    densify_ms = [ms for step, ms in zip(timed_steps, all_ms) if densifies(cfg, step)]
    sections = {k: v / args.steps for k, v in timer.totals().items()}
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    if group.distributed:  # the largest of any GPU
        peaks = [None] * group.world_size
        torch.distributed.all_gather_object(peaks, peak)
        peak = max(peaks)
    tflop = (unet_counter["samples"] / args.steps * flops.unet_tflop_per_sample
             + cfg.guidance.C_batch_size * flops.vae_tflop_fwd_bwd_per_image)
    result = Result(mode, loss, step_ms, wall_ms, sections, peak, trainer.gaussians.num_points, tflop,
                    cfg.guidance.C_batch_size, warmup_s, group.world_size, densify_ms=densify_ms,
                    eval_render_ms=evaluation_render_ms(trainer, cfg, device), prior=prior)
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def format_table(results: list[Result], gpu: str, args) -> str:
    peak = dense_fp16_peak_tflops(gpu)
    lines = [
        f"GPU: {gpu}; torch {torch.__version__}; SD 2.1-base architecture (random weights), "
        f"{args.precision}; B={args.batch} cameras (unless the mode sets another) at "
        f"{args.resolution}x{args.resolution}; "
        f"~{'/'.join(str(n) for n in args.gaussians)} Gaussians at start; CFG 7.5; densification on; "
        f"{args.steps} timed iterations "
        f"after {args.warmup} warm-up, from iteration {args.start_step}. TFLOP/it counts the UNet calls and "
        f"the VAE-encoder forward+backward (bench/flops.py); % of peak = TFLOP/it / median time / "
        + (f"{peak:.0f} TFLOP/s (dense fp16 data-sheet peak)." if peak else "peak (unknown for this GPU)."),
        "",
        ("| mode | loss | GPUs | B | median ms/it | p10-p90 ms | mean wall ms/it | vs straightforward | peak GiB "
         "| Gaussians | TFLOP/it | % of peak | warm-up s | densify step ms | eval render ms |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    medians = {(r.mode, r.loss): statistics.median(r.step_ms) for r in results}  # the first count's
    for r in results:
        med = statistics.median(r.step_ms)
        base = medians.get(("straightforward", r.loss))
        comparable = base and r.mode != "straightforward" and r.cameras == args.batch
        ratio = f"{base / med:.2f}x" if comparable else "-"
        lines.append(
            f"| {r.mode} | {r.loss} | {r.gpus} | {r.cameras} | {med:.1f} | "
            f"{percentile(r.step_ms, 0.1):.1f}-{percentile(r.step_ms, 0.9):.1f} "
            f"| {r.wall_ms:.1f} | {ratio} | {r.peak_gib:.2f} | {r.gaussians} | {r.tflop:.3g} "
            f"| {f'{100 * r.tflop / med / peak * 1e3:.0f}%' if peak else '-'} | {r.warmup_s:.0f} "
            f"| {'/'.join(f'{ms:.0f}' for ms in r.densify_ms) or '-'} | {r.eval_render_ms:.1f} |"
        )
    lines += ["", "Breakdown (mean ms per iteration; unet#k [branches x batch] is the k-th denoiser call of a step;",
              "backward = VAE-encoder backward + rasterizer backward):", ""]
    for r in results:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r.sections.items()))
        covered = sum(v for k, v in r.sections.items() if not k.startswith("unet"))
        rest = statistics.median(r.step_ms) - covered
        lines.append(f"- {r.mode} / {r.loss}: {parts}; other (python, sampling, losses) {rest:.1f}")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--losses", default=",".join(LOSSES), help="comma-separated labels from " + ",".join(LOSSES))
    p.add_argument("--modes", default="straightforward,default", help="comma-separated from " + ",".join(MODES))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--start-step", type=int, default=1001, help="iteration index of the first step (schedules)")
    p.add_argument("--gaussians", type=lambda v: [int(n) for n in v.split(",")], default=[100_000],
                   help="initial Gaussian count(s), comma-separated: one row each")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--precision", default="fp16", choices=("fp16", "bf16", "fp32"))
    p.add_argument("--tiny", action="store_true", help="tiny random SD and small sizes (CPU smoke test)")
    p.add_argument("--out", type=Path, default=None, help="write the table (markdown) here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    group = ProcessGroup.from_environment()  # torchrun: one asset, each step's cameras split over the GPUs
    device = group.device("auto") if group.distributed else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    group.start(device)
    try:
        return benchmark(args, group, device)
    finally:
        group.stop()


def benchmark(args, group: ProcessGroup, device: torch.device) -> int:
    def report(text: str) -> None:  # rank 0 prints and writes
        if group.is_writer:
            print(text, flush=True)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.precision]
    if args.tiny:
        from tests.tiny_models import tiny_sd_pipeline

        pipe = tiny_sd_pipeline("epsilon")
        components_fn = lambda: SDComponents(pipe.unet, pipe.vae, pipe.text_encoder,  # noqa: E731
                                              pipe.tokenizer, pipe.scheduler)
        args.resolution, args.gaussians = min(args.resolution, 64), [min(n, 2000) for n in args.gaussians]
    else:
        components_fn = random_sd_components
    if device.type == "cpu":
        dtype = torch.float32
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU)"
    results, failures = [], []
    components, flops = None, None
    for mode in args.modes.split(","):
        components = components_fn() if components is None else components
        flops = flops or network_flops(components.unet, components.vae, args.resolution)
        for loss in args.losses.split(","):
            prior = None
            for n in args.gaussians:
                try:
                    r = run_config(loss, mode, components, args, device, dtype, flops, group, n, prior)
                except Exception as exc:  # one failing configuration must not lose the others' numbers
                    log.exception("%s / %s / %d Gaussians failed", mode, loss, n)
                    failures.append(f"- {mode} / {loss} / {n} Gaussians failed: {type(exc).__name__}: {exc}")
                    break
                prior, r.prior = r.prior, None
                report(f"{mode:16s} {loss:14s} {r.gaussians:8d} Gaussians median {statistics.median(r.step_ms):7.1f}"
                       f" ms  peak {r.peak_gib:6.2f} GiB")
                results.append(r)
            if args.out and group.is_writer:  # rewritten after every configuration: a killed run keeps what it measured
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(format_table(results, gpu, args) + "".join(f"{x}\n" for x in failures))
    report(format_table(results, gpu, args) + "".join(f"{line}\n" for line in failures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
