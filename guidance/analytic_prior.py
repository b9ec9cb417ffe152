"""A diffusion prior whose exact denoiser is known in closed form: a test bench for the whole pipeline.

A hidden ground-truth Gaussian scene is rendered at the requested cameras. In pixel space
(z = 2x - 1 at render resolution) the conditional distribution of a view is an isotropic
Gaussian N(mu, s^2 I) around that render; the unconditional one (negative prompt, empty
prompt, Perp-Neg components) is a mixture of mu and a few colour-shifted distractors. For a
mixture of N(mu_k, s^2 I) with weights w_k and z_t = a x + sigma eps:

    r_k ~ w_k exp(-|z_t - a mu_k|^2 / (2 (a^2 s^2 + sigma^2)))
    E[x | z_t] = sum_k r_k (mu_k + a s^2 / (a^2 s^2 + sigma^2) (z_t - a mu_k))
    eps = (z_t - a E[x | z_t]) / sigma

Distilling any loss from this prior must recover the hidden scene: a known answer for the
whole pipeline, with no downloaded model.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from gaussian_renderer import render
from guidance.prior import Conditioning, DiffusionPrior
from guidance.timesteps import TimestepGrid
from scene.cameras import Cameras
from scene.gaussian_model import rgb_to_sh
from scene.gaussian_tensors import GaussianTensors
from scene.ply_format import load_gaussian_ply

PROCEDURAL_SCENES = ("blobs", "snowman", "dumbbell")


# The steps_offset of SD 1.x/2.x's scheduler config: with SD's noise schedule and SD's index -> timestep
# grid, a timestep draw means the same noise level here as with Stable Diffusion.
STABLE_DIFFUSION_STEPS_OFFSET = 1


def stable_diffusion_alphas_cumprod(num_timesteps: int = 1000) -> Tensor:
    """SD's scaled_linear schedule (beta 0.00085 -> 0.012), so that timesteps mean the same as with SD."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, num_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def mixture_posterior_mean(
    z_t: Tensor, alpha: Tensor, sigma: Tensor, means: Tensor, log_weights: Tensor, std: float
) -> Tensor:
    """E[x | z_t] for a mixture of isotropic Gaussians.

    z_t: [B, ...]; alpha, sigma: [B]; means: [B, K, ...] component means; log_weights: [K] or [B, K].
    Returns [B, ...].
    """
    b, k = means.shape[:2]
    z = z_t.reshape(b, 1, -1).float()
    mu = means.reshape(b, k, -1).float()
    a = alpha.float().view(b, 1, 1)
    var = a.square() * std**2 + sigma.float().view(b, 1, 1).square()  # [B, 1, 1]
    diff = z - a * mu  # [B, K, D]
    logits = log_weights.float().expand(b, k) - diff.square().sum(-1) / (2.0 * var[:, :, 0])
    resp = torch.softmax(logits, dim=1).unsqueeze(-1)  # [B, K, 1]
    component_means = mu + (a * std**2 / var) * diff
    return (resp * component_means).sum(1).reshape(z_t.shape)


def mixture_eps(z_t: Tensor, alpha: Tensor, sigma: Tensor, means: Tensor, log_weights: Tensor, std: float) -> Tensor:
    """The exact epsilon-prediction (z_t - a E[x | z_t]) / sigma of the mixture. Shapes as above."""
    x_mean = mixture_posterior_mean(z_t, alpha, sigma, means, log_weights, std)
    view = (-1,) + (1,) * (z_t.ndim - 1)
    return (z_t.float() - alpha.float().view(view) * x_mean) / sigma.float().view(view)


def _sphere_cluster(center: Sequence[float], radius: float, rgb: Sequence[float], count: int,
                    generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    direction = torch.randn(count, 3, generator=generator)
    direction = direction / direction.norm(dim=1, keepdim=True)
    r = radius * torch.rand(count, 1, generator=generator) ** (1 / 3)
    means = torch.tensor(center) + r * direction
    colors = torch.tensor(rgb).expand(count, 3) + 0.05 * torch.randn(count, 3, generator=generator)
    scales = torch.full((count, 3), radius * 0.35)
    return means, colors.clamp(0, 1), scales


def procedural_scene(name: str, seed: int = 0) -> GaussianTensors:
    """A small hidden scene (a few hundred Gaussians, within the unit ball), deterministic in `seed`."""
    g = torch.Generator().manual_seed(seed)
    if name == "blobs":
        parts = [_sphere_cluster(c, 0.18, rgb, 40, g) for c, rgb in [
            ((0.0, 0.0, 0.0), (0.9, 0.3, 0.2)), ((0.3, 0.1, 0.1), (0.2, 0.7, 0.3)),
            ((-0.25, 0.15, 0.2), (0.2, 0.3, 0.9)), ((0.05, -0.3, -0.15), (0.9, 0.8, 0.2)),
            ((-0.1, 0.25, -0.3), (0.8, 0.3, 0.8)),
        ]]
    elif name == "snowman":
        parts = [_sphere_cluster(c, r, rgb, n, g) for c, r, rgb, n in [
            ((0.0, 0.0, -0.3), 0.3, (0.95, 0.95, 0.95), 80), ((0.0, 0.0, 0.15), 0.2, (0.9, 0.9, 0.95), 60),
            ((0.0, 0.2, 0.2), 0.06, (1.0, 0.5, 0.0), 10),
        ]]
    elif name == "dumbbell":
        parts = [_sphere_cluster(c, r, rgb, n, g) for c, r, rgb, n in [
            ((-0.35, 0.0, 0.0), 0.22, (0.8, 0.2, 0.2), 60), ((0.35, 0.0, 0.0), 0.22, (0.2, 0.2, 0.8), 60),
            ((0.0, 0.0, 0.0), 0.1, (0.7, 0.7, 0.7), 30),
        ]]
    else:
        raise ValueError(
            f"GuidanceParams.analytic_scene must be one of {PROCEDURAL_SCENES} or a .ply path, got {name!r}"
        )
    means, colors, scales = (torch.cat(x) for x in zip(*parts))
    n = means.shape[0]
    return GaussianTensors(
        means=means, quats=torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(n, 4).contiguous(),
        scales=scales, opacities=torch.full((n,), 0.9),
        sh_coeffs=rgb_to_sh(colors).unsqueeze(1), sh_degree=0,
    )


def load_hidden_scene(spec: str, seed: int = 0) -> GaussianTensors:
    """A procedural scene by name, or any standard 3DGS PLY file."""
    if spec.endswith(".ply"):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"GuidanceParams.analytic_scene: no PLY file at {path.resolve()}")
        model = load_gaussian_ply(path)
        with torch.no_grad():
            return model.gaussian_tensors(sh_degree=model.max_sh_degree)
    return procedural_scene(spec, seed)


