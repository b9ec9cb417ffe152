"""Shared pytest fixtures.

Stable Diffusion section: tiny random-weight Stable Diffusion folders in the diffusers layout
(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), built once per session,
so that the real loaders run without any download. The UNet works on 4x8x8 latents, the VAE
keeps the real downsampling factor 8 (64x64 images <-> 8x8 latents), the text encoder has
hidden size 32 and 77 positions, the tokenizer is a character-level CLIP BPE tokenizer.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

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


def _tiny_tokenizer():
    from transformers import CLIPTokenizer

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789,.!-'")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _tiny_pipeline(prediction_type: str):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=1000,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    ))
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tiny_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """A tiny epsilon-prediction Stable Diffusion folder in the diffusers layout."""
    path = tmp_path_factory.mktemp("tiny-sd") / "tiny-sd-eps"
    _tiny_pipeline("epsilon").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_sd_v_dir(tmp_path_factory) -> Path:
    """The same tiny model with a v-prediction scheduler."""
    path = tmp_path_factory.mktemp("tiny-sd") / "tiny-sd-v"
    _tiny_pipeline("v_prediction").save_pretrained(path)
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
