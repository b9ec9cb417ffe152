"""`GaussianTensors`: the activated Gaussian parameters, the one view of a scene that the renderer takes.

It lives with the scene it describes (beside `Cameras`), so that the renderer imports the scene's types
and the scene never imports the renderer. Producers: `GaussianModel.gaussian_tensors` (the trained
scene) and the analytic prior's hidden scenes; `gaussian_renderer.render` validates it.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class GaussianTensors:
    """N activated Gaussians."""

    means: Tensor  # [N, 3] world positions
    quats: Tensor  # [N, 4] rotations (w, x, y, z), not necessarily normalised
    scales: Tensor  # [N, 3] standard deviations along the local axes (activated)
    opacities: Tensor  # [N] in (0, 1) (activated)
    sh_coeffs: Tensor  # [N, K, 3] spherical-harmonic colour coefficients, K = (sh_degree + 1) ** 2
    sh_degree: int  # degree used for this render (<= the coefficients' degree)
