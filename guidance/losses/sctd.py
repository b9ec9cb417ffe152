"""SCTD: Segmented Consistency Trajectory Distillation (SegmentDreamer, Eq. 9-11, Algorithm 1).

Notation (paper): z_sm = alpha_sm z0 + sigma_sm eps* with fixed eps*; G^m(z, t, c) is the
first-order step of Eq. 5 from t to the segment start s_m with the noise predicted under c.

    bracket = [G^m(z_s, s, empty) - G^m(z_t, t, empty)]              self-consistency
            + (w + 1) [G^m(z_t, t, empty) - G^m(z_t, t, y)]           cross-consistency
            (+ [z_sm - G^m(z_s, s, empty)]                            generative prior, Eq. 9; off)

With z_t the forward-noised sample, bracket / c(t, s_m) is exactly the SDS residual
eps_hat - eps (Supplementary C-D, Eq. 17-21); the loss injects weight(t) * bracket on z0.

Timesteps (SegmentDreamer guidance/sctd_utils.py, `timestep_setting`): an index drawn from the sliding
window is mapped to the scheduler's timestep t (index + 1 for SD 2.1); the segment edges s_m are
timestep values, and s ~ U[s_m + 10, t - 10) is drawn as a value.

Defaults follow the official code (SegmentDreamer guidance/sctd_utils.py, `train_step`):
  * z_t comes from z_sm by one (t < t_threshold) or two (s_m -> s -> t) unconditional DDIM
    inversion steps (Eq. 11, with the inner step going s -> t);
  * G^m(z_t, t, empty) is approximated by z_sm (Sec. 4.4), saving a denoiser call;
  * the cross term and Phi(z_t, t, s, y) use the CFG prediction, not the pure conditional;
  * weight = lambda_guidance * sigma_t / alpha_t, no 1/B.
Config switches select the paper's form: `sctd_cross_prediction: cond`, `sctd_approximate_null:
false`, `sctd_generative_prior: true`, `sctd_weighting: paper` (weight / c(t, s_m), the SDS
gradient the bracket stands for).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from guidance.losses.base import BatchShard, DistillationLoss, LossOutput, NoiseSource, StepInfo, per_sample_norm
from guidance.losses.registry import register
from guidance.prior import Conditioning
from guidance.timesteps import TimestepGrid, TimestepWindow, uniform_integer


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
    s = uniform_integer(edge + margin, t - margin, generator)
    return SCTDTimesteps(t=t, s=s, edge=edge)


def consistency_terms(
    z_sm: Tensor, g_s_null: Tensor, g_t_null: Tensor, g_t_y: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The three terms of Eq. 9 (all [B, C, h, w]):

    self  = G^m(z_s, s, empty) - G^m(z_t, t, empty)
    cross = (w + 1) (G^m(z_t, t, empty) - G^m(z_t, t, y))
    prior = z_sm - G^m(z_s, s, empty)
    Their sum times 1 / c(t, s_m) is the SDS residual eps_empty + (w + 1)(eps_y - eps_empty) - eps
    when z_t = alpha_t z0 + sigma_t eps (Supplementary C-D).
    """
    return g_s_null - g_t_null, (scale + 1.0) * (g_t_null - g_t_y), z_sm - g_s_null


