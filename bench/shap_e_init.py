"""Time and peak GPU memory of the Shap-E initialisation (GenerateCamParams.init_shape: shapee).

Full-size openai/shap-e architecture with random weights (bench/random_shap_e.py), saved to a temporary
diffusers folder so that the run's real loading path is measured too. Rows:
    load      ShapEPipeline.from_pretrained of the folder onto the device (fp16 on CUDA)
    sample    64 Heun steps with classifier-free guidance 15 (the official sampler settings)
    decode    marching cubes on the 128^3 grid + vertex colours
    init      the whole `initial_points` call a run makes (load + sample + decode + expansion to balls)
Random weights give a noisy signed-distance field with far more surface than a real object, so the
decode row (and the vertex count it reports) is an upper bound for a real prompt.

    python bench/shap_e_init.py --out bench/results/shap_e_init_h200.md     # on an H100/H200
    python bench/shap_e_init.py --tiny                                     # CPU smoke test of the script
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import scene.text_to_3d_init as shapee  # noqa: E402
from bench.random_shap_e import random_shap_e_pipeline  # noqa: E402
from scene.initialisation import initial_points  # noqa: E402

PROMPT = "a man head."  # the official evil / orchead init prompt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions of each row (after one warm-up)")
    p.add_argument("--steps", type=int, default=shapee.NUM_STEPS)
    p.add_argument("--grid", type=int, default=shapee.GRID_SIZE)
    p.add_argument("--init-num-pts", type=int, default=100_000)
    p.add_argument("--tiny", action="store_true", help="tiny random Shap-E, 2 steps, 24^3 grid (CPU smoke test)")
    p.add_argument("--out", type=Path, default=None, help="write the table (markdown) here")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.grid, args.repeats = 2, 24, 1
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> tuple[list[float], float, object]:
    """fn() once to warm up, then `repeats` times: (seconds per run, peak GiB allocated over them, last result)."""
    result = fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak, result


def run(args: argparse.Namespace) -> list[dict]:
    """The four rows; initial_points reads the step count and grid from the module, set for the run."""
    defaults = shapee.NUM_STEPS, shapee.GRID_SIZE
    shapee.NUM_STEPS, shapee.GRID_SIZE = args.steps, args.grid
    try:
        return _rows(args, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    finally:
        shapee.NUM_STEPS, shapee.GRID_SIZE = defaults


def _rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        random_shap_e_pipeline("tiny" if args.tiny else "full").save_pretrained(folder)
        seconds, peak, pipe = timed(lambda: shapee.load_shapee_pipeline(folder, device), device, args.repeats)
        prior_millions = sum(p.numel() for p in pipe.prior.parameters()) / 1e6
        rows.append(dict(row="load", seconds=seconds, peak=peak,
                         note=f"{prior_millions:.0f}M-parameter prior, {pipe.dtype}"))
        generator = torch.Generator(device=device)

        def sample():
            return pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=shapee.GUIDANCE_SCALE,
                        generator=generator.manual_seed(0), output_type="latent").images

        seconds, peak, latents = timed(sample, device, args.repeats)
        rows.append(dict(row="sample", seconds=seconds, peak=peak,
                         note=f"{args.steps} steps, CFG {shapee.GUIDANCE_SCALE}"))

        def decode():
            return pipe.shap_e_renderer.decode_to_mesh(latents[:1], device, grid_size=args.grid)

        seconds, peak, mesh = timed(decode, device, args.repeats)
        rows.append(dict(row="decode", seconds=seconds, peak=peak,
                         note=f"{args.grid}^3 grid, {mesh.verts.shape[0]} vertices, {mesh.faces.shape[0]} faces"))
        pipe = latents = mesh = None  # free the model before the end-to-end row
        cfg = SimpleNamespace(init_shape="shapee", init_prompt=PROMPT, shapee_model_key=folder,
                              init_num_pts=args.init_num_pts, use_pointe_rgb=False)
        seconds, peak, (xyz, _) = timed(lambda: initial_points(cfg, torch.Generator().manual_seed(0)), device,
                                        args.repeats)
        rows.append(dict(row="init", seconds=seconds, peak=peak, note=f"{xyz.shape[0]} initial points"))
    return rows


def table(rows: list[dict], device_name: str) -> str:
    lines = [f"Shap-E initialisation on {device_name} (random weights, full-size architecture unless --tiny)", "",
             "| row | median s | min s | peak GiB | note |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {statistics.median(r['seconds']):.3f} | {min(r['seconds']):.3f} | "
                     f"{r['peak']:.2f} | {r['note']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = run(args)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    text = table(rows, name)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
