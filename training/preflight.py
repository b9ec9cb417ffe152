"""Checks of a run's environment and input files, made before its folder is created or any model built.

Pure configuration rules live in utils/config/loading.py; the checks here need the machine (CUDA,
installed packages, files on disk). Each failure is a ConfigError naming the key, the rule and the
value, so that train.py reports it as a message (exit code 2) and nothing is left behind.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from utils.cli_errors import InputError, require_writable_folder
from utils.config import Config, ConfigError


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_device(cfg: Config) -> None:
    pipe = cfg.pipeline
    cuda = torch.cuda.is_available()
    why = "this PyTorch has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
    require(pipe.device != "cuda" or cuda,
            f"PipelineParams.device is 'cuda' but {why}; use PipelineParams.device=auto or cpu")
    on_cuda = pipe.device == "cuda" or (pipe.device == "auto" and cuda)
    require(pipe.renderer != "gsplat" or on_cuda,
            "PipelineParams.renderer is 'gsplat', whose kernels need CUDA, but the run is on the CPU "
            f"(PipelineParams.device={pipe.device!r}); use PipelineParams.renderer=auto or torch")
    require(pipe.renderer != "gsplat" or importlib.util.find_spec("gsplat") is not None,
            "PipelineParams.renderer is 'gsplat' but the gsplat package is not installed (pip install gsplat); "
            "or use PipelineParams.renderer=auto")


def check_output_dir(output_dir: str) -> None:
    """output_dir must be (or be creatable as) a writable folder; '~' is expanded by new_run_dir."""
    try:
        require_writable_folder("output_dir", output_dir)
    except InputError as exc:
        raise ConfigError(str(exc)) from None


def check_initialisation(cfg: Config) -> None:
    from scene.initialisation import POINTE_MISSING

    c = cfg.camera
    if c.init_shape == "shapee":
        from scene.text_to_3d_init import check_shapee_available

        check_shapee_available(c.shapee_model_key)  # ModelNotFoundError: the key, what was tried, what to do
    require(c.init_shape != "mesh" or Path(c.init_path).expanduser().is_file(),
            f"GenerateCamParams.init_path {c.init_path!r}: no such mesh or point-cloud file (init_shape 'mesh')")
    require(c.init_shape != "pointe" or importlib.util.find_spec("point_e") is not None, POINTE_MISSING)
    if c.init_shape in ("ply", "mesh"):  # read and checked now: empty, NaN or absurd files fail before any folder
        from scene.initialisation import read_initial_file

        try:
            read_initial_file(c)
        except (OSError, ValueError) as exc:
            raise ConfigError(str(exc)) from None


def check_analytic_scene(cfg: Config) -> None:
    from guidance.analytic_prior import PROCEDURAL_SCENES
    from scene.ply_format import load_gaussian_ply

    scene = cfg.guidance.analytic_scene
    if scene in PROCEDURAL_SCENES:
        return
    require(scene.endswith(".ply") or Path(scene).expanduser().is_file(),
            f"GuidanceParams.analytic_scene must be one of {list(PROCEDURAL_SCENES)} or a path ending in .ply, "
            f"got {scene!r}")
    try:
        load_gaussian_ply(Path(scene).expanduser()).check_usable(scene)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"GuidanceParams.analytic_scene: {exc}") from None
    require(scene.endswith(".ply"), f"GuidanceParams.analytic_scene {scene!r} is a 3DGS PLY: name it with the "
                                    "suffix .ply (lower case) so it is not taken for a procedural scene name")


def text_encoder_layers(model_key: str) -> int | None:
    """num_hidden_layers of a local model folder's text encoder (None when not a local folder)."""
    path = Path(model_key).expanduser() / "text_encoder" / "config.json"
    if not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text())["num_hidden_layers"])
    except (ValueError, KeyError, TypeError):
        return None  # the model-folder check reports the damaged config


def check_stable_diffusion(cfg: Config) -> None:
    """Model present and intact, adapters loadable, clip_skip within the text encoder."""
    from guidance.stable_diffusion import check_adapter_support, check_model_available

    g = cfg.guidance
    check_model_available(g.model_key, g.is_safe_tensor, g.base_model_key)
    if g.textual_inversion_path:
        path = Path(g.textual_inversion_path).expanduser()
        require(path.exists(), f"GuidanceParams.textual_inversion_path: no such file or folder {str(path)!r}")
    if g.LoRA_path:
        try:
            check_adapter_support(g.LoRA_path)
        except RuntimeError as exc:
            raise ConfigError(str(exc)) from None
    layers = text_encoder_layers(g.model_key) if g.model_key and not g.is_safe_tensor else None
    require(layers is None or g.clip_skip <= layers,
            f"GuidanceParams.clip_skip must be <= the text encoder's {layers} layers, got {g.clip_skip}")


def preflight(cfg: Config, resume: bool = False, prior_given: bool = False) -> None:
    """Every check that can fail before any heavy work; ModelNotFoundError or ConfigError on failure."""
    check_device(cfg)
    if not resume:
        check_output_dir(cfg.output_dir)
    if not prior_given and cfg.guidance.prior == "analytic":
        check_analytic_scene(cfg)
    elif not prior_given:
        check_stable_diffusion(cfg)
    if not resume:  # a resumed run starts from its checkpoint, not from the initialisation
        check_initialisation(cfg)
