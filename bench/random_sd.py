"""Stable Diffusion components with random weights, built from architecture configs only.

Used by the GPU benchmark (full-size SD 2.1-base: the real model's cost); the tests' tiny models
(tests/tiny_models.py) reuse the tokenizer. The tokenizer is a character-level CLIP BPE: prompts
tokenise to valid ids, and the embeddings it yields are as meaningless as the random text encoder
that consumes them.
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
