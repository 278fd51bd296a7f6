"""Losses on output distributions: Hinton KD, reverse/skew KL, generalized JSD, soft CE, NKD, plain CE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from compressor.distill.losses.base import (
    DistillLoss,
    Features,
    _check_positive,
    _check_range,
    _kl,
    _mask,
    _mix,
    _position_mean,
    check_logit_shapes,
    register,
)


class _LogitLoss(DistillLoss):
    """A divergence between the output distributions at temperature T, scaled by T²."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        _check_positive(self, "temperature", temperature)
        self.temperature = temperature

    def setup(self, student: Features, teacher: Features) -> None:
        check_logit_shapes(self.loss_name, student.output, teacher.output)

    def log_probs(self, student: Features, teacher: Features) -> tuple[Tensor, Tensor]:
        t = self.temperature
        return F.log_softmax(student.output / t, dim=-1), F.log_softmax(teacher.output / t, dim=-1)

    def reduce(self, per_position: Tensor, student: Features, teacher: Features) -> Tensor:
        return _position_mean(per_position, _mask(student, teacher)) * self.temperature**2



@register("hinton")
class HintonKD(_LogitLoss):
    """Soft targets (Hinton et al., 2015): `α·CE(y, s) + (1-α)·T²·KL(p_T ‖ q_S)`.

    The T² factor keeps the soft-target gradients on the same scale as the hard-label ones as T grows.
    Without labels (target is None) only the soft term is used. For [B, L, V] logits the hard term
    flattens positions and ignores label -100 (the Hugging Face convention).
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.5):
        super().__init__(temperature)
        _check_range(self, "alpha", alpha, 0.0, 1.0, closed_high=True)
        self.alpha = alpha

    def compute(self, student: Features, teacher: Features, target: Tensor | None) -> Tensor:
        log_q, log_p = self.log_probs(student, teacher)
        soft = self.reduce(_kl(log_p, log_q), student, teacher)
        if target is None or self.alpha == 0:
            return soft
        logits = student.output
        hard = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
        return self.alpha * hard + (1 - self.alpha) * soft


@register("reverse_kl")
class ReverseKL(_LogitLoss):
    """Reverse KL `T²·KL(q_S ‖ p_T)` (MiniLLM, Gu et al., ICLR 2024): mode-seeking.

    This is the token-level reverse KL on the given outputs; MiniLLM's policy-gradient optimisation over
    student-generated sequences is a training-loop concern, not part of the loss.
    """

    def compute(self, student: Features, teacher: Features, target: Tensor | None) -> Tensor:
        log_q, log_p = self.log_probs(student, teacher)
        return self.reduce(_kl(log_q, log_p), student, teacher)


@register("skew_kl")
class SkewKL(_LogitLoss):
    """Skew KL `KL(p ‖ α·p + (1-α)·q)` (DistiLLM, Ko et al., ICML 2024), α≈0.1.

    Mixing some of p into the second argument bounds the divergence and its gradients. α=0 is forward KL.
    """

    def __init__(self, alpha: float = 0.1, temperature: float = 1.0):
        super().__init__(temperature)
        _check_range(self, "alpha", alpha, 0.0, 1.0, closed_high=False)
        self.alpha = alpha

    def compute(self, student: Features, teacher: Features, target: Tensor | None) -> Tensor:
        log_q, log_p = self.log_probs(student, teacher)
        return self.reduce(_kl(log_p, _mix(log_p, log_q, self.alpha)), student, teacher)


@register("skew_reverse_kl")
class SkewReverseKL(SkewKL):
    """Skew reverse KL `KL(q ‖ α·q + (1-α)·p)` (DistiLLM, Ko et al., ICML 2024), α≈0.1. α=0 is reverse KL."""

    def compute(self, student: Features, teacher: Features, target: Tensor | None) -> Tensor:
        log_q, log_p = self.log_probs(student, teacher)
        return self.reduce(_kl(log_q, _mix(log_q, log_p, self.alpha)), student, teacher)


@register("gjsd")
class GeneralizedJSD(_LogitLoss):
    """Generalized JSD (GKD, Agarwal et al., ICLR 2024): `β·KL(p‖m) + (1-β)·KL(q‖m)`, `m = β·p + (1-β)·q`.

    β in (0, 1); β=0.5 is the ordinary Jensen-Shannon divergence. On-policy mixing of student-generated
    sequences (GKD's λ) is a data concern outside the loss.
    """

    def __init__(self, beta: float = 0.5, temperature: float = 1.0):
        super().__init__(temperature)
        if not 0 < beta < 1:
            raise self.fail(f"beta must be in (0, 1) (at 0 or 1 the divergence is identically 0), got {beta}")
        self.beta = beta

    def compute(self, student: Features, teacher: Features, target: Tensor | None) -> Tensor:
        log_q, log_p = self.log_probs(student, teacher)
        log_m = _mix(log_p, log_q, self.beta)
        per_position = self.beta * _kl(log_p, log_m) + (1 - self.beta) * _kl(log_q, log_m)
        return self.reduce(per_position, student, teacher)


@register("soft_ce")
class SoftCrossEntropy(_LogitLoss):
    """Soft cross-entropy `-Σ softmax(t/T)·log_softmax(s/T)` (mean over positions, no T² factor).

    Its minimum over the student is the teacher's entropy, reached when student equals teacher. Also the
    PS-KD loss: pass the progressive targets as teacher logits (`teachers.ProgressiveTargets`).
    """

    def reduce(self, per_position: Tensor, student: Features, teacher: Features) -> Tensor:
        return _position_mean(per_position, _mask(student, teacher))

    def compute(self, student: Features, teacher: Features, target: Tensor | None) -> Tensor:
        log_q, log_p = self.log_probs(student, teacher)
        p = log_p.exp()
        return self.reduce(-(p * log_q).sum(-1), student, teacher)


@register("tinybert_prediction")
class TinyBertPrediction(SoftCrossEntropy):
    """TinyBERT prediction-layer distillation (Jiao et al., Findings of EMNLP 2020): soft CE at T (default 1)."""


@register("nkd")
class NormalizedKD(DistillLoss):
    """Normalized KD (Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation", ICCV 2023).

    `L = -T_t·log S_t  -  γ·λ²·Σ_{i≠t} N(T_i^λ)·log N(S_i^λ)`: the target part weights the student's
    log-probability of the true class by the teacher's; the non-target part matches the teacher's
    distribution over the other classes renormalised to sum to 1 (softmax over non-target logits at λ).
    Needs labels; soft labels are reduced to their argmax. γ=1.5, λ=1 are the paper's defaults.
    """

    needs = ("output", "target")

    def __init__(self, gamma: float = 1.5, temperature: float = 1.0):
        super().__init__()
        _check_positive(self, "temperature", temperature)
        if gamma < 0:
            raise self.fail(f"gamma must be >= 0, got {gamma}")
        self.gamma = gamma
        self.temperature = temperature

    def setup(self, student: Features, teacher: Features) -> None:
        check_logit_shapes(self.loss_name, student.output, teacher.output)
        if student.output.shape[-1] < 2:
            raise self.fail("needs at least 2 classes")

    def compute(self, student: Features, teacher: Features, target: Tensor | None) -> Tensor:
        s = student.output.reshape(-1, student.output.shape[-1])
        t = teacher.output.reshape(-1, teacher.output.shape[-1])
        assert target is not None
        label = target.argmax(-1) if target.dim() == student.output.dim() else target
        label = label.reshape(-1, 1).long()
        n, c = s.shape
        s_target = F.log_softmax(s, dim=-1).gather(1, label)
        t_target = F.softmax(t, dim=-1).gather(1, label)
        loss_target = -(t_target * s_target).mean()
        keep = torch.ones_like(s, dtype=torch.bool).scatter_(1, label, False)
        lam = self.temperature
        s_rest = F.log_softmax(s[keep].view(n, c - 1) / lam, dim=-1)
        t_rest = F.softmax(t[keep].view(n, c - 1) / lam, dim=-1)
        loss_rest = -self.gamma * lam**2 * (t_rest * s_rest).sum(-1).mean()
        return loss_target + loss_rest


@register("ce")
class CrossEntropy(DistillLoss):
    """Cross-entropy with the labels: the student trained alone (no teacher), or the hard term beside KD."""

    needs = ("output", "target")
    uses_teacher = False

    def compute(self, student: Features, teacher: Features, target: Tensor | None) -> Tensor:
        assert target is not None
        logits = student.output
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)


def cross_entropy_only(student: Features, target: Tensor) -> Tensor:
    """The no-teacher baseline: the student trained on labels alone."""
    return F.cross_entropy(student.output, target)
