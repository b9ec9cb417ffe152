"""Registry of distillation losses by name (`GuidanceParams.guidance_type`).

The one list of loss names: the config schema's allowed values (utils/config/schema.py, `choices_from`),
the `--guidance_type` help and a sweep's `--losses` (training/sweep/plan.py) all read LOSSES.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from guidance.losses.base import DistillationLoss

LOSSES: dict[str, type["DistillationLoss"]] = {}


def register(cls: type["DistillationLoss"]) -> type["DistillationLoss"]:
    """Class decorator: make the loss selectable as `GuidanceParams.guidance_type: <cls.name>`."""
    if not isinstance(getattr(cls, "name", None), str) or not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute `name` (its GuidanceParams.guidance_type)")
    if cls.name in LOSSES:
        raise ValueError(f"loss {cls.name!r} registered twice")
    LOSSES[cls.name] = cls
    return cls


def build_loss(cfg, prior, generator) -> "DistillationLoss":
    """The loss named by cfg.guidance_type, built from the GuidanceParams section."""
    try:
        cls = LOSSES[cfg.guidance_type]
    except KeyError:
        raise ValueError(
            f"GuidanceParams.guidance_type must be one of {sorted(LOSSES)}, got {cfg.guidance_type!r}"
        ) from None
    return cls(cfg, prior, generator)
