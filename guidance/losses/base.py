"""What every distillation loss shares: its output type, the noise policy, guided predictions.

A loss receives the working-space samples z0 of the current renders (detached) and returns
the gradient direction it injects on z0 (and, for the pixel constraints of GCS/SCTD, on the
rendered RGB). The trainer turns that into a surrogate loss <sg(g), z0> (+ <sg(g_px), x>) whose
backward runs through the encoder and the renderer. No loss ever back-propagates through the
denoiser, so every prior call runs without autograd.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from guidance.diffusion import NoiseSchedule, cfg_combine, perp_neg_combine
from guidance.prior import Conditioning, DiffusionPrior
from guidance.timesteps import TimestepWindow


@dataclass
class LossOutput:
    latent_grad: Tensor  # [B, C, h, w] dL/dz0 injected on the working-space samples
    pixel_grad: Tensor | None = None  # [B, 3, H, W] dL/dx on the rendered RGB (even when the prior saw depth), or None
    scalars: dict[str, Tensor | float] = field(default_factory=dict)  # logged every log_interval


@dataclass(frozen=True)
class BatchShard:
    """The rows [start, stop) of a step's camera batch of `total` that this process handles.

    With one asset trained on several processes, every process draws the randomness of the whole
    batch (the same on every process) and keeps its rows, and batch-size normalisations use
    `total`, so the union of the shards computes exactly the one-process step.
    """

    start: int
    stop: int
    total: int

    def __post_init__(self):
        if not 0 <= self.start <= self.stop <= self.total or self.total < 1:
            raise ValueError(f"need 0 <= start <= stop <= total and total >= 1, got "
                             f"start={self.start}, stop={self.stop}, total={self.total}")

    @classmethod
    def whole(cls, batch: int) -> "BatchShard":
        return cls(0, batch, batch)

    @property
    def size(self) -> int:
        return self.stop - self.start

    def take(self, x: Tensor) -> Tensor:
        """This shard's rows of a tensor whose first dimension is the whole batch."""
        if x.shape[0] != self.total:
            raise ValueError(f"expected a whole batch of {self.total} rows, got {tuple(x.shape)}")
        return x[self.start:self.stop]


@dataclass(frozen=True)
class StepInfo:
    step: int  # 1-based training iteration
    warm_up_rate: float  # 1 -> 0 over OptimizationParams.warmup_iter
    shard: BatchShard | None = None  # this process's rows of the batch; None = the whole batch

    def batch_total(self, local: int) -> int:
        """The whole step's batch size (the normaliser of the official 1/B factors)."""
        return local if self.shard is None else self.shard.total


class NoiseSource:
    """The noise eps of z_t = alpha_t z0 + sigma_t eps, fixed for the run or fresh every step.

    The recipe is the official one: randn(B, C, h, w) + offset * randn(1, C, 1, 1) (per-channel
    "offset noise"). `shared` draws one noise map for the whole batch (Consistent3D).
    """

    def __init__(self, fixed: bool, offset: float, seed: int, shared: bool = False):
        self.fixed = fixed
        self.offset = offset
        self.shared = shared
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._noise: Tensor | None = None

    def _draw(self, shape: torch.Size, device: torch.device) -> Tensor:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        b = 1 if self.shared else shape[0]
        base = torch.randn((b, *shape[1:]), generator=self._generator, device=device)
        offset = torch.randn((1, shape[1], 1, 1), generator=self._generator, device=device)
        return (base + self.offset * offset).expand(shape)

    def __call__(self, like: Tensor, shard: BatchShard | None = None) -> Tensor:
        """Noise shaped like `like` ([B, C, h, w]); with a shard, this shard's rows of the whole
        batch's draw (so the stream does not depend on how the batch is split)."""
        shape = like.shape if shard is None else torch.Size((shard.total, *like.shape[1:]))
        if shard is not None and like.shape[0] != shard.size:
            raise ValueError(f"a shard of {shard.size} rows got a batch of {like.shape[0]}")
        if not self.fixed:
            noise = self._draw(shape, like.device)
        else:
            if self._noise is None or self._noise.shape != shape or self._noise.device != like.device:
                self._noise = self._draw(shape, like.device).contiguous()
            noise = self._noise
        return noise if shard is None else shard.take(noise)

    def state_dict(self) -> dict:
        return {
            "generator": None if self._generator is None else self._generator.get_state(),
            "noise": self._noise,
        }

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        if state["generator"] is not None:
            self._generator = torch.Generator(device=device)
            self._generator.set_state(state["generator"])
        self._noise = None if state["noise"] is None else state["noise"].to(device)


