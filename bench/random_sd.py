"""Stable Diffusion components with random weights, built from architecture configs only.

Used by the GPU benchmark (full-size SD 2.1-base: the real model's cost) and by tests (tiny
configs). The tokenizer is a character-level CLIP BPE: prompts tokenise to valid ids, and the
embeddings it yields are as meaningless as the random text encoder that consumes them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from guidance.stable_diffusion import SDComponents

ARCHITECTURE_DIR = Path(__file__).resolve().parent / "sd21_base_architecture"


def char_tokenizer(vocab_size: int | None = None):
    """A CLIPTokenizer over single characters (ids < vocab_size of any CLIP text encoder)."""
    from transformers import CLIPTokenizer

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789,.!-'")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    if vocab_size is not None and len(vocab) > vocab_size:
        raise ValueError(f"the character vocabulary ({len(vocab)}) exceeds vocab_size {vocab_size}")
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def random_sd_components(config_dir: Path = ARCHITECTURE_DIR, seed: int = 0) -> SDComponents:
    """UNet, VAE, text encoder (random weights), char tokenizer and DDIM scheduler from config_dir/*/config.json."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    def read(sub: str, name: str = "config.json") -> dict:
        return json.loads((config_dir / sub / name).read_text())

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(read("unet"))
    vae = AutoencoderKL.from_config(read("vae"))
    text_cfg = {k: v for k, v in read("text_encoder").items() if k != "architectures"}
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    scheduler = DDIMScheduler.from_config(read("scheduler", "scheduler_config.json"))
    return SDComponents(unet, vae, text_encoder, char_tokenizer(text_cfg.get("vocab_size")), scheduler)


def tiny_sd_pipeline(prediction_type: str = "epsilon"):
    """A tiny random Stable Diffusion pipeline (tests, CPU smoke runs): UNet on 4x8x8 latents, a VAE
    with the real downsampling factor 8, a 2-layer text encoder of width 32, the char tokenizer."""
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
        tokenizer=char_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
