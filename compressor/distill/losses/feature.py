"""Losses on intermediate features: FitNets hints and TinyBERT hidden/embedding (learned regressors),
attention transfer, FSP."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compressor.distill.losses.base import (
    DistillLoss,
    Features,
    LayerMap,
    PairedTapLoss,
    Pairs,
    _as_pairs,
    _check_positive,
    _mask,
    _position_mean,
    register,
)


def _make_regressor(student: Tensor, teacher: Tensor) -> nn.Module:
    """1×1 conv for [B, C, H, W] maps, Linear over the last dim otherwise (widths from the tensors)."""
    if student.dim() == 4:
        return nn.Conv2d(student.shape[1], teacher.shape[1], kernel_size=1)
    return nn.Linear(student.shape[-1], teacher.shape[-1])


def _width_dim(x: Tensor) -> int:
    return 1 if x.dim() == 4 else -1


class _HintLoss(PairedTapLoss):
    """`scale·‖h_T − r(g_S)‖²` per tap pair, summed over pairs; `r` created in prepare() when widths differ."""

    learned = True
    scale = 1.0
    default_reduction = "mean"
    default_shared = False

    def __init__(
        self,
        regressor: str = "auto",
        shared_regressor: bool | None = None,
        reduction: str | None = None,
        **taps: Any,
    ):
        super().__init__(**taps)
        if regressor not in ("auto", "always", "none"):
            raise self.fail(f"regressor must be 'auto', 'always' or 'none', got {regressor!r}")
        reduction = reduction or self.default_reduction
        if reduction not in ("mean", "batchmean"):
            raise self.fail(f"reduction must be 'mean' or 'batchmean', got {reduction!r}")
        self.regressor = regressor
        self.shared = self.default_shared if shared_regressor is None else shared_regressor
        self.reduction = reduction
        self.regressors = nn.ModuleDict()

    def setup(self, student: Features, teacher: Features) -> None:
        for i, (s_key, t_key) in enumerate(self.pairs()):
            s, t = student.taps[s_key], teacher.taps[t_key]
            wd = _width_dim(s)
            other_s = [d for j, d in enumerate(s.shape) if j != wd % s.dim()]
            other_t = [d for j, d in enumerate(t.shape) if j != wd % t.dim()]
            if s.dim() != t.dim() or other_s != other_t:
                raise self.fail(
                    f"student tap '{s_key}' {tuple(s.shape)} and teacher tap '{t_key}' {tuple(t.shape)} "
                    "differ in more than the feature width; pair layers with the same batch/spatial/sequence size"
                )
            differ = s.shape[wd] != t.shape[wd]
            if differ and self.regressor == "none":
                raise self.fail(
                    f"widths differ ({s.shape[wd]} vs {t.shape[wd]}) for '{s_key}'/'{t_key}' and regressor is 'none'"
                )
            if not (differ or self.regressor == "always"):
                continue
            key = "shared" if self.shared else str(i)
            if key in self.regressors:
                existing = self.regressors[key]
                if _regressor_shape(existing) != (s.shape[wd], t.shape[wd]):
                    raise self.fail(
                        f"shared_regressor needs the same widths for every pair; '{s_key}'/'{t_key}' has "
                        f"{s.shape[wd]}→{t.shape[wd]}; set shared_regressor: false"
                    )
                continue
            self.regressors[key] = _make_regressor(s, t).to(device=s.device, dtype=s.dtype)

    def project(self, i: int, s: Tensor) -> Tensor:
        key = "shared" if self.shared else str(i)
        return self.regressors[key](s) if key in self.regressors else s

    def compute(self, student: Features, teacher: Features, target: Tensor | None) -> Tensor:
        mask = _mask(student, teacher)
        total = student.output.new_zeros(())
        for i, (s_key, t_key) in enumerate(self.pairs()):
            s, t = self.project(i, student.taps[s_key]), teacher.taps[t_key]
            sq = (s - t).pow(2)
            if self.reduction == "batchmean":
                total = total + self.scale * sq.sum() / sq.shape[0]
            elif mask is not None and sq.dim() == 3 and tuple(mask.shape) == tuple(sq.shape[:2]):
                total = total + self.scale * _position_mean(sq.mean(-1), mask)
            else:
                total = total + self.scale * sq.mean()
        return total


def _regressor_shape(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    assert isinstance(module, nn.Linear)
    return module.in_features, module.out_features


@register("fitnets")
class FitNetsHint(_HintLoss):
    """FitNets hints (Romero et al., ICLR 2015): `½‖h_T(x) − r(g_S(x))‖²` per tap pair.

    `r` is a learned regressor, created by prepare() when widths differ: a 1×1 Conv2d for [B, C, H, W]
    maps (spatial sizes must match), a Linear over the last dim otherwise. It belongs to the loss, so it is
    trained with the student (optimizer over `loss.parameters()`) and is not exported.
    reduction: 'batchmean' (the paper: per-sample squared norm, averaged over the batch) or 'mean'
    (per element, robust to feature size; with an attention mask, over real tokens only).
    """

    scale = 0.5
    default_reduction = "batchmean"


@register("tinybert_hidden")
class TinyBertHidden(_HintLoss):
    """TinyBERT hidden-state distillation (Jiao et al., 2020): `MSE(H_S·W_h, H_T)` per layer pair.

    One W_h is shared by all layer pairs, as in the reference code (shared_regressor: false for one per
    pair). MSE is averaged over real tokens when an attention mask is given.
    """

    default_shared = True


@register("tinybert_embedding")
class TinyBertEmbedding(TinyBertHidden):
    """TinyBERT embedding-layer distillation (Jiao et al., 2020): `MSE(E_S·W_e, E_T)`; tap the embeddings."""


@register("at")
class AttentionTransfer(PairedTapLoss):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017).

    `Q = vec(Σ_c |A_c|^p)` per sample (channels are dim 1 of [B, C, H, W], the last dim of [B, L, C]),
    L2-normalised; loss `β/2·Σ_j mean_b ‖Q_S/‖Q_S‖ − Q_T/‖Q_T‖‖₂` over tap pairs (the paper's formula).
    `squared: true` uses the reference code's `mean((Q̂_S − Q̂_T)²)` instead (paired with β≈1000 there).
    Channel counts may differ; spatial sizes must match.
    """

    def __init__(
        self,
        p: float = 2.0,
        beta: float = 1.0,
        squared: bool = False,
        **taps: Any,
    ):
        super().__init__(**taps)
        _check_positive(self, "p", p)
        self.p, self.beta, self.squared = p, beta, squared

    def attention(self, x: Tensor) -> Tensor:
        channel_dim = 1 if x.dim() == 4 else -1
        a = x.abs().pow(self.p).sum(channel_dim)
        return F.normalize(a.reshape(a.shape[0], -1), dim=1)

    def setup(self, student: Features, teacher: Features) -> None:
        for s_key, t_key in self.pairs():
            s, t = self.attention(student.taps[s_key]), self.attention(teacher.taps[t_key])
            if s.shape != t.shape:
                raise self.fail(
                    f"attention maps of '{s_key}' {tuple(student.taps[s_key].shape)} and '{t_key}' "
                    f"{tuple(teacher.taps[t_key].shape)} differ in spatial size; pair layers of equal resolution"
                )

    def compute(self, student: Features, teacher: Features, target: Tensor | None) -> Tensor:
        total = student.output.new_zeros(())
        for s_key, t_key in self.pairs():
            diff = self.attention(student.taps[s_key]) - self.attention(teacher.taps[t_key])
            total = total + (diff.pow(2).mean() if self.squared else diff.norm(dim=1).mean())
        return self.beta / 2 * total


