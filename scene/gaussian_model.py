"""The trainable 3D Gaussian model: parameters, their activations, the Adam optimizer and lr schedules.

Follows the official `GaussianModel` (zjhJOJO/SegmentDreamer and EnVision-Research/LucidDreamer
`scene/gaussian_model.py`, itself the 3DGS one): `create_from_pcd`, `training_setup` and the learning-rate
schedules, the per-tensor gradient clipping, `reset_opacity` and `reset_brightness` (BEG). The official
class also densifies and writes PLYs; here densification is a strategy with its own statistics
(scene/densification.py) that changes the model only through `append`, `keep` and `replace`, and the
PLY layout lives in scene/ply_format.py. Differences:

- stored parameters are plain leaf tensors (no `nn.Module`), one Adam group per tensor;
- `state_dict()` holds exactly this state (parameters, SH degree, lr schedule, optimizer), nothing of
  densification.

Stored (raw) parameters and their activations:

    _means         [N, 3]       identity
    _features_dc   [N, 1, 3]    SH degree-0 coefficients
    _features_rest [N, K-1, 3]  higher SH coefficients, K = (max_sh_degree + 1) ** 2
    _opacity       [N, 1]       logit  -> sigmoid
    _scaling       [N, 3]       log    -> exp
    _rotation      [N, 4]       raw quaternion (w, x, y, z) -> normalize
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree
from torch import Tensor

from scene.gaussian_tensors import GaussianTensors

logger = logging.getLogger(__name__)

SH_C0 = 0.28209479177387814
# Official scale augmentation: s <- clamp(s + N(0, 1) * sqrt(0.2) * s / 4, min=0).
SCALE_NOISE_STD = math.sqrt(0.2) / 4.0
# Adam group names, in the official order, and the attribute each one optimises.
PARAM_NAMES: dict[str, str] = {
    "xyz": "_means",
    "f_dc": "_features_dc",
    "f_rest": "_features_rest",
    "opacity": "_opacity",
    "scaling": "_scaling",
    "rotation": "_rotation",
}
SCHEDULED_GROUPS = ("xyz", "f_dc", "scaling", "rotation")
# 2: no densification statistics, no percent_dense (scene/densification.py owns them); version 1 states
# still load (for python -m export.mesh on an older run), their extra entries ignored
CHECKPOINT_VERSION = 2
READABLE_VERSIONS = (1, 2)
VISIBLE_OPACITY = 1.0 / 255.0  # below this a Gaussian adds less than one 8-bit level to any pixel


def rgb_to_sh(rgb: Tensor) -> Tensor:
    """Colour in [0, 1] -> degree-0 SH coefficient."""
    return (rgb - 0.5) / SH_C0


def sh_to_rgb(sh: Tensor) -> Tensor:
    """Degree-0 SH coefficient -> colour (0.5 + C0 * sh)."""
    return sh * SH_C0 + 0.5


def num_sh_coeffs(sh_degree: int) -> int:
    return (sh_degree + 1) ** 2


def exponential_lr(step: int, lr_init: float, lr_final: float, max_steps: int) -> float:
    """Log-linear interpolation from lr_init (step 0) to lr_final (step >= max_steps).

    The official `get_expon_lr_func` with lr_delay_steps = 0. Negative steps give 0.
    """
    if max_steps <= 0:
        raise ValueError(f"max_steps must be positive, got {max_steps}")
    if step < 0 or (lr_init == 0.0 and lr_final == 0.0):
        return 0.0
    if lr_init <= 0.0 or lr_final <= 0.0:
        raise ValueError(f"learning rates must both be positive (or both 0), got {lr_init} -> {lr_final}")
    t = min(max(step / max_steps, 0.0), 1.0)
    return math.exp(math.log(lr_init) * (1.0 - t) + math.log(lr_final) * t)


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Quaternions (w, x, y, z), normalised here, -> rotation matrices.

    quats [N, 4] -> [N, 3, 3]
    """
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    rows = (
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    )
    return torch.stack(rows, dim=-1).reshape(quats.shape[:-1] + (3, 3))


def knn_mean_sq_dist(points: np.ndarray, k: int = 3) -> np.ndarray:
    """Mean squared distance of each point to its k nearest other points (simple_knn's distCUDA2).

    points [N, 3] -> [N] float64
    """
    n = points.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 points to estimate initial scales, got {n}")
    k = min(k, n - 1)
    dist, _ = cKDTree(points).query(points, k=k + 1)
    return np.mean(dist[:, 1:] ** 2, axis=1)


