"""The official rules (the defaults) against the improvements overlay (config/improvements.yaml).

Analytic prior (CPU, known answer): the demo distilled with each rule set; held-out PSNR, Gaussians at
the end (the demo's last densification is at iteration 400 of 600) and training time. The demo
distils RGB only (as_latent_ratio 0), where the depth-gradient rule cannot act, so the rows are
repeated with the official as_latent_ratio 0.2.

Stable Diffusion 2.1-base architecture with random weights (GPU): the bagel configuration from a
sphere of 81,920 points (the official Point-E start's count), iterations 1..--steps with densification;
ms per iteration and the Gaussian count after the densifications.

    OMP_NUM_THREADS=1 python bench/official_rules.py --out bench/results/official_rules_cpu.md  # analytic, CPU
    python bench/official_rules.py --prior sd-random --steps 500 --out bench/results/official_rules_h100.md
    python bench/official_rules.py --prior sd-random --tiny --steps 3               # CPU smoke test
    OMP_NUM_THREADS=1 python bench/official_rules.py --render-cost --out bench/results/official_rules_render_cpu.md

On a CPU shared with other jobs, OMP_NUM_THREADS=1: OpenMP's spin-waiting threads otherwise cost ~20x here.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from utils.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OVERLAY = REPO / "config" / "improvements.yaml"
RULES = {"official (defaults)": (), "improvements overlay": (OVERLAY,)}


def analytic_rows(args, progress) -> list[str]:
    from training.run import train

    rows = ["| rules | as_latent_ratio | held-out PSNR start (dB) | held-out PSNR end (dB) | Gaussians | "
            "train time (s) |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in args.as_latent_ratios:
            for label, overlays in RULES.items():
                overrides = [f"output_dir={tmp}", "save_video=false", "export_mesh=false",
                             f"OptimizationParams.as_latent_ratio={ratio}", f"PipelineParams.device={args.device}",
                             *args.overrides]
                cfg = load_config(args.opt, overrides, warn_no_effect=False, overlays=overlays)
                m = train(cfg, args.opt, ["bench/official_rules.py"], quiet=True).metrics
                rows.append(f"| {label} | {ratio:g} | {m['initial']['psnr_heldout']:.2f} | "
                            f"{m['final']['psnr_heldout']:.2f} | {m['final']['gaussians']} | "
                            f"{m['train_seconds']:.1f} |")
                progress(rows)
    return rows


def sd_rows(args, progress) -> list[str]:
    from bench.benchmark import make_prior
    from guidance.stable_diffusion import SDComponents
    from training.trainer import Trainer, apply_pipeline_options

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.tiny:
        from tests.tiny_models import tiny_sd_pipeline

        pipe = tiny_sd_pipeline("epsilon")
        components = SDComponents(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)
        size, points = 64, 2000
    else:
        from bench.random_sd import random_sd_components

        components, size, points = random_sd_components(), 512, 81_920
    rows = ["| rules | ms/it (median of windows) | Gaussians at the start | Gaussians at the end | iterations |",
            "|---|---|---|---|---|"]
    for label, overlays in RULES.items():
        overrides = ["GuidanceParams.prior=stable_diffusion", "GenerateCamParams.init_shape=sphere",
                     f"GenerateCamParams.init_num_pts={points}", f"GenerateCamParams.image_w={size}",
                     f"GenerateCamParams.image_h={size}", f"PipelineParams.device={device.type}", *args.overrides]
        if device.type != "cuda":
            overrides += ["PipelineParams.compile=false", "PipelineParams.cuda_graphs=false"]
        cfg = load_config(args.opt, overrides, warn_no_effect=False, overlays=overlays)
        prior = make_prior(cfg, components, device, dtype)
        apply_pipeline_options(prior, cfg.pipeline)
        torch.manual_seed(0)
        trainer = Trainer(cfg, prior=prior, device=device)
        start_points = trainer.gaussians.num_points
        window = max(1, args.steps // 10)
        windows = []
        for first in range(1, args.steps + 1, window):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            last = min(first + window, args.steps + 1)
            for step in range(first, last):
                trainer.train_step(step)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            windows.append((time.perf_counter() - t0) * 1000 / (last - first))
        # the first window holds compilation / graph capture: leave it out when there are others
        ms = statistics.median(windows[1:] or windows)
        rows.append(f"| {label} | {ms:.1f} | {start_points} | {trainer.gaussians.num_points} | {args.steps} |")
        progress(rows)
        del trainer, prior
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def render_cost_rows(args, progress) -> list[str]:
    """CPU cost of the renderer rules: forward + backward of the torch backend (the demo's 2000-Gaussian
    sphere, 4 cameras at 64 x 64, RGB + depth loss) with each depth rule and with shared or per-camera scales."""
    from gaussian_renderer import render
    from scene.camera_sampler import orbit_cameras
    from scene.gaussian_tensors import GaussianTensors

    g = torch.Generator().manual_seed(0)
    n = 2000
    means = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1) * torch.rand(n, 1, generator=g)
    base = dict(means=means, quats=torch.randn(n, 4, generator=g), scales=torch.full((n, 3), 0.05),
                opacities=torch.full((n,), 0.1), sh_coeffs=torch.zeros(n, 1, 3))
    cams = orbit_cameras(torch.full((4,), 3.5), torch.full((4,), 80.0), torch.tensor([0.0, 90.0, 180.0, -90.0]),
                         torch.full((4,), 0.55), 64, 64)
    noise = 1 + 0.1 * torch.randn(4, n, 3, generator=g)
    rows = ["| scales | depth_grad_to_z | torch backend forward + backward (ms, median of 20) |", "|---|---|---|"]
    variants = [(per_camera, to_z) for per_camera in (False, True) for to_z in (False, True)]
    times = {v: [] for v in variants}
    for repeat in range(22):  # the variants interleaved, so that a busy moment of the machine hits them all
        for per_camera, to_z in variants:
            leaves = {k: v.clone().requires_grad_(True) for k, v in base.items()}
            scales = leaves["scales"] * noise if per_camera else leaves["scales"]
            t0 = time.perf_counter()
            out = render(GaussianTensors(**{**leaves, "scales": scales}, sh_degree=0), cams, torch.zeros(3),
                         backend="torch", depth_grad_to_z=to_z)
            (out.rgb.sum() + out.depth.sum()).backward()
            if repeat >= 2:  # warm-up
                times[(per_camera, to_z)].append((time.perf_counter() - t0) * 1000)
    for (per_camera, to_z), values in times.items():
        rows.append(f"| {'per camera [4, N, 3]' if per_camera else 'shared [N, 3]'} | {str(to_z).lower()} | "
                    f"{statistics.median(values):.1f} |")
        progress(rows)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prior", default="analytic", choices=("analytic", "sd-random"),
                   help="analytic: the demo (held-out PSNR); sd-random: SD 2.1-base architecture, random weights")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--opt", default=None, help="config (default: config/demo.yaml or config/bagel.yaml)")
    p.add_argument("--steps", type=int, default=500, help="sd-random: iterations from 1 (densification included)")
    p.add_argument("--as-latent-ratios", type=float, nargs="+", default=[0.0, 0.2], help="analytic rows")
    p.add_argument("--render-cost", action="store_true", help="instead: the renderer rules' cost on this device")
    p.add_argument("--tiny", action="store_true", help="sd-random with a tiny random SD at 64x64 (smoke test)")
    p.add_argument("--out", type=Path, help="write the table (markdown) here")
    p.add_argument("overrides", nargs="*", help="Section.key=value overrides for every row")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    analytic = args.prior == "analytic"
    args.opt = args.opt or str(REPO / "config" / ("demo.yaml" if analytic else "bagel.yaml"))
    if analytic and args.device == "auto":
        args.device = "cpu"
    device = torch.cuda.get_device_name() if args.device == "cuda" or (
        args.device == "auto" and torch.cuda.is_available()) else f"CPU, {torch.get_num_threads()} threads"
    header = (f"Official rules (defaults) against config/improvements.yaml; {Path(args.opt).name}, prior "
              f"{args.prior}{' (tiny)' if args.tiny else ''}, device: {device}; overrides: "
              f"{' '.join(args.overrides) or 'none'}\n\n")
    if args.render_cost:
        header = f"Renderer rules' cost (bench/official_rules.py --render-cost), device: {device}\n\n"

    def progress(rows: list[str]) -> None:  # each row as it comes; the file rewritten, so a killed run keeps it
        print(rows[-1], flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(header + "\n".join(rows) + "\n")

    if args.render_cost:
        rows = render_cost_rows(args, progress)
    else:
        rows = analytic_rows(args, progress) if analytic else sd_rows(args, progress)
    print(header + "\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
