"""SDS: Score Distillation Sampling (DreamFusion) as LucidDreamer's 3DGS switch computes it.

    g = lambda_g * sigma_t/alpha_t * (eps_hat(z_t, t) - eps),  z_t = alpha_t z0 + sigma_t eps

with fresh noise every step (unless fix_noise) and LucidDreamer's timestep window: t is the
scheduler's timestep of an index drawn from U[min_step, max_step + k) (LucidDreamer
guidance/sd_utils.py, `train_step` with `sds: true`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from guidance.losses.base import DistillationLoss, LossOutput, StepInfo, per_sample_norm
from guidance.losses.registry import register
from guidance.prior import Conditioning


@register
class SDSLoss(DistillationLoss):
    name = "sds"

    def __init__(self, cfg, prior, generator):
        super().__init__(cfg, prior, generator)
        self.window = self.make_window(slide_lower=False)

    def __call__(self, z0: Tensor, cond: Conditioning, info: StepInfo) -> LossOutput:
        t_val = self.grid(self.window.sample(info.warm_up_rate, self.generator))
        t = self.timesteps(t_val, z0.shape[0])
        with torch.no_grad():
            z0 = z0.float()
            noise = self.noise(z0, info.shard)
            z_t = self.schedule.add_noise(z0, noise, t)
            eps_guided, _, _ = self.guided_noise(z_t, t, cond)
            weight = self.lambda_guidance * self.schedule.snr_weight(t)
            grad = torch.nan_to_num(weight.view(-1, 1, 1, 1) * (eps_guided - noise))
        return LossOutput(latent_grad=grad, scalars={"t": float(t_val), "grad_norm": per_sample_norm(grad)})
