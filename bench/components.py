"""Time the two expensive networks of an iteration in isolation, under each speed lever, check that
every lever computes the same numbers as plain eager execution, and show where their GPU time goes.

    python bench/components.py [--compile] [--profile] [--out bench/results/components.md]

UNet forward (no grad) at batch 4 and 8, VAE-encoder forward+backward (gradient to the input only)
at 4x512x512, SD 2.1-base architecture with random weights, fp16. Each row also gives the achieved
arithmetic rate (FLOPs counted by bench/flops.py) and its share of the GPU's dense fp16 peak.
Levers: channels-last, CUDA-graph replay, torch.compile (static shapes, optional: about a minute of
compilation per row), explicit matmul VAE attention, the NHWC GroupNorm kernels. The levers measured
and not adopted (Inductor's tuning options, weight freezing, fused QKV projections, cuDNN attention,
CUDA-graph trees) have no rows here any more; their measurements stay in bench/results/.
--select REGEX keeps the rows whose label matches.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from functools import partial
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0  # noqa: E402
from torch import Tensor  # noqa: E402

from bench.flops import dense_fp16_peak_tflops, kernel_classes, network_flops  # noqa: E402
from bench.random_sd import random_sd_components  # noqa: E402
from guidance import group_norm_nhwc  # noqa: E402
from guidance.cuda_graphs import GraphedForward, VAEMoments  # noqa: E402
from guidance.group_norm_nhwc import (  # noqa: E402
    GroupNormAct,
    fuse_encoder_norms,
    group_norm_act_nhwc,
)

log = logging.getLogger(__name__)


def first_call_s(fn: Callable[[], object]) -> float:
    """Wall seconds of one call (with torch.compile: the compilation)."""
    import time

    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def timed(fn: Callable[[], object], reps: int = 20, warmup: int = 5) -> float:
    """Mean ms per call of fn over reps calls, timed with CUDA events after warmup calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


class Table:
    """Markdown rows, printed (and written) as they come: a killed run keeps what it measured."""

    def __init__(self, header: list[str], out: Path | None):
        self.lines, self.out = list(header), out
        print("\n".join(header), flush=True)

    def add(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)
        if self.out:
            self.out.write_text("\n".join(self.lines) + "\n")


def rate(tflop: float, ms: float, peak: float | None) -> str:
    achieved = tflop / ms * 1e3
    share = f" ({100 * achieved / peak:.0f}%)" if peak else ""
    return f"{achieved:.0f}{share}"


def compiled(fn):
    return torch.compile(fn, dynamic=False)


def unet_variants(unet, use_compile: bool) -> list[tuple[str, Callable[[], Callable], object]]:
    """(label, factory of fn(latents, t, context) -> eps, memory format); factories run lazily."""
    def eager(a, t, c):
        return unet(a, t, encoder_hidden_states=c).sample

    contiguous, cl = torch.contiguous_format, torch.channels_last
    variants = [
        ("eager", lambda: eager, contiguous),
        ("CUDA graph", lambda: GraphedForward(eager, "unet"), contiguous),
    ]
    if use_compile:
        variants += [
            ("compile", lambda: compiled(eager), contiguous),
            ("compile + CUDA graph", lambda: GraphedForward(compiled(eager), "unet"), contiguous),
            ("compile + CUDA graph, channels-last", lambda: GraphedForward(compiled(eager), "unet"), cl),
        ]
    return variants


