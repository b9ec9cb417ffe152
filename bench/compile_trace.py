"""How long Dynamo and AOTAutograd take to trace the SD 2.1 UNet: whole against regional compilation.

A device-independent part of torch.compile's start-up cost (issue 20): Dynamo's bytecode tracing and
AOTAutograd's graph capture are Python work that a GPU run pays too, on a fresh machine and, for the
tracing, with Inductor's caches warm as well (a warm cache skips code generation, not tracing). With the
"aot_eager" backend nothing is generated, so a first call's time beyond an eager call is that tracing.
Random-weight SD 2.1-base UNet (bench/sd21_base_architecture), float32 on the CPU, batch --batch at
64x64 latents, no gradient (the UNet's calls in a training step):

    python bench/compile_trace.py --out bench/results/compile_trace_cpu.md     # ~5 min on 2 cores

Rows: "whole" compiles the UNet's forward (guidance/stable_diffusion.py's default), "regional" only its
repeated transformer blocks (PipelineParams.compile_regions, guidance/regional_compile.py). Each row is a
fresh process, so no trace is reused between rows. Inductor's code generation and autotuning, the rest
of a GPU compilation, are measured on a GPU by bench/time_to_asset.py.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = ("whole", "regional")


def measure(mode: str, batch: int) -> dict:
    """One mode in this process: eager call, first compiled call, second compiled call (seconds), graphs."""
    import torch
    from torch._dynamo.utils import counters

    from bench.random_sd import random_sd_components
    from guidance.regional_compile import compile_repeated_blocks

    torch.set_num_threads(max(1, torch.get_num_threads()))
    unet = random_sd_components().unet.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(batch, 4, 64, 64, generator=g), torch.full((batch,), 500),
            torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g))

    def call(fn) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            fn(*args)
        return time.perf_counter() - t0

    def eager(x, t, c):
        return unet(x, t, encoder_hidden_states=c).sample

    eager_s = min(call(eager) for _ in range(2))
    if mode == "whole":
        compiled = torch.compile(eager, backend="aot_eager", dynamic=False)
    else:
        blocks = compile_repeated_blocks(unet, dynamic_batch=True, backend="aot_eager")
        compiled = eager  # the UNet calls its compiled blocks
        assert blocks == 16, blocks
    first_s = call(compiled)
    second_s = call(compiled)
    return {"eager_s": eager_s, "first_s": first_s, "second_s": second_s,
            "graphs": counters["stats"]["unique_graphs"], "torch": torch.__version__}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4, help="UNet batch (SCTD's step: 4 cameras)")
    p.add_argument("--out", type=Path, help="write the table (markdown) here")
    p.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # internal: one mode, JSON on stdout
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.batch)))
        return
    from bench.report import publish_table

    rows, torch_version = [], ""
    for mode in MODES:
        done = subprocess.run([sys.executable, __file__, "--one", mode, "--batch", str(args.batch)],
                              capture_output=True, text=True, check=True, cwd=REPO)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        torch_version = r["torch"]
        rows.append(f"| {mode} | {r['graphs']} | {r['eager_s']:.1f} | {r['first_s']:.1f} | "
                    f"**{r['first_s'] - r['eager_s']:.1f}** | {r['second_s']:.1f} |")
        print(rows[-1], file=sys.stderr, flush=True)
    table = "\n".join([
        f"# Tracing the SD 2.1 UNet for torch.compile: whole vs regional (CPU, torch {torch_version})", "",
        f"Random-weight SD 2.1-base UNet, float32, batch {args.batch} at 64x64 latents, no gradient; backend "
        "aot_eager (Dynamo + AOTAutograd, no code generation); each row a fresh process. Seconds.", "",
        "| compiled | graphs | eager call | first compiled call | tracing (first - eager) | second compiled call |",
        "|---|---|---|---|---|---|", *rows, "",
        f"Command: `python bench/compile_trace.py --batch {args.batch}`", ""])
    publish_table(table, args.out)


if __name__ == "__main__":
    main()
