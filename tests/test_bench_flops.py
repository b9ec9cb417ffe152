"""FLOP accounting and kernel classes of the benchmark (bench/flops.py)."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench.flops import classify_kernel, dense_fp16_peak_tflops, kernel_classes, network_flops
from guidance.cuda_graphs import VAEMoments
from tests.tiny_models import tiny_sd_pipeline


@pytest.fixture(scope="module")
def tiny():
    return tiny_sd_pipeline()


def _real_flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e12


def test_meta_count_equals_a_real_run_per_sample(tiny):
    unet, vae = tiny.unet.eval(), tiny.vae.eval()
    flops = network_flops(unet, vae, resolution=64)
    lat = torch.randn(3, 4, 8, 8)
    ctx = torch.randn(3, 77, unet.config.cross_attention_dim)
    # the math backend: the counter has no formula for the CPU flash kernel and would skip attention
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        real = _real_flops(lambda: unet(lat, torch.full((3,), 10), encoder_hidden_states=ctx))
    assert flops.unet_tflop_per_sample == pytest.approx(real / 3, rel=1e-9)
    assert flops.unet_tflop_per_sample > 0


def test_vae_forward_backward_is_about_twice_the_forward(tiny):
    """Gradients go to the input only: every layer's backward costs about its forward."""
    vae = tiny.vae.eval().requires_grad_(False)
    flops = network_flops(tiny.unet, vae, resolution=64)
    with sdpa_kernel(SDPBackend.MATH):
        forward = _real_flops(lambda: VAEMoments(vae)(torch.randn(2, 3, 64, 64))) / 2
    assert 1.9 * forward < flops.vae_tflop_fwd_bwd_per_image < 2.6 * forward


def test_conv_flops_known_answer():
    """One 3x3 conv, 8->16 channels on 32x32: 2 * 32*32 * 16 * 8*9 FLOPs (the counter the module relies on)."""
    conv = torch.nn.Conv2d(8, 16, 3, padding=1, bias=False)
    assert _real_flops(lambda: conv(torch.randn(1, 8, 32, 32))) * 1e12 == 2 * 32 * 32 * 16 * 8 * 9


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H200", 989.4), ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("Tesla T4", None),
])
def test_dense_peak_lookup(name, peak):
    assert dense_fp16_peak_tflops(name) == peak


@pytest.mark.parametrize("kernel,label", [
    ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc", "convolution"),
    ("void cudnn::ops::nchwToNhwcKernel<__half>", "layout copies"),
    ("flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x1_kernel0_0",
     "attention"),
    ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NNT", "matmul"),
    ("triton_per_fused_native_group_norm_silu_3", "normalisation"),
    ("triton_poi_fused_add_mul_7", "fused Triton (norm, activation, elementwise)"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::Half>>",
     "other elementwise and reductions"),
])
def test_classify_kernel(kernel, label):
    assert classify_kernel(kernel) == label


def test_kernel_classes_sums_device_time_per_call_and_skips_cpu_records():
    class Event:
        def __init__(self, key, us, device_type="DeviceType.CUDA"):
            self.key, self.device_time_total, self.device_type = key, us, device_type

    events = [Event("flash_fwd_kernel", 3000), Event("nvjet_hsh_x", 1000), Event("gemm_2", 1000),
              Event("aten::mm", 5000, "DeviceType.CPU")]
    classes = kernel_classes(events, reps=2)
    assert classes == {"attention": 1.5, "matmul": 1.0}
    assert list(classes) == ["attention", "matmul"]
