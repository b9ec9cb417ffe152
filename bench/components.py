"""Time the two expensive networks of an iteration in isolation, under each speed lever, and check
that every lever computes the same numbers as plain eager execution.

    python bench/components.py [--compile] [--out bench/components.md]

UNet forward (no grad) at batch 4 and 8, VAE-encoder forward+backward at 4x512x512, SD 2.1-base
architecture with random weights, fp16. Levers: channels-last, cuDNN autotuning, CUDA-graph replay,
torch.compile (optional: minutes of compilation).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from bench.random_sd import random_sd_components  # noqa: E402
from guidance.cuda_graphs import GraphedForward, VAEMoments  # noqa: E402

log = logging.getLogger(__name__)


class GraphedTrainingForward:  # measured here only: no gain for the VAE encoder
    """Forward AND backward of a frozen module from CUDA graphs (torch.cuda.make_graphed_callables),
    one pair of graphs per input shape. Gradients flow to the input only."""

    def __init__(self, module: nn.Module, name: str):
        self.module = module
        self.name = name
        self._callables: dict[tuple, Callable[[Tensor], Tensor]] = {}

    def __call__(self, x: Tensor) -> Tensor:
        key = (tuple(x.shape), x.dtype, x.requires_grad)
        fn = self._callables.get(key)
        if fn is None:
            log.info("capturing CUDA graphs of %s forward+backward for input %s", self.name, tuple(x.shape))
            sample = torch.randn_like(x).requires_grad_(x.requires_grad)
            # a plain function, not the module: make_graphed_callables would patch module.forward,
            # and the frozen weights are constants of the graph anyway
            fn = self._callables[key] = torch.cuda.make_graphed_callables(lambda inp: self.module(inp), (sample,))
        return fn(x)


def timed(fn, reps: int = 20, warmup: int = 5) -> float:
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


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def unet_rows(unet, batches, use_compile: bool) -> list[str]:
    rows = []
    for b in batches:
        g = torch.Generator(device="cuda").manual_seed(0)
        lat = torch.randn(b, 4, 64, 64, device="cuda", dtype=torch.float16, generator=g)
        ctx = torch.randn(b, 77, 1024, device="cuda", dtype=torch.float16, generator=g)
        t = torch.full((b,), 500, device="cuda", dtype=torch.long)

        def eager(x=lat):
            with torch.no_grad():
                return unet(x, t, encoder_hidden_states=ctx).sample

        ref = eager().clone()
        for fmt_name, fmt in (("contiguous", torch.contiguous_format), ("channels-last", torch.channels_last)):
            unet.to(memory_format=fmt)
            x = lat.contiguous(memory_format=fmt)
            for bench_flag in (False, True):
                torch.backends.cudnn.benchmark = bench_flag
                ms = timed(lambda: eager(x))
                rows.append(f"| UNet fwd B={b} | eager {fmt_name}, cudnn.benchmark={bench_flag} | {ms:.2f} | "
                            f"{rel_err(eager(x), ref):.1e} |")
            graphed = GraphedForward(lambda a, b_, c: unet(a, b_, encoder_hidden_states=c).sample, "unet")
            ms = timed(lambda: graphed(x, t, ctx))
            rows.append(f"| UNet fwd B={b} | CUDA graph {fmt_name} | {ms:.2f} | {rel_err(graphed(x, t, ctx), ref):.1e} |")
        unet.to(memory_format=torch.contiguous_format)
        if use_compile:
            compiled = torch.compile(unet)
            with torch.no_grad():
                ms = timed(lambda: compiled(lat, t, encoder_hidden_states=ctx).sample, warmup=3)
                out = compiled(lat, t, encoder_hidden_states=ctx).sample
            rows.append(f"| UNet fwd B={b} | torch.compile | {ms:.2f} | {rel_err(out, ref):.1e} |")
    return rows


def vae_rows(vae, use_compile: bool) -> list[str]:
    rows = []
    module = VAEMoments(vae)
    g = torch.Generator(device="cuda").manual_seed(1)
    x0 = torch.rand(4, 3, 512, 512, device="cuda", dtype=torch.float16, generator=g) * 2 - 1
    gout = torch.randn(4, 8, 64, 64, device="cuda", dtype=torch.float16, generator=g)

    def fwd_bwd(fn, x):
        x = x.detach().requires_grad_(True)
        out = fn(x)
        out.backward(gout)
        return out.detach(), x.grad

    ref_out, ref_grad = fwd_bwd(module, x0)
    for fmt_name, fmt in (("contiguous", torch.contiguous_format), ("channels-last", torch.channels_last)):
        vae.to(memory_format=fmt)
        x = x0.contiguous(memory_format=fmt)
        for bench_flag in (False, True):
            torch.backends.cudnn.benchmark = bench_flag
            ms = timed(lambda: fwd_bwd(module, x))
            out, grad = fwd_bwd(module, x)
            rows.append(f"| VAE enc fwd+bwd B=4 | eager {fmt_name}, cudnn.benchmark={bench_flag} | {ms:.2f} | "
                        f"out {rel_err(out, ref_out):.1e}, grad {rel_err(grad, ref_grad):.1e} |")
        graphed = GraphedTrainingForward(module, "vae")
        ms = timed(lambda: fwd_bwd(graphed, x))
        out, grad = fwd_bwd(graphed, x)
        rows.append(f"| VAE enc fwd+bwd B=4 | CUDA graphs {fmt_name} | {ms:.2f} | "
                    f"out {rel_err(out, ref_out):.1e}, grad {rel_err(grad, ref_grad):.1e} |")
    vae.to(memory_format=torch.contiguous_format)
    if use_compile:
        compiled = torch.compile(module)
        ms = timed(lambda: fwd_bwd(compiled, x0), warmup=3)
        out, grad = fwd_bwd(compiled, x0)
        rows.append(f"| VAE enc fwd+bwd B=4 | torch.compile | {ms:.2f} | "
                    f"out {rel_err(out, ref_out):.1e}, grad {rel_err(grad, ref_grad):.1e} |")
    fwd_only = timed(lambda: module(x0).detach())
    rows.append(f"| VAE enc fwd only B=4 | eager contiguous | {fwd_only:.2f} | - |")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    comps = random_sd_components()
    unet = comps.unet.to("cuda", torch.float16).eval().requires_grad_(False)
    vae = comps.vae.to("cuda", torch.float16).eval().requires_grad_(False)
    rows = [f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; fp16; mean of 20 after 5 warm-up", "",
            "| network | variant | ms | relative error vs eager contiguous |", "|---|---|---|---|"]
    print("\n".join(rows), flush=True)
    rows += vae_rows(vae, args.compile)
    print("\n".join(rows[4:]), flush=True)
    rows += unet_rows(unet, (4, 8), args.compile)
    text = "\n".join(rows) + "\n"
    print(text, flush=True)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
