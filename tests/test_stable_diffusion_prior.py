"""StableDiffusionPrior on tiny random-weight models saved in the diffusers layout (conftest)."""
import logging
import math

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import USE_PEFT_BACKEND
from transformers import CLIPTextModel, CLIPTokenizer

from guidance import stable_diffusion as sd
from guidance.prior import Conditioning
from guidance.stable_diffusion import (
    ModelNotFoundError,
    StableDiffusionPrior,
    encode_prompt,
    load_components,
    resolve_dtype,
)
from scene.cameras import Cameras


def make_cameras(azimuths):
    az = torch.tensor(azimuths, dtype=torch.float32)
    b = az.shape[0]

    def full(value):
        return torch.full((b,), value)

    return Cameras(
        world_to_camera=torch.eye(4).repeat(b, 1, 1),
        fov_x=full(0.8),
        fov_y=full(0.8),
        azimuth_deg=az,
        polar_deg=full(90.0),
        radius=full(3.0),
        width=64,
        height=64,
    )


@pytest.fixture(scope="module")
def prior(tiny_sd_dir, make_guidance_cfg):
    return StableDiffusionPrior.from_config(make_guidance_cfg(model_key=str(tiny_sd_dir)), "cpu")


@pytest.fixture(scope="module")
def perpneg_prior(tiny_sd_dir, make_guidance_cfg):
    cfg = make_guidance_cfg(model_key=str(tiny_sd_dir), perpneg=True)
    return StableDiffusionPrior.from_config(cfg, "cpu")


def test_loads_from_folder(tiny_sd_dir, make_guidance_cfg, caplog):
    with caplog.at_level(logging.WARNING, logger=sd.__name__):
        prior = StableDiffusionPrior.from_config(make_guidance_cfg(model_key=str(tiny_sd_dir)), "cpu")
    fp16_warnings = [r for r in caplog.records if "fp16" in r.getMessage()]
    assert len(fp16_warnings) == 1  # auto + fp16 on the CPU falls back to fp32, once
    assert prior.dtype == torch.float32
    assert isinstance(prior.unet, UNet2DConditionModel)
    assert isinstance(prior.vae, AutoencoderKL)
    assert isinstance(prior.text_encoder, CLIPTextModel)
    assert isinstance(prior.tokenizer, CLIPTokenizer)
    assert isinstance(prior.scheduler, DDIMScheduler)
    assert prior.prediction_type == "epsilon"
    for module in (prior.unet, prior.vae, prior.text_encoder):
        assert not module.training
        assert all(not p.requires_grad for p in module.parameters())
        assert all(p.dtype == torch.float32 for p in module.parameters())
    reference = DDIMScheduler.from_pretrained(tiny_sd_dir, subfolder="scheduler").alphas_cumprod
    assert prior.alphas_cumprod.dtype == torch.float32
    assert torch.equal(prior.alphas_cumprod, reference.float())
    assert prior.num_train_timesteps == 1000


def test_resolve_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", True, cuda) == torch.float16
    assert resolve_dtype("auto", False, cuda) == torch.float32
    assert resolve_dtype("bf16", True, cpu) == torch.bfloat16
    assert resolve_dtype("fp16", True, cpu) == torch.float32
    with pytest.raises(ValueError, match="precision"):
        resolve_dtype("fp8", True, cpu)


def test_embeddings_computed_once(prior):
    assert set(prior.embeddings) == {"front", "side", "back", "neg", "null"}
    for emb in prior.embeddings.values():
        assert emb.shape == (1, 77, 32)
    assert not torch.equal(prior.embeddings["front"], prior.embeddings["back"])
    calls = []
    handle = prior.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        for _ in range(3):
            prior.condition(make_cameras([0.0, 120.0]))
    finally:
        handle.remove()
    assert calls == []


