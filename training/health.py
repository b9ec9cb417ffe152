"""Non-finite (NaN/Inf) Gaussians or gradients: skip the step on the device, report, stop if it persists.

`NonFiniteGuard.check` runs every iteration without a host sync: it reduces "every parameter and
gradient is finite" to a 0-dim flag on the device, which the optimizer uses to skip its update
(fused Adam's `found_inf`, the mechanism of torch's GradScaler), and counts skipped steps on the
device. `report` reads the counters back to the host; the run loop calls it every `log_interval`
iterations (when the logging scalars are read anyway) and before writing a checkpoint or a PLY.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


class TrainingStopped(RuntimeError):
    """Training cannot usefully continue (the message says why and what to change); the run stops."""


class NonFiniteTrainingError(TrainingStopped):
    """Training produced NaN/Inf for too long (or in the Gaussians themselves)."""


@dataclass(frozen=True)
class HealthReport:
    skipped_total: int  # iterations skipped since the run started
    skipped_new: int  # skipped since the previous report
    worst_streak: int  # longest run of consecutive skipped iterations since the previous report
    streak: int  # consecutive skipped iterations ending at the current one (0 = the last step was applied)
    parameters_finite: bool  # every Gaussian parameter is finite now


def all_finite(tensors: list[Tensor]) -> Tensor:
    """0-dim bool on the tensors' device: every element of every tensor is finite (True for no tensors)."""
    if not tensors:
        return torch.tensor(True)
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


class NonFiniteGuard:
    """Device-side counters of skipped iterations."""

    def __init__(self, device: torch.device):
        self.device = device
        self.skipped = torch.zeros((), dtype=torch.long, device=device)
        self.streak = torch.zeros((), dtype=torch.long, device=device)
        self.worst = torch.zeros((), dtype=torch.long, device=device)
        self.params_ok = torch.ones((), dtype=torch.bool, device=device)
        self._reported = 0

    def check(self, params: dict[str, Tensor]) -> Tensor:
        """0-dim float32 flag on the device, 1.0 when any parameter or gradient is non-finite (the step
        must be skipped), else 0.0; updates the counters. No host sync."""
        tensors = list(params.values())
        self.params_ok = all_finite([t.detach() for t in tensors]).to(self.device)
        grads_ok = all_finite([t.grad for t in tensors if t.grad is not None]).to(self.device)
        bad = ~(self.params_ok & grads_ok)
        self.skipped += bad
        self.streak = torch.where(bad, self.streak + 1, 0)
        self.worst = torch.maximum(self.worst, self.streak)
        return bad.float()

    def report_now(self) -> HealthReport:
        """Read the counters (one host sync) without starting a new reporting window."""
        skipped, streak, worst, params_ok = torch.stack(
            [self.skipped, self.streak, self.worst, self.params_ok.long()]).tolist()
        return HealthReport(skipped, skipped - self._reported, worst, streak, bool(params_ok))

    def report(self) -> HealthReport:
        """report_now, then start a new reporting window (new skips and the worst streak count from here)."""
        report = self.report_now()
        self._reported = report.skipped_total
        self.worst = self.streak.clone()
        return report

    def state_dict(self) -> dict:
        return {"skipped": self.skipped.cpu(), "streak": self.streak.cpu(), "reported": self._reported}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = state["skipped"].to(self.device)
        self.streak = state["streak"].to(self.device)
        self.worst = self.streak.clone()
        self._reported = int(state["reported"])


def stop_message(report: HealthReport, step: int, patience: int, lrs: dict[str, float],
                 checkpoint_step: int | None) -> str:
    """Why the run stops and what to change, naming the learning rates in effect."""
    rates = ", ".join(f"{name} {value:.3g}" for name, value in lrs.items())
    if not report.parameters_finite:
        what = "the Gaussians' parameters became NaN/Inf"
    else:
        what = f"the gradients were NaN/Inf in {report.worst_streak} consecutive iterations (patience {patience})"
    return (f"training stopped at step {step}: {what}; every such step was skipped, {report.skipped_total} in all. "
            f"The usual cause is a learning rate too high for this scene (current: {rates}; see "
            "OptimizationParams.*_lr), or a too large GuidanceParams.lambda_guidance. "
            "No point cloud or checkpoint was written for the broken state; "
            + (f"checkpoints/last.pt holds step {checkpoint_step}, the last good one." if checkpoint_step is not None
               else "there is no earlier checkpoint."))
