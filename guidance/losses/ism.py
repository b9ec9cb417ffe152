"""ISM: Interval Score Matching (LucidDreamer, CVPR 2024), as its official code computes it.

    g = lambda_g * sigma_t/alpha_t * (eps_hat(x_t, t) - eps(x_s, s, empty))

(LucidDreamer guidance/sd_utils.py, `train_step` / `train_step_perpneg` and `add_noise_with_cfg`.)
Indices: i_t ~ U[min_step, max_step + k), i_s = max(i_t - delta_T, 0); each index i stands for the
scheduler's timestep grid(i) (i + 1 for SD 2.1). x_s comes from empty-prompt DDIM inversion of the
render that starts at index max(i_s - xs_delta_t * xs_inv_steps, 0) and strides xs_delta_t indices
up to i_s (grid(0), grid(200), ... = 1, 201, 401, ... for SD 2.1); x_t is one more inversion step
s -> t, and its noise prediction is the target.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from guidance.losses.base import DistillationLoss, LossOutput, StepInfo, per_sample_norm
from guidance.losses.registry import register
from guidance.prior import Conditioning


def ism_interval(rate: float, delta_t: int, delta_t_start: int, annealing: bool, round_up: bool = False) -> int:
    """LucidDreamer's interval delta_T = int(delta_t + rate (delta_t_start - delta_t)) (`train_step`);
    its Perp-Neg path (`train_step_perpneg`) rounds the annealed part up: delta_t + ceil(rate (...))."""
    if not annealing:
        return delta_t
    annealed = rate * (delta_t_start - delta_t)
    return delta_t + math.ceil(annealed) if round_up else int(delta_t + annealed)


@register
class ISMLoss(DistillationLoss):
    name = "ism"

    def __init__(self, cfg, prior, generator):
        super().__init__(cfg, prior, generator)
        self.window = self.make_window(slide_lower=False)
        self.stride = int(cfg.xs_delta_t)
        self.max_inversion_steps = int(cfg.xs_inv_steps)

    def sample_indices(self, rate: float, perp_neg: bool) -> tuple[int, int]:
        """(i_t, i_s): the Perp-Neg path rounds the annealed interval up, the plain path down."""
        cfg = self.cfg
        delta = ism_interval(rate, cfg.delta_t, cfg.delta_t_start, cfg.annealing_intervals, round_up=perp_neg)
        i_t = self.window.sample(rate, self.generator)
        return i_t, max(i_t - delta, 0)

    def __call__(self, z0: Tensor, cond: Conditioning, info: StepInfo) -> LossOutput:
        i_t, i_s = self.sample_indices(info.warm_up_rate, cond.perp_neg)
        t_val, s_val = self.grid(i_t), self.grid(i_s)
        b = z0.shape[0]
        t, s = self.timesteps(t_val, b), self.timesteps(s_val, b)
        sched = self.schedule
        with torch.no_grad():
            z0 = z0.float()
            x_s = self._invert_to(z0, self.noise(z0, info.shard), i_s, cond)
            target = self.null_noise(x_s, s, cond)
            x_t = sched.step(x_s, target, s, t)
            eps_guided, _, _ = self.guided_noise(x_t, t, cond)
            residual = eps_guided - target
            weight = self.lambda_guidance * sched.snr_weight(t)
            grad = torch.nan_to_num(weight.view(-1, 1, 1, 1) * residual)
        scalars = {"t": float(t_val), "s": float(s_val), "grad_norm": per_sample_norm(grad)}
        return LossOutput(latent_grad=grad, scalars=scalars)

    def _invert_to(self, z0: Tensor, noise: Tensor, i_s: int, cond: Conditioning) -> Tensor:
        """x_s: noise z0 to the start index, then empty-prompt DDIM inversion in strides of xs_delta_t
        indices up to i_s (at most xs_inv_steps of them, which then end exactly at i_s)."""
        b = z0.shape[0]
        current = max(i_s - self.stride * self.max_inversion_steps, 0)
        x = self.schedule.add_noise(z0, noise, self.timesteps(self.grid(current), b))
        while current < i_s:
            nxt = min(current + self.stride, i_s)
            cur_t, nxt_t = self.timesteps(self.grid(current), b), self.timesteps(self.grid(nxt), b)
            x = self.schedule.step(x, self.null_noise(x, cur_t, cond), cur_t, nxt_t)
            current = nxt
        return x
