"""Arithmetic of an iteration: FLOPs of the networks, the GPU's peak, and where measured GPU time goes.

FLOPs are counted by torch.utils.flop_counter (matmuls, convolutions, attention) on meta-device copies
of the networks built from their configs: nothing is allocated or run, so it works on any machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) fp16/bf16 tensor-core peaks from the vendor data sheets, TFLOP/s.
_DENSE_FP16_PEAK = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM / HBM3
    ("A100", 312.0),
    ("L40S", 362.1),
    ("A10G", 70.0),  # sic: the A10G is rated 70 TFLOP/s dense fp16 with fp32 accumulation
)


def dense_fp16_peak_tflops(gpu_name: str) -> float | None:
    """The data-sheet dense fp16 tensor-core peak of a GPU named like torch.cuda.get_device_name(), or None."""
    for key, peak in _DENSE_FP16_PEAK:
        if key.lower() in gpu_name.lower():
            return peak
    return None


@dataclass(frozen=True)
class NetworkFlops:
    unet_tflop_per_sample: float  # one UNet forward of one latent
    vae_tflop_fwd_bwd_per_image: float  # VAE encoder forward + backward to the input, one image


def _count(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e12


def network_flops(unet, vae, resolution: int, text_length: int = 77) -> NetworkFlops:
    """FLOPs of the UNet forward (per latent) and of the VAE-encoder forward+backward (per image) at
    `resolution`, from meta-device copies built from unet.config / vae.config."""
    from guidance.cuda_graphs import VAEMoments

    with torch.device("meta"):
        unet_meta = type(unet).from_config(unet.config).requires_grad_(False)
        vae_meta = type(vae).from_config(vae.config).requires_grad_(False)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    side = resolution // factor
    latents = torch.empty(1, unet.config.in_channels, side, side, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    context = torch.empty(1, text_length, unet.config.cross_attention_dim, device="meta")
    unet_tflop = _count(lambda: unet_meta(latents, t, encoder_hidden_states=context))
    encoder = VAEMoments(vae_meta)
    image = torch.empty(1, vae.config.in_channels, resolution, resolution, device="meta", requires_grad=True)

    def fwd_bwd():
        out = encoder(image)
        out.backward(torch.empty_like(out))

    return NetworkFlops(unet_tflop, _count(fwd_bwd))


_KERNEL_CLASSES = (  # (class, name fragments), first match wins; names lower-cased
    # attention first: cuDNN's attention kernels are named like "..._sdpa_sm90_flash_fprop_..."
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("convolution", ("fprop", "dgrad", "wgrad", "conv", "implicit_convolve", "implicit_gemm")),
    ("matmul", ("gemm", "nvjet", "cutlass", "cublas", "matmul")),
    ("layout copies", ("nchwtonhwc", "nhwctonchw", "transpose", "memcpy", "memset", "copy_kernel")),
    ("normalisation", ("group_norm", "groupnorm", "layer_norm", "layernorm", "batch_norm", "welford")),
    ("fused Triton (norm, activation, elementwise)", ("triton",)),
)


def classify_kernel(name: str) -> str:
    lowered = name.lower()
    for label, fragments in _KERNEL_CLASSES:
        if any(f in lowered for f in fragments):
            return label
    return "other elementwise and reductions"


def kernel_classes(events: Iterable, reps: int = 1) -> dict[str, float]:
    """GPU ms per call by kernel class, largest first, from profiler key averages (objects with `key` and
    `device_time_total` in microseconds) of `reps` calls."""
    totals: dict[str, float] = {}
    for event in events:
        if "CUDA" not in str(getattr(event, "device_type", "CUDA")):
            continue  # CPU-side operator records: their device time would count their kernels twice
        us = getattr(event, "device_time_total", None)
        if us is None:
            us = getattr(event, "cuda_time_total", 0.0)
        label = classify_kernel(event.key)
        totals[label] = totals.get(label, 0.0) + us / 1e3 / reps
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))
