"""Losses on relations between the samples of a batch: RKD distance and angle, contrastive (CRD-style)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compressor.distill.losses.base import (
    DistillLoss,
    Features,
    _as_pairs,
    _check_positive,
    check_same_batch,
    register,
)


class _EmbeddingLoss(DistillLoss):
    """Reads one embedding per sample: the outputs, or one tap pair `pair: [student_tap, teacher_tap]`."""

    min_batch = 2

    def __init__(self, pair: list[str] | None = None):
        super().__init__()
        if pair is not None:
            self.tap_refs = {"pairs": _as_pairs(self, "pair", [pair])}
            self.needs = ("taps",)

    def embeddings(self, student: Features, teacher: Features) -> tuple[Tensor, Tensor]:
        if self.tap_refs:
            s_key, t_key = self.pairs()[0]
            s, t = student.taps[s_key], teacher.taps[t_key]
        else:
            s, t = student.output, teacher.output
        return s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)

    def setup(self, student: Features, teacher: Features) -> None:
        if self.tap_refs and len(self.pairs()) != 1:
            raise self.fail(
                f"pair must resolve to exactly one student and one teacher tap, got {self.pairs()}"
            )
        s, t = self.embeddings(student, teacher)
        check_same_batch(self.loss_name, s, t)
        if s.shape[0] < self.min_batch:
            raise self.fail(f"relations need a batch of at least {self.min_batch} samples, got {s.shape[0]}")


def _off_diagonal_distances(x: Tensor) -> Tensor:
    b = x.shape[0]
    keep = ~torch.eye(b, dtype=torch.bool, device=x.device)
    return (x.unsqueeze(1) - x.unsqueeze(0))[keep].norm(dim=-1)  # [B·(B-1)]


@register("rkd_distance")
class RKDDistance(_EmbeddingLoss):
    """RKD distance-wise loss (Park et al., CVPR 2019).

    `ψ_D(i, j) = ‖x_i − x_j‖₂ / μ`, μ the mean distance over pairs i≠j in the batch; loss is the Huber
    (smooth L1, δ=1) between student and teacher ψ_D, averaged over ordered pairs i≠j. Widths may differ.
    The paper weights it λ_D=25 (set the recipe weight).
    """

    def compute(self, student: Features, teacher: Features, target: Tensor | None) -> Tensor:
        s, t = self.embeddings(student, teacher)
        d_s, d_t = _off_diagonal_distances(s), _off_diagonal_distances(t)
        d_s = d_s / d_s.mean().clamp_min(1e-12)
        d_t = d_t / d_t.mean().clamp_min(1e-12)
        return F.smooth_l1_loss(d_s, d_t)


def _angles(x: Tensor) -> Tensor:
    """cos∠(x_i, x_j, x_k) at vertex j, for distinct i, j, k → [B·(B-1)·(B-2)]."""
    b = x.shape[0]
    e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), dim=-1)  # e[j, i] = unit(x_i − x_j)
    cos = torch.einsum("jid,jkd->jik", e, e)
    idx = torch.arange(b, device=x.device)
    distinct = (idx[:, None, None] != idx[None, :, None]) & (idx[:, None, None] != idx[None, None, :])
    distinct &= idx[None, :, None] != idx[None, None, :]
    return cos[distinct]


@register("rkd_angle")
class RKDAngle(_EmbeddingLoss):
    """RKD angle-wise loss (Park et al., CVPR 2019).

    `ψ_A(i, j, k) = ⟨e_ij, e_kj⟩`, `e_ij = (x_i − x_j)/‖x_i − x_j‖` (the angle at x_j); Huber between
    student and teacher, averaged over triplets of distinct samples. The paper weights it λ_A=50.
    """

    min_batch = 3

    def compute(self, student: Features, teacher: Features, target: Tensor | None) -> Tensor:
        s, t = self.embeddings(student, teacher)
        return F.smooth_l1_loss(_angles(s), _angles(t))


@register("contrastive")
class ContrastiveKD(_EmbeddingLoss):
    """In-batch InfoNCE between projected student and teacher embeddings (CRD-style; Tian et al., ICLR 2020).

    `z_S = normalize(W_S·f_S)`, `z_T = normalize(W_T·f_T)`, logits `z_S·z_Tᵀ/τ`, and cross-entropy with the
    matching teacher embedding (same sample) as the positive, the other samples of the batch as negatives.
    CRD's memory bank of 16k negatives and ACKD's hard-sample weighting are not implemented: negatives are
    the batch. Both projections are created by prepare() (proj_dim) and trained with the student;
    proj_dim: null compares the raw embeddings (widths must be equal). symmetric adds the teacher→student
    direction.
    """

    learned = True

    def __init__(
        self,
        pair: list[str] | None = None,
        temperature: float = 0.1,
        proj_dim: int | None = 128,
        symmetric: bool = False,
    ):
        super().__init__(pair)
        _check_positive(self, "temperature", temperature)
        if proj_dim is not None and proj_dim < 1:
            raise self.fail(f"proj_dim must be >= 1 or null, got {proj_dim}")
        self.temperature, self.proj_dim, self.symmetric = temperature, proj_dim, symmetric
        self.student_proj: nn.Module = nn.Identity()
        self.teacher_proj: nn.Module = nn.Identity()

    def setup(self, student: Features, teacher: Features) -> None:
        super().setup(student, teacher)
        s, t = self.embeddings(student, teacher)
        if self.proj_dim is None:
            if s.shape[1] != t.shape[1]:
                raise self.fail(f"embedding widths differ ({s.shape[1]} vs {t.shape[1]}); set proj_dim")
            return
        self.student_proj = nn.Linear(s.shape[1], self.proj_dim).to(device=s.device, dtype=s.dtype)
        self.teacher_proj = nn.Linear(t.shape[1], self.proj_dim).to(device=s.device, dtype=s.dtype)

    def compute(self, student: Features, teacher: Features, target: Tensor | None) -> Tensor:
        s, t = self.embeddings(student, teacher)
        z_s = F.normalize(self.student_proj(s), dim=1)
        z_t = F.normalize(self.teacher_proj(t), dim=1)
        logits = z_s @ z_t.T / self.temperature
        labels = torch.arange(logits.shape[0], device=logits.device)
        loss = F.cross_entropy(logits, labels)
        if self.symmetric:
            loss = (loss + F.cross_entropy(logits.T, labels)) / 2
        return loss
