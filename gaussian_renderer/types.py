"""Inputs and outputs of the Gaussian rasterizer, shared by every backend."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class GaussianTensors:
    """Activated Gaussian parameters, the renderer's only view of the model."""

    means: Tensor  # [N, 3] world positions
    quats: Tensor  # [N, 4] rotations (w, x, y, z), not necessarily normalised
    scales: Tensor  # [N, 3] standard deviations along the local axes (activated)
    opacities: Tensor  # [N] in (0, 1) (activated)
    sh_coeffs: Tensor  # [N, K, 3] spherical-harmonic colour coefficients, K = (sh_degree + 1) ** 2
    sh_degree: int  # degree used for this render (<= the coefficients' degree)


@dataclass
class RenderOutput:
    rgb: Tensor  # [B, 3, H, W] composited colour, background included
    depth: Tensor  # [B, 1, H, W] normalised disparity in [0, 1] (official formula; 1 = nearest)
    alpha: Tensor  # [B, 1, H, W] accumulated opacity (1 - final transmittance)
    means2d: Tensor  # [B, N, 2] projected centres in pixels; holds .grad after backward
    radii: Tensor  # [B, N] integer screen radius in pixels; 0 = not visible
    parts: "list[RenderOutput] | None" = None  # the per-call renders this batch was concatenated from

    def means2d_grad(self) -> Tensor | None:
        """[B, N, 2] dL/dmeans2d after backward (gathered from the parts of a concatenated render)."""
        if self.parts is None:
            return self.means2d.grad
        grads = [p.means2d.grad for p in self.parts]
        if any(g is None for g in grads):
            return None
        return torch.cat(grads)

    @staticmethod
    def concat(outs: "list[RenderOutput]") -> "RenderOutput":
        """Concatenate renders of camera batches along the camera axis."""
        if len(outs) == 1:
            return outs[0]
        return RenderOutput(rgb=torch.cat([o.rgb for o in outs]), depth=torch.cat([o.depth for o in outs]),
                            alpha=torch.cat([o.alpha for o in outs]), means2d=torch.cat([o.means2d for o in outs]),
                            radii=torch.cat([o.radii for o in outs]), parts=outs)
