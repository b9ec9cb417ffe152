"""Diffusion maths shared by every loss: the noise schedule, the first-order ODE step,
prediction-type conversions and the guidance combinations (CFG, Perp-Neg).

Timesteps here are values: integers that index `alphas_cumprod` directly and that the
denoiser is conditioned on (diffusers' convention). The losses sample indices and map them to
values with the prior's scheduler grid, as the official code does (guidance/timesteps.py).
"""
from __future__ import annotations

import torch
from torch import Tensor


class NoiseSchedule:
    """alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t)."""

    def __init__(self, alphas_cumprod: Tensor):
        if alphas_cumprod.ndim != 1:
            raise ValueError(f"alphas_cumprod must be 1-D [T], got {tuple(alphas_cumprod.shape)}")
        abar = alphas_cumprod.detach().to(torch.float64)
        self.alphas_cumprod = alphas_cumprod.detach().float()
        self.alpha = abar.sqrt().float()  # [T]
        self.sigma = (1.0 - abar).sqrt().float()  # [T]
        self.lam = (self.alpha.double().log() - self.sigma.double().log()).float()  # [T]

    @property
    def num_timesteps(self) -> int:
        return self.alpha.shape[0]

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        moved = NoiseSchedule.__new__(NoiseSchedule)
        for name in ("alphas_cumprod", "alpha", "sigma", "lam"):
            setattr(moved, name, getattr(self, name).to(device))
        return moved

    def coefficients(self, t: Tensor, ndim: int = 4) -> tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t) gathered for t [B] and shaped [B, 1, ..., 1] with `ndim` dims."""
        shape = (-1,) + (1,) * (ndim - 1)
        return self.alpha[t].view(shape), self.sigma[t].view(shape)

    def add_noise(self, z0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """z_t = alpha_t z0 + sigma_t eps (Sec. 3 of the paper)."""
        a, s = self.coefficients(t, z0.ndim)
        return a * z0 + s * noise

    def step(self, z: Tensor, eps: Tensor, t: Tensor, s: Tensor) -> Tensor:
        """First-order PF-ODE step from t to s with the noise prediction eps held fixed.

        Eq. 5 (DPM-Solver-1):
            G(z_t, t, s) = (alpha_s/alpha_t) z_t - alpha_s eps int_{lambda_t}^{lambda_s} e^-lambda dlambda
        which is exactly deterministic DDIM: alpha_s * x0_hat + sigma_s * eps. It inverts (s > t)
        and denoises (s < t) with the same formula. Computed in float32 whatever the input dtype.
        """
        a_t, s_t = self.coefficients(t, z.ndim)
        a_s, s_s = self.coefficients(s, z.ndim)
        z32, eps32 = z.float(), eps.float()
        x0 = (z32 - s_t * eps32) / a_t
        return (a_s * x0 + s_s * eps32).to(z.dtype)

    def step_dpm_solver(self, z: Tensor, eps: Tensor, t: Tensor, s: Tensor) -> Tensor:
        """Eq. 5 written literally in lambda space; equal to `step` (kept for the tests)."""
        a_t, _ = self.coefficients(t, z.ndim)
        a_s, _ = self.coefficients(s, z.ndim)
        shape = (-1,) + (1,) * (z.ndim - 1)
        lam_t, lam_s = self.lam[t].view(shape), self.lam[s].view(shape)
        integral = torch.exp(-lam_t) - torch.exp(-lam_s)  # int_{lam_t}^{lam_s} e^-lam dlam
        return ((a_s / a_t) * z.float() - a_s * eps.float() * integral).to(z.dtype)

    def step_scale(self, t: Tensor, e: Tensor) -> Tensor:
        """c(t, e) = alpha_e * (sigma_t/alpha_t - sigma_e/alpha_e): G = (alpha_e/alpha_t) z_t - c * eps."""
        a_t, s_t = self.alpha[t], self.sigma[t]
        a_e, s_e = self.alpha[e], self.sigma[e]
        return a_e * (s_t / a_t - s_e / a_e)

    def pred_x0(self, z: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        a, s = self.coefficients(t, z.ndim)
        return (z.float() - s * eps.float()) / a

    def snr_weight(self, t: Tensor) -> Tensor:
        """w(t) = sigma_t / alpha_t, the DreamFusion/LucidDreamer weighting used by the official code. [B]"""
        return self.sigma[t] / self.alpha[t]


def eps_from_v(v: Tensor, z_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """v-prediction -> epsilon: with v = alpha eps - sigma x0 and z = alpha x0 + sigma eps, eps = alpha v + sigma z."""
    return alpha * v + sigma * z_t


def cfg_combine(eps_neg: Tensor, eps_pos: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance, standard convention: eps_neg + w (eps_pos - eps_neg)."""
    return eps_neg + scale * (eps_pos - eps_neg)


def perpendicular(x: Tensor, y: Tensor) -> Tensor:
    """Component of x orthogonal to y, per sample over all non-batch dims; x, y: [B, ...]."""
    dims = tuple(range(1, x.ndim))
    inner = (x * y).sum(dim=dims, keepdim=True)
    norm2 = (y * y).sum(dim=dims, keepdim=True).clamp_min(1e-6)
    return x - inner / norm2 * y


def perp_neg_combine(
    eps_neg: Tensor, eps_pos: Tensor, eps_components: Tensor, weights: Tensor, scale: float
) -> Tensor:
    """Perp-Neg (Armandpour et al.) as in LucidDreamer/SegmentDreamer.

    eps_neg, eps_pos: [B, C, h, w]; eps_components: [K, B, C, h, w]; weights: [B, K].
    eps = eps_neg + w [d_pos + sum_i w_i perp(d_i, d_pos)], d = eps - eps_neg.
    Components with |w_i| <= 1e-4 contribute nothing (multiplied by zero instead of skipped,
    so that the computation has no data-dependent branch).
    """
    d_pos = eps_pos - eps_neg
    delta = d_pos
    view = (-1,) + (1,) * (eps_pos.ndim - 1)
    for k in range(eps_components.shape[0]):
        w = weights[:, k]
        w = torch.where(w.abs() > 1e-4, w, torch.zeros_like(w)).view(view).to(eps_pos.dtype)
        delta = delta + w * perpendicular(eps_components[k] - eps_neg, d_pos)
    return eps_neg + scale * delta
