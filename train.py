"""Distil a text prompt into 3D Gaussians.

    python train.py --opt config/bagel.yaml --guidance_type sctd --phase_num 5 --num_ddim_timesteps 50 --guid_scale 7.5
    python train.py --opt config/demo.yaml                       # offline, CPU, analytic prior
    python train.py --opt config/demo.yaml --viewer              # ... watched live at http://127.0.0.1:8080
    python train.py --resume outputs/<workspace>/<run>           # continue an interrupted run
    python train.py --opt config/bagel.yaml GuidanceParams.guidance_type=ism OptimizationParams.iterations=3000
"""
from __future__ import annotations

import logging
import sys

from utils.config import ConfigError, parse_cli


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg, args = parse_cli(argv)
    except ConfigError as exc:
        logging.getLogger("train").error("%s", exc)
        return 2
    import torch

    from guidance.prior import ModelNotFoundError
    from training.run import train
    from training.viewer import ViewerUnavailableError

    torch.autograd.set_detect_anomaly(bool(args.detect_anomaly))
    try:
        outputs = train(cfg, args.opt, ["train.py", *argv], resume=args.resume, quiet=args.quiet)
    except (ModelNotFoundError, FileNotFoundError, ViewerUnavailableError) as exc:
        logging.getLogger("train").error("%s", exc)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("train").warning("interrupted: the last checkpoint in the run folder is intact")
        return 130
    print(f"run folder:  {outputs.run_dir.resolve()}")
    print(f"point cloud: {outputs.point_cloud.resolve()}")
    if outputs.video is not None:
        print(f"video:       {outputs.video.resolve()}")
    final = outputs.metrics.get("final", {})
    if "psnr_heldout" in final:
        print(f"held-out PSNR: {outputs.metrics['initial']['psnr_heldout']:.2f} dB -> {final['psnr_heldout']:.2f} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
