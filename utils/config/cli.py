"""The ``train.py`` command line: ``--opt``, overlays, ``Section.key=value`` overrides and the published flags."""

from __future__ import annotations

import argparse
import logging
from typing import Optional, Sequence

from utils.config.loading import load_config
from utils.config.resume import config_value, load_run_config
from utils.config.schema import Config, ConfigError

logger = logging.getLogger("utils.config")

# ---------------------------------------------------------------------------
# Command line

_FLAG_KEYS = {
    "guidance_type": "GuidanceParams.guidance_type",
    "phase_num": "GuidanceParams.phase_num",
    "num_ddim_timesteps": "GuidanceParams.num_ddim_timesteps",
    "guid_scale": "GuidanceParams.guidance_scale",
    "seed": "seed",
    "output": "output_dir",
    "port": "port",
    "test_ratio": "test_ratio",
    "save_ratio": "save_ratio",
    "save_video": "save_video",
    "viewer": "viewer",
    "viewer_host": "viewer_host",
    "viewer_port": "viewer_port",
}

_IGNORED_FLAGS = {
    "ip": "the official SIBR network GUI is not served (the live viewer: --viewer, --viewer_host)",
    "debug_from": "the official CUDA rasterizer debug mode is not used",
    "checkpoint_iterations": "checkpoints follow checkpoint_interval",
    "start_checkpoint": "use --resume RUN_DIR",
}


def _add_published_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--guidance_type", help="GuidanceParams.guidance_type (sctd|ism|sds|cds|gcs)")
    parser.add_argument("--phase_num", help="GuidanceParams.phase_num: number of trajectory segments N_s")
    parser.add_argument("--num_ddim_timesteps", help="GuidanceParams.num_ddim_timesteps (no effect)")
    parser.add_argument("--guid_scale", help="GuidanceParams.guidance_scale (only when given)")
    parser.add_argument("--seed", help="top-level seed")


def _add_viewer_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--viewer", action="store_const", const="true",
                        help="serve a live browser view of the training (top-level viewer=true; needs viser)")
    parser.add_argument("--viewer_host", help="top-level viewer_host (default 127.0.0.1: this machine only)")
    parser.add_argument("--viewer_port", help="top-level viewer_port (default 8080)")


def _add_official_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ip", help="official GUI host (no effect)")
    parser.add_argument("--port", help="top-level port (no effect)")
    parser.add_argument("--debug_from", help="official rasterizer debug start (no effect)")
    parser.add_argument("--detect_anomaly", action="store_true", help="enable torch autograd anomaly detection")
    parser.add_argument("--test_ratio", help="top-level test_ratio")
    parser.add_argument("--save_ratio", help="top-level save_ratio")
    parser.add_argument("--save_video", nargs="?", const="true", help="top-level save_video (true/false)")
    parser.add_argument("--quiet", action="store_true", help="less console output")
    parser.add_argument("--checkpoint_iterations", nargs="+", type=int,
                        help="official checkpoint iterations (no effect)")
    parser.add_argument("--start_checkpoint", help="official checkpoint to start from (no effect; use --resume)")


def build_arg_parser() -> argparse.ArgumentParser:
    """Parser for ``train.py``: ``--opt``, trailing ``Section.key=value`` overrides and the published flags.

    Flags default to None and become overrides only when given, so YAML values are not overwritten.
    """
    parser = argparse.ArgumentParser(
        prog="train.py", description="Text-to-3D Gaussian splatting with SegmentDreamer (SCTD).")
    parser.add_argument("--opt", metavar="FILE", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="Section.key=value",
                        help="config overrides applied after the file, e.g. GuidanceParams.text='a cat' seed=3")
    parser.add_argument("--overlay", action="append", metavar="FILE",
                        help="partial YAML applied after --opt (repeatable), e.g. config/low_vram.yaml")
    parser.add_argument("--resume", metavar="RUN_DIR", help="resume from the latest checkpoint of a run folder")
    parser.add_argument("--output", metavar="DIR", help="top-level output_dir")
    _add_published_flags(parser)
    _add_viewer_flags(parser)
    _add_official_flags(parser)
    return parser


def cli_overrides(args: argparse.Namespace) -> list[str]:
    """Overrides implied by the parsed flags (only those given), followed by the positional overrides."""
    out = [f"{key}={getattr(args, flag)}" for flag, key in _FLAG_KEYS.items() if getattr(args, flag) is not None]
    return out + list(args.overrides)


def _warn_ignored_flags(args: argparse.Namespace) -> None:
    for flag, reason in _IGNORED_FLAGS.items():
        if getattr(args, flag) is not None:
            logger.warning("--%s has no effect here: %s", flag, reason)


def parse_cli(argv: Optional[Sequence[str]] = None) -> tuple[Config, argparse.Namespace]:
    """Parse ``argv`` (default ``sys.argv[1:]``), load ``--opt`` with all overrides and validate."""
    args = build_arg_parser().parse_intermixed_args(argv)
    _warn_ignored_flags(args)
    if args.resume:
        return _resume_config(args), args
    return load_config(args.opt, cli_overrides(args), overlays=args.overlay or ()), args


def _resume_config(args: argparse.Namespace) -> Config:
    """The resumed run's own config.yaml with the overrides given after --resume (those that may change)."""
    if args.opt or args.overlay:
        flag = "--opt" if args.opt else "--overlay"
        raise ConfigError(f"{flag} cannot be combined with --resume: a resumed run uses the config.yaml of its run "
                          "folder; give changes as Section.key=value overrides after --resume RUN_DIR")
    cfg, changed = load_run_config(args.resume, cli_overrides(args))
    for key in changed:
        logger.info("resume: %s changed to %r", key, config_value(cfg, key))
    return cfg
