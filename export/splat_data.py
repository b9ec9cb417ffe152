"""Gaussian splats as plain arrays in a file's frame: what every splat writer and reader exchanges.

The standard 3DGS PLY, `.spz` and SOG hold the same quantities in different encodings. This module is
the one place that turns a trained model (or a PLY) into those quantities, in the axis convention of
the file being written (scene/orientation.py), and back: a writer takes a `SplatData`, a reader
returns one, and a round-trip test compares two of them attribute by attribute.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from scene.gaussian_model import GaussianModel, num_sh_coeffs
from scene.orientation import UP_AXES, rotate_gaussians, world_to_export
from scene.ply_format import load_gaussian_ply


class SplatDataError(ValueError):
    """Splat arrays that no file may hold: wrong shapes, non-finite values, no splats."""


@dataclass(frozen=True)
class SplatData:
    """N Gaussian splats, in the raw (pre-activation) parametrisation of the 3DGS PLY.

    means       [N, 3] float32  centres, in the file frame named by `up_axis`
    log_scales  [N, 3] float32  natural log of the standard deviations (PLY `scale_*`)
    quats       [N, 4] float32  unit quaternions (w, x, y, z) (PLY `rot_*`, normalised)
    opacity_logits [N] float32  logit of the opacity (PLY `opacity`)
    sh_dc       [N, 3] float32  degree-0 SH coefficient per colour channel (PLY `f_dc_*`)
    sh_rest     [N, K, 3] float32  higher-degree coefficients, coefficient-major, K = (degree + 1)^2 - 1
                (the PLY stores them channel-major: f_rest_{c * K + k} = sh_rest[:, k, c])
    up_axis     the axis convention of the coordinates ("-y", "y" or "z", see scene/orientation.py)
    """

    means: np.ndarray
    log_scales: np.ndarray
    quats: np.ndarray
    opacity_logits: np.ndarray
    sh_dc: np.ndarray
    sh_rest: np.ndarray
    up_axis: str = "-y"

    def __post_init__(self) -> None:
        n = self.means.shape[0] if self.means.ndim == 2 else -1
        expected = {
            "means": (n, 3), "log_scales": (n, 3), "quats": (n, 4), "opacity_logits": (n,), "sh_dc": (n, 3),
        }
        for name, shape in expected.items():
            array = getattr(self, name)
            if array.shape != shape:
                raise SplatDataError(f"{name} must be {shape}, got {array.shape}")
        if self.sh_rest.ndim != 3 or self.sh_rest.shape[0] != n or self.sh_rest.shape[2] != 3:
            raise SplatDataError(f"sh_rest must be [N, K, 3] with N = {n}, got {self.sh_rest.shape}")
        if self.sh_rest.shape[1] not in (num_sh_coeffs(d) - 1 for d in range(4)):
            raise SplatDataError(f"sh_rest has {self.sh_rest.shape[1]} coefficients: no SH degree 0-3 has that many")
        if self.up_axis not in UP_AXES:
            raise SplatDataError(f"up_axis must be one of {UP_AXES}, got {self.up_axis!r}")

    @property
    def num_splats(self) -> int:
        return self.means.shape[0]

    @property
    def sh_degree(self) -> int:
        return round((self.sh_rest.shape[1] + 1) ** 0.5) - 1

    def check_writable(self, source: str) -> None:
        """SplatDataError naming `source` (the file or run the splats came from) when no file should hold
        them: no splats, or a non-finite value in any attribute."""
        if self.num_splats == 0:
            raise SplatDataError(f"{source} holds no Gaussians: there is nothing to export")
        for name in ("means", "log_scales", "quats", "opacity_logits", "sh_dc", "sh_rest"):
            bad = ~np.isfinite(getattr(self, name))
            if bad.any():
                rows = np.flatnonzero(bad.reshape(self.num_splats, -1).any(axis=1))
                raise SplatDataError(f"{source}: {rows.size} Gaussians have non-finite {name} (first index "
                                     f"{rows[0]}); a compressed file cannot hold them: fix or prune them first")

    # ------------------------------------------------------------------ conversions

    @classmethod
    def from_model(cls, model: GaussianModel, up_axis: str = "-y") -> SplatData:
        """The model's splats (training world, z up) rotated into the `up_axis` file frame."""
        params = {name: tensor.detach().cpu().float() for name, tensor in model.params().items()}
        features = torch.cat([params["f_dc"], params["f_rest"]], dim=1)  # [N, K + 1, 3]
        means, quats = params["xyz"], torch.nn.functional.normalize(params["rotation"], dim=-1)
        if up_axis != "z":
            means, quats, features = rotate_gaussians(means, quats, features, world_to_export(up_axis))
        return cls(
            means=means.numpy().astype(np.float32),
            log_scales=params["scaling"].numpy().astype(np.float32),
            quats=quats.numpy().astype(np.float32),
            opacity_logits=params["opacity"][:, 0].numpy().astype(np.float32),
            sh_dc=features[:, 0].numpy().astype(np.float32),
            sh_rest=features[:, 1:].numpy().astype(np.float32),
            up_axis=up_axis,
        )

    @classmethod
    def from_ply(cls, path: str | os.PathLike, up_axis: str = "-y") -> SplatData:
        """A standard 3DGS PLY (its recorded up axis is honoured, see scene/ply_format.py), in `up_axis`."""
        return cls.from_model(load_gaussian_ply(path), up_axis)

    def to_model(self, device: str | torch.device = "cpu") -> GaussianModel:
        """A GaussianModel in the training world (z up) holding these splats (no optimizer)."""
        means, quats = torch.from_numpy(self.means).float(), torch.from_numpy(self.quats).float()
        features = torch.cat([torch.from_numpy(self.sh_dc).float()[:, None], torch.from_numpy(self.sh_rest).float()],
                             dim=1)
        if self.up_axis != "z":
            means, quats, features = rotate_gaussians(means, quats, features, world_to_export(self.up_axis).T)
        return GaussianModel.from_params({
            "xyz": means, "f_dc": features[:, :1], "f_rest": features[:, 1:],
            "opacity": torch.from_numpy(self.opacity_logits).float()[:, None],
            "scaling": torch.from_numpy(self.log_scales).float(), "rotation": quats,
        }, device)
