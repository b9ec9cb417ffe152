"""Test doubles around a real prior."""
from __future__ import annotations

import math
import time

import torch

from guidance.analytic_prior import AnalyticPrior, mixture_eps
from guidance.background_compile import BackgroundCompile


class RecordingPrior:
    """Forwards to a prior and records, for every denoiser call, its branches and its timestep values."""

    def __init__(self, inner):
        self.inner, self.branches, self.timesteps = inner, [], []
        self.alphas_cumprod, self.device = inner.alphas_cumprod, inner.device

    def predict_noise(self, z_t, t, cond, branches):
        self.branches.append(tuple(branches))
        self.timesteps.append(t.tolist())
        return self.inner.predict_noise(z_t, t, cond, branches)

    def decode(self, z):
        return self.inner.decode(z)

    @property
    def num_train_timesteps(self):
        return self.inner.num_train_timesteps

    @property
    def timestep_grid(self):
        return self.inner.timestep_grid


class BackgroundCompilingPrior(AnalyticPrior):
    """The analytic prior with StableDiffusionPrior's background-compilation protocol (warm_up,
    start_background_warm_up, adopt_compiled_programs): its denoiser maths (mixture_eps) is compiled by
    Dynamo with the "eager" backend (the same ATen ops: outputs bit-identical to the uncompiled ones).

    hold: the background thread starts compiling only after this many denoiser calls, and the call after
    those waits for it, so that the switch falls at a known iteration in the middle of a run."""

    def __init__(self, *args, hold: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.hold = hold
        self.calls = 0
        self.compiled_calls = 0
        self._compiled = torch.compile(mixture_eps, backend="eager")
        self._mixture = mixture_eps
        self._background: BackgroundCompile | None = None

    def predict_noise(self, z_t, t, cond, branches):
        self.calls += 1
        if self._background is not None and self.calls > self.hold:
            while self._background.running:  # the test's rule: the switch comes at the next iteration
                time.sleep(0.01)
        self.compiled_calls += self._mixture is self._compiled
        alpha, sigma = self.alphas_cumprod[t].sqrt(), (1.0 - self.alphas_cumprod[t]).sqrt()
        out = []
        for name in branches:
            means = cond.branches[name]  # [B, K, C, h, w]
            log_w = torch.full((means.shape[1],), -math.log(means.shape[1]), device=z_t.device)
            out.append(self._mixture(z_t, alpha, sigma, means, log_w, self.std))
        return torch.stack(out)

    def _compile_now(self, batch: int, height: int, width: int) -> None:
        g = torch.Generator().manual_seed(0)  # private inputs: no stream of the run moves
        z = torch.randn(batch, 3, height, width, generator=g)
        means = torch.randn(batch, 3, 3, height, width, generator=g)
        self._compiled(z, torch.full((batch,), 0.5), torch.full((batch,), 0.5), means,
                       torch.full((3,), -math.log(3.0)), self.std)

    def warm_up(self, batch: int, height: int, width: int) -> None:
        self._compile_now(batch, height, width)
        self._mixture = self._compiled

    def start_background_warm_up(self, batch: int, height: int, width: int) -> bool:
        def warm_up():
            while self.calls < self.hold:
                time.sleep(0.01)
            self._compile_now(batch, height, width)

        self._background = BackgroundCompile(warm_up, "the analytic denoiser")
        self._background.start()
        return True

    def adopt_compiled_programs(self) -> bool:
        if self._background is None or not self._background.poll():
            return False
        self._mixture = self._compiled
        return True