def unet_rows(table: Table, unet, batches, use_compile: bool, tflop_per_sample: float, peak,
              select: re.Pattern) -> None:
    for b in batches:
        g = torch.Generator(device="cuda").manual_seed(0)
        lat = torch.randn(b, 4, 64, 64, device="cuda", dtype=torch.float16, generator=g)
        ctx = torch.randn(b, 77, 1024, device="cuda", dtype=torch.float16, generator=g)
        t = torch.full((b,), 500, device="cuda", dtype=torch.long)
        ref = None
        for label, factory, fmt in unet_variants(unet, use_compile):
            if not select.search(label) and ref is not None:  # the eager row stays: it is the reference
                continue
            torch._dynamo.reset()
            unet.to(memory_format=fmt)
            x = lat.contiguous(memory_format=fmt)
            try:
                with torch.no_grad():
                    call = partial(factory(), x, t, ctx)
                    first_s = first_call_s(call)
                    ms = timed(call, warmup=3)
                    out = call().clone()
            except Exception as exc:  # a lever unsupported on this GPU/software must not lose the others
                table.add(f"| UNet fwd B={b} | {label} | failed: {type(exc).__name__}: {str(exc)[:80]} | | | |")
                continue
            ref = out if ref is None else ref
            table.add(f"| UNet fwd B={b} | {label} | {ms:.2f} | {rate(tflop_per_sample * b, ms, peak)} | "
                      f"{rel_err(out, ref):.1e} | {first_s:.0f} |")
        unet.to(memory_format=torch.contiguous_format)


def vae_rows(table: Table, vae, use_compile: bool, tflop_fwd_bwd: float, peak, select: re.Pattern) -> None:
    module = VAEMoments(vae)
    g = torch.Generator(device="cuda").manual_seed(1)
    x0 = torch.rand(4, 3, 512, 512, device="cuda", dtype=torch.float16, generator=g) * 2 - 1
    gout = torch.randn(4, 8, 64, 64, device="cuda", dtype=torch.float16, generator=g)

    def fwd_bwd(fn, x):
        x = x.detach().requires_grad_(True)
        out = fn(x)
        out.backward(gout)
        return out.detach(), x.grad

    def nhwc_norms(factory):
        def fused():
            fuse_encoder_norms(vae.encoder)  # in place, for good: these rows come last
            return factory()
        return fused

    contiguous, cl = torch.contiguous_format, torch.channels_last

    def plain():
        return compiled(module)

    variants = [("eager, sdpa attention", lambda: module, contiguous, AttnProcessor2_0),
                ("eager, matmul attention", lambda: module, contiguous, AttnProcessor)]
    if use_compile:
        variants += [
            ("compile, sdpa attention", plain, contiguous, AttnProcessor2_0),
            ("compile, matmul attention", plain, contiguous, AttnProcessor),
            ("compile, matmul attention, channels-last", plain, cl, AttnProcessor),
        ]
    variants.append(("eager, matmul attention, channels-last, NHWC GroupNorm kernels", nhwc_norms(lambda: module),
                     cl, AttnProcessor))
    if use_compile:
        variants.append(("compile, matmul attention, channels-last, NHWC GroupNorm kernels", nhwc_norms(plain), cl,
                         AttnProcessor))
    ref = None
    for label, factory, fmt, processor in variants:
        if not select.search(label) and ref is not None:  # the first row stays: it is the reference
            continue
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        vae.set_attn_processor(processor())
        vae.to(memory_format=fmt)
        x = x0.contiguous(memory_format=fmt)
        try:
            call = partial(fwd_bwd, factory(), x)
            first_s = first_call_s(call)
            ms = timed(call, warmup=3)
            out, grad = call()
        except Exception as exc:  # a lever unsupported on this GPU/software must not lose the others
            table.add(f"| VAE enc fwd+bwd B=4 | {label} | failed: {type(exc).__name__}: {str(exc)[:80]} | | | |")
            continue
        ref = (out, grad) if ref is None else ref
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
        label += f" ({breaks} graph breaks)" if breaks else ""
        table.add(f"| VAE enc fwd+bwd B=4 | {label} | {ms:.2f} | {rate(tflop_fwd_bwd * 4, ms, peak)} | "
                  f"out {rel_err(out, ref[0]):.1e}, grad {rel_err(grad, ref[1]):.1e} | {first_s:.0f} |")
    vae.to(memory_format=torch.contiguous_format)
    vae.set_attn_processor(AttnProcessor())


