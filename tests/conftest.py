"""Shared pytest fixtures.

Stable Diffusion section: tiny random-weight Stable Diffusion folders in the diffusers layout
(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), built once per session,
so that the real loaders run without any download. The UNet works on 4x8x8 latents, the VAE
keeps the real downsampling factor 8 (64x64 images <-> 8x8 latents), the text encoder has
hidden size 32 and 77 positions, the tokenizer is a character-level CLIP BPE tokenizer.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

# Without a GPU, Triton kernels (guidance/group_norm_nhwc.py) run in Triton's CPU interpreter, which is
# chosen when a kernel is defined: set before any test module imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.tiny_models import tiny_sd_pipeline  # noqa: E402

TINY_SD_DEFAULTS = dict(
    model_key=None,
    is_safe_tensor=False,
    base_model_key=None,
    precision="auto",
    fp16=True,
    text="a delicious bagel",
    negative="blurry, low quality",
    inverse_text="",
    perpneg=False,
    negative_w=-2.0,
    front_decay_factor=2.0,
    side_decay_factor=10.0,
    guidance_scale=7.5,
    clip_skip=1,
    LoRA_path=None,
    textual_inversion_path=None,
)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """A tiny epsilon-prediction Stable Diffusion folder in the diffusers layout."""
    path = tmp_path_factory.mktemp("tiny-sd") / "tiny-sd-eps"
    tiny_sd_pipeline("epsilon").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_sd_v_dir(tmp_path_factory) -> Path:
    """The same tiny model with a v-prediction scheduler."""
    path = tmp_path_factory.mktemp("tiny-sd") / "tiny-sd-v"
    tiny_sd_pipeline("v_prediction").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def make_guidance_cfg():
    """Factory: make_guidance_cfg(**overrides) -> SimpleNamespace with the GuidanceParams attributes."""

    def factory(**overrides) -> SimpleNamespace:
        unknown = set(overrides) - set(TINY_SD_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown GuidanceParams attributes {sorted(unknown)}")
        return SimpleNamespace(**{**TINY_SD_DEFAULTS, **overrides})

    return factory