class DistillationLoss:
    """Base class: subclasses set `name` and implement `__call__`."""

    name: ClassVar[str]

    def __init__(self, cfg, prior: DiffusionPrior, generator: torch.Generator):
        self.cfg = cfg
        self.prior = prior
        self.schedule = NoiseSchedule(prior.alphas_cumprod).to(prior.device)
        self.generator = generator  # CPU generator for timesteps
        self.grid = prior.timestep_grid  # sampled index -> timestep value
        self.guidance_scale = float(cfg.guidance_scale)
        self.lambda_guidance = float(cfg.lambda_guidance)
        self.noise = self.make_noise_source()

    def make_noise_source(self) -> NoiseSource:
        return NoiseSource(fixed=self.cfg.fix_noise, offset=0.1, seed=self.cfg.noise_seed)

    def __call__(self, z0: Tensor, cond: Conditioning, info: StepInfo) -> LossOutput:
        raise NotImplementedError

    def make_window(self, slide_lower: bool) -> TimestepWindow:
        """The annealed index window of the config, checked against the model's timestep grid."""
        window = TimestepWindow.from_config(self.cfg, len(self.grid), slide_lower)
        self.grid.check_reaches(window.upper_limit - 1, self.prior.num_train_timesteps)
        return window

    def state_dict(self) -> dict:
        """The random state a resumed run needs: the timestep generator and the noise source(s)."""
        return {"generator": self.generator.get_state(), "noise": self.noise.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.noise.load_state_dict(state["noise"], self.prior.device)

    def timesteps(self, value: int | Tensor, batch: int) -> Tensor:
        """[B] long tensor on the prior's device (no host sync)."""
        if isinstance(value, Tensor):
            return value.to(self.prior.device, torch.long)
        return torch.full((batch,), value, dtype=torch.long, device=self.prior.device)

    def null_noise(self, z: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """eps(z, t, empty prompt): the unconditional ODE of every inversion/consistency step."""
        return self.prior.predict_noise(z, t, cond, ("null",))[0].float()

    def guided_noise(
        self, z: Tensor, t: Tensor, cond: Conditioning, extra: tuple[str, ...] = ()
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """CFG (or Perp-Neg) noise in ONE batched call; `extra` branches ride along in the same call.

        Returns (guided eps, pure conditional eps, {extra branch: eps}), all float32.
        """
        branches = ("neg", "pos") + (("perp1", "perp2") if cond.perp_neg else ()) + extra
        eps = self.prior.predict_noise(z, t, cond, branches).float()
        eps_neg, eps_pos = eps[0], eps[1]
        if cond.perp_neg:
            guided = perp_neg_combine(eps_neg, eps_pos, eps[2:4], cond.perp_neg_weights, self.guidance_scale)
        else:
            guided = cfg_combine(eps_neg, eps_pos, self.guidance_scale)
        extras = {name: eps[len(branches) - len(extra) + i] for i, name in enumerate(extra)}
        return guided, eps_pos, extras


def per_sample_norm(x: Tensor) -> Tensor:
    """Mean over the batch of the per-sample L2 norm (a logging scalar, stays on device)."""
    return x.flatten(1).norm(dim=1).mean()