def _adam_fused(device: torch.device) -> bool:
    """Fused Adam (CUDA and CPU kernels): one kernel per step, and the only implementation that can
    skip a step on the device from a `found_inf` flag (see `GaussianModel.optimizer_step`)."""
    return device.type in ("cuda", "cpu")


def _as_float_tensor(value: Tensor | np.ndarray, name: str, device: torch.device) -> Tensor:
    tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, Tensor) else value)
    if tensor.ndim != 2 or tensor.shape[1] != 3:
        raise ValueError(f"{name} must be [N, 3], got {tuple(tensor.shape)}")
    return tensor.to(device=device, dtype=torch.float32)


class GaussianModel:
    """3D Gaussians with their Adam optimizer and learning-rate schedules."""

    def __init__(self, max_sh_degree: int, device: str | torch.device = "cpu") -> None:
        if not 0 <= max_sh_degree <= 3:
            raise ValueError(f"max_sh_degree must be in [0, 3], got {max_sh_degree}")
        self.max_sh_degree = max_sh_degree
        self.active_sh_degree = 0
        self.device = torch.device(device)
        self.spatial_lr_scale = 0.0
        self.optimizer: torch.optim.Adam | None = None
        self._lr_schedule: dict[str, Any] | None = None
        self._set_params(self._empty_params(0))

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_points(
        cls,
        xyz: Tensor | np.ndarray,
        rgb: Tensor | np.ndarray,
        max_sh_degree: int,
        opacity: float = 0.1,
        device: str | torch.device = "cpu",
    ) -> GaussianModel:
        """Official `create_from_pcd`: isotropic kNN scales, identity rotations, constant opacity.

        xyz [N, 3], rgb [N, 3] in [0, 1]
        """
        model = cls(max_sh_degree, device)
        means = _as_float_tensor(xyz, "xyz", model.device)
        colors = _as_float_tensor(rgb, "rgb", model.device)
        if colors.shape[0] != means.shape[0]:
            raise ValueError(f"xyz and rgb differ in length: {means.shape[0]} vs {colors.shape[0]}")
        if not 0.0 < opacity < 1.0:
            raise ValueError(f"opacity must be in (0, 1), got {opacity}")
        n = means.shape[0]
        dist2 = np.maximum(knn_mean_sq_dist(means.detach().cpu().double().numpy()), 1e-7)
        log_scale = torch.from_numpy(np.log(np.sqrt(dist2))).to(model.device, torch.float32)
        params = model._empty_params(n)
        params["xyz"] = means.clone()
        params["f_dc"] = rgb_to_sh(colors)[:, None, :]
        params["opacity"] = torch.full((n, 1), math.log(opacity / (1.0 - opacity)), device=model.device)
        params["scaling"] = log_scale[:, None].repeat(1, 3)
        params["rotation"][:, 0] = 1.0
        model._set_params(params)
        logger.info("Initialised %d Gaussians (SH degree %d)", n, max_sh_degree)
        return model

    @classmethod
    def from_params(cls, params: dict[str, Tensor], device: str | torch.device = "cpu") -> GaussianModel:
        """A model holding the given raw parameters (the `params()` layout: xyz [N, 3], f_dc [N, 1, 3],
        f_rest [N, K - 1, 3], opacity [N, 1], scaling [N, 3], rotation [N, 4]); its SH degree follows
        from f_rest and is active; no optimizer."""
        n_rest = params["f_rest"].shape[1]
        degrees = [d for d in range(4) if num_sh_coeffs(d) - 1 == n_rest]
        if not degrees:
            raise ValueError(f"f_rest has {n_rest} coefficients: no SH degree 0-3 has that many")
        model = cls(degrees[0], device)
        expected = model._empty_params(params["xyz"].shape[0])
        for name, empty in expected.items():
            if name not in params or tuple(params[name].shape) != tuple(empty.shape):
                got = tuple(params[name].shape) if name in params else "missing"
                raise ValueError(f"parameter {name} must be {tuple(empty.shape)}, got {got}")
        model._set_params(params)
        model.active_sh_degree = degrees[0]
        return model

    def _empty_params(self, n: int) -> dict[str, Tensor]:
        k = num_sh_coeffs(self.max_sh_degree)
        shapes = {
            "xyz": (n, 3), "f_dc": (n, 1, 3), "f_rest": (n, k - 1, 3),
            "opacity": (n, 1), "scaling": (n, 3), "rotation": (n, 4),
        }
        return {name: torch.zeros(shape, device=self.device) for name, shape in shapes.items()}

    def _set_params(self, params: dict[str, Tensor]) -> None:
        """Install new leaf tensors (no optimizer bookkeeping); contiguous, as fused Adam requires (an
        expanded view given to `from_params` would abort it)."""
        for name, attr in PARAM_NAMES.items():
            tensor = params[name].detach().to(self.device, torch.float32).contiguous()
            setattr(self, attr, tensor.requires_grad_(True))

    # ------------------------------------------------------------------ views

    @property
    def num_points(self) -> int:
        return self._means.shape[0]

    def params(self) -> dict[str, Tensor]:
        """The optimised leaf tensors by group name (xyz, f_dc, f_rest, opacity, scaling, rotation)."""
        return {name: getattr(self, attr) for name, attr in PARAM_NAMES.items()}

    @property
    def means(self) -> Tensor:
        return self._means  # [N, 3]

    @property
    def scales(self) -> Tensor:
        return torch.exp(self._scaling)  # [N, 3]

    @property
    def opacities(self) -> Tensor:
        return torch.sigmoid(self._opacity).squeeze(-1)  # [N]

    @property
    def quats(self) -> Tensor:
        return F.normalize(self._rotation, dim=-1)  # [N, 4]

    @property
    def features(self) -> Tensor:
        return torch.cat([self._features_dc, self._features_rest], dim=1)  # [N, K, 3]

    def check_usable(self, source: str) -> None:
        """Gaussians read from a file (a PLY, a checkpoint) must be finite and some of them visible:
        ValueError naming `source` and what is wrong otherwise (NaN would render black or crash later)."""
        bad = {name: int((~torch.isfinite(t.detach()).reshape(t.shape[0], -1).all(dim=1)).sum())
               for name, t in self.params().items()}
        bad = {name: count for name, count in bad.items() if count}
        if bad:
            raise ValueError(f"{source}: {max(bad.values())} of {self.num_points} Gaussians have NaN or infinite "
                             f"values (in {', '.join(sorted(bad))}); the file is damaged or comes from a diverged run")
        if not bool((self.opacities >= VISIBLE_OPACITY).any()):
            raise ValueError(f"{source}: all {self.num_points} Gaussians are transparent (opacity < 1/255): nothing "
                             "would be seen; was the file saved right after an opacity reset?")

    def one_up_sh_degree(self) -> None:
        """Official `oneupSHdegree` (called every 500 iterations); saturates at max_sh_degree."""
        self.active_sh_degree = min(self.active_sh_degree + 1, self.max_sh_degree)

    def gaussian_tensors(self, sh_degree: int | None = None, scale_noise: Tensor | None = None) -> GaussianTensors:
        """Activated parameters for the renderer.

        sh_degree: degree to render with (default: active_sh_degree); the coefficients are cut to
            (sh_degree + 1) ** 2.
        scale_noise: standard-normal noise for the official scale augmentation,
            scales <- clamp(s + noise * sqrt(0.2) * s / 4, min=0): [N, 3], or [B, N, 3] for one draw
            per camera (the official `render()` draws per call); the scales then have its shape.
        """
        degree = self.active_sh_degree if sh_degree is None else sh_degree
        if not 0 <= degree <= self.max_sh_degree:
            raise ValueError(f"sh_degree must be in [0, {self.max_sh_degree}], got {degree}")
        scales = self.scales
        if scale_noise is not None:
            if scale_noise.shape[-2:] != scales.shape or scale_noise.dim() not in (2, 3):
                raise ValueError(f"scale_noise must be [N, 3] or [B, N, 3] with N, 3 = {tuple(scales.shape)}, "
                                 f"got {tuple(scale_noise.shape)}")
            scales = torch.clamp_min(scales + scale_noise * (SCALE_NOISE_STD * scales), 0.0)
        return GaussianTensors(
            means=self._means,
            quats=self.quats,
            scales=scales,
            opacities=self.opacities,
            sh_coeffs=self.features[:, : num_sh_coeffs(degree)],
            sh_degree=degree,
        )

    # ------------------------------------------------------------------ optimizer

    def setup_optimizer(self, optim: Any, spatial_lr_scale: float) -> None:
        """Official `training_setup`: one Adam group per tensor (eps 1e-15) and the lr schedules.

        optim: the OptimizationParams config section (duck-typed).
        spatial_lr_scale: scene extent; multiplies the xyz learning rates.
        """
        if spatial_lr_scale <= 0:
            raise ValueError(f"spatial_lr_scale must be positive, got {spatial_lr_scale}")
        if optim.iterations <= 0:
            raise ValueError(f"OptimizationParams.iterations must be positive, got {optim.iterations}")
        self.spatial_lr_scale = float(spatial_lr_scale)
        self._lr_schedule = {
            "max_steps": int(optim.iterations),
            "xyz": (optim.position_lr_init * spatial_lr_scale, optim.position_lr_final * spatial_lr_scale),
            "f_dc": (optim.feature_lr, optim.feature_lr_final),
            "f_rest": (optim.feature_lr / 20.0, None),
            "opacity": (optim.opacity_lr, None),
            "scaling": (optim.scaling_lr, optim.scaling_lr_final),
            "rotation": (optim.rotation_lr, optim.rotation_lr_final),
        }
        self._build_optimizer()

    def _build_optimizer(self) -> None:
        if self._lr_schedule is None:
            raise RuntimeError("no learning-rate settings: call setup_optimizer first")
        groups = [
            {"params": [tensor], "lr": float(self._lr_schedule[name][0]), "name": name}
            for name, tensor in self.params().items()
        ]
        self.optimizer = torch.optim.Adam(
            groups, lr=0.0, betas=(0.9, 0.999), eps=1e-15, fused=_adam_fused(self.device)
        )

    def update_learning_rate(self, step: int) -> dict[str, float]:
        """Set the scheduled lrs (xyz, f_dc, scaling, rotation) for `step`; return every group's lr."""
        optimizer, schedule = self._require_optimizer()
        lrs = {}
        for group in optimizer.param_groups:
            name = group["name"]
            if name in SCHEDULED_GROUPS:
                lr_init, lr_final = schedule[name]
                group["lr"] = exponential_lr(step, lr_init, lr_final, schedule["max_steps"])
            lrs[name] = float(group["lr"])
        return lrs

    def optimizer_step(self, skip: Tensor | None = None) -> None:
        """Adam step, then clear the gradients.

        skip: 0-dim float tensor on the model's device; 1.0 skips the update on the device, without a
            host sync (parameters, moments and step counts stay as they were), 0.0 applies it.
        """
        optimizer, _ = self._require_optimizer()
        optimizer.found_inf = skip  # read by fused Adam's step (the flag torch's GradScaler sets)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def _require_optimizer(self) -> tuple[torch.optim.Adam, dict[str, Any]]:
        if self.optimizer is None or self._lr_schedule is None:
            raise RuntimeError("call setup_optimizer (or load_state_dict of a checkpoint) first")
        return self.optimizer, self._lr_schedule

    def _param_state(self, name: str) -> tuple[dict | None, dict[str, Any] | None]:
        """(optimizer group, Adam state of its tensor) for a group name; (None, None) without optimizer."""
        if self.optimizer is None:
            return None, None
        group = next(g for g in self.optimizer.param_groups if g["name"] == name)
        return group, self.optimizer.state.get(group["params"][0])

    def _update_param(self, name: str, new: Tensor, state_fn) -> None:
        """Swap in a new leaf tensor for group `name`, mapping each per-element Adam state tensor
        through state_fn(old_state_tensor) (scalar entries such as `step` are kept)."""
        old = getattr(self, PARAM_NAMES[name])
        leaf = new.detach().requires_grad_(True)
        setattr(self, PARAM_NAMES[name], leaf)
        group, state = self._param_state(name)
        if group is None:
            return
        group["params"][0] = leaf
        if state is None:
            return
        del self.optimizer.state[old]
        for key, value in state.items():
            if isinstance(value, Tensor) and value.shape == old.shape:
                state[key] = state_fn(value)
        self.optimizer.state[leaf] = state

    # ------------------------------------------------------------------ edits (densification, resets)

    def replace(self, new: dict[str, Tensor]) -> None:
        """Replace whole tensors by group name (same shapes) and zero their Adam moments."""
        for name, tensor in new.items():
            current = getattr(self, PARAM_NAMES[name])
            if tensor.shape != current.shape:
                raise ValueError(f"replace: {name} must keep its shape {tuple(current.shape)}, "
                                 f"got {tuple(tensor.shape)}")
            self._update_param(name, tensor, torch.zeros_like)

    def append(self, extension: dict[str, Tensor]) -> None:
        """Append Gaussians given as raw parameters for every group (the `params()` layout, M rows each);
        their Adam moments start at zero."""
        if set(extension) != set(PARAM_NAMES):
            raise ValueError(f"append needs every parameter group {sorted(PARAM_NAMES)}, got {sorted(extension)}")
        for name, ext in extension.items():
            old = getattr(self, PARAM_NAMES[name])
            self._update_param(
                name,
                torch.cat([old.detach(), ext]),
                lambda value, ext=ext: torch.cat([value, value.new_zeros(ext.shape)]),
            )

    def keep(self, mask: Tensor) -> None:
        """Keep the Gaussians where mask [N] (bool) is True, with their Adam moments."""
        if mask.dtype != torch.bool or mask.shape != (self.num_points,):
            raise ValueError(f"keep: mask must be bool [N={self.num_points}], got {mask.dtype} {tuple(mask.shape)}")
        for name in PARAM_NAMES:
            old = getattr(self, PARAM_NAMES[name])
            self._update_param(name, old.detach()[mask], lambda value: value[mask])

    # ------------------------------------------------------------------ gradient edits

    def clip_gradients(self, max_norm: float) -> None:
        """Official per-tensor clipping: clip_grad_norm_ on each parameter tensor separately."""
        foreach = True if self.device.type == "cuda" else None
        for tensor in self.params().values():
            if tensor.grad is not None:
                torch.nn.utils.clip_grad_norm_(tensor, max_norm, error_if_nonfinite=False, foreach=foreach)

    @torch.no_grad()
    def reset_opacity(self, max_opacity: float = 0.01) -> None:
        """Official opacity reset: opacity <- min(opacity, 0.01), Adam moments zeroed."""
        cap = math.log(max_opacity / (1.0 - max_opacity))
        self.replace({"opacity": torch.clamp_max(self._opacity, cap)})

    @torch.no_grad()
    def scale_colors(self, factor: float) -> None:
        """BEG brightness reset: every SH coefficient times `factor`, Adam moments zeroed."""
        self.replace({"f_dc": self._features_dc * factor, "f_rest": self._features_rest * factor})

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume training bit-exactly (a snapshot: tensors are copied)."""
        return {
            "version": CHECKPOINT_VERSION,
            "max_sh_degree": self.max_sh_degree,
            "active_sh_degree": self.active_sh_degree,
            "spatial_lr_scale": self.spatial_lr_scale,
            "lr_schedule": copy.deepcopy(self._lr_schedule),
            "params": {name: tensor.detach().clone() for name, tensor in self.params().items()},
            "optimizer": None if self.optimizer is None else copy.deepcopy(self.optimizer.state_dict()),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a `state_dict()`; rebuilds the optimizer, so setup_optimizer is not needed."""
        if sd.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"unsupported GaussianModel checkpoint version {sd.get('version')!r}")
        if sd["max_sh_degree"] != self.max_sh_degree:
            raise ValueError(f"checkpoint has max_sh_degree {sd['max_sh_degree']}, model has {self.max_sh_degree}")
        self._set_params(sd["params"])
        self.active_sh_degree = int(sd["active_sh_degree"])
        self.spatial_lr_scale = float(sd["spatial_lr_scale"])
        self._lr_schedule = copy.deepcopy(sd["lr_schedule"])
        self.optimizer = None
        if sd["optimizer"] is not None:
            self._build_optimizer()
            self.optimizer.load_state_dict(self._adapt_optimizer_state(sd["optimizer"]))

    def _adapt_optimizer_state(self, saved: dict[str, Any]) -> dict[str, Any]:
        """Use this device's implementation flags (fused, foreach, ...) for a saved optimizer state."""
        saved = copy.copy(saved)
        saved["param_groups"] = [
            {**group, **{k: v for k, v in current.items() if k in ("fused", "foreach", "capturable")}}
            for group, current in zip(saved["param_groups"], self.optimizer.param_groups)
        ]
        return saved
