"""Known-answer comparison of the distillation losses: distil the same hidden scene through the
analytic prior with each loss, from the same initialisation and seed, and print held-out PSNR and time.

    python bench/compare_losses.py                        # config/demo.yaml, every loss
    python bench/compare_losses.py --losses sctd,gcs --out bench/results/compare_losses.md
    python bench/compare_losses.py GuidanceParams.analytic_scene=snowman   # any override
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from training.run import train  # noqa: E402
from utils.config import load_config  # noqa: E402

VARIANTS = {
    "sctd": [],
    "sctd (paper form)": ["GuidanceParams.sctd_cross_prediction=cond", "GuidanceParams.sctd_approximate_null=false",
                          "GuidanceParams.sctd_weighting=paper"],
    "ism": [],
    "sds": [],
    "cds": [],
    "gcs": [],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--opt", default="config/demo.yaml")
    p.add_argument("--losses", default=",".join(VARIANTS))
    p.add_argument("--out", type=Path)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = ["| loss | held-out PSNR start (dB) | held-out PSNR end (dB) | gain (dB) | train time (s) | Gaussians |",
            "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.losses.split(","):
            loss = label.split(" ")[0]
            overrides = [f"GuidanceParams.guidance_type={loss}", f"output_dir={tmp}", "save_video=false",
                         *VARIANTS[label], *args.overrides]
            cfg = load_config(args.opt, overrides, warn_no_effect=False)
            out = train(cfg, args.opt, ["bench/compare_losses.py"], quiet=True)
            m = out.metrics
            start, end = m["initial"]["psnr_heldout"], m["final"]["psnr_heldout"]
            rows.append(f"| {label} | {start:.2f} | {end:.2f} | {end - start:+.2f} | {m['train_seconds']:.1f} "
                        f"| {m['final']['gaussians']} |")
            print(rows[-1], flush=True)
    header = (f"Analytic prior, {args.opt} ({cfg.guidance.analytic_scene} scene, {cfg.optim.iterations} iterations, "
              f"B={cfg.guidance.C_batch_size}, {cfg.camera.image_w}x{cfg.camera.image_h}, CFG "
              f"{cfg.guidance.guidance_scale}), CPU threads: {torch.get_num_threads()}; overrides: "
              f"{' '.join(args.overrides) or 'none'}\n\n")
    table = header + "\n".join(rows) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
