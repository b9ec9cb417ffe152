"""Distil a text prompt into 3D Gaussians.

    python train.py --opt config/bagel.yaml --guidance_type sctd --phase_num 5 --num_ddim_timesteps 50 --guid_scale 7.5
    python train.py --opt config/demo.yaml                       # offline, CPU, analytic prior
    python train.py --opt config/demo.yaml --viewer              # ... watched live at http://127.0.0.1:8080
    python train.py --resume outputs/<workspace>/<run>           # continue an interrupted run
    python train.py --resume outputs/<workspace>/<run> OptimizationParams.iterations=8000   # train further
    python train.py --opt config/bagel.yaml GuidanceParams.guidance_type=ism OptimizationParams.iterations=3000
    torchrun --nproc_per_node=2 train.py --opt config/bagel.yaml   # one asset, each step's cameras on 2 GPUs

Exit codes: 0 done; 2 a user error (the message says which key or file and what to do; nothing is
left behind); 1 training stopped on its own (NaN/Inf that persists, everything pruned, a full disk, out
of GPU memory: the message names the step, the peak and the settings that lower it); 130 stopped by Ctrl-C
or SIGTERM (a checkpoint of the last completed step is saved; the message says which).
"""
from __future__ import annotations

import logging
import sys

from utils.cli_errors import report_user_error
from utils.config import ConfigError, parse_cli
from utils.timeline import Timeline

log = logging.getLogger("train")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    timeline = Timeline()  # seconds since the process was launched
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg, args = parse_cli(argv)
    except ConfigError as exc:
        return report_user_error(log, exc)
    if cfg.guidance.prior == "stable_diffusion":  # its weights come off the disk while the training code,
        # diffusers and transformers import (guidance/model_folder.py read_ahead)
        from guidance.model_folder import read_ahead, weight_files

        read_ahead(weight_files(cfg.guidance.model_key, cfg.guidance.is_safe_tensor))
    import torch

    from guidance.prior import ModelNotFoundError
    from training.distributed import ProcessGroup
    from training.health import TrainingStopped
    from training.lock import RunLockedError
    from training.run import train
    from training.stop import RunInterrupted, TrainingInterrupted
    from training.viewer import ViewerUnavailableError
    from utils.checkpoint_file import CheckpointError
    from utils.monitor import setup_logging
    from utils.threads import configure_threads

    timeline.log("imports", "imports done")
    try:
        configure_threads()
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    torch.autograd.set_detect_anomaly(bool(args.detect_anomaly))
    group = ProcessGroup.from_environment()  # several processes under torchrun: one asset, cameras split
    try:
        outputs = train(cfg, args.opt, ["train.py", *argv], resume=args.resume, quiet=args.quiet, group=group,
                        timeline=timeline)
    except (ConfigError, ModelNotFoundError, CheckpointError, RunLockedError, FileNotFoundError,
            ViewerUnavailableError) as exc:
        return report_user_error(log, exc)  # the contract every command keeps (utils/cli_errors.py)
    except TrainingStopped as exc:
        log.error("%s", exc)
        return 1
    except TrainingInterrupted as exc:
        log.warning("%s: %s", exc, exc.outcome())
        return 130
    except RunInterrupted as exc:
        log.warning("%s", exc)
        return 130
    except KeyboardInterrupt:  # before the run folder existed (or on a rank that writes none)
        log.warning("interrupted before training started: no run folder was written")
        return 130
    except OSError as exc:  # a full disk outside the training loop (which reports its own, see training/run.py)
        from utils.files import is_disk_full

        if not is_disk_full(exc):
            raise
        log.error("the disk is full: could not write %s; free some space and run the command again (a run "
                  "folder with a checkpoint continues with --resume)", exc.filename or "a file of the run")
        return 1
    finally:
        group.stop()
        setup_logging(None, args.quiet)  # closes the run's train.log (after the messages above reached it)
    if outputs is None:  # a process other than rank 0 of a torchrun launch: rank 0 reports
        return 0
    print(f"run folder:  {outputs.run_dir.resolve()}")
    print(f"point cloud: {outputs.point_cloud.resolve()}")
    if outputs.video is not None:
        print(f"video:       {outputs.video.resolve()}")
    if outputs.mesh is not None:
        print(f"mesh:        {outputs.mesh.resolve()}")
    final = outputs.metrics.get("final", {})
    if "psnr_heldout" in final:
        print(f"held-out PSNR: {outputs.metrics['initial']['psnr_heldout']:.2f} dB -> {final['psnr_heldout']:.2f} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