def group_norm_rows(table: Table) -> None:
    """The NHWC GroupNorm+SiLU kernels alone at the encoder's largest activation (4x128x512x512 fp16),
    forward+backward, per tile size and warp count, against PyTorch's GroupNorm+SiLU (NCHW, eager and
    compiled). GB/s counts the minimum traffic: forward reads x twice and writes y, backward reads x
    and dy twice each and writes dx (8 passes over one tensor)."""
    import torch.nn.functional as F

    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(4, 128, 512, 512, device="cuda", dtype=torch.float16, generator=g)
    dy = torch.randn(x.shape, device="cuda", dtype=torch.float16, generator=g)
    w = torch.randn(128, device="cuda", dtype=torch.float16, generator=g)
    b = torch.randn(128, device="cuda", dtype=torch.float16, generator=g)
    gigabytes = 8 * x.numel() * x.element_size() / 1e9

    def torch_gn(v):
        return F.silu(F.group_norm(v, 32, w, b, 1e-6))

    def run(fn, v):
        v = v.detach().requires_grad_(True)
        fn(v).backward(dy.contiguous(memory_format=torch.channels_last) if v is x_cl else dy)
        return v.grad

    x_cl = x.contiguous(memory_format=torch.channels_last)
    ref = run(torch_gn, x)
    rows = [("PyTorch GroupNorm+SiLU, NCHW, eager", lambda: torch_gn, x),
            ("PyTorch GroupNorm+SiLU, NCHW, compiled", lambda: compiled(torch_gn), x),
            ("PyTorch GroupNorm+SiLU, channels-last, compiled", lambda: compiled(torch_gn), x_cl)]
    for tile in (4096, 8192, 16384):
        for warps in (4, 8, 16):
            def kernels(tile=tile, warps=warps):
                group_norm_nhwc.TILE_ELEMENTS, group_norm_nhwc.NUM_WARPS = tile, warps
                return lambda v: group_norm_act_nhwc(v, w, b, 32, 1e-6, True)
            rows.append((f"NHWC kernels, tile {tile}, {warps} warps", kernels, x_cl))
    for label, factory, v in rows:
        torch._dynamo.reset()
        try:
            call = partial(run, factory(), v)
            ms = timed(call, reps=10, warmup=2)
        except Exception as exc:  # keep the other rows
            table.add(f"| GroupNorm+SiLU fwd+bwd | {label} | failed: {type(exc).__name__}: {str(exc)[:80]} | | | |")
            continue
        table.add(f"| GroupNorm+SiLU fwd+bwd 4x128x512x512 | {label} | {ms:.2f} | {gigabytes / ms * 1e3:.0f} GB/s | "
                  f"grad {rel_err(call(), ref):.1e} | |")
    group_norm_nhwc.TILE_ELEMENTS, group_norm_nhwc.NUM_WARPS = 8192, 8