def _detach(scene: GaussianTensors, device: torch.device) -> GaussianTensors:
    return GaussianTensors(
        means=scene.means.detach().to(device), quats=scene.quats.detach().to(device),
        scales=scene.scales.detach().to(device), opacities=scene.opacities.detach().to(device),
        sh_coeffs=scene.sh_coeffs.detach().to(device), sh_degree=scene.sh_degree,
    )


class AnalyticPrior(DiffusionPrior):
    """Closed-form prior around renders of a hidden scene (see module docstring)."""

    def __init__(self, scene: GaussianTensors, std: float = 0.05, num_distractors: int = 2, seed: int = 0,
                 device: torch.device | str = "cpu", backend: str = "auto",
                 steps_offset: int = STABLE_DIFFUSION_STEPS_OFFSET):
        if std <= 0:
            raise ValueError(f"GuidanceParams.analytic_std must be > 0, got {std}")
        if num_distractors < 0:
            raise ValueError(f"GuidanceParams.analytic_distractors must be >= 0, got {num_distractors}")
        self.device = torch.device(device)
        self.scene = _detach(scene, self.device)
        self.std = float(std)
        self.backend = backend
        self.alphas_cumprod = stable_diffusion_alphas_cumprod().to(self.device)
        self._timestep_grid = TimestepGrid.with_offset(self.alphas_cumprod.shape[0], steps_offset)
        g = torch.Generator().manual_seed(seed)
        # Distractors: the target with a strong constant colour shift per component (in z units).
        self.distractor_shifts = (0.6 * (2 * torch.rand(num_distractors, 3, generator=g) - 1)).to(self.device)

    @classmethod
    def from_config(cls, guidance_cfg, device, backend: str = "auto") -> "AnalyticPrior":
        scene = load_hidden_scene(guidance_cfg.analytic_scene, guidance_cfg.analytic_seed)
        return cls(scene, guidance_cfg.analytic_std, guidance_cfg.analytic_distractors,
                   guidance_cfg.analytic_seed, device, backend)

    @property
    def timestep_grid(self) -> TimestepGrid:
        """SD's "leading" grid (index + steps_offset); no scheduler config of its own."""
        return self._timestep_grid

    def set_prompts(self, text: str, negative: str = "") -> None:
        """No-op: the analytic prior's target is its hidden scene (GuidanceParams.analytic_*), not a text,
        so a prompt changes nothing here, exactly as GuidanceParams.text does when the prior is built."""

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return images * 2.0 - 1.0  # deterministic: nothing drawn

    def decode(self, latents: Tensor) -> Tensor:
        return ((latents + 1.0) / 2.0).clamp(0.0, 1.0)

    def set_posterior_sampling(self, sample: bool) -> None:
        """A no-op: the encoder z = 2x - 1 is deterministic."""

    @torch.no_grad()
    def reference_images(self, cameras: Cameras, background: Tensor | None = None) -> Tensor:
        """[B, 3, H, W] renders of the hidden scene in [0, 1]."""
        cameras = cameras.to(self.device)
        if background is None:
            background = torch.zeros(len(cameras), 3, device=self.device)
        return render(self.scene, cameras, background.to(self.device), backend=self.backend).rgb

    def condition(self, cameras: Cameras, background: Tensor | None = None) -> Conditioning:
        target = self.encode(self.reference_images(cameras, background))  # [B, 3, H, W]
        shifts = self.distractor_shifts.view(1, -1, 3, 1, 1)
        mixture = torch.cat([target.unsqueeze(1), (target.unsqueeze(1) + shifts).clamp(-1, 1)], dim=1)
        branches = {"pos": target.unsqueeze(1), "neg": mixture, "null": mixture}
        return Conditioning(branches=branches, spatial=True)

    def predict_noise(self, z_t: Tensor, t: Tensor, cond: Conditioning, branches: Sequence[str]) -> Tensor:
        alpha, sigma = self.alphas_cumprod[t].sqrt(), (1.0 - self.alphas_cumprod[t]).sqrt()
        out = []
        for name in branches:
            means = cond.branches[name]  # [B, K, C, h, w]
            log_w = torch.full((means.shape[1],), -math.log(means.shape[1]), device=z_t.device)
            out.append(mixture_eps(z_t, alpha, sigma, means, log_w, self.std))
        return torch.stack(out)
