"""What the losses' timestep rules share: the index -> timestep grid, the warm-up and the sliding window.

Each loss's own rule (SCTD's segments, ISM's and GCS's intervals, CDS's annealing) lives in the loss's
file under guidance/losses/. All sampling runs on a CPU `torch.Generator`, so a training step never
waits on the GPU to choose its timesteps and the branch `t >= t_threshold` costs no host sync.

Two number lines, as in the official code: a sampler draws an *index* (e.g. U[20, 500 + k) for
SCTD), and the prior's `TimestepGrid` turns it into the *timestep value* the model runs at. Values
index alphas_cumprod and condition the denoiser (see guidance/diffusion.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def uniform_integer(low: int, high: int, generator: torch.Generator) -> int:
    """Uniform integer in [low, high) drawn from `generator` (high > low required)."""
    if high <= low:
        raise ValueError(f"empty timestep range [{low}, {high})")
    return int(torch.randint(low, high, (1,), generator=generator))


@dataclass(frozen=True)
class TimestepGrid:
    """Sampled index -> timestep value, following the model's scheduler.

    The official code (LucidDreamer / SegmentDreamer guidance `StableDiffusion.__init__`) calls the
    DDIM scheduler's `set_timesteps(num_train_timesteps)` and flips the result into `timesteps`; a
    sampled index i then stands for `timesteps[i]`. With diffusers' "leading" spacing that is
    i + steps_offset (steps_offset = 1 in the SD 1.x/2.x scheduler configs: index 0 is timestep 1);
    with "linspace" or "trailing" spacing at full resolution it is i itself.
    """

    values: tuple[int, ...]  # [T] ascending timestep values, one per index

    @classmethod
    def with_offset(cls, num_timesteps: int, steps_offset: int) -> "TimestepGrid":
        """The "leading" grid at full resolution: index i -> i + steps_offset."""
        return cls(tuple(range(steps_offset, num_timesteps + steps_offset)))

    def __len__(self) -> int:
        return len(self.values)

    def __call__(self, index: int) -> int:
        if not 0 <= index < len(self.values):
            raise ValueError(f"timestep index {index} outside the scheduler's grid [0, {len(self.values)})")
        return self.values[index]

    def check_reaches(self, highest_index: int, num_timesteps: int) -> None:
        """Raise unless every index up to `highest_index` maps to a timestep the model has (< num_timesteps)."""
        value = self(min(highest_index, len(self) - 1))
        if value >= num_timesteps:
            raise ValueError(
                f"GuidanceParams.max_t_range lets the sampler draw timestep index {highest_index}, which the "
                f"model's scheduler maps to timestep {value}, beyond its last timestep {num_timesteps - 1}; "
                f"lower GuidanceParams.max_t_range (the official 0.98 draws indices up to 979)"
            )


def warm_up_rate(step: int, warmup_iter: int) -> float:
    """1 at the start, falling linearly to 0 at `warmup_iter` (official train.py)."""
    if warmup_iter <= 0:
        return 0.0
    return 1.0 - min(step / warmup_iter, 1.0)


@dataclass(frozen=True)
class TimestepWindow:
    """The annealed sampling window shared by SCTD, ISM, SDS and GCS.

    min_step = 1000 t_range[0], max_step = 1000 t_range[1], warm-up width
    1000 (max_t_range - t_range[1]); k = int(width * warm_up_rate).
    `slide_lower` moves both bounds (SCTD, GCS: [min + k, max + k)); otherwise only the upper
    bound is annealed (LucidDreamer ISM/SDS: [min, max + k)).
    """

    min_step: int
    max_step: int
    warmup_width: int
    slide_lower: bool

    @classmethod
    def from_config(cls, guidance_cfg, num_timesteps: int, slide_lower: bool) -> "TimestepWindow":
        t_lo, t_hi = guidance_cfg.t_range
        return cls(
            min_step=int(num_timesteps * t_lo),
            max_step=int(num_timesteps * t_hi),
            warmup_width=int(num_timesteps * (guidance_cfg.max_t_range - t_hi)),
            slide_lower=slide_lower,
        )

    def bounds(self, rate: float) -> tuple[int, int]:
        k = int(self.warmup_width * rate)
        low = self.min_step + k if self.slide_lower else self.min_step
        return low, self.max_step + k

    @property
    def upper_limit(self) -> int:
        """max_step + warm-up width: the official `max_step` that also bounds SCTD's segment edges."""
        return self.max_step + self.warmup_width

    def sample(self, rate: float, generator: torch.Generator) -> int:
        """A timestep *index* (map it with the prior's TimestepGrid)."""
        return uniform_integer(*self.bounds(rate), generator)
