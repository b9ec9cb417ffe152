"""Timestep samplers and trajectory segmentation.

All sampling runs on a CPU `torch.Generator`, so a training step never waits on the GPU
to choose its timesteps and the branch `t >= t_threshold` costs no host sync.

Two number lines, as in the official code: a sampler draws an *index* (e.g. U[20, 500 + k) for
SCTD), and the prior's `TimestepGrid` turns it into the *timestep value* the model runs at. Values
index alphas_cumprod and condition the denoiser (see guidance/diffusion.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def _randint(low: int, high: int, generator: torch.Generator) -> int:
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
        return _randint(*self.bounds(rate), generator)


def uniform_edges(num_segments: int, grid: TimestepGrid, first: int = 20, last: int = 980) -> list[int]:
    """Equal segmentation of the trajectory into N_s segments (Sec. 4.3), as official timestep values.

    Official (SegmentDreamer guidance/sctd_utils.py, `trajectory_segmentation`): the indices
    linspace(first, last, N_s + 1) - 1, truncated to integers by tensor indexing, mapped through the
    scheduler's grid. With SD's grid (index + 1) and N_s = 5: [20, 212, 404, 596, 788, 980]. The paper's
    s_0 = 0, s_N = T; the official code uses [min_step, max_step] = [20, 980], which we keep.
    """
    if num_segments < 1:
        raise ValueError(f"GuidanceParams.phase_num must be >= 1, got {num_segments}")
    if first < 1:
        raise ValueError(f"GuidanceParams.t_range[0] must give a first index >= 1 for uniform segments "
                         f"(edges start at index min_step - 1), got min_step = {first}")
    indices = np.linspace(first, last, num_segments + 1) - 1
    return [grid(int(i)) for i in indices]


def monotonic_edges(num_segments: int, t_threshold: int, first: int = 20, last: int = 980) -> list[int]:
    """Monotonically increasing segmentation (Sec. 4.3): s_{m+1} - s_m = t_tau + 2m(T - N_s t_tau)/(N_s(N_s - 1)).

    Official form: T -> last - first (960), t_tau -> t_threshold - first (130), the increment floored,
    and the last edge forced to `last`. N_s = 5, t_threshold = 150 gives [20, 150, 311, 503, 726, 980].
    These are timestep values as they stand (the official code does not map them through the grid).
    """
    if num_segments < 1:
        raise ValueError(f"GuidanceParams.phase_num must be >= 1, got {num_segments}")
    if num_segments == 1:
        return [first, last]
    span, base = last - first, t_threshold - first
    if base <= 0 or num_segments * base >= span:
        raise ValueError(
            f"GuidanceParams.t_threshold={t_threshold} does not fit {num_segments} monotonic segments "
            f"in [{first}, {last}]: need {first} < t_threshold and phase_num * (t_threshold - {first}) < {span}"
        )
    increment = math.floor(2 * (span - num_segments * base) / ((num_segments - 1) * num_segments))
    edges = [first]
    for m in range(num_segments - 1):
        edges.append(edges[-1] + base + m * increment)
    edges.append(last)
    return edges


def segment_edges(mode: str, num_segments: int, t_threshold: int, grid: TimestepGrid,
                  first: int = 20, last: int = 980) -> list[int]:
    """The segment edges s_m (timestep values) between the official min_step `first` and max_step `last`."""
    if mode == "uniform":
        return uniform_edges(num_segments, grid, first, last)
    if mode == "mono":
        return monotonic_edges(num_segments, t_threshold, first, last)
    raise ValueError(f"GuidanceParams.t_mode must be 'uniform' or 'mono', got {mode!r}")


def segment_start(edges: list[int], t: int) -> int:
    """s_m = the largest edge <= t (Algorithm 1, line 5)."""
    candidates = [e for e in edges if e <= t]
    if not candidates:
        raise ValueError(f"timestep {t} lies below the first segment edge {edges[0]}")
    return candidates[-1]


@dataclass(frozen=True)
class SCTDTimesteps:
    t: int  # noisy timestep
    s: int  # intermediate timestep, s_m < s < t
    edge: int  # segment start s_m


def sample_sctd_timesteps(
    window: TimestepWindow,
    edges: list[int],
    rate: float,
    delta_t: int,
    grid: TimestepGrid,
    generator: torch.Generator,
    margin: int = 10,
) -> SCTDTimesteps:
    """Official SCTD timestep rule (SegmentDreamer guidance/sctd_utils.py, `timestep_setting`).

    An index from the sliding window mapped to its timestep value t, s_m the segment start below t,
    t pushed to at least s_m + delta_t, then s ~ U[s_m + margin, t - margin) drawn directly as a value.
    """
    t = grid(window.sample(rate, generator))
    edge = segment_start(edges, t)
    t = max(t, edge + delta_t)
    s = _randint(edge + margin, t - margin, generator)
    return SCTDTimesteps(t=t, s=s, edge=edge)


def ism_interval(rate: float, delta_t: int, delta_t_start: int, annealing: bool, round_up: bool = False) -> int:
    """LucidDreamer's interval delta_T = int(delta_t + rate (delta_t_start - delta_t)) (`train_step`);
    its Perp-Neg path (`train_step_perpneg`) rounds the annealed part up: delta_t + ceil(rate (...))."""
    if not annealing:
        return delta_t
    annealed = rate * (delta_t_start - delta_t)
    return delta_t + math.ceil(annealed) if round_up else int(delta_t + annealed)


def gcs_interval(rate: float, delta_t: int, delta_t_start: int) -> int:
    """GCS interval delta = delta_t + ceil(rate (delta_t_start - delta_t))."""
    return delta_t + math.ceil(rate * (delta_t_start - delta_t))


def cds_timesteps(
    step: int, batch: int, t_start: int, t_end: int, anneal_iters: int, gap: tuple[int, int],
    generator: torch.Generator, lowest: int = 100, highest: int = 980,
) -> tuple[int, torch.Tensor]:
    """Consistent3D's square-root annealed s and per-sample t = s + U[gap) (its threestudio
    guidance/stable_diffusion_guidance.py, `__call__` and `anneal_t`).

    These are timestep values: threestudio conditions the model on them directly, without a
    scheduler grid.
    """
    frac = min(step / anneal_iters, 1.0) if anneal_iters > 0 else 1.0
    s = int(t_start + (t_end - t_start) * math.sqrt(frac))
    s = min(max(s, lowest), highest - gap[0])
    t = s + torch.randint(gap[0], gap[1], (batch,), generator=generator)
    return s, t.clamp(lowest, highest)
