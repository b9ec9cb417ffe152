"""The fast path computes the same gradient as the straightforward path on the same inputs.

fast: one batched rasterizer call, matmul VAE attention (+ CUDA graphs and cuDNN autotuning on a GPU; a
second GPU case runs the schema defaults, which add torch.compile and a channels-last UNet)
straightforward: one rasterizer call per camera, contiguous eager convolutions, fused-kernel VAE attention
(the official structure)
Both run in float32 (TF32 off): relative L2 error < 1e-4 per parameter tensor on the CPU, < 1e-3 on
a GPU (cuDNN may pick other convolution algorithms). In fp16, CFG/Perp-Neg differences of nearly equal
noise predictions of a random-weight model amplify rounding differences to O(1): not a useful check.
"""
import pytest
import torch

from guidance.stable_diffusion import StableDiffusionPrior
from training.trainer import Trainer, apply_pipeline_options
from utils.config import load_config

FAST = ["PipelineParams.render_per_camera=false", "PipelineParams.channels_last=false", "PipelineParams.compile=false",
        "PipelineParams.cuda_graphs=true", "PipelineParams.cudnn_benchmark=true", "PipelineParams.vae_attention=matmul",
        "PipelineParams.vae_channels_last=false"]
STRAIGHT = ["PipelineParams.render_per_camera=true", "PipelineParams.channels_last=false",
            "PipelineParams.compile=false", "PipelineParams.cuda_graphs=false", "PipelineParams.cudnn_benchmark=false",
            "PipelineParams.vae_attention=sdpa", "PipelineParams.vae_channels_last=false"]


def _config(model_dir, mode, device, loss="sctd", perpneg=False):
    return load_config(None, [
        f"GuidanceParams.model_key={model_dir}", f"GuidanceParams.guidance_type={loss}",
        f"GuidanceParams.perpneg={str(perpneg).lower()}", "GuidanceParams.precision=fp32",
        "GuidanceParams.C_batch_size=3", "GuidanceParams.fix_noise=true",
        "GuidanceParams.text='a bagel'", "GenerateCamParams.image_w=64", "GenerateCamParams.image_h=64",
        "GenerateCamParams.init_num_pts=500", "OptimizationParams.as_latent_ratio=0.0",
        "ModelParams.scale_aug_ratio=0.0", f"PipelineParams.device={device}", "PipelineParams.renderer=auto",
    ] + mode, warn_no_effect=False)


def _trainer(cfg, device):
    torch.manual_seed(0)
    prior = StableDiffusionPrior.from_config(cfg.guidance, device)
    apply_pipeline_options(prior, cfg.pipeline)
    return prior, Trainer(cfg, prior=prior, device=torch.device(device))


def _step_gradients(trainer, step):
    """The Gaussians' gradients of `step` (adopting a finished background compilation first, as train_step)."""
    torch.manual_seed(step)
    trainer.adopt_compiled_prior(step)
    trainer.compute_gradients(step)
    grads = {name: p.grad.detach().clone() for name, p in trainer.gaussians.params().items()
             if p.grad is not None and p.numel()}
    trainer.gaussians.optimizer.zero_grad(set_to_none=True)
    return grads


def _gradients(cfg, device, warm_up=False):
    _, trainer = _trainer(cfg, device)
    if warm_up:  # as train.py does: compile and capture before the first step, on private random inputs
        trainer.warm_up_prior()
    _step_gradients(trainer, 1)  # the CUDA graphs are captured on the first call and replayed on the second
    return _step_gradients(trainer, 2)


def _compare(fast, straight, rel_tol, min_cos):
    assert fast.keys() == straight.keys() and {"xyz", "f_dc", "opacity", "scaling"} <= set(fast)
    for name in fast:
        a, b = fast[name].double().flatten(), straight[name].double().flatten()
        if name == "rotation" and a.norm() == 0 and b.norm() == 0:
            continue  # isotropic initial Gaussians: rotations do not change the render
        assert b.norm() > 0, f"{name}: zero gradient"
        rel = ((a - b).norm() / b.norm()).item()
        cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
        print(f"{name}: relative L2 error {rel:.2e}, cosine {cos:.6f}")
        assert rel < rel_tol and cos > min_cos, name


@pytest.mark.parametrize("loss,perpneg", [("sctd", True)])
def test_fast_path_gradient_equals_straightforward_cpu(tiny_sd_dir, loss, perpneg):
    fast = _gradients(_config(tiny_sd_dir, FAST, "cpu", loss, perpneg), "cpu")
    straight = _gradients(_config(tiny_sd_dir, STRAIGHT, "cpu", loss, perpneg), "cpu")
    _compare(fast, straight, rel_tol=1e-4, min_cos=0.99999)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode,warm_up", [(FAST, False), ([], False), ([], True),
                                          (["PipelineParams.compile_dynamic_batch=false"], False),
                                          (["PipelineParams.vae_channels_last=false"], False),
                                          (["PipelineParams.compile_regions=true"], True)],
                         ids=["no-compile", "defaults", "defaults-warmed-up", "static-batch", "contiguous-vae",
                              "regional-warmed-up"])
def test_fast_path_gradient_equals_straightforward_gpu(tiny_sd_dir, monkeypatch, mode, warm_up):
    """defaults = the schema's: torch.compile (one UNet program for every batch size) + CUDA graphs,
    channels-last UNet, matmul VAE attention, channels-last VAE encoder with the Triton NHWC GroupNorm
    kernels; warmed-up: compiled and captured ahead of the first step (train.py's order); regional: only the
    UNet's transformer blocks compiled (guidance/regional_compile.py)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    fast = _gradients(_config(tiny_sd_dir, mode, "cuda", perpneg=True), "cuda", warm_up)
    straight = _gradients(_config(tiny_sd_dir, STRAIGHT, "cuda", perpneg=True), "cuda")
    _compare(fast, straight, rel_tol=1e-3, min_cos=0.9999)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_background_compilation_switches_to_the_same_gradients_gpu(tiny_sd_dir, monkeypatch):
    """train.py's order with PipelineParams.compile_in_background=true: step 1 runs the eager modules (the UNet
    CUDA-graphed) while the UNet and the VAE encoder compile in a background thread; step 2 adopts the compiled
    programs. Both steps' gradients equal the straightforward path's, as the compiled path's do."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)

    prior, background = _trainer(_config(tiny_sd_dir, [], "cuda", perpneg=True), "cuda")
    _, straight = _trainer(_config(tiny_sd_dir, STRAIGHT, "cuda", perpneg=True), "cuda")
    background.warm_up_prior(background=True)
    _compare(_step_gradients(background, 1), _step_gradients(straight, 1), rel_tol=1e-3, min_cos=0.9999)
    assert background.compiled_prior_step is None
    prior.wait_for_background_warm_up()
    _compare(_step_gradients(background, 2), _step_gradients(straight, 2), rel_tol=1e-3, min_cos=0.9999)
    assert background.compiled_prior_step == 2
