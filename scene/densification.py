"""Adaptive density control of the Gaussians: the official clone / split / prune as a strategy object.

Follows the densification of the official `train.py` and `GaussianModel` (zjhJOJO/SegmentDreamer and
EnVision-Research/LucidDreamer `scene/gaussian_model.py`: `add_densification_stats`, `densify_and_clone`,
`densify_and_split`, `prune_points`, `densify_and_prune`, itself the 3DGS one), shaped like gsplat's
`DefaultStrategy` (`gsplat/strategy/default.py`): the strategy owns the rules and its running statistics
(`state_dict()`), is called after the backward pass with the screen-space gradients of the batch, and
changes the model only through GaussianModel's public `params()`, `append`, `keep` and `reset_opacity`.
gsplat's `step_pre_backward` only retains the gradient of the projected means; the renderer here always
keeps it (`RenderOutput.means2d_grad`), so there is no pre-backward step.

Differences from the official code:

- the statistic may take every camera of a batch (OptimizationParams.densify_stats_all_cameras); by
  default it takes the batch's last camera only, as the official camera loop leaves it;
- the screen-size pruning rule is off by default, as it is in effect in the official code (see
  `DensificationStrategy.densify_and_prune`).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from scene.gaussian_model import GaussianModel, quat_to_rotmat

logger = logging.getLogger(__name__)

STATE_VERSION = 1
STAT_NAMES = ("grad2d", "count", "max_radii")


class AllPrunedError(RuntimeError):
    """Pruning would leave no Gaussian; raised after the clones and split children were appended,
    before anything is removed."""


class DensificationStrategy:
    """The official densification schedule and rules, with the statistics gathered between two rounds.

    Rules (OptimizationParams keys, see `from_config`): grad_threshold (densify_grad_threshold),
    min_opacity, percent_dense, max_screen_size (applied after the first opacity reset), the iteration
    window densify_from_iter < step < densify_until_iter every densification_interval, and the opacity
    reset every opacity_reset_interval while densifying. extent: the scene extent (camera radius) that
    percent_dense and the world-size prune are relative to.

    State (per Gaussian, reset after each densification):
        grad2d    [N]  sum of screen-space gradient norms (NDC units) over the cameras that saw it
        count     [N]  number of cameras that saw it
        max_radii [N]  largest screen radius in pixels
    """

    def __init__(
        self,
        *,
        grad_threshold: float,
        min_opacity: float,
        percent_dense: float,
        extent: float,
        max_screen_size: int = 0,
        densify_from_iter: int = 0,
        densify_until_iter: int = 0,
        densification_interval: int = 1,
        opacity_reset_interval: int = 1,
        stats_all_cameras: bool = False,
        screen_size_prune: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if extent <= 0:
            raise ValueError(f"extent must be positive, got {extent}")
        if densification_interval < 1 or opacity_reset_interval < 1:
            raise ValueError(f"densification_interval and opacity_reset_interval must be >= 1, got "
                             f"{densification_interval} and {opacity_reset_interval}")
        self.grad_threshold = float(grad_threshold)
        self.min_opacity = float(min_opacity)
        self.percent_dense = float(percent_dense)
        self.extent = float(extent)
        self.max_screen_size = int(max_screen_size)
        self.densify_from_iter = int(densify_from_iter)
        self.densify_until_iter = int(densify_until_iter)
        self.densification_interval = int(densification_interval)
        self.opacity_reset_interval = int(opacity_reset_interval)
        self.stats_all_cameras = bool(stats_all_cameras)
        self.screen_size_prune = bool(screen_size_prune)
        self.device = torch.device(device)  # where the statistics live: the model's device
        self.generator = generator  # None: split children sample from torch's global generator (official)
        self.grad2d: Tensor | None = None
        self.count: Tensor | None = None
        self.max_radii: Tensor | None = None

    @classmethod
    def from_config(cls, optim: Any, extent: float, device: torch.device | str = "cpu",
                    generator: torch.Generator | None = None) -> DensificationStrategy:
        """The strategy of an OptimizationParams section (duck-typed), its statistics on `device`; split
        children sample from `generator` (a generator on `device`; None: torch's global one, as the official
        code)."""
        return cls(
            grad_threshold=optim.densify_grad_threshold, min_opacity=optim.min_opacity,
            percent_dense=optim.percent_dense, extent=extent, max_screen_size=optim.max_screen_size,
            densify_from_iter=optim.densify_from_iter, densify_until_iter=optim.densify_until_iter,
            densification_interval=optim.densification_interval,
            opacity_reset_interval=optim.opacity_reset_interval,
            stats_all_cameras=optim.densify_stats_all_cameras, generator=generator, device=device,
        )

    # ------------------------------------------------------------------ the loop's entry points

    def collects(self, step: int) -> bool:
        """Whether `step` gathers statistics (and may densify or reset opacities): step < densify_until_iter."""
        return step < self.densify_until_iter

    @torch.no_grad()
    def step_post_backward(
        self, model: GaussianModel, step: int, means2d_grad: Tensor, radii: Tensor, width: int, height: int,
        skip: Tensor | None = None,
    ) -> dict[str, int] | None:
        """After the backward pass (and gradient clipping), before the optimizer step (official order):
        add the statistics, densify on schedule, reset opacities on schedule.

        means2d_grad [B, N, 2], radii [B, N]: the whole batch's cameras, in batch order.
        skip: 0-dim tensor, > 0 when the step's gradients are not finite: its statistics count as
            zero and no densification runs (a NaN/Inf Gaussian is not split).
        Returns the densification counts when it ran, else None. Raises AllPrunedError.
        """
        if not self.collects(step):
            return None
        if skip is not None:
            means2d_grad = torch.where(skip > 0, 0.0, means2d_grad)
        if not self.stats_all_cameras:
            # official train.py: its camera loop overwrites viewspace_point_tensor, visibility_filter and
            # radii, so add_densification_stats and max_radii2D see the batch's last camera only
            means2d_grad, radii = means2d_grad[-1:], radii[-1:]
        self.add_statistics(means2d_grad, radii, width, height)
        counts = None
        densify_now = step > self.densify_from_iter and step % self.densification_interval == 0
        # densification syncs anyway; a skipped step's statistics are not trusted
        if densify_now and (skip is None or not bool(skip)):
            size_threshold = self.max_screen_size if step > self.opacity_reset_interval else None
            counts = self.densify_and_prune(model, size_threshold)
            logger.debug("step %d densify: %s -> %d Gaussians", step, counts, model.num_points)
        if step % self.opacity_reset_interval == 0:
            model.reset_opacity()
        return counts

    # ------------------------------------------------------------------ statistics

    def reset_statistics(self, num_points: int) -> None:
        """Zero statistics for `num_points` Gaussians (a new or replaced model)."""
        self.grad2d = torch.zeros(num_points, device=self.device)  # [N]
        self.count = torch.zeros(num_points, device=self.device)  # [N]
        self.max_radii = torch.zeros(num_points, device=self.device)  # [N]

    @torch.no_grad()
    def add_statistics(self, means2d_grad: Tensor, radii: Tensor, width: int, height: int) -> None:
        """Accumulate screen-space gradient norms from every camera given (B may be 1).

        means2d_grad [B, N, 2]: d loss / d projected centre, pixel units. It is converted to the
            NDC units of the original 3DGS rasterizer (x * W/2, y * H/2), the units of the
            official threshold 0.00075.
        radii [B, N]: screen radius in pixels, 0 where not visible.
        """
        if means2d_grad.ndim != 3 or means2d_grad.shape[2] != 2:
            raise ValueError(f"means2d_grad must be [B, N, 2], got {tuple(means2d_grad.shape)}")
        n = means2d_grad.shape[1]
        if radii.shape != means2d_grad.shape[:2]:
            raise ValueError(f"radii must be [B, N] = {tuple(means2d_grad.shape[:2])}, got {tuple(radii.shape)}")
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        if self.grad2d is None:
            self.reset_statistics(n)
        elif self.grad2d.shape[0] != n:
            raise ValueError(f"statistics are kept for {self.grad2d.shape[0]} Gaussians, the gradients have {n}: "
                             "the model changed outside the strategy (reset_statistics after replacing it)")
        norms = torch.hypot(means2d_grad[..., 0] * (width / 2.0), means2d_grad[..., 1] * (height / 2.0))  # [B, N]
        visible = radii > 0  # [B, N]
        self.grad2d += torch.where(visible, norms, 0.0).sum(0).float()
        self.count += visible.sum(0).float()
        self.max_radii = torch.maximum(self.max_radii, radii.amax(0).float())

    # ------------------------------------------------------------------ clone / split / prune

    @torch.no_grad()
    def densify_and_prune(self, model: GaussianModel, max_screen_size: int | None) -> dict[str, int]:
        """Official clone / split / prune, then reset the statistics.

        Clone where avg grad >= grad_threshold and max scale <= percent_dense * extent; split (2
        children sampled in the parent's Gaussian, scale / 1.6, parent removed) where avg grad >=
        grad_threshold and max scale is larger; prune opacity < min_opacity and, when max_screen_size
        is set, max world scale > 0.1 * extent.

        The official code also tests max_radii2D > max_screen_size, but its densification resets
        max_radii2D to zero just before that test, so the rule never fires. screen_size_prune=True
        applies it with the radii seen since the last densification (new Gaussians exempt).

        Returns the counts {cloned, split, pruned} (split = number of parents split).
        """
        n = model.num_points
        if self.grad2d is None:
            self.reset_statistics(n)
        if self.grad2d.shape[0] != n:
            raise ValueError(f"statistics are kept for {self.grad2d.shape[0]} Gaussians, the model has {n}")
        avg_grad = torch.where(self.count > 0, self.grad2d / self.count, 0.0)
        large_grad = avg_grad >= self.grad_threshold
        small = model.scales.amax(dim=1) <= self.percent_dense * self.extent
        clone_mask = large_grad & small
        split_mask = large_grad & ~small
        radii = self.max_radii
        model.append(self._grown(model, clone_mask, split_mask))

        removed = torch.zeros(model.num_points, dtype=torch.bool, device=model.device)
        removed[:n] = split_mask
        prune = model.opacities < self.min_opacity
        if max_screen_size:
            prune |= model.scales.amax(dim=1) > 0.1 * self.extent
            if self.screen_size_prune:
                prune[:n] |= radii > max_screen_size
        prune &= ~removed
        counts = torch.stack([clone_mask.sum(), split_mask.sum(), prune.sum(), (removed | prune).sum()]).tolist()
        if counts[3] == model.num_points:
            raise AllPrunedError(
                f"densify_and_prune would remove all {model.num_points} Gaussians (opacity below "
                f"{self.min_opacity}, or larger than 0.1 x extent {self.extent:g} when max_screen_size is set)")
        model.keep(~(removed | prune))
        self.reset_statistics(model.num_points)
        return dict(zip(("cloned", "split", "pruned"), counts[:3]))

    def _grown(self, model: GaussianModel, clone_mask: Tensor, split_mask: Tensor) -> dict[str, Tensor]:
        """Raw parameters of the clones followed by the split children (official order)."""
        params = {name: tensor.detach() for name, tensor in model.params().items()}
        clones = {name: tensor[clone_mask] for name, tensor in params.items()}
        children = {name: tensor[split_mask].repeat((2,) + (1,) * (tensor.ndim - 1)) for name, tensor in params.items()}
        stds = torch.exp(children["scaling"])  # [2S, 3]
        samples = torch.normal(torch.zeros_like(stds), stds, generator=self.generator)  # [2S, 3]
        rotmats = quat_to_rotmat(children["rotation"])  # [2S, 3, 3]
        children["xyz"] = children["xyz"] + (rotmats @ samples[..., None]).squeeze(-1)
        children["scaling"] = torch.log(stds / (0.8 * 2))
        return {name: torch.cat([clones[name], children[name]]) for name in params}

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The running statistics (a snapshot: tensors are copied); the rules come from the config."""
        return {"version": STATE_VERSION,
                **{name: None if getattr(self, name) is None else getattr(self, name).clone() for name in STAT_NAMES}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported densification state version {state.get('version')!r}")
        for name in STAT_NAMES:
            value = state[name]
            setattr(self, name, None if value is None else value.to(self.device, torch.float32).clone())
