"""Losses on transformer attention: TinyBERT attention maps, MiniLM attention/value relations, BiBERT DMD."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from compressor.distill.losses.base import (
    DistillLoss,
    Features,
    LayerMap,
    PairedTapLoss,
    _as_pairs,
    _kl,
    _mask,
    register,
)


def _check_attention(loss: DistillLoss, s_key: str, s: Tensor, t_key: str, t: Tensor) -> None:
    if s.dim() != 4 or s.shape != t.shape:
        raise loss.fail(
            f"attention maps '{s_key}' {tuple(s.shape)} and '{t_key}' {tuple(t.shape)} must both be "
            "[B, heads, L, L] with equal heads (tap '<self-attention module>:attention' and run the models "
            "with output_attentions=True)"
        )


def _query_key_mask(mask: Tensor | None, like: Tensor) -> Tensor | None:
    """[B, L] token mask → [B, 1, L, L] mask of (real query, real key) entries, or None."""
    if mask is None or tuple(mask.shape) != (like.shape[0], like.shape[-1]):
        return None
    m = mask.to(like.dtype)
    return m[:, None, :, None] * m[:, None, None, :]


@register("tinybert_attention")
class TinyBertAttention(PairedTapLoss):
    """TinyBERT attention distillation (Jiao et al., 2020): `mean_h MSE(A_S, A_T)` per layer pair.

    A are [B, heads, L, L] attention maps (heads must be equal). Hugging Face returns softmax
    probabilities (tap `...attention.self:attention`); TinyBERT fitted the pre-softmax scores, which HF
    does not expose — the probabilities are what this loss sees. With an attention mask, only (real query,
    real key) entries are averaged.
    """

    def __init__(
        self,
        **taps: Any,
    ):
        super().__init__(**taps)

    def setup(self, student: Features, teacher: Features) -> None:
        for s_key, t_key in self.pairs():
            _check_attention(self, s_key, student.taps[s_key], t_key, teacher.taps[t_key])

    def compute(self, student: Features, teacher: Features, target: Tensor | None) -> Tensor:
        total = student.output.new_zeros(())
        mask = _mask(student, teacher)
        for s_key, t_key in self.pairs():
            sq = (student.taps[s_key] - teacher.taps[t_key]).pow(2)
            m = _query_key_mask(mask, sq)
            if m is None:
                total = total + sq.mean()
            else:
                m = m.expand_as(sq)
                total = total + (sq * m).sum() / m.sum().clamp_min(1)
        return total


def _split_heads(loss: DistillLoss, key: str, x: Tensor, heads: int) -> Tensor:
    """[B, L, H] → [B, heads, L, H/heads]."""
    if x.dim() != 3:
        raise loss.fail(
            f"tap '{key}' has shape {tuple(x.shape)}; expected [B, L, hidden] (a q/k/v linear output)"
        )
    b, length, hidden = x.shape
    if hidden % heads:
        raise loss.fail(f"tap '{key}' has hidden size {hidden}, not divisible into {heads} heads")
    return x.reshape(b, length, heads, hidden // heads).transpose(1, 2)


def _row_kl(log_t: Tensor, log_s: Tensor, mask: Tensor | None) -> Tensor:
    """KL(teacher ‖ student) per row of [B, h, L, L] distributions, mean over real query rows."""
    per_row = _kl(log_t, log_s)  # [B, h, L]
    if mask is None or tuple(mask.shape) != (per_row.shape[0], per_row.shape[-1]):
        return per_row.mean()
    m = mask.to(per_row.dtype)[:, None, :].expand_as(per_row)
    return (per_row * m).sum() / m.sum().clamp_min(1)


@register("minilm")
class MiniLM(DistillLoss):
    """MiniLM deep self-attention distillation (Wang et al., NeurIPS 2020; MiniLMv2, Findings of ACL 2021).

    attention_pairs: KL(A_T ‖ A_S) between the self-attention distributions of paired layers (usually the
    last), [B, heads, L, L] probabilities with equal heads (tap `...attention.self:attention`).
    value_pairs (and query_pairs / key_pairs, MiniLMv2): taps of the value (query, key) linears, [B, L, H].
    Each is split into `relation_heads` relation heads (student and teacher hidden sizes may differ; both
    must be divisible), `R = softmax(X·Xᵀ/√d_r)`, and the loss is KL(R_T ‖ R_S). With relation_heads equal
    to the attention heads this is MiniLM's value relation; MiniLMv2 uses more relation heads than heads.
    KLs are averaged over batch, heads and real query rows; padded keys are excluded from the softmax.
    """

    needs = ("taps",)

    def __init__(
        self,
        attention_pairs: list[list[str]] | None = None,
        value_pairs: list[list[str]] | None = None,
        query_pairs: list[list[str]] | None = None,
        key_pairs: list[list[str]] | None = None,
        relation_heads: int | None = None,
        layer_map: LayerMap = None,
    ):
        super().__init__(layer_map)
        self.tap_refs = {
            "attention": _as_pairs(self, "attention_pairs", attention_pairs),
            "value": _as_pairs(self, "value_pairs", value_pairs),
            "query": _as_pairs(self, "query_pairs", query_pairs),
            "key": _as_pairs(self, "key_pairs", key_pairs),
        }
        self.tap_refs = {k: v for k, v in self.tap_refs.items() if v}
        relations = any(k in self.tap_refs for k in ("value", "query", "key"))
        if relations and (relation_heads is None or relation_heads < 1):
            raise self.fail(
                "value/query/key relations need relation_heads (e.g. the number of attention heads)"
            )
        self.relation_heads = relation_heads

    def setup(self, student: Features, teacher: Features) -> None:
        for s_key, t_key in self.pairs("attention"):
            _check_attention(self, s_key, student.taps[s_key], t_key, teacher.taps[t_key])
        for group in ("value", "query", "key"):
            for s_key, t_key in self.pairs(group):
                s = _split_heads(self, s_key, student.taps[s_key], self.relation_heads)
                t = _split_heads(self, t_key, teacher.taps[t_key], self.relation_heads)
                if s.shape[:3] != t.shape[:3]:
                    raise self.fail(
                        f"'{s_key}' {tuple(s.shape)} and '{t_key}' {tuple(t.shape)} differ in batch or length"
                    )

    def relation(self, key: str, x: Tensor, mask: Tensor | None) -> Tensor:
        xh = _split_heads(self, key, x, self.relation_heads)
        scores = xh @ xh.transpose(-1, -2) / math.sqrt(xh.shape[-1])
        if mask is not None and tuple(mask.shape) == (x.shape[0], x.shape[1]):
            scores = scores.masked_fill(~mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
        return F.log_softmax(scores, dim=-1)

    def compute(self, student: Features, teacher: Features, target: Tensor | None) -> Tensor:
        mask = _mask(student, teacher)
        total = student.output.new_zeros(())
        for s_key, t_key in self.pairs("attention"):
            log_s = student.taps[s_key].clamp_min(1e-12).log()
            log_t = teacher.taps[t_key].clamp_min(1e-12).log()
            total = total + _row_kl(log_t, log_s, mask)
        for group in ("value", "query", "key"):
            for s_key, t_key in self.pairs(group):
                log_s = self.relation(s_key, student.taps[s_key], mask)
                log_t = self.relation(t_key, teacher.taps[t_key], mask)
                total = total + _row_kl(log_t, log_s, mask)
        return total


@register("dmd")
class DirectionMatching(PairedTapLoss):
    """BiBERT Direction-Matching Distillation (Qin et al., ICLR 2022).

    For each tap pair (the query, key and value linears of paired layers, [B, L, H]):
    `P_F = F·Fᵀ` per attention head ([B, heads, L, L]; heads=1 uses the whole hidden size),
    `P̂ = P / ‖P‖`, loss `Σ_l Σ_F ‖P̂_S − P̂_T‖`. normalize 'batch' takes ‖·‖ over the whole batch tensor,
    exactly as the reference code does (then ‖P̂_S − P̂_T‖ is one Frobenius norm); 'sample' normalises and
    measures each sample and averages. distance 'norm' is the paper's ‖·‖ (unsquared); 'mse' is the mean
    squared difference. The reference code splits heads: set heads to the model's attention heads to
    match it. Hidden sizes may differ (patterns are L×L); padded tokens' rows and columns are zeroed.
    """

    def __init__(
        self,
        heads: int = 1,
        normalize: str = "batch",
        distance: str = "norm",
        **taps: Any,
    ):
        super().__init__(**taps)
        if heads < 1:
            raise self.fail(f"heads must be >= 1, got {heads}")
        if normalize not in ("batch", "sample"):
            raise self.fail(f"normalize must be 'batch' or 'sample', got {normalize!r}")
        if distance not in ("norm", "mse"):
            raise self.fail(f"distance must be 'norm' or 'mse', got {distance!r}")
        self.heads, self.normalize, self.distance = heads, normalize, distance

    def pattern(self, key: str, x: Tensor, mask: Tensor | None) -> Tensor:
        xh = _split_heads(self, key, x, self.heads)
        p = xh @ xh.transpose(-1, -2)
        m = _query_key_mask(mask, p)
        if m is not None:
            p = p * m
        if self.normalize == "batch":
            return p / p.norm().clamp_min(1e-12)
        return p / p.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)

    def setup(self, student: Features, teacher: Features) -> None:
        for s_key, t_key in self.pairs():
            s = _split_heads(self, s_key, student.taps[s_key], self.heads)
            t = _split_heads(self, t_key, teacher.taps[t_key], self.heads)
            if s.shape[:3] != t.shape[:3]:
                raise self.fail(
                    f"'{s_key}' {tuple(student.taps[s_key].shape)} and '{t_key}' {tuple(teacher.taps[t_key].shape)} "
                    "differ in batch or sequence length"
                )

    def compute(self, student: Features, teacher: Features, target: Tensor | None) -> Tensor:
        mask = _mask(student, teacher)
        total = student.output.new_zeros(())
        for s_key, t_key in self.pairs():
            diff = self.pattern(s_key, student.taps[s_key], mask) - self.pattern(
                t_key, teacher.taps[t_key], mask
            )
            if self.distance == "mse":
                total = total + diff.pow(2).mean()
            elif self.normalize == "batch":
                total = total + diff.norm()
            else:
                total = total + diff.flatten(1).norm(dim=1).mean()
        return total
