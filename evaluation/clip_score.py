"""CLIP score of a trained asset: the text-alignment metric of SegmentDreamer's Table 1 (CLIP-L, the
mean over 120 views around the object).

    python evaluation/clip_score.py outputs/sctd/bagel_sctd_s0_20261122-101500
    python evaluation/clip_score.py RUN_DIR --model /path/to/clip-vit-large-patch14 --views 120 --resolution 512
    python evaluation/clip_score.py RUN_DIR --ply other.ply --prompt "a DSLR photo of a bagel"

The run folder supplies the prompt (GuidanceParams.text), the camera ring (GenerateCamParams: default
radius, polar and fov) and the asset: point_cloud.ply, or the newest point_cloud/iteration_*/point_cloud.ply
of an interrupted run. Views are rendered on a
white background. Score per view = 100 * max(cos(image, text), 0) (the torchmetrics / paper scale,
about 30 for good assets); the result goes to RUN_DIR/clip_score.json and the log.

The model key is a local CLIPModel folder (config.json, weights, tokenizer files, optionally
preprocessor_config.json) or a Hugging Face Hub id read through the local cache.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from guidance.prior import ModelNotFoundError  # noqa: E402
from utils.cli_errors import (  # noqa: E402
    InputError,
    reading,
    require_file,
    require_folder,
    require_writable_folder,
    run_command,
)

log = logging.getLogger("clip_score")

DEFAULT_MODEL = "openai/clip-vit-large-patch14"  # CLIP-L, as in the paper's Table 1
# OpenAI CLIP's image normalisation, used when the model folder has no preprocessor_config.json
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CLIPScorer:
    """A CLIP model with its tokenizer and image normalisation; tensors in, scores out."""

    model: torch.nn.Module  # transformers CLIPModel
    tokenizer: object
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_pretrained(cls, key: str, device: torch.device | str = "cpu") -> "CLIPScorer":
        """Load a CLIPModel folder or hub id; ModelNotFoundError (naming --model) if it is not there."""
        from transformers import CLIPModel, CLIPTokenizer

        from guidance.stable_diffusion import hub_offline

        kwargs = {"local_files_only": True} if hub_offline() else {}
        try:
            model = CLIPModel.from_pretrained(key, **kwargs)
            tokenizer = CLIPTokenizer.from_pretrained(key, **kwargs)
        except OSError as err:
            raise ModelNotFoundError(
                f"CLIP model not found: --model {key!r} ({type(err).__name__}: {err}).\n"
                "Point --model at a local CLIPModel folder (config.json, model.safetensors, vocab.json, "
                f"merges.txt), e.g. a save_pretrained copy of {DEFAULT_MODEL}, or at a hub id in the local cache."
            ) from err
        mean, std = _normalisation(key, kwargs)
        model = model.to(device).eval().requires_grad_(False)
        return cls(model, tokenizer, int(model.config.vision_config.image_size), mean, std)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, images: Tensor) -> Tensor:
        """[N, 3, H, W] in [0, 1] -> [N, 3, S, S] CLIP input: shortest side resized to S (bicubic, antialiased),
        centre crop, per-channel normalisation (CLIPImageProcessor's steps, on tensors)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
        size = self.image_size
        h, w = images.shape[-2:]
        scale = size / min(h, w)
        new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(images.float(), size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        x = x[..., top:top + size, left:left + size].clamp(0.0, 1.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def text_features(self, prompt: str) -> Tensor:
        """-> [1, D] unit-norm text embedding."""
        ids = self.tokenizer(prompt, padding="max_length", truncation=True, return_tensors="pt",
                             max_length=self.tokenizer.model_max_length).input_ids.to(self.device)
        pooled = self.model.text_model(input_ids=ids).pooler_output
        return F.normalize(self.model.text_projection(pooled), dim=-1)

    @torch.no_grad()
    def image_features(self, images: Tensor, batch: int = 16) -> Tensor:
        """[N, 3, H, W] in [0, 1] -> [N, D] unit-norm image embeddings."""
        feats = []
        for chunk in images.split(batch):
            pixels = self.preprocess(chunk.to(self.device))
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            feats.append(F.normalize(self.model.visual_projection(pooled), dim=-1))
        return torch.cat(feats)

    def score(self, images: Tensor, prompt: str) -> Tensor:
        """[N, 3, H, W] in [0, 1] -> [N] scores 100 * max(cos, 0)."""
        cos = (self.image_features(images) @ self.text_features(prompt).T).squeeze(-1)
        return 100.0 * cos.clamp_min(0.0)


def _normalisation(key: str, kwargs: dict) -> tuple[tuple, tuple]:
    try:
        from transformers import CLIPImageProcessor

        processor = CLIPImageProcessor.from_pretrained(key, **kwargs)
        return tuple(processor.image_mean), tuple(processor.image_std)
    except (OSError, ValueError, ImportError):
        log.info("no image processor config with %s: OpenAI CLIP normalisation", key)
        return OPENAI_MEAN, OPENAI_STD


def asset_ply(run_dir: Path) -> Path:
    """The run's result: RUN_DIR/point_cloud.ply (written when training finishes), else, for an interrupted
    run, the newest RUN_DIR/point_cloud/iteration_<k>/point_cloud.ply."""
    final = run_dir / "point_cloud.ply"
    if final.is_file():
        return final
    candidates = list((run_dir / "point_cloud").glob("iteration_*/point_cloud.ply"))
    if not candidates:
        raise FileNotFoundError(f"no point_cloud.ply or point_cloud/iteration_*/point_cloud.ply in {run_dir}; "
                                "pass --ply")
    return max(candidates, key=lambda p: int(p.parent.name.split("_")[-1]))


def render_ring(ply: Path, camera_cfg, n_views: int, resolution: int, device: torch.device) -> Tensor:
    """[n_views, 3, R, R] renders of the PLY on the evaluation ring (white background)."""
    from gaussian_renderer import render_in_chunks
    from scene.camera_sampler import evaluation_ring
    from scene.ply_format import load_gaussian_ply

    gaussians = load_gaussian_ply(ply, device=device).gaussian_tensors()
    cameras = evaluation_ring(camera_cfg, n_views, False, width=resolution, height=resolution)
    with torch.no_grad():
        return render_in_chunks(gaussians, cameras, torch.ones(3, device=device)).rgb


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a run folder written by train.py")
    p.add_argument("--ply", type=Path, help="score this PLY instead of the run's result")
    p.add_argument("--prompt", help="text to score against (default: the run's GuidanceParams.text)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="CLIPModel folder or hub id (default: CLIP-L)")
    p.add_argument("--views", type=int, default=120, help="views on the ring (paper: 120)")
    p.add_argument("--resolution", type=int, default=512, help="render size in pixels")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", type=Path, help="JSON result (default: RUN_DIR/clip_score.json)")
    args = p.parse_args(argv)
    for name in ("views", "resolution"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    return run_command(lambda: _score(args), log)


def _score(args: argparse.Namespace) -> int:
    """main()'s work: the run folder, its config, the asset and the output are checked before the model loads."""
    from scene.ply_format import load_gaussian_ply
    from utils.config import ConfigError, load_config
    from utils.devices import resolve_device
    from utils.files import atomic_write_text

    run_dir = require_folder("RUN_DIR", args.run_dir, "pass a run folder written by train.py")
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise InputError(f"{config_path} not found: RUN_DIR must be a folder written by train.py")
    try:
        cfg = load_config(config_path, warn_no_effect=False)
    except ConfigError as exc:
        raise ConfigError(f"RUN_DIR's {config_path}: {exc}") from None
    device = resolve_device(args.device)
    prompt = args.prompt or cfg.guidance.text
    if args.ply is not None:
        require_file("--ply", args.ply)
    with reading("--ply" if args.ply else "RUN_DIR", args.ply or run_dir):
        ply = args.ply or asset_ply(run_dir)
        load_gaussian_ply(ply).check_usable(str(ply))
    out = args.out or run_dir / "clip_score.json"
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; pass a .json file path")
    require_writable_folder("--out's folder", out.parent)
    scorer = CLIPScorer.from_pretrained(args.model, device)
    images = render_ring(ply, cfg.camera, args.views, args.resolution, device)
    scores = scorer.score(images, prompt).cpu()
    result = {"model": args.model, "prompt": prompt, "ply": str(ply), "views": args.views,
              "resolution": args.resolution, "mean": scores.mean().item(),
              "std": scores.std().item() if len(scores) > 1 else 0.0, "per_view": scores.tolist()}
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    log.info("CLIP score %.2f +- %.2f over %d views of %s (%r, %s) -> %s",
             result["mean"], result["std"], args.views, ply, prompt, args.model, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
