"""GCS: Guided Consistency Sampling (Connecting Consistency Distillation to Score Distillation,
ECCV 2024) as its official code computes it (LMozart/ECCV2024-GCS-BEG `guidance/gcs_utils.py`,
`train_step`; the loss as defined in the SegmentDreamer supplementary, Sec. A).

    L = lambda_g (w_cc L_CC + w_gc L_CG + w_cp L_CP)

with e < s < t, x_e = alpha_e z0 + sigma_e n, x_t from two empty-prompt inversion steps e -> s -> t,
  L_CC = |Phi(x_t, t->e; eps_0) - sg Phi(Phi(x_t, t->s; eps_hat), s->e; eps_0)|^2 / B   (compact consistency)
  L_CG = |x0(x_e, e; eps_0) - sg x0(Phi(x_t, t->e; eps_hat), e; eps_hat_e)|^2 / B      (conditional guidance)
  L_CP = |x - sg(x + D(x0_y) - D(x0_0))|^2 / B, x the rendered RGB                     (pixel constraint)
Their gradients on z0 (treating denoiser outputs as constants, dx_t/dz0 = alpha_t):
  2 w_cc alpha_e (x_e^(t) - x_e^(s)) / B  and  2 w_gc (x0_0 - x0_y) / B; on the image 2 w_cp (D(x0_0) - D(x0_y)) / B.
Noise is fresh every step without Perp-Neg and fixed with it (an official quirk, kept).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from guidance.losses.base import DistillationLoss, LossOutput, NoiseSource, StepInfo, per_sample_norm
from guidance.losses.registry import register
from guidance.prior import Conditioning
from guidance.timesteps import uniform_integer


def gcs_interval(rate: float, delta_t: int, delta_t_start: int) -> int:
    """GCS interval delta = delta_t + ceil(rate (delta_t_start - delta_t))."""
    return delta_t + math.ceil(rate * (delta_t_start - delta_t))


@register
class GCSLoss(DistillationLoss):
    name = "gcs"

    def __init__(self, cfg, prior, generator):
        super().__init__(cfg, prior, generator)
        self.window = self.make_window(slide_lower=True)
        self.fresh_noise = NoiseSource(fixed=False, offset=0.1, seed=cfg.noise_seed)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "fresh_noise": self.fresh_noise.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.fresh_noise.load_state_dict(state["fresh_noise"], self.prior.device)

    def sample_timesteps(self, rate: float) -> tuple[int, int, int]:
        """(t, s, e) timestep values: indices drawn as in GCS guidance/gcs_utils.py (`train_step`), each
        mapped through the scheduler's grid."""
        delta = gcs_interval(rate, self.cfg.delta_t, self.cfg.delta_t_start)
        t = max(self.window.sample(rate, self.generator), delta + 1)
        s = t - delta
        e = max(uniform_integer(max(t - 2 * delta, 0), max(t - delta - 10, 1), self.generator), 1)
        return self.grid(t), self.grid(s), self.grid(e)

    def __call__(self, z0: Tensor, cond: Conditioning, info: StepInfo) -> LossOutput:
        t_val, s_val, e_val = self.sample_timesteps(info.warm_up_rate)
        b = z0.shape[0]
        n = info.batch_total(b)  # the official 1/B is over the whole step's batch
        t, s, e = (self.timesteps(v, b) for v in (t_val, s_val, e_val))
        sched = self.schedule
        with torch.no_grad():
            z0 = z0.float()
            noise = self.noise(z0, info.shard) if cond.perp_neg else self.fresh_noise(z0, info.shard)
            x_e = sched.add_noise(z0, noise, e)
            eps_e = self.null_noise(x_e, e, cond)
            x_s_inv = sched.step(x_e, eps_e, e, s)
            x_t = sched.step(x_s_inv, self.null_noise(x_s_inv, s, cond), s, t)
            eps_hat_t, _, extras = self.guided_noise(x_t, t, cond, extra=("null",))
            x_s = sched.step(x_t, eps_hat_t, t, s)
            x_e_from_t = sched.step(x_t, extras["null"], t, e)  # online
            x_e_from_s = sched.step(x_s, self.null_noise(x_s, s, cond), s, e)  # target
            x_e_guided = sched.step(x_t, eps_hat_t, t, e)
            eps_hat_e, _, _ = self.guided_noise(x_e_guided, e, cond)
            x0_y = sched.pred_x0(x_e_guided, eps_hat_e, e)
            x0_null = sched.pred_x0(x_e, eps_e, e)
            alpha_e = sched.alpha[e].view(-1, 1, 1, 1)
            g_cc = 2.0 * self.cfg.w_cc * alpha_e * (x_e_from_t - x_e_from_s) / n
            g_cg = 2.0 * self.cfg.w_gc * (x0_null - x0_y) / n
            grad = torch.nan_to_num(self.lambda_guidance * (g_cc + g_cg))
            pixel_grad = None
            if self.cfg.w_cp > 0:
                decoded = self.prior.decode(torch.cat([x0_null, x0_y]).to(z0.dtype)).float()
                d_null, d_y = decoded.chunk(2)
                scale = self.lambda_guidance * 2.0 * self.cfg.w_cp * self.cfg.rgb_scale / n
                pixel_grad = scale * (d_null - d_y)
        scalars = {
            "t": float(t_val), "s": float(s_val), "e": float(e_val),
            "cc_norm": per_sample_norm(g_cc), "cg_norm": per_sample_norm(g_cg), "grad_norm": per_sample_norm(grad),
        }
        return LossOutput(latent_grad=grad, pixel_grad=pixel_grad, scalars=scalars)
