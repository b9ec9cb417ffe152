"""SOG (export/sog.py): encode time of a large SH-3 asset, and size / round-trip quality on real assets.

For every PLY given: its size against the .sog, the encode and decode time, the 16-view PSNR of the decoded
splats against the PLY's own (our torch rasterizer, cameras on a ring around the asset), and the largest
error of each attribute. Then the encode time of a synthetic N-splat SH-3 asset (default 1M). One markdown
table each, printed and, with --out, written to a file.

    python bench/sog_encode.py --ply outputs/demo/RUN/point_cloud.ply --out bench/results/sog_cpu.md
    python bench/sog_encode.py --ply A.ply --reference-sog A.sog --skip-timing    # against splat-transform's file
    python bench/sog_encode.py --device cuda --splats 1000000          # the GPU encode (goal <= 20 s)
    nice -n 19 python bench/sog_encode.py --skip-assets                   # only the 1M timing (CPU goal <= 10 min)
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.spatial import cKDTree  # noqa: E402

from export.kmeans import default_device  # noqa: E402
from export.sog import DEFAULT_SH_ITERATIONS, read_sog, write_sog  # noqa: E402
from export.splat_data import SplatData  # noqa: E402
from gaussian_renderer import render  # noqa: E402
from scene.camera_sampler import orbit_cameras  # noqa: E402
from utils.metrics import psnr  # noqa: E402
from utils.threads import configure_threads  # noqa: E402


def synthetic_asset(n: int, degree: int = 3, seed: int = 0) -> SplatData:
    """n splats shaped like a trained asset: a noisy shell, small scales, SH rest around 512 material
    prototypes (k-means work does not depend on the values; the palette's error does)."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=(n, 3))
    means = direction / np.linalg.norm(direction, axis=1, keepdims=True) * (0.5 + 0.05 * rng.normal(size=(n, 1)))
    k = (degree + 1) ** 2 - 1
    prototypes = rng.normal(size=(512, k, 3)) * 0.1
    sh_rest = prototypes[rng.integers(512, size=n)] + 0.02 * rng.normal(size=(n, k, 3))
    quats = rng.normal(size=(n, 4))
    return SplatData(
        means=means.astype(np.float32), log_scales=(rng.normal(size=(n, 3)) * 0.5 - 5).astype(np.float32),
        quats=(quats / np.linalg.norm(quats, axis=1, keepdims=True)).astype(np.float32),
        opacity_logits=(rng.normal(size=n) * 2).astype(np.float32),
        sh_dc=rng.normal(size=(n, 3)).astype(np.float32), sh_rest=sh_rest.astype(np.float32), up_axis="-y",
    )


def renders(data: SplatData, radius: float, views: int = 16, size: int = 128) -> torch.Tensor:
    """[views, 3, size, size] torch-rasterizer renders on a ring around the asset (training world, z up)."""
    one = torch.ones(views)
    cameras = orbit_cameras(radius * one, torch.linspace(60, 100, views), torch.arange(views) * (360.0 / views),
                            0.6 * one, size, size)
    with torch.no_grad():
        return render(data.to_model().gaussian_tensors(), cameras, torch.ones(3), backend="torch").rgb.clamp(0, 1)


def largest_errors(original: SplatData, back: SplatData) -> dict[str, float]:
    match = cKDTree(back.means).query(original.means)[1]  # the file reorders splats (Morton order)
    sigmoid = lambda x: 1 / (1 + np.exp(-x.astype(np.float64)))  # noqa: E731
    dots = np.clip(np.abs((back.quats[match].astype(np.float64) * original.quats).sum(axis=1)), 0, 1)
    errors = {
        "position/extent": np.abs(back.means[match] - original.means).max() / np.ptp(original.means, axis=0).max(),
        "rotation (deg)": np.degrees(2 * np.arccos(dots)).max(),
        "log-scale": np.abs(back.log_scales[match] - original.log_scales).max(),
        "opacity": np.abs(sigmoid(back.opacity_logits[match]) - sigmoid(original.opacity_logits)).max(),
        "DC colour": np.abs(back.sh_dc[match] - original.sh_dc).max(),
    }
    errors["SH rest"] = np.abs(back.sh_rest[match] - original.sh_rest).max() if original.sh_degree else np.nan
    return {name: float(value) for name, value in errors.items()}


def asset_rows(ply: Path, device: str, iterations: int, folder: Path, reference: Path | None) -> list[tuple[str, str]]:
    """(size / PSNR / time row, largest-error row) for our encode of `ply`, and for the reference encoder's
    file of the same PLY when given (read with our reader, its encode time not ours to measure)."""
    data = SplatData.from_ply(ply)
    path = folder / f"{ply.parent.name}.sog"
    start = time.perf_counter()
    write_sog(data, path, sh_iterations=iterations, device=device)
    encode = time.perf_counter() - start
    radius = 2.5 * float(np.ptp(data.means, axis=0).max()) + 1.0
    original = renders(data, radius)
    rows = []
    for name, sog in (("ours", path), ("splat-transform", reference)):
        if sog is None:
            continue
        start = time.perf_counter()
        back = read_sog(sog)
        decode = time.perf_counter() - start
        quality = float(psnr(renders(back, radius), original))
        ratio = ply.stat().st_size / sog.stat().st_size
        timing = f"{encode:.2f}" if name == "ours" else "-"
        errors = " | ".join("-" if np.isnan(v) else f"{v:.3g}" for v in largest_errors(data, back).values())
        rows.append((f"| {ply} | {name} | {data.num_splats:,} | {data.sh_degree} | {ply.stat().st_size:,} | "
                     f"{sog.stat().st_size:,} | {ratio:.2f}x | {quality:.2f} | {timing} | {decode:.2f} |",
                     f"| {ply} | {name} | {errors} |"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ply", type=Path, action="append", default=[], help="asset(s) for size / PSNR")
    parser.add_argument("--reference-sog", type=Path, action="append", default=[],
                        help="the reference encoder's .sog of each --ply, in the same order (compared, not timed)")
    parser.add_argument("--splats", type=int, default=1_000_000, help="synthetic SH-3 asset size for the timing")
    parser.add_argument("--iterations", type=int, default=DEFAULT_SH_ITERATIONS, help="SH palette k-means iterations")
    parser.add_argument("--device", default=None, help="k-means device: cpu or cuda (default: CUDA when present)")
    parser.add_argument("--skip-assets", action="store_true", help="only the synthetic timing")
    parser.add_argument("--skip-timing", action="store_true", help="only the assets")
    parser.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    args = parser.parse_args()
    configure_threads()  # as train.py: on a loaded machine more OpenMP threads than idle cores collapse
    device = str(torch.device(args.device) if args.device else default_device())
    machine = platform.processor() or platform.machine()
    lines = [f"# SOG encode ({device}, {torch.get_num_threads()} threads, {machine}, torch {torch.__version__}, "
             f"k-means iterations {args.iterations})", ""]
    with tempfile.TemporaryDirectory() as folder:
        if args.ply and not args.skip_assets:
            if args.reference_sog and len(args.reference_sog) != len(args.ply):
                parser.error("give one --reference-sog per --ply, or none")
            references = args.reference_sog or [None] * len(args.ply)
            lines += ["| asset | encoder | splats | SH | PLY bytes | SOG bytes | PLY / SOG | 16-view PSNR (dB) | "
                      "encode (s) | decode (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
            rows = [row for ply, reference in zip(args.ply, references)
                    for row in asset_rows(ply, device, args.iterations, Path(folder), reference)]
            lines += [row for row, _ in rows]
            names = "position/extent | rotation (deg) | log-scale | opacity | DC colour | SH rest"
            lines += ["", f"Largest error per attribute:\n\n| asset | encoder | {names} |",
                      "|---|---|---|---|---|---|---|---|"]
            lines += [errors for _, errors in rows]
        if not args.skip_timing:
            data = synthetic_asset(args.splats)
            path = Path(folder) / "synthetic.sog"
            if device.startswith("cuda"):  # CUDA context and kernels outside the timing
                write_sog(synthetic_asset(4096), Path(folder) / "warm.sog", device=device, progress=False)
                torch.cuda.synchronize()
            start = time.perf_counter()
            write_sog(data, path, sh_iterations=args.iterations, device=device)
            encode = time.perf_counter() - start
            start = time.perf_counter()
            read_sog(path)
            decode = time.perf_counter() - start
            lines += ["", "| synthetic SH-3 asset | splats | SOG bytes | encode (s) | decode (s) |",
                      "|---|---|---|---|---|",
                      f"| shell, 512 SH prototypes + noise | {args.splats:,} | {path.stat().st_size:,} | "
                      f"{encode:.1f} | {decode:.1f} |"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