def profile_rows(table: Table, unet, vae, use_compile: bool, skip: set[str], top: int = 0) -> None:
    """GPU time per kernel class for one UNet B=4 forward (channels-last, as the trainer runs it) and one VAE
    fwd+bwd (eager or compiled; the VAE with the attention processor it was left with); with top > 0 also
    the `top` costliest kernels of each."""
    from torch.profiler import ProfilerActivity, profile

    torch._dynamo.reset()
    module = VAEMoments(vae)
    wrap = (lambda f: torch.compile(f, dynamic=False)) if use_compile else (lambda f: f)
    unet_fn = wrap(lambda a, t, c: unet(a, t, encoder_hidden_states=c).sample)
    vae_fn = wrap(module)
    unet.to(memory_format=torch.channels_last)
    lat = torch.randn(4, 4, 64, 64, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    ctx = torch.randn(4, 77, 1024, device="cuda", dtype=torch.float16)
    t = torch.full((4,), 500, device="cuda", dtype=torch.long)
    # the encoder as the VAE rows left it: channels-last if they swapped in the NHWC GroupNorm kernels
    layout = torch.channels_last if any(isinstance(m, GroupNormAct) for m in vae.modules()) else torch.contiguous_format
    module.to(memory_format=layout)
    x = (torch.rand(4, 3, 512, 512, device="cuda", dtype=torch.float16) * 2 - 1).contiguous(memory_format=layout)
    x.requires_grad_(True)

    def unet_call():
        with torch.no_grad():
            unet_fn(lat, t, ctx)

    def vae_call():
        vae_fn(x).float().square().mean().backward()

    kind = ("compiled" if use_compile else "eager") + (", NHWC GroupNorm kernels" if layout == torch.channels_last
                                                       else "")
    calls = ([("UNet fwd B=4, channels-last", unet_call)] * ("profile-unet" not in skip)
             + [("VAE enc fwd+bwd B=4", vae_call)] * ("profile-vae" not in skip))
    for name, call in calls:
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                call()
            torch.cuda.synchronize()
        classes = kernel_classes(prof.key_averages(), reps=5)
        total = sum(classes.values())
        parts = ", ".join(f"{k} {v:.2f} ({100 * v / total:.0f}%)" for k, v in classes.items())
        table.add(f"- {name}, {kind}: GPU kernel time {total:.2f} ms = {parts}")
        for event in top_kernels(prof.key_averages(), top):
            table.add(f"  - {event.device_time_total / 1e3 / 5:.3f} ms, {event.count // 5} per call: "
                      f"{event.key[:110]}")
    unet.to(memory_format=torch.contiguous_format)


def top_kernels(events, n: int) -> list:
    """The n profiler records (GPU kernels only) with the most device time."""
    kernels = [e for e in events if "CUDA" in str(getattr(e, "device_type", "CUDA"))]
    return sorted(kernels, key=lambda e: -e.device_time_total)[:n]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compile", action="store_true", help="add the torch.compile rows (minutes)")
    p.add_argument("--profile", action="store_true", help="GPU time per kernel class")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: groupnorm,vae,unet4,unet8,profile-unet,"
                                               "profile-vae")
    p.add_argument("--top", type=int, default=0, help="with --profile: list the N costliest kernels of each network")
    p.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its algorithms (as the trainer "
                                                                  "does by default: PipelineParams.cudnn_benchmark)")
    p.add_argument("--select", default="", help="regex: run only the rows whose label matches (the eager "
                                                 "reference rows always run)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    comps = random_sd_components()
    flops = network_flops(comps.unet, comps.vae, resolution=512)
    unet = comps.unet.to("cuda", torch.float16).eval().requires_grad_(False)
    vae = comps.vae.to("cuda", torch.float16).eval().requires_grad_(False)
    gpu = torch.cuda.get_device_name(0)
    peak = dense_fp16_peak_tflops(gpu)
    peak_text = f"{peak:.0f} TFLOP/s dense fp16 peak" if peak else "peak unknown"
    table = Table([
        f"GPU: {gpu} ({peak_text}); torch {torch.__version__}; fp16; cudnn.benchmark {args.cudnn_benchmark}; "
        "mean of 20 after 3 warm-up.",
        f"FLOPs (bench/flops.py): UNet {flops.unet_tflop_per_sample:.3f} TFLOP per sample, VAE encoder "
        f"fwd+bwd {flops.vae_tflop_fwd_bwd_per_image:.3f} TFLOP per 512x512 image.",
        "",
        "| network | variant | ms | TFLOP/s (% of peak) | relative error vs eager | first call s |",
        "|---|---|---|---|---|---|",
    ], args.out)
    select = re.compile(args.select)
    if "groupnorm" not in skip:
        group_norm_rows(table)
    if "vae" not in skip:
        vae_rows(table, vae, args.compile, flops.vae_tflop_fwd_bwd_per_image, peak, select)
    batches = [b for b in (4, 8) if f"unet{b}" not in skip]
    unet_rows(table, unet, batches, args.compile, flops.unet_tflop_per_sample, peak, select)
    if args.profile:
        table.add("")
        profile_rows(table, unet, vae, args.compile, skip, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
