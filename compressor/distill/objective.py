"""The distillation objective: runs student and teacher on a batch and sums the weighted losses.

The teacher never gets gradients: it runs in eval mode under `torch.inference_mode`, and its outputs are
cloned into ordinary tensors so the student's losses can save them for backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from compressor.distill.losses import LOSSES, DistillLoss, Features, build_loss
from compressor.errors import RecipeError
from compressor.models.call import call, primary_output


class Objective(nn.Module):
    """Weighted sum of distillation losses. Its own parameters (e.g. FitNets regressors) train with the student."""

    def __init__(self, losses: Sequence[tuple[str, float, DistillLoss]], teacher: nn.Module | None):
        super().__init__()
        self.names = [name for name, _, _ in losses]
        self.weights = [weight for _, weight, _ in losses]
        self.losses = nn.ModuleList([loss for _, _, loss in losses])
        # Kept out of the module tree on purpose: the teacher's parameters must not reach the optimizer.
        self._teacher = [teacher] if teacher is not None else []
        self.needs_teacher = any(getattr(loss, "uses_teacher", True) for loss in self.losses)
        self.last_parts: dict[str, float] = {}

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def teacher_features(self, inputs) -> Features:
        teacher = self.teacher
        with torch.inference_mode():
            out = primary_output(call(teacher, inputs))
        return Features(output=out.clone())

    def compute(self, student: nn.Module, inputs, target: Tensor | None) -> Tensor:
        s = Features(output=primary_output(call(student, inputs)))
        t = self.teacher_features(inputs) if self.needs_teacher else Features(output=s.output.detach())
        if self.needs_teacher and t.output.shape != s.output.shape:
            raise RecipeError(
                f"teacher output {tuple(t.output.shape)} cannot be compared with student output "
                f"{tuple(s.output.shape)}; give both the same output layer, or use feature losses with taps"
            )
        total = s.output.new_zeros(())
        parts = {}
        for name, weight, loss in zip(self.names, self.weights, self.losses):
            value = loss(s, t, target)
            parts[name] = float(value.detach())
            total = total + weight * value
        self.last_parts = parts
        return total


def build_objective(loss_specs, teacher: nn.Module | None, has_labels: bool = True) -> Objective:
    """Instantiate the recipe's losses; fail before training if one needs what the run lacks."""
    built = []
    for spec in loss_specs:
        if spec.name not in LOSSES:
            raise RecipeError(f"distillation loss '{spec.name}' is unknown; known: {', '.join(LOSSES.names())}")
        try:
            loss = build_loss(spec.name, spec.params)
        except TypeError as exc:
            raise RecipeError(f"distillation loss '{spec.name}': bad params {spec.params} ({exc})") from None
        if getattr(loss, "uses_teacher", True) and teacher is None:
            raise RecipeError(f"distillation loss '{spec.name}' needs a teacher; add a 'teacher:' section to the recipe")
        built.append((spec.name, spec.weight, loss))
    if not built:
        raise RecipeError("no distillation losses configured; add at least one under distillation.losses")
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    return Objective(built, teacher)
