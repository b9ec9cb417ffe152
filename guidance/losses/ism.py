"""ISM: Interval Score Matching (LucidDreamer, CVPR 2024), as its official code computes it.

    g = lambda_g * sigma_t/alpha_t * (eps_hat(x_t, t) - eps(x_s, s, empty))

x_s comes from DDIM inversion of the render with the empty prompt, starting at timestep 0
and striding `xs_delta_t` up to s = t - delta_T; x_t is one more inversion step s -> t, and
its noise prediction is the target (EnVision-Research/LucidDreamer `guidance/sd_utils.py`, `train_step`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from guidance.losses.base import DistillationLoss, LossOutput, StepInfo, per_sample_norm
from guidance.losses.registry import register
from guidance.prior import Conditioning
from guidance.timesteps import TimestepWindow, ism_interval


@register
class ISMLoss(DistillationLoss):
    name = "ism"

    def __init__(self, cfg, prior, generator):
        super().__init__(cfg, prior, generator)
        self.window = TimestepWindow.from_config(cfg, prior.num_train_timesteps, slide_lower=False)
        self.stride = int(cfg.xs_delta_t)
        self.max_inversion_steps = int(cfg.xs_inv_steps)

    def __call__(self, z0: Tensor, cond: Conditioning, info: StepInfo) -> LossOutput:
        delta = ism_interval(info.warm_up_rate, self.cfg.delta_t, self.cfg.delta_t_start, self.cfg.annealing_intervals)
        t_val = self.window.sample(info.warm_up_rate, self.generator)
        s_val = max(t_val - delta, 0)
        b = z0.shape[0]
        t, s = self.timesteps(t_val, b), self.timesteps(s_val, b)
        sched = self.schedule
        with torch.no_grad():
            z0 = z0.float()
            x = sched.add_noise(z0, self.noise(z0, info.shard), self.timesteps(0, b))
            x_s = self._invert_to(x, s_val, cond)
            target = self.null_noise(x_s, s, cond)
            x_t = sched.step(x_s, target, s, t)
            eps_guided, _, _ = self.guided_noise(x_t, t, cond)
            residual = eps_guided - target
            weight = self.lambda_guidance * sched.snr_weight(t)
            grad = torch.nan_to_num(weight.view(-1, 1, 1, 1) * residual)
        scalars = {"t": float(t_val), "s": float(s_val), "grad_norm": per_sample_norm(grad)}
        return LossOutput(latent_grad=grad, scalars=scalars)

    def _invert_to(self, x: Tensor, s_val: int, cond: Conditioning) -> Tensor:
        """Empty-prompt DDIM inversion from timestep 0 to s in strides of xs_delta_t (at most xs_inv_steps)."""
        current = 0
        for _ in range(self.max_inversion_steps):
            if current >= s_val:
                break
            nxt = min(current + self.stride, s_val)
            cur_t, nxt_t = self.timesteps(current, x.shape[0]), self.timesteps(nxt, x.shape[0])
            x = self.schedule.step(x, self.null_noise(x, cur_t, cond), cur_t, nxt_t)
            current = nxt
        return x
