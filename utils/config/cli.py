"""The ``train.py`` command line: ``--opt``, overlays, ``Section.key=value`` overrides and the published flags."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from utils.config.loading import load_config
from utils.config.resume import config_value, load_run_config
from utils.config.schema import Config, ConfigError, field_choices, flag_keys, key_spec

logger = logging.getLogger("utils.config")

# ---------------------------------------------------------------------------
# Command line

_IGNORED_FLAGS = {
    "ip": "the official SIBR network GUI is not served (the live viewer: --viewer, --viewer_host)",
    "debug_from": "the official CUDA rasterizer debug mode is not used",
    "checkpoint_iterations": "checkpoints follow checkpoint_interval",
    "start_checkpoint": "use --resume RUN_DIR",
}

_BOOL_WORDS = ("true", "false")


def _flag_help(key: str) -> str:
    meta = key_spec(key).meta
    text = f"{key}: {meta['help']}"
    choices = field_choices(meta)
    if choices:
        text += f" (one of {', '.join(str(c) for c in choices)})"
    if meta["no_effect"]:
        text += f" (no effect: {meta['no_effect']})"
    return text.replace("%", "%%")


def _is_bool_key(key: str) -> bool:
    return key_spec(key).type is bool


def _add_key_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per key declared with param(..., flag=...) in the schema; a flag becomes an override
    only when given. A true/false key's flag alone means true (``--viewer``), or takes true/false."""
    for flag, key in flag_keys().items():
        if _is_bool_key(key):
            parser.add_argument(f"--{flag}", nargs="?", const="true", metavar="true|false", help=_flag_help(key))
        else:
            parser.add_argument(f"--{flag}", help=_flag_help(key))


def _bool_flags_explicit(argv: Sequence[str]) -> list[str]:
    """``--viewer seed=3`` must not read ``seed=3`` as the flag's value: a true/false flag followed by
    anything but true/false gets its value spelled out (``--viewer=true``)."""
    bool_flags = {f"--{flag}" for flag, key in flag_keys().items() if _is_bool_key(key)}
    out = list(argv)
    for i, arg in enumerate(out):
        following = out[i + 1].lower() if i + 1 < len(out) else None
        if arg in bool_flags and following not in _BOOL_WORDS:
            out[i] = f"{arg}=true"
    return out


class _HelpConfigAction(argparse.Action):
    """``--help-config [Section]``: print the keys of the schema (utils/config/help.py) and exit, as --help does."""

    def __call__(self, parser, namespace, values, option_string=None):
        from utils.config.help import format_config_help

        try:
            text = format_config_help(values or None)
        except ConfigError as exc:
            parser.exit(2, f"{parser.prog}: error: {exc}\n")
        sys.stdout.write(text)
        parser.exit(0)


def _add_official_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ip", help="official GUI host (no effect)")
    parser.add_argument("--debug_from", help="official rasterizer debug start (no effect)")
    parser.add_argument("--detect_anomaly", action="store_true", help="enable torch autograd anomaly detection")
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
    parser.add_argument("--help-config", nargs="?", const="", metavar="SECTION", action=_HelpConfigAction,
                        help="print every config key (default, meaning, rules, resume/prior/no-effect properties) "
                             "of all sections or of one (e.g. GuidanceParams, top-level) and exit")
    _add_key_flags(parser)
    _add_official_flags(parser)
    return parser


def cli_overrides(args: argparse.Namespace) -> list[str]:
    """Overrides implied by the parsed flags (only those given), followed by the positional overrides."""
    out = [f"{key}={getattr(args, flag)}" for flag, key in flag_keys().items() if getattr(args, flag) is not None]
    return out + list(args.overrides)


def _warn_ignored_flags(args: argparse.Namespace) -> None:
    for flag, reason in _IGNORED_FLAGS.items():
        if getattr(args, flag) is not None:
            logger.warning("--%s has no effect here: %s", flag, reason)


def parse_cli(argv: Optional[Sequence[str]] = None) -> tuple[Config, argparse.Namespace]:
    """Parse ``argv`` (default ``sys.argv[1:]``), load ``--opt`` with all overrides and validate."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_arg_parser().parse_intermixed_args(_bool_flags_explicit(argv))
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
