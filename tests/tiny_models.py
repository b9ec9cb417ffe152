"""Tiny random-weight models that the tests (and the benchmark's CPU smoke mode) build themselves."""
from __future__ import annotations

import torch

from bench.random_sd import char_tokenizer


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


def save_tiny_clip(folder) -> None:
    """A tiny random CLIPModel (32x32 images, width 32) and the char tokenizer, saved as a model folder."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    layers = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=100, max_position_embeddings=77, **layers),
        vision_config=dict(image_size=32, patch_size=8, **layers),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    char_tokenizer(100).save_pretrained(folder)


class TinyInception(torch.nn.Module):
    """Stands in for the FID Inception TorchScript file: the same call, detector(images_0_255,
    return_features=True) -> [N, 8] features, with its own resize inside."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=4, stride=4)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(img / 255.0, size=(32, 32), mode="bilinear", align_corners=False)
        return self.conv(x).relu().mean(dim=(2, 3))


def save_tiny_inception(path) -> None:
    torch.jit.script(TinyInception()).save(str(path))
