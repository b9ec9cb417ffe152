"""Test doubles around a real prior."""
from __future__ import annotations


class RecordingPrior:
    """Forwards to a prior and records, for every denoiser call, its branches and its timestep values."""

    def __init__(self, inner):
        self.inner, self.branches, self.timesteps = inner, [], []
        self.alphas_cumprod, self.device = inner.alphas_cumprod, inner.device

    def predict_noise(self, z_t, t, cond, branches):
        self.branches.append(tuple(branches))
        self.timesteps.append(t.tolist())
        return self.inner.predict_noise(z_t, t, cond, branches)

    def decode(self, z):
        return self.inner.decode(z)

    @property
    def num_train_timesteps(self):
        return self.inner.num_train_timesteps

    @property
    def timestep_grid(self):
        return self.inner.timestep_grid
