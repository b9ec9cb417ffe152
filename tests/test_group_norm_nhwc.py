"""Channels-last GroupNorm(+SiLU) Triton kernels against PyTorch's GroupNorm, and their use in the VAE encoder.

On a CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1); without
Triton the kernel tests skip and GroupNormAct's PyTorch path is still tested.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from guidance import group_norm_nhwc as gn
from guidance.group_norm_nhwc import GroupNormAct, fuse_encoder_norms, group_norm_act_nhwc

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(not gn.triton_ready(torch.empty(0, device=DEVICE)),
                                   reason="needs Triton (on CUDA, or its interpreter on the CPU)")


def no_tf32(monkeypatch):
    """On a GPU the contiguous and channels-last convolutions take other algorithms: in TF32 they differ ~1e-3."""
    if torch.cuda.is_available():
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def channels_last_input(shape, mean=2.0, std=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * std + mean
    if len(shape) == 4:
        return x.to(DEVICE).contiguous(memory_format=torch.channels_last)
    return x.transpose(1, 2).contiguous().transpose(1, 2).to(DEVICE)  # [B, C, L] with the channel stride 1


def reference(x, weight, bias, groups, eps, silu):
    y = F.group_norm(x, groups, weight, bias, eps)
    return F.silu(y) if silu else y


def forward_backward(fn, x, dy):
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    y.backward(dy)
    return y.detach(), x.grad


@needs_kernels
@pytest.mark.parametrize("shape,groups,silu,tile", [
    ((2, 64, 5, 7), 32, True, 8192),  # one partial tile per sample
    ((2, 64, 5, 7), 32, True, 256),  # 4 rows per tile: 9 tiles, the last one partial
    ((1, 32, 3, 3), 8, False, 64),
    ((2, 16, 9), 4, True, 32),  # attention layout [B, C, L] with the channel stride 1
])
def test_kernels_match_pytorch_group_norm_forward_and_backward(monkeypatch, shape, groups, silu, tile):
    monkeypatch.setattr(gn, "TILE_ELEMENTS", tile)
    x = channels_last_input(shape)
    g = torch.Generator().manual_seed(1)
    weight, bias = (torch.randn(shape[1], generator=g).to(DEVICE) for _ in range(2))
    dy = torch.randn(shape, generator=g).to(DEVICE)
    ours, ours_grad = forward_backward(lambda v: group_norm_act_nhwc(v, weight, bias, groups, 1e-6, silu), x, dy)
    ref, ref_grad = forward_backward(lambda v: reference(v, weight, bias, groups, 1e-6, silu), x, dy)
    assert ours.stride() == x.stride()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_statistics_are_stable_for_a_large_mean(monkeypatch):
    """Per-tile mean and M2 combined by Chan's formula: no E[x^2] - E[x]^2 cancellation."""
    monkeypatch.setattr(gn, "TILE_ELEMENTS", 128)
    x = channels_last_input((1, 16, 8, 8), mean=1000.0, std=0.01)
    mean, rstd = gn.group_norm_statistics(x, 4, 1e-12)
    groups = x.reshape(1, 4, -1).double()  # NCHW-ordered values of each group
    torch.testing.assert_close(mean, groups.mean(-1).float(), rtol=1e-7, atol=0)
    torch.testing.assert_close(rstd, groups.var(-1, unbiased=False).rsqrt().float(), rtol=1e-3, atol=0)
    y = group_norm_act_nhwc(x, torch.ones(16, device=DEVICE), torch.zeros(16, device=DEVICE), 4, 1e-12)
    assert y.std().item() == pytest.approx(1.0, rel=1e-3)


def test_kernels_reject_inputs_they_cannot_take():
    with pytest.raises(ValueError, match="channels-last"):
        gn._layout(torch.randn(2, 16, 4, 4), 4)
    with pytest.raises(ValueError, match="power-of-two channels >= groups; got C=12, groups=4"):
        gn._layout(torch.randn(2, 12, 4, 4).contiguous(memory_format=torch.channels_last), 4)


