"""Registry of distillation losses by name (`GuidanceParams.guidance_type`)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from guidance.losses.base import DistillationLoss

LOSSES: dict[str, type["DistillationLoss"]] = {}


def register(cls: type["DistillationLoss"]) -> type["DistillationLoss"]:
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