@register("fsp")
class FSP(DistillLoss):
    """Flow of solution procedure (Yim et al., CVPR 2017).

    `G(F1, F2)_ij = Σ_{s,t} F1_{s,t,i}·F2_{s,t,j} / (h·w)` between two layers of one network;
    loss `Σ_k λ_k · mean_b ‖G_T − G_S‖²_F`. Each entry of student_pairs / teacher_pairs is [first, second];
    the two layers must have the same spatial size, and student channels must equal teacher channels.
    """

    needs = ("taps",)

    def __init__(
        self,
        student_pairs: list[list[str]] | None = None,
        teacher_pairs: list[list[str]] | None = None,
        weights: list[float] | None = None,
        layer_map: LayerMap = None,
    ):
        super().__init__(layer_map)
        s_pairs = _as_pairs(self, "student_pairs", student_pairs)
        t_pairs = _as_pairs(self, "teacher_pairs", teacher_pairs)
        if len(s_pairs) != len(t_pairs):
            raise self.fail(f"student_pairs has {len(s_pairs)} entries and teacher_pairs {len(t_pairs)}")
        self.tap_refs = {
            "first": [(s[0], t[0]) for s, t in zip(s_pairs, t_pairs)],
            "second": [(s[1], t[1]) for s, t in zip(s_pairs, t_pairs)],
        }
        if weights is not None and len(weights) != len(s_pairs):
            raise self.fail(f"weights has {len(weights)} entries for {len(s_pairs)} pairs")
        self.weights = weights

    def bind(self, groups: dict[str, Pairs]) -> None:
        if len(groups.get("first", [])) != len(groups.get("second", [])):
            raise self.fail(
                "the first and second layers of the FSP pairs resolve to different numbers of taps"
            )
        super().bind(groups)

    @staticmethod
    def gram(f1: Tensor, f2: Tensor) -> Tensor:
        return torch.einsum("bihw,bjhw->bij", f1, f2) / (f1.shape[-2] * f1.shape[-1])

    def setup(self, student: Features, teacher: Features) -> None:
        for side, feats, idx in (("student", student, 0), ("teacher", teacher, 1)):
            for a, b in zip(self.pairs("first"), self.pairs("second")):
                fa, fb = feats.taps[a[idx]], feats.taps[b[idx]]
                if fa.dim() != 4 or fb.dim() != 4 or fa.shape[-2:] != fb.shape[-2:]:
                    raise self.fail(
                        f"{side} taps '{a[idx]}' {tuple(fa.shape)} and '{b[idx]}' {tuple(fb.shape)} must be "
                        "[B, C, H, W] maps of the same spatial size"
                    )
        for a, b in zip(self.pairs("first"), self.pairs("second")):
            gs = self.gram(student.taps[a[0]], student.taps[b[0]]).shape
            gt = self.gram(teacher.taps[a[1]], teacher.taps[b[1]]).shape
            if gs != gt:
                raise self.fail(
                    f"FSP matrices differ in shape: student {tuple(gs)}, teacher {tuple(gt)}; channels must match"
                )

    def compute(self, student: Features, teacher: Features, target: Tensor | None) -> Tensor:
        total = student.output.new_zeros(())
        for k, (a, b) in enumerate(zip(self.pairs("first"), self.pairs("second"))):
            g_s = self.gram(student.taps[a[0]], student.taps[b[0]])
            g_t = self.gram(teacher.taps[a[1]], teacher.taps[b[1]])
            weight = 1.0 if self.weights is None else self.weights[k]
            total = total + weight * (g_t - g_s).pow(2).sum((1, 2)).mean()
        return total
