"""The prior interface: what a distillation loss, the trainer and a run may ask of a 2D diffusion model.

A prior maps rendered images to its working space (`encode`), builds per-view
conditioning from the cameras (`condition`), and predicts the noise epsilon of
noisy working-space samples for any set of conditioning branches in one batched
call (`predict_noise`). Losses never see which prior they talk to. The trainer may ask
for a deterministic encoder (`set_posterior_sampling`), and a run measures held-out PSNR
when the prior knows the views it is centred on (`reference_images`).

Branch names:
    "null"   the empty prompt, used on every unconditional ODE step (inversion, consistency targets)
    "neg"    the negative prompt: the unconditional side of classifier-free guidance
    "pos"    the view-dependent positive prompt
    "perp1", "perp2"  the two Perp-Neg view components (only when Perp-Neg is on)
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import Tensor

from guidance.timesteps import TimestepGrid
from scene.cameras import Cameras
from utils.hub import ModelNotFoundError  # noqa: F401 (raised by every prior's loader; imported from here)

BRANCHES = ("null", "neg", "pos", "perp1", "perp2")
PERP_NEG_BRANCHES = ("perp1", "perp2")


@dataclass(frozen=True)
class Conditioning:
    """Per-view conditioning for one batch of B views."""

    branches: dict[str, Tensor]  # branch name -> [B, ...] (text embeddings, or target images)
    perp_neg_weights: Tensor | None = None  # [B, 2] weights of "perp1", "perp2"; None = plain CFG
    spatial: bool = False  # True when the branch tensors are images that must flip with the render

    def __post_init__(self) -> None:
        unknown = set(self.branches) - set(BRANCHES)
        if unknown:
            raise ValueError(f"unknown conditioning branches {sorted(unknown)}; valid: {BRANCHES}")
        sizes = {name: value.shape[0] for name, value in self.branches.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"conditioning branches disagree on the batch size: {sizes}")
        if self.perp_neg_weights is not None:
            missing = [b for b in PERP_NEG_BRANCHES if b not in self.branches]
            if missing:
                raise ValueError(f"Perp-Neg weights given but branches {missing} are missing")

    def __len__(self) -> int:
        return next(iter(self.branches.values())).shape[0]

    @property
    def perp_neg(self) -> bool:
        return self.perp_neg_weights is not None

    def hflip(self) -> "Conditioning":
        """The conditioning of horizontally flipped views (a no-op for text embeddings)."""
        if not self.spatial:
            return self
        return replace(self, branches={k: v.flip(-1) for k, v in self.branches.items()})


class DiffusionPrior(ABC):
    """A 2D diffusion model seen as a prior over rendered views."""

    alphas_cumprod: Tensor  # [T] float32, on the prior's device; index = timestep value
    device: torch.device

    @property
    @abstractmethod
    def timestep_grid(self) -> TimestepGrid:
        """Sampled timestep index -> the timestep value this model runs at (its scheduler's steps_offset
        and spacing); every value a loss can reach must be < T."""

    @abstractmethod
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """[B, 3, H, W] images in [0, 1] -> [B, C, h, w] working-space samples z0 (differentiable); a
        stochastic encoder draws from `generator` (on the prior's device; None: torch's global one)."""

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """[B, C, h, w] -> [B, 3, H, W] images in [0, 1] (no gradient needed)."""

    @abstractmethod
    def condition(self, cameras: Cameras, background: Tensor | None = None) -> Conditioning:
        """Conditioning for the views of `cameras`; `background` [B, 3] is the render's background."""

    @abstractmethod
    def predict_noise(
        self, z_t: Tensor, t: Tensor, cond: Conditioning, branches: Sequence[str]
    ) -> Tensor:
        """Epsilon for every branch from one batched evaluation.

        z_t: [B, C, h, w] noisy samples; t: [B] integer timestep values (they index alphas_cumprod).
        Returns [len(branches), B, C, h, w], always epsilon whatever the model predicts.
        """

    @abstractmethod
    def set_posterior_sampling(self, sample: bool) -> None:
        """Whether `encode` draws z0 from the encoder's posterior (True, the default) or returns its mean.

        The trainer's chunked encoder (PipelineParams.encode_chunk) runs the encoder twice per image and
        needs both passes to give the same z0. A prior whose encoder is deterministic ignores this.
        """

    @abstractmethod
    def reference_images(self, cameras: Cameras, background: Tensor | None = None) -> Tensor | None:
        """[B, 3, H, W] in [0, 1]: the views this prior's conditional distribution is centred on, when it
        knows them (the renders of a hidden scene); None when no such scene exists (a text-to-image model).

        `background` [B, 3] is the background to render them on (black when None).
        """

    @abstractmethod
    def set_prompts(self, text: str, negative: str = "") -> None:
        """Re-target the prior to another prompt and negative prompt, keeping the loaded model: a sweep
        trains many prompts with one prior. Afterwards the prior behaves exactly as one built with them."""

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]
