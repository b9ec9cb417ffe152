"""Every convolution shape of one SD 2.1-base UNet forward, timed alone: cuDNN (channels-last,
cudnn.benchmark) against the same convolution as one GEMM over an NHWC patch matrix
(bench/conv_gemm.py), eager and compiled, and against the bare GEMM on a ready patch matrix.

    python bench/unet_convs.py [--batches 4,8] [--compile] [--out bench/results/unet_convs.md]

The last table sums the time per input resolution (count x time per call): the sizes where the GEMM wins
would be the ones worth running as GEMMs (measured on an H200: none are).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.components import Table, rel_err, timed  # noqa: E402
from bench.conv_gemm import conv2d_as_gemm  # noqa: E402
from bench.flops import dense_fp16_peak_tflops  # noqa: E402
from bench.random_sd import random_sd_components  # noqa: E402


def conv_shapes(unet, batch: int) -> Counter:
    """(input shape, conv module) -> calls per UNet forward at this batch size."""
    shapes: Counter = Counter()
    hooks = [m.register_forward_pre_hook(lambda m, inp: shapes.update([(tuple(inp[0].shape), m)]))
             for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    lat = torch.randn(batch, 4, 64, 64, device="cuda", dtype=torch.float16)
    ctx = torch.randn(batch, 77, 1024, device="cuda", dtype=torch.float16)
    t = torch.full((batch,), 500, device="cuda", dtype=torch.long)
    with torch.no_grad():
        unet(lat.contiguous(memory_format=torch.channels_last), t, encoder_hidden_states=ctx)
    for h in hooks:
        h.remove()
    return shapes


def shape_rows(table: Table, shapes: Counter, use_compile: bool, peak: float | None, totals: dict) -> None:
    for (shape, conv), count in sorted(shapes.items(), key=lambda kv: (-kv[0][0][2], kv[0][0][1])):
        x = torch.randn(shape, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
        w, b, stride, padding = conv.weight, conv.bias, tuple(conv.stride), tuple(conv.padding)
        ref = F.conv2d(x, w, b, stride, padding)
        gflop = 2 * ref.numel() * w[0].numel() / 1e9
        cols_shape = (ref.shape[0] * ref.shape[2] * ref.shape[3], w[0].numel())
        cols = torch.randn(cols_shape, device="cuda", dtype=torch.float16)
        w_mat = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
        variants = {"cuDNN": lambda: F.conv2d(x, w, b, stride, padding),
                    "GEMM eager": lambda: conv2d_as_gemm(x, w, b, stride, padding),
                    "mm only": lambda: F.linear(cols, w_mat, b)}
        if use_compile:
            fn = torch.compile(conv2d_as_gemm, dynamic=False)
            variants["GEMM compiled"] = lambda: fn(x, w, b, stride, padding)
        cells, err = [], rel_err(conv2d_as_gemm(x, w, b, stride, padding), ref)
        for name, call in variants.items():
            us = 1e3 * timed(call, reps=50, warmup=5)
            totals[(shape[0], shape[2], name)] += count * us
            share = f" ({100 * gflop / us * 1e3 / peak:.0f}%)" if peak else ""
            cells.append(f"{us:.0f}{share}")
        k = "x".join(map(str, conv.kernel_size)) + (f"/{stride[0]}" if stride != (1, 1) else "")
        table.add(f"| {shape[0]} | {shape[1]}x{shape[2]}x{shape[3]} | {w.shape[0]} | {k} | {count} | {gflop:.1f} | "
                  + " | ".join(cells) + f" | {err:.1e} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="4,8")
    p.add_argument("--compile", action="store_true", help="add the compiled GEMM column (seconds per shape)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.backends.cudnn.benchmark = True
    unet = random_sd_components().unet.to("cuda", torch.float16).eval().requires_grad_(False)
    unet.to(memory_format=torch.channels_last)
    gpu = torch.cuda.get_device_name(0)
    peak = dense_fp16_peak_tflops(gpu)
    names = ["cuDNN", "GEMM eager", "mm only"] + ["GEMM compiled"] * args.compile
    table = Table([
        f"GPU: {gpu}; torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}; fp16, channels-last, "
        "cudnn.benchmark; µs per call (share of the dense fp16 peak), mean of 50 after 5 warm-up.",
        "",
        "| B | input C x H x W | out C | kernel/stride | calls per forward | GFLOP | " + " | ".join(names)
        + " | GEMM vs cuDNN rel. error |",
        "|---|---|---|---|---|---|" + "---|" * len(names) + "---|",
    ], args.out)
    totals: dict = defaultdict(float)
    batches = [int(b) for b in args.batches.split(",")]
    for batch in batches:
        shape_rows(table, conv_shapes(unet, batch), args.compile, peak, totals)
    table.add("")
    table.add("Per forward, by input resolution (µs, count x time per call):")
    table.add("")
    table.add("| B | resolution | " + " | ".join(names) + " |")
    table.add("|---|---|" + "---|" * len(names))
    for batch in batches:
        for side in sorted({s for (bb, s, _) in totals if bb == batch}, reverse=True):
            table.add(f"| {batch} | {side}x{side} | " + " | ".join(f"{totals[(batch, side, n)]:.0f}" for n in names) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