@register
class SCTDLoss(DistillationLoss):
    name = "sctd"

    def __init__(self, cfg, prior, generator):
        super().__init__(cfg, prior, generator)
        self.window = self.make_window(slide_lower=True)
        self.edges = segment_edges(cfg.t_mode, cfg.phase_num, cfg.t_threshold, self.grid,
                                   self.window.min_step, self.window.upper_limit)
        self.t_threshold = int(cfg.t_threshold)
        self.delta_t = int(cfg.delta_t)
        self.cross_prediction = cfg.sctd_cross_prediction
        self.approximate_null = bool(cfg.sctd_approximate_null)
        self.generative_prior = bool(cfg.sctd_generative_prior)
        self.weighting = cfg.sctd_weighting
        self.w_cp = float(cfg.w_cp)
        self.rgb_scale = float(cfg.rgb_scale)

    def make_noise_source(self) -> NoiseSource:
        # The official fixed noise uses a smaller channel offset with Perp-Neg (`train_step_perpneg`).
        offset = 0.05 if (self.cfg.perpneg and self.cfg.fix_noise) else 0.1
        return NoiseSource(fixed=self.cfg.fix_noise, offset=offset, seed=self.cfg.noise_seed)

    def sample_timesteps(self, rate: float) -> SCTDTimesteps:
        return sample_sctd_timesteps(self.window, self.edges, rate, self.delta_t, self.grid, self.generator)

    def __call__(self, z0: Tensor, cond: Conditioning, info: StepInfo) -> LossOutput:
        return self.direction(z0, cond, self.sample_timesteps(info.warm_up_rate), info.shard)

    def direction(self, z0: Tensor, cond: Conditioning, ts: SCTDTimesteps,
                  shard: BatchShard | None = None) -> LossOutput:
        """The injected gradient for explicit timestep values (t, s, s_m); `shard`: these rows of a larger
        batch (their noise is those rows of the whole batch's noise, 1/B is over the whole batch)."""
        b = z0.shape[0]
        t, s, e = (self.timesteps(v, b) for v in (ts.t, ts.s, ts.edge))
        sched = self.schedule
        with torch.no_grad():
            z0 = z0.float()
            z_e = sched.add_noise(z0, self.noise(z0, shard), e)
            eps_e = self.null_noise(z_e, e, cond)
            z_t = self._invert(z_e, eps_e, e, s, t, cond, two_steps=ts.t >= self.t_threshold)
            extra = () if self.approximate_null else ("null",)
            eps_guided, eps_pos, extras = self.guided_noise(z_t, t, cond, extra)
            eps_y = eps_guided if self.cross_prediction == "cfg" else eps_pos
            z_s = sched.step(z_t, eps_y, t, s)  # Phi(z_t, t, s, y)
            g_s_null = sched.step(z_s, self.null_noise(z_s, s, cond), s, e)  # G^m(z_s, s, empty)
            g_t_null = z_e if self.approximate_null else sched.step(z_t, extras["null"], t, e)
            g_t_y = sched.step(z_t, eps_y, t, e)  # G^m(z_t, t, y)
            self_term, cross_term, prior_term = consistency_terms(
                z_e, g_s_null, g_t_null, g_t_y, self.guidance_scale)
            bracket = self_term + cross_term + (prior_term if self.generative_prior else 0.0)
            weight = self.lambda_guidance * sched.snr_weight(t)
            if self.weighting == "paper":
                weight = weight / sched.step_scale(t, e)
            grad = torch.nan_to_num(weight.view(-1, 1, 1, 1) * bracket)
            pixel_grad = (self._pixel_constraint(z_e, eps_e, g_t_y, e, cond, b if shard is None else shard.total)
                          if self.w_cp > 0 else None)
        scalars = {
            "t": float(ts.t), "s": float(ts.s), "s_m": float(ts.edge),
            "self_norm": per_sample_norm(self_term), "cross_norm": per_sample_norm(cross_term),
            "grad_norm": per_sample_norm(grad),
        }
        return LossOutput(latent_grad=grad, pixel_grad=pixel_grad, scalars=scalars)

    def _invert(self, z_e, eps_e, e, s, t, cond, two_steps: bool) -> Tensor:
        """Eq. 11: z_sm -> z_t by unconditional DDIM inversion, via s when t >= t_threshold."""
        if not two_steps:
            return self.schedule.step(z_e, eps_e, e, t)
        z_s = self.schedule.step(z_e, eps_e, e, s)
        return self.schedule.step(z_s, self.null_noise(z_s, s, cond), s, t)

    def _pixel_constraint(self, z_e, eps_e, g_t_y, e, cond, batch_total: int) -> Tensor:
        """Optional GCS-style pixel constraint of the official code (w_cp > 0, `train_step`'s L_cp).

        Gradient on the rendered RGB (also when the prior saw the depth map):
        2 w_cp rgb_scale (D(x0_null) - D(x0_cond)) / B, with
        x0_cond from the guided prediction at (G^m(z_t, t, y), s_m) and x0_null from eps(z_sm, s_m, empty)
        (which the inversion already computed).
        """
        sched = self.schedule
        eps_cond_e, _, _ = self.guided_noise(g_t_y, e, cond)
        x0_cond = sched.pred_x0(g_t_y, eps_cond_e, e)
        x0_null = sched.pred_x0(z_e, eps_e, e)
        decoded = self.prior.decode(torch.cat([x0_null, x0_cond]).to(z_e.dtype)).float()
        d_null, d_cond = decoded.chunk(2)
        return 2.0 * self.w_cp * self.rgb_scale * (d_null - d_cond) / batch_total