def test_embeddings_match_direct_encoding(prior):
    tok = prior.tokenizer
    ids = tok("a delicious bagel, side view", padding="max_length", max_length=77, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        direct = prior.text_encoder(ids)[0]
    torch.testing.assert_close(prior.embeddings["side"], direct)
    empty = tok("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(prior.embeddings["null"], prior.text_encoder(empty)[0])


def test_clip_skip_two_equals_text_encoder_one_layer_shorter(prior):
    skipped = encode_prompt(prior.tokenizer, prior.text_encoder, "a bagel", clip_skip=2)
    encoder = getattr(prior.text_encoder, "text_model", prior.text_encoder).encoder
    layers = encoder.layers
    encoder.layers = layers[:-1]
    try:
        shorter = encode_prompt(prior.tokenizer, prior.text_encoder, "a bagel", clip_skip=1)
    finally:
        encoder.layers = layers
    torch.testing.assert_close(skipped, shorter)
    assert not torch.allclose(skipped, encode_prompt(prior.tokenizer, prior.text_encoder, "a bagel"))


def test_condition_view_interpolation(prior):
    cond = prior.condition(make_cameras([0.0, 90.0, 180.0, 45.0, -90.0]))
    e = prior.embeddings
    pos = cond.branches["pos"]
    assert set(cond.branches) == {"null", "neg", "pos"}
    assert not cond.spatial and cond.perp_neg_weights is None
    assert pos.shape == (5, 77, 32)
    assert torch.equal(pos[0], e["front"][0])
    assert torch.equal(pos[1], e["side"][0])
    assert torch.equal(pos[2], e["back"][0])
    torch.testing.assert_close(pos[3], 0.5 * e["front"][0] + 0.5 * e["side"][0])
    assert torch.equal(pos[4], e["side"][0])
    assert torch.equal(cond.branches["neg"], e["neg"].expand(5, -1, -1))
    assert torch.equal(cond.branches["null"], e["null"].expand(5, -1, -1))


def test_condition_perp_neg_layout_and_weights(perpneg_prior):
    cond = perpneg_prior.condition(make_cameras([0.0, 30.0, 120.0, 180.0]))
    e = perpneg_prior.embeddings
    assert set(cond.branches) == {"null", "neg", "pos", "perp1", "perp2"}
    expected_components = [("front", "side"), ("front", "side"), ("side", "front"), ("side", "front")]
    for i, (first, second) in enumerate(expected_components):
        assert torch.equal(cond.branches["perp1"][i], e[first][0])
        assert torch.equal(cond.branches["perp2"][i], e[second][0])
    r30, r120 = 2 / 3, 2 / 3
    expected = torch.tensor([
        [0.0, -2.0],  # azimuth 0: r = 1
        [-2 * math.exp(-2 * r30), -2 * math.exp(-10 * (1 - r30))],
        [-math.exp(-10 * r120), -2.0],  # back half, r = 1 - 30/90
        [-1.0, -2.0],  # azimuth 180: r = 0
    ])
    torch.testing.assert_close(cond.perp_neg_weights, expected)
    torch.testing.assert_close(cond.branches["pos"][2], r120 * e["side"][0] + (1 - r120) * e["back"][0])


def test_encode_decode_shapes_and_gradient(prior):
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    latents = prior.encode(images)
    assert latents.shape == (2, 4, 8, 8) and latents.dtype == torch.float32
    latents.square().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    decoded = prior.decode(latents.detach())
    assert decoded.shape == (2, 3, 64, 64)
    assert decoded.min() >= 0 and decoded.max() <= 1


def test_encode_posterior_mean(prior):
    images = torch.rand(1, 3, 64, 64)
    prior.set_posterior_sampling(False)
    try:
        a, b = prior.encode(images), prior.encode(images)
    finally:
        prior.set_posterior_sampling(True)
    assert torch.equal(a, b)
    expected = prior.vae.encode(images * 2 - 1).latent_dist.mean * prior.vae.config.scaling_factor
    torch.testing.assert_close(a, expected)


def test_has_no_reference_images(prior):
    assert prior.reference_images(make_cameras([0.0, 90.0])) is None


def test_vae_attention_kinds_compute_the_same_encoding_and_gradient(prior):
    """matmul (explicit matmul + float32 softmax) and sdpa (fused kernels) are the same maths."""
    images = torch.rand(2, 3, 64, 64)
    results = {}
    prior.set_posterior_sampling(False)
    try:
        for kind in ("sdpa", "matmul"):
            prior.set_vae_attention(kind)
            expected = "AttnProcessor" if kind == "matmul" else "AttnProcessor2_0"
            assert {type(p).__name__ for p in prior.vae.attn_processors.values()} == {expected}
            x = images.clone().requires_grad_(True)
            latents = prior.encode(x)
            latents.square().sum().backward()
            results[kind] = (latents.detach(), x.grad)
    finally:
        prior.set_posterior_sampling(True)
        prior.set_vae_attention("sdpa")
    processors = {type(p).__name__ for p in prior.vae.attn_processors.values()}
    assert processors == {"AttnProcessor2_0"}
    torch.testing.assert_close(results["matmul"][0], results["sdpa"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["matmul"][1], results["sdpa"][1], rtol=1e-5, atol=1e-6)
    assert results["sdpa"][1].abs().sum() > 0
    with pytest.raises(ValueError, match="PipelineParams.vae_attention"):
        prior.set_vae_attention("flash")


def test_predict_noise_batched_equals_unbatched(perpneg_prior):
    prior = perpneg_prior
    cond = prior.condition(make_cameras([10.0, 150.0, -60.0]))
    torch.manual_seed(1)
    z_t = torch.randn(3, 4, 8, 8)
    t = torch.tensor([20, 500, 979])
    branches = ["neg", "pos", "perp1", "perp2", "null"]
    eps = prior.predict_noise(z_t, t, cond, branches)
    assert eps.shape == (5, 3, 4, 8, 8) and eps.dtype == torch.float32
    with torch.no_grad():
        for k, name in enumerate(branches):
            direct = prior.unet(z_t, t, encoder_hidden_states=cond.branches[name]).sample
            torch.testing.assert_close(eps[k], direct, rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="perp1"):
        prior.predict_noise(z_t, t, Conditioning({"neg": cond.branches["neg"]}), ["neg", "perp1"])


def test_v_prediction_converted_to_epsilon(tiny_sd_v_dir, make_guidance_cfg):
    prior = StableDiffusionPrior.from_config(make_guidance_cfg(model_key=str(tiny_sd_v_dir)), "cpu")
    assert prior.prediction_type == "v_prediction"
    cond = prior.condition(make_cameras([0.0, 100.0]))
    torch.manual_seed(2)
    z_t = torch.randn(2, 4, 8, 8)
    t = torch.tensor([50, 700])
    eps = prior.predict_noise(z_t, t, cond, ["neg", "pos"])
    abar = prior.scheduler.alphas_cumprod[t].view(2, 1, 1, 1)
    with torch.no_grad():
        for k, name in enumerate(["neg", "pos"]):
            v = prior.unet(z_t, t, encoder_hidden_states=cond.branches[name]).sample
            torch.testing.assert_close(eps[k], abar.sqrt() * v + (1 - abar).sqrt() * z_t, rtol=1e-5, atol=1e-5)


def test_unsupported_prediction_type(tiny_sd_dir):
    components = load_components(str(tiny_sd_dir))
    scheduler = DDIMScheduler.from_config(components.scheduler.config, prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type"):
        StableDiffusionPrior(components._replace(scheduler=scheduler), text="a bagel")


def _assert_helpful(message: str):
    for needle in ("GuidanceParams.model_key", "model_index.json", "unet/", "scheduler/",
                   "November 2025", "GuidanceParams.model_key=/path/to/stable-diffusion-2-1-base",
                   "GuidanceParams.base_model_key"):
        assert needle in message, needle


def test_missing_local_path(tmp_path, make_guidance_cfg):
    missing = tmp_path / "stable-diffusion-2-1-base"
    with pytest.raises(ModelNotFoundError) as info:
        StableDiffusionPrior.from_config(make_guidance_cfg(model_key=str(missing)), "cpu")
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)
    _assert_helpful(str(info.value))
    assert isinstance(info.value, RuntimeError)


def test_empty_key_and_incomplete_folder(tmp_path, make_guidance_cfg):
    with pytest.raises(ModelNotFoundError, match="GuidanceParams.model_key"):
        StableDiffusionPrior.from_config(make_guidance_cfg(model_key=None), "cpu")
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelNotFoundError, match="lacks the subfolders") as info:
        load_components(str(tmp_path))
    _assert_helpful(str(info.value))


def test_hub_id_offline_not_cached(tmp_path, monkeypatch, make_guidance_cfg):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    cfg = make_guidance_cfg(model_key="stabilityai/stable-diffusion-2-1-base")
    with pytest.raises(ModelNotFoundError) as info:
        StableDiffusionPrior.from_config(cfg, "cpu")
    message = str(info.value)
    _assert_helpful(message)
    assert "stabilityai/stable-diffusion-2-1-base" in message
    assert "offline" in message and str(tmp_path / "hf-home") in message


def test_single_file_routes_to_from_single_file(tiny_sd_dir, tmp_path, monkeypatch, make_guidance_cfg):
    """No diffusers -> original-SD converter ships in the package: check the routing instead."""
    checkpoint = tmp_path / "dreamshaper_8.safetensors"
    checkpoint.write_bytes(b"")
    calls = []

    def fake_from_single_file(cls, path, **kwargs):
        calls.append((path, kwargs))
        return StableDiffusionPipeline.from_pretrained(tiny_sd_dir)

    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", classmethod(fake_from_single_file))
    cfg = make_guidance_cfg(model_key=str(checkpoint), base_model_key=str(tiny_sd_dir), precision="fp32")
    prior = StableDiffusionPrior.from_config(cfg, "cpu")
    assert len(calls) == 1
    path, kwargs = calls[0]
    assert path == str(checkpoint)
    assert kwargs["config"] == str(tiny_sd_dir) and kwargs["torch_dtype"] == torch.float32
    assert isinstance(prior.scheduler, DDIMScheduler)
    assert prior.embeddings["front"].shape == (1, 77, 32)


def test_single_file_missing(tmp_path, tiny_sd_dir, make_guidance_cfg):
    cfg = make_guidance_cfg(model_key=str(tmp_path / "model.ckpt"), base_model_key=str(tiny_sd_dir))
    with pytest.raises(ModelNotFoundError, match="no such file"):
        StableDiffusionPrior.from_config(cfg, "cpu")
    checkpoint = tmp_path / "weights.bin"
    checkpoint.write_bytes(b"")
    cfg = make_guidance_cfg(model_key=str(checkpoint), is_safe_tensor=True, base_model_key=str(tmp_path / "no"))
    with pytest.raises(ModelNotFoundError, match="GuidanceParams.base_model_key"):
        StableDiffusionPrior.from_config(cfg, "cpu")


def test_textual_inversion(tiny_sd_dir, tmp_path, make_guidance_cfg):
    from safetensors.torch import save_file

    vector = torch.randn(32)
    path = tmp_path / "learned_embeds.safetensors"
    save_file({"<bagel>": vector}, str(path))
    cfg = make_guidance_cfg(model_key=str(tiny_sd_dir), text="a <bagel>", textual_inversion_path=str(path))
    prior = StableDiffusionPrior.from_config(cfg, "cpu")
    token_id = prior.tokenizer.convert_tokens_to_ids("<bagel>")
    assert token_id in prior.tokenizer("a <bagel>").input_ids
    table = prior.text_encoder.get_input_embeddings().weight
    torch.testing.assert_close(table[token_id], vector)


@pytest.mark.skipif(USE_PEFT_BACKEND, reason="peft is installed")
def test_lora_without_peft_fails_before_loading(make_guidance_cfg):
    cfg = make_guidance_cfg(model_key=None, LoRA_path="/some/lora.safetensors")
    with pytest.raises(RuntimeError, match="peft"):
        StableDiffusionPrior.from_config(cfg, "cpu")


def test_tokenizer_without_model_max_length_falls_back_to_text_encoder_positions(tiny_sd_dir, tmp_path,
                                                                                  make_guidance_cfg, prior):
    """A tokenizer_config.json without model_max_length makes transformers report a huge sentinel, which
    padding cannot use (OverflowError); prompts then use the text encoder's max_position_embeddings."""
    import json
    import shutil

    from guidance.losses import StepInfo, build_loss
    from utils.config import load_config

    folder = tmp_path / "converted-sd"
    shutil.copytree(tiny_sd_dir, folder)
    config_path = folder / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("model_max_length")
    config_path.write_text(json.dumps(config))
    converted = StableDiffusionPrior.from_config(make_guidance_cfg(model_key=str(folder)), "cpu")
    assert converted.tokenizer.model_max_length > 10**20  # the sentinel that used to crash every loss
    for name, embedding in prior.embeddings.items():
        assert converted.embeddings[name].shape == (1, 77, 32)
        assert torch.allclose(converted.embeddings[name], embedding)
    loss = build_loss(load_config(None, ["GuidanceParams.fix_noise=true"], warn_no_effect=False).guidance,
                      converted, torch.Generator().manual_seed(0))
    out = loss(torch.randn(2, 4, 8, 8), converted.condition(make_cameras([0.0, 90.0])), StepInfo(1, 0.5))
    assert out.latent_grad.shape == (2, 4, 8, 8) and torch.isfinite(out.latent_grad).all()
