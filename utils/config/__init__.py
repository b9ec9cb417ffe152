"""Run configuration: the typed schema (:mod:`.schema`), strict loading (:mod:`.loading`) and the
command line (:mod:`.cli`). Import the public names from here."""

from utils.config.cli import build_arg_parser, cli_overrides, parse_cli
from utils.config.loading import config_to_dict, load_config, save_config, validate_config
from utils.config.resume import RESUMABLE_KEYS, config_value, load_run_config
from utils.config.schema import (
    Config,
    ConfigError,
    GenerateCamParams,
    GuidanceParams,
    ModelParams,
    OptimizationParams,
    PipelineParams,
    cuda_only_changes,
    flag_keys,
    no_effect_keys,
    param,
    prior_keys,
    resumable_keys,
)

__all__ = [
    "ConfigError",
    "ModelParams",
    "PipelineParams",
    "GuidanceParams",
    "GenerateCamParams",
    "OptimizationParams",
    "Config",
    "param",
    "load_config",
    "validate_config",
    "config_to_dict",
    "save_config",
    "no_effect_keys",
    "cuda_only_changes",
    "prior_keys",
    "resumable_keys",
    "flag_keys",
    "config_value",
    "build_arg_parser",
    "cli_overrides",
    "parse_cli",
    "RESUMABLE_KEYS",
    "load_run_config",
]
