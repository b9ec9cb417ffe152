"""Compressed splat formats on real assets: size against the PLY, round-trip render PSNR, largest errors.

    python bench/splat_formats.py PLY [PLY ...] [--size 256] [--out bench/results/splat_formats_cpu.md]

For each PLY (a run's point_cloud.ply, in its recorded up axis) and each format (.spz v3, .spz v4, and
SOG when export/sog.py is present): write it with our writer, read it back with our reader, and
report the size ratio (PLY bytes / file bytes), the PSNR of 16 renders of the read-back splats against
16 renders of the PLY's (our torch rasterizer, two rings of 8 views, export/splat_compare.py), the
largest error of each attribute, and the write and read times. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.splat_compare import attribute_errors, render_psnr  # noqa: E402
from export.splat_data import SplatData  # noqa: E402
from export.spz import read_spz, write_spz  # noqa: E402


def formats() -> dict:
    """name -> (suffix, write(data, path), read(path))."""
    table = {
        ".spz v3": (".spz", lambda data, path: write_spz(data, path, 3), read_spz),
        ".spz v4": (".v4.spz", lambda data, path: write_spz(data, path, 4), read_spz),
    }
    if importlib.util.find_spec("export.sog") is not None:
        from export.sog import read_sog, write_sog

        table["SOG"] = (".sog", write_sog, read_sog)
    return table


def measure(ply: Path, size: int) -> list[dict]:
    data = SplatData.from_ply(ply, "-y")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (suffix, write, read) in formats().items():
            path = Path(tmp) / f"asset{suffix}"
            t0 = time.perf_counter()
            write(data, path)
            t1 = time.perf_counter()
            back = read(path)
            t2 = time.perf_counter()
            if back.up_axis != data.up_axis:  # a file that records no frame is read in the default
                back = SplatData(back.means, back.log_scales, back.quats, back.opacity_logits, back.sh_dc,
                                 back.sh_rest, data.up_axis)
            rows.append({"asset": ply, "splats": data.num_splats, "sh": data.sh_degree, "format": name,
                         "bytes": path.stat().st_size, "ratio": ply.stat().st_size / path.stat().st_size,
                         "psnr": render_psnr(data, back, size), "errors": attribute_errors(data, back),
                         "write_s": t1 - t0, "read_s": t2 - t1})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| asset | splats | SH | format | bytes | PLY / file | PSNR (dB) | position / extent | rotation (deg) "
             "| log-scale | opacity | colour | SH coeff. | write (s) | read (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r["errors"]
        lines.append(f"| {r['asset']} | {r['splats']} | {r['sh']} | {r['format']} | {r['bytes']} | {r['ratio']:.2f}x "
                     f"| {r['psnr']:.2f} | {e.position:.2e} | {e.rotation_deg:.3f} | {e.log_scale:.4f} "
                     f"| {e.opacity:.4f} | {e.color:.4f} | {e.sh:.4f} | {r['write_s']:.2f} | {r['read_s']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("plys", type=Path, nargs="+", help="3DGS PLY files (e.g. runs' point_cloud.ply)")
    parser.add_argument("--size", type=int, default=256, help="render size of the 16 PSNR views (pixels)")
    parser.add_argument("--out", type=Path, help="also write the table (with the command) to this Markdown file")
    args = parser.parse_args()
    rows = [row for ply in args.plys for row in measure(ply, args.size)]
    text = table(rows)
    print(text)
    if args.out is not None:
        command = "python bench/splat_formats.py " + " ".join(sys.argv[1:])
        args.out.write_text(f"# Splat formats ({platform.processor() or platform.machine()}, CPU)\n\n"
                            f"`{command}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
