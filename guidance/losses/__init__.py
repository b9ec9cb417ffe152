"""Distillation losses, each registered under its `GuidanceParams.guidance_type` name."""
from guidance.losses import cds, gcs, ism, sctd, sds  # noqa: F401  (imports register the losses)
from guidance.losses.base import BatchShard, DistillationLoss, LossOutput, NoiseSource, StepInfo
from guidance.losses.registry import LOSSES, build_loss, register

__all__ = ["BatchShard", "DistillationLoss", "LossOutput", "NoiseSource", "StepInfo", "LOSSES", "build_loss",
           "register"]