def test_group_norm_act_uses_pytorch_when_the_affine_parameters_train():
    norm = GroupNormAct(4, 16, silu=True).to(DEVICE)
    x = channels_last_input((2, 16, 4, 4))
    assert not norm.uses_triton(x)  # parameters require grad: the kernels treat them as constants
    # x requires grad too: PyTorch's CPU GroupNorm backward crashes on a channels-last input that does not
    norm(x.requires_grad_(True)).sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
    norm.requires_grad_(False)
    assert norm.uses_triton(x) == (gn.triton is not None and gn.triton_ready(x))
    assert not norm.uses_triton(x.contiguous())  # NCHW input


def tiny_vae():
    from tests.tiny_models import tiny_sd_pipeline

    return tiny_sd_pipeline().vae.to(DEVICE).requires_grad_(False).eval()


def test_fuse_encoder_norms_swaps_every_norm_and_keeps_parameters_and_keys():
    vae = tiny_vae()
    before = {k: v.clone() for k, v in vae.encoder.state_dict().items()}
    norms = sum(isinstance(m, nn.GroupNorm) for m in vae.encoder.modules())
    resnets = [m for m in vae.encoder.modules() if type(m).__name__ == "ResnetBlock2D"]
    assert fuse_encoder_norms(vae.encoder) == norms
    assert all(isinstance(m, GroupNormAct) for m in vae.encoder.modules() if isinstance(m, nn.GroupNorm))
    assert all(isinstance(r.nonlinearity, nn.Identity) and r.norm1.silu and r.norm2.silu for r in resnets)
    assert isinstance(vae.encoder.conv_act, nn.Identity) and vae.encoder.conv_norm_out.silu
    after = vae.encoder.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert fuse_encoder_norms(vae.encoder) == 0  # idempotent


@needs_kernels
def test_channels_last_fused_encoder_matches_the_original_encoder(monkeypatch):
    """The whole tiny VAE encoder: every GroupNorm on the kernels, output and input gradient as before."""
    no_tf32(monkeypatch)
    from guidance.cuda_graphs import VAEMoments

    vae = tiny_vae()
    original = VAEMoments(copy.deepcopy(vae))
    fused = VAEMoments(vae)
    norms = fuse_encoder_norms(vae.encoder)
    fused.to(memory_format=torch.channels_last)
    kernel_calls = []

    def counted(*args):
        kernel_calls.append(args[0].shape)
        return group_norm_act_nhwc(*args)

    monkeypatch.setattr(gn, "group_norm_act_nhwc", counted)
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(2, 3, 64, 64, generator=g) * 2 - 1).to(DEVICE)
    dy = torch.randn(2, 8, 8, 8, generator=g).to(DEVICE)
    ref, ref_grad = forward_backward(original, x, dy)
    ours, ours_grad = forward_backward(fused, x.contiguous(memory_format=torch.channels_last), dy)
    assert len(kernel_calls) == norms  # every norm ran on the kernels (the attention one on [B, C, L])
    for a, b in ((ours, ref), (ours_grad, ref_grad)):  # float32, summation order differs: relative L2
        assert ((a - b).norm() / b.norm()).item() < 1e-5


@needs_kernels
def test_prior_with_a_channels_last_encoder_encodes_as_before(tiny_sd_dir, make_guidance_cfg, monkeypatch):
    """StableDiffusionPrior.use_channels_last_encoder (PipelineParams.vae_channels_last): same latents and
    image gradient, with the encoder's input converted to channels-last."""
    no_tf32(monkeypatch)
    from guidance.stable_diffusion import StableDiffusionPrior

    prior = StableDiffusionPrior.from_config(make_guidance_cfg(model_key=str(tiny_sd_dir)), DEVICE,
                                             dtype=torch.float32)
    prior.set_posterior_sampling(False)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4)).to(DEVICE)

    def encode_with_grad():
        x = images.clone().requires_grad_(True)
        latents = prior.encode(x)
        latents.square().sum().backward()
        return latents.detach(), x.grad

    ref, ref_grad = encode_with_grad()
    prior.use_channels_last_encoder()
    assert prior.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    ours, ours_grad = encode_with_grad()
    for a, b in ((ours, ref), (ours_grad, ref_grad)):
        assert ((a - b).norm() / b.norm()).item() < 1e-5
