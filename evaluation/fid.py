"""FID of rendered views against a folder of reference images (SegmentDreamer Table 1: against images
that Stable Diffusion 2.1 generates for the same prompts).

Features: the Inception-v3 network of the original TensorFlow FID, as the TorchScript file that
StyleGAN2-ADA and clean-fid use (inception-2015-12-05.pt, called as detector(images_0_255,
return_features=True) -> [N, 2048]; it resizes to 299x299 inside). It is loaded with torch.jit.load,
so no extra package is needed: torchmetrics' and clean-fid's FID both pull in torchvision (through
torch-fidelity / their own requirements), which breaks transformers' CLIP import beside the CPU torch
wheel. Download the file once (no account needed):

    wget https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt

The reference set, with the same Stable Diffusion model the sweep distils from:

    python -m evaluation.fid reference --model-key /models/stable-diffusion-2-1-base \\
        --prompts config/paper_prompts.txt --per-prompt 30 --out outputs/fid_reference
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from utils.checkpoint_file import CheckpointError, load_tensor_file
from utils.cli_errors import InputError, reading, require_folder, require_writable_folder, run_command
from utils.config import ConfigError

log = logging.getLogger(__name__)

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
INCEPTION_SIZE = 299


class FeatureExtractorMissing(RuntimeError):
    """The Inception TorchScript file is not where the options say."""


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) of two Gaussians (Heusel et al. 2017)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics disagree: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    covmean, _ = linalg.sqrtm(sigma1 @ sigma2, disp=False)
    if not np.isfinite(covmean).all():  # singular product: offset the diagonals (as the reference code does)
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def feature_statistics(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """[N, D] features -> (mean [D], covariance [D, D]) in float64."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got {tuple(features.shape)}")
    x = features.double().cpu().numpy()
    return x.mean(axis=0), np.cov(x, rowvar=False)


class InceptionFeatures:
    """The FID Inception network from its TorchScript file: images in [0, 1] -> [N, 2048] features."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu"):
        path = Path(path).expanduser()
        if not path.is_file():
            raise FeatureExtractorMissing(
                f"FID needs the Inception TorchScript file; none at {path.resolve()}. Download it with\n"
                f"  wget {INCEPTION_URL}\nand pass its path (--inception; the sweep report: --fid-inception).")
        self.device = torch.device(device)
        try:
            self.detector = torch.jit.load(str(path), map_location=self.device).eval()
        except RuntimeError as exc:  # not a TorchScript archive (truncated download, another file)
            raise FeatureExtractorMissing(
                f"{path} is not the Inception TorchScript file (torch.jit.load: {str(exc).splitlines()[0]}); "
                f"download it again with\n  wget {INCEPTION_URL}\nand pass its path (--inception; the sweep report: "
                "--fid-inception).") from None

    @torch.no_grad()
    def __call__(self, images: Tensor, batch: int = 32) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        feats = []
        for chunk in images.split(batch):
            pixels = (chunk.float().clamp(0, 1) * 255.0).round().to(self.device)  # the 8-bit images FID expects
            feats.append(self.detector(pixels, return_features=True).float().cpu())
        return torch.cat(feats)


def resize_for_inception(images: Tensor) -> Tensor:
    """[N, 3, H, W] -> [N, 3, 299, 299] (antialiased bilinear): renders and reference images alike."""
    import torch.nn.functional as F

    if images.shape[-2:] == (INCEPTION_SIZE, INCEPTION_SIZE):
        return images
    return F.interpolate(images.float(), size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", antialias=True,
                         align_corners=False)


def reference_features(folder: Path, extractor: InceptionFeatures, cache: Path) -> Tensor:
    """[N, D] features of the reference images, cached (keyed by the folder's file list)."""
    files = sorted(str(p) for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if cache.is_file():
        try:
            cached = load_tensor_file(cache, "FID feature cache")
        except CheckpointError as exc:  # a damaged or foreign cache is recomputed, never unpickled with code
            log.warning("%s; computing the features again", exc)
            cached = None
        if isinstance(cached, dict) and cached.get("files") == files and torch.is_tensor(cached.get("features")):
            return cached["features"]
    features = extractor(load_image_folder(folder, INCEPTION_SIZE))
    torch.save({"files": files, "features": features}, cache)
    return features


def load_image_folder(folder: Path, resolution: int | None = None) -> Tensor:
    """Every image under folder (sorted) as [N, 3, H, W] in [0, 1]; resized to resolution if given."""
    import imageio.v3 as iio
    import torch.nn.functional as F

    folder = require_folder("image folder", Path(folder))
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder.resolve()}; pass a folder of "
                         "rendered or reference images")
    images = []
    for f in files:
        with reading("image", f):
            array = iio.imread(f)
        x = torch.from_numpy(np.ascontiguousarray(array[..., :3] if array.ndim == 3 else np.stack([array] * 3, -1)))
        x = x.permute(2, 0, 1).float().unsqueeze(0) / 255.0
        if resolution is not None and x.shape[-2:] != (resolution, resolution):
            x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
        images.append(x)
    return torch.cat(images)


