"""CUDA-graph replay of the fixed-shape network calls of a training step.

The SD UNet at batch 4-8 is launch-bound in eager mode (~1,000 kernels per forward), so
replaying a captured graph removes most of its cost. Every distinct input signature gets
its own graph; all graphs of one runner share a memory pool, which is safe because they
replay one after another on the same stream.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


class GraphedForward:
    """Replays a no-grad forward `fn(*tensors) -> Tensor` from a CUDA graph per input signature.

    The returned tensor is the graph's static output: it is overwritten by the next replay of
    the same signature, so callers copy what they keep.
    """

    def __init__(self, fn: Callable[..., Tensor], name: str, warmup: int = 2):
        self.fn = fn
        self.name = name
        self.warmup = warmup
        self.pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[tuple, tuple[list[Tensor], Tensor, torch.cuda.CUDAGraph]] = {}

    def __call__(self, *args: Tensor) -> Tensor:
        key = tuple((tuple(a.shape), a.dtype, a.stride()) for a in args)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(args)
        static_inputs, static_output, graph = entry
        for static, value in zip(static_inputs, args):
            static.copy_(value)
        graph.replay()
        return static_output

    @torch.no_grad()
    def _capture(self, args: tuple[Tensor, ...]) -> tuple[list[Tensor], Tensor, torch.cuda.CUDAGraph]:
        log.info("capturing a CUDA graph of %s for inputs %s", self.name, [tuple(a.shape) for a in args])
        static_inputs = [a.clone() for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a background compilation (guidance/background_compile.py) may allocate and launch
        # on its own stream while this thread captures; only this thread's calls are checked
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            static_output = self.fn(*static_inputs)
        return static_inputs, static_output, graph


class VAEMoments(nn.Module):
    """Encoder + quant_conv of an AutoencoderKL: images in [-1, 1] -> posterior moments [B, 2C, h, w]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = getattr(vae, "quant_conv", None)

    def forward(self, x: Tensor) -> Tensor:
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h
