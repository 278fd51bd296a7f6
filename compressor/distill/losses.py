"""The knowledge zoo: each kind of knowledge is an `nn.Module` registered by name.

Every loss has the same call: `loss(student: Features, teacher: Features, target) -> scalar tensor`.
`Features.output` is the model's primary output (class logits, or an embedding); `Features.taps` holds
tapped intermediate tensors by tap name (see `taps.py`). A loss reads only what it needs and says so in
`needs` ("output", "taps", "target"), so a recipe that forgot to tap features fails before training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor, nn

from compressor.registry import Registry

LOSSES: Registry[type[nn.Module]] = Registry("distillation loss")


@dataclass
class Features:
    output: Tensor
    taps: dict[str, Tensor] = field(default_factory=dict)


class DistillLoss(nn.Module):
    needs: tuple[str, ...] = ("output",)

    def forward(self, student: Features, teacher: Features, target: Tensor | None = None) -> Tensor:
        raise NotImplementedError


@LOSSES.register("hinton")
class HintonKD(DistillLoss):
    """Soft targets (Hinton et al., 2015): `α·CE(y, s) + (1-α)·T²·KL(p_T ‖ q_S)`.

    The T² factor keeps the soft-target gradients on the same scale as the hard-label ones as T grows.
    Without labels (target is None) only the soft term is used.
    """

    needs = ("output",)

    def __init__(self, temperature: float = 4.0, alpha: float = 0.5):
        super().__init__()
        self.temperature = temperature
        self.alpha = alpha

    def forward(self, student: Features, teacher: Features, target: Tensor | None = None) -> Tensor:
        t = self.temperature
        log_q = F.log_softmax(student.output / t, dim=-1)
        log_p = F.log_softmax(teacher.output / t, dim=-1)
        soft = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * t * t
        if target is None or self.alpha == 0:
            return soft
        hard = F.cross_entropy(student.output, target)
        return self.alpha * hard + (1 - self.alpha) * soft


def build_loss(name: str, params: dict | None = None) -> DistillLoss:
    """Instantiate a registered loss with its recipe parameters."""
    cls = LOSSES.get(name)
    return cls(**(params or {}))


def cross_entropy_only(student: Features, target: Tensor) -> Tensor:
    """The no-teacher baseline: the student trained on labels alone."""
    return F.cross_entropy(student.output, target)


__all__ = ["LOSSES", "Features", "DistillLoss", "HintonKD", "build_loss", "cross_entropy_only"]
