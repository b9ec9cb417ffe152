"""Distillation losses, each registered under its `GuidanceParams.guidance_type` name.

A loss is one file in this folder: a `DistillationLoss` subclass with a `name`, decorated with
`@register`, with its timestep rule beside it. Every module of this folder is imported here, so the new
file is all it takes for the loss to be selectable from YAML, the command line, a sweep and a resume.
"""
import importlib
import pkgutil

from guidance.losses.base import BatchShard, DistillationLoss, LossOutput, NoiseSource, StepInfo
from guidance.losses.registry import LOSSES, build_loss, register

for _module in pkgutil.iter_modules(__path__):  # sorted by file name: cds, gcs, ism, sctd, sds, ...
    importlib.import_module(f"{__name__}.{_module.name}")  # a loss module registers its loss on import

__all__ = ["BatchShard", "DistillationLoss", "LossOutput", "NoiseSource", "StepInfo", "LOSSES", "build_loss",
           "register"]
