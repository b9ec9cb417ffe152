"""ImageReward (Xu et al. 2023) of rendered views: the human-preference score of SegmentDreamer's Table 1.

The model comes with its own package (pip install image-reward; import name ImageReward), which
downloads "ImageReward-v1.0" from the Hugging Face Hub into download_root, or loads a local
ImageReward.pt path. The package pins old timm and pulls torchvision, which breaks transformers' CLIP
import beside the CPU torch wheel, so it is not in requirements.txt: install it in the evaluation
environment (a CUDA torch build with its matching torchvision). Without it, the report says so and
leaves the column empty.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_MODEL = "ImageReward-v1.0"
INSTALL_HINT = ("ImageReward is not installed: pip install image-reward (it needs torchvision and timm; use an "
                "environment with a CUDA torch build and its matching torchvision)")


class ImageRewardUnavailable(RuntimeError):
    """The ImageReward package is missing, or its model cannot be loaded."""


def image_reward_installed() -> bool:
    return importlib.util.find_spec("ImageReward") is not None


def to_pil(images: Tensor) -> list:
    """[N, 3, H, W] in [0, 1] -> N RGB PIL images (what ImageReward's preprocessing takes)."""
    from PIL import Image

    from utils.media import to_uint8

    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W] in [0, 1], got {tuple(images.shape)}")
    return [Image.fromarray(frame) for frame in to_uint8(images)]


@dataclass
class ImageRewardScorer:
    model: object  # ImageReward.ImageReward: .score(prompt, list of PIL images) -> list of floats (float for one)

    @classmethod
    def from_pretrained(cls, name: str = DEFAULT_MODEL, device: torch.device | str = "cpu",
                        download_root: str | None = None) -> "ImageRewardScorer":
        if not image_reward_installed():
            raise ImageRewardUnavailable(INSTALL_HINT)
        import ImageReward as reward_package

        try:
            model = reward_package.load(name, device=str(device), download_root=download_root)
        except (OSError, RuntimeError, ValueError) as err:
            raise ImageRewardUnavailable(f"ImageReward model {name!r} could not be loaded: {err}") from err
        return cls(model)

    @torch.no_grad()
    def score(self, images: Tensor, prompt: str, batch: int = 16) -> Tensor:
        """[N, 3, H, W] in [0, 1] -> [N] rewards."""
        rewards: list[float] = []
        for chunk in images.split(batch):
            out = self.model.score(prompt, to_pil(chunk))
            rewards += [float(out)] if isinstance(out, (int, float)) else [float(r) for r in out]
        if len(rewards) != images.shape[0]:
            raise RuntimeError(f"ImageReward returned {len(rewards)} scores for {images.shape[0]} images")
        return torch.tensor(rewards)