def generate_reference(model_key: str, prompts: list[str], per_prompt: int, out: Path, steps: int = 50,
                       guidance_scale: float = 7.5, resolution: int | None = None, seed: int = 0,
                       device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> list[Path]:
    """per_prompt images per prompt from the Stable Diffusion model at model_key (the sweep's prior),
    written as out/<prompt-slug>/<k>.png; existing files are kept (the command resumes)."""
    import imageio.v3 as iio
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from utils.media import to_uint8
    from utils.prompts import Prompt, unique_slugs

    pipe = StableDiffusionPipeline.from_pretrained(model_key, torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    written = []
    for prompt, slug in zip(prompts, unique_slugs([Prompt(p) for p in prompts])):
        folder = Path(out) / slug
        for k in range(per_prompt):
            path = folder / f"img_{k:03d}.png"
            if not path.is_file():
                generator = torch.Generator(device="cpu").manual_seed(seed + k)
                images = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, height=resolution,
                              width=resolution, generator=generator, output_type="pt").images  # [1, 3, H, W]
                folder.mkdir(parents=True, exist_ok=True)
                iio.imwrite(path, to_uint8(images)[0])
            written.append(path)
        log.info("reference images for %r: %s", prompt, folder)
    return written


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m evaluation.fid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    ref = sub.add_parser("reference", help="generate the reference images with a Stable Diffusion model")
    ref.add_argument("--model-key", required=True, help="diffusers Stable Diffusion folder or hub id")
    ref.add_argument("--prompts", required=True, help="prompt list (as for training.sweep)")
    ref.add_argument("--out", required=True, type=Path)
    ref.add_argument("--per-prompt", type=int, default=30, help="images per prompt (default 30)")
    ref.add_argument("--steps", type=int, default=50)
    ref.add_argument("--guidance-scale", type=float, default=7.5)
    ref.add_argument("--resolution", type=int, help="image size (default: the model's)")
    ref.add_argument("--seed", type=int, default=0)
    ref.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    score = sub.add_parser("score", help="FID between two image folders")
    score.add_argument("images", type=Path)
    score.add_argument("reference", type=Path)
    score.add_argument("--inception", required=True, type=Path, help="inception-2015-12-05.pt")
    score.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    return run_command(lambda: _run(args), log, FeatureExtractorMissing)


def _run(args: argparse.Namespace) -> int:
    """main()'s work; inputs, the model and the output folder are checked before any image is made."""
    from utils.devices import resolve_device

    device = resolve_device(args.device)
    if args.command == "reference":
        from guidance.stable_diffusion import check_model_available
        from utils.prompts import load_prompts

        prompts = [p.text for p in load_prompts(args.prompts)]
        check_model_available(args.model_key)  # ModelNotFoundError naming the key and what to do
        require_writable_folder("--out", args.out)
        if args.per_prompt <= 0 or args.steps <= 0:
            raise ConfigError(f"--per-prompt and --steps must be positive, got {args.per_prompt}, {args.steps}")
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        files = generate_reference(args.model_key, prompts, args.per_prompt, args.out, args.steps,
                                   args.guidance_scale, args.resolution, args.seed, device, dtype)
        print(f"{len(files)} reference images under {args.out.resolve()}")
        return 0
    images, reference = (load_image_folder(folder, INCEPTION_SIZE) for folder in (args.images, args.reference))
    for folder, batch in ((args.images, images), (args.reference, reference)):
        if batch.shape[0] < 2:
            raise InputError(f"image folder {folder} holds {batch.shape[0]} image: FID needs a covariance, so at "
                             "least 2 images per folder (the paper: 120 views per asset)")
    extractor = InceptionFeatures(args.inception, device)
    a, b = feature_statistics(extractor(images)), feature_statistics(extractor(reference))
    print(f"FID {frechet_distance(*a, *b):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
