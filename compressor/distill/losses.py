"""The knowledge zoo: each kind of knowledge is an `nn.Module` registered by name.

Every loss has the same call: `loss(student: Features, teacher: Features, target) -> scalar tensor`.
`Features.output` is the model's primary output (class logits, or an embedding); `Features.taps` holds
tapped intermediate tensors by tap key (see `taps.py`); `Features.attention_mask` ([B, L], 1 = real token)
lets sequence losses ignore padding. A loss reads only what it needs and says so in `needs`
("output", "taps", "target"), so a recipe that forgot to tap features fails before training.

Life cycle of a loss (the objective drives it):
1. `build_loss(name, params)`: parameters are checked here (RecipeError on a bad value).
2. `taps.bind_taps(losses, student, teacher, aliases)`: the loss's tap references (aliases, exact module
   names or globs) become concrete tap keys, paired by the loss's `layer_map`.
3. `loss.prepare(student_features, teacher_features)` on one dry-run batch: checks that the taps exist and
   shapes are comparable, and creates learned parts (FitNets/TinyBERT regressors, contrastive projections).
   Build the optimizer *after* this, over the student's and every loss's `parameters()`.
4. `loss(student, teacher, target)` every step. Teacher tensors made under `torch.inference_mode` are
   copied into normal tensors first (autograd refuses to save inference tensors for backward).

Distributions are taken over the last dimension; logits may be [B, C] or [B, L, V] (then divergences are
averaged over the positions where `attention_mask` is 1).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compressor.errors import RecipeError
from compressor.registry import Registry

LOSSES: Registry[type[nn.Module]] = Registry("distillation loss")

Pairs = list[tuple[str, str]]
LayerMap = str | list[int] | list[list[int]] | None


@dataclass
class Features:
    output: Tensor
    taps: dict[str, Tensor] = field(default_factory=dict)
    attention_mask: Tensor | None = None  # [B, L], 1 (or True) where the token is real, 0 for padding


class DistillLoss(nn.Module):
    """Base of every loss: tap references, validation before training, the per-step call."""

    needs: tuple[str, ...] = ("output",)
    learned: bool = False  # True when prepare() may create trainable parameters
    uses_teacher: bool = True  # False only for the label-only baseline ('ce')

    def __init__(self, layer_map: LayerMap = None):
        super().__init__()
        # group name -> [(student ref, teacher ref)]; refs are tap aliases, module names or globs
        self.tap_refs: dict[str, Pairs] = {}
        self.layer_map = layer_map
        self.bound: dict[str, Pairs] | None = None
        self.prepared = False

    @property
    def loss_name(self) -> str:
        return getattr(type(self), "registered_name", type(self).__name__)

    def fail(self, message: str) -> RecipeError:
        return RecipeError(f"loss '{self.loss_name}': {message}")

    # --- taps -------------------------------------------------------------------------------------------
    def bind(self, groups: dict[str, Pairs]) -> None:
        """Replace tap references by concrete tap keys (called by `taps.bind_taps`)."""
        self.bound = {name: [(s, t) for s, t in pairs] for name, pairs in groups.items()}

    def pairs(self, group: str = "pairs") -> Pairs:
        source = self.bound if self.bound is not None else self.tap_refs
        return list(source.get(group, []))

    def require_taps(self) -> None:
        if "taps" in self.needs and not any(self.tap_refs.values()):
            raise self.fail("needs tapped features but no tap pairs were given; set its params (e.g. pairs)")

    def student_tap_keys(self) -> list[str]:
        return [s for group in (self.bound or self.tap_refs) for s, _ in self.pairs(group)]

    def teacher_tap_keys(self) -> list[str]:
        return [t for group in (self.bound or self.tap_refs) for _, t in self.pairs(group)]

    # --- validation -------------------------------------------------------------------------------------
    def prepare(self, student: Features, teacher: Features) -> None:
        """Check features on one batch and create learned parts; run once before building the optimizer."""
        if "taps" in self.needs:
            self.require_taps()
            check_taps_present(self.loss_name, "student", self.student_tap_keys(), student.taps)
            check_taps_present(self.loss_name, "teacher", self.teacher_tap_keys(), teacher.taps)
        self.setup(student, _as_teacher(teacher))
        self.prepared = True

    def setup(self, student: Features, teacher: Features) -> None:
        """Shape checks and learned parts; subclasses override."""

    # --- the step -----------------------------------------------------------------------------------------
    def forward(self, student: Features, teacher: Features, target: Tensor | None = None) -> Tensor:
        if not self.prepared:
            if self.learned:
                # Parameters created now would be missing from an optimizer built earlier: never trained.
                raise RuntimeError(
                    f"loss '{self.loss_name}' creates trainable parameters: call prepare(student, teacher) "
                    "on a dry-run batch before building the optimizer"
                )
            self.prepare(student, teacher)
        if "target" in self.needs and target is None:
            raise self.fail("needs labels (target) but the batch has none; use a labelled dataset")
        return self.compute(student, _as_teacher(teacher), target)

    def compute(self, student: Features, teacher: Features, target: Tensor | None) -> Tensor:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------
# Validation helpers (the objective calls these through prepare(); usable on their own)
# ---------------------------------------------------------------------------------------------------------


def check_taps_present(loss_name: str, side: str, keys: list[str], taps: dict[str, Tensor]) -> None:
    """Every tap a loss reads must have been captured; name the missing one and what was captured."""
    missing = [k for k in keys if k not in taps]
    if missing:
        have = ", ".join(sorted(taps)) or "none"
        raise RecipeError(
            f"loss '{loss_name}' reads {side} tap '{missing[0]}', which was not captured (captured: {have}); "
            f"add it to distillation.taps.{side} or fix the loss's pairs"
        )


def check_logit_shapes(loss_name: str, student_out: Tensor, teacher_out: Tensor) -> None:
    """A logit loss compares distributions position by position: the shapes must be equal."""
    if student_out.shape != teacher_out.shape:
        raise RecipeError(
            f"loss '{loss_name}' compares outputs as distributions, but the student output has shape "
            f"{tuple(student_out.shape)} and the teacher output {tuple(teacher_out.shape)}; they must match "
            "(same classes/vocabulary; use a feature loss such as fitnets or rkd_distance for embeddings)"
        )


def check_same_batch(loss_name: str, a: Tensor, b: Tensor) -> None:
    if a.shape[0] != b.shape[0]:
        raise RecipeError(
            f"loss '{loss_name}': student batch {tuple(a.shape)} and teacher batch {tuple(b.shape)} differ "
            "in the batch dimension; feed both models the same batch"
        )


def prepare_losses(losses: dict[str, DistillLoss], student: Features, teacher: Features) -> None:
    """Validate and set up every loss on one dry-run batch (call before building the optimizer)."""
    for loss in losses.values():
        loss.prepare(student, teacher)


def build_loss(name: str, params: dict | None = None) -> DistillLoss:
    """Instantiate a registered loss with its recipe parameters."""
    cls = LOSSES.get(name)
    params = dict(params or {})
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise RecipeError(
            f"loss '{name}' has no parameter '{unknown[0]}'; accepted: {', '.join(accepted) or 'none'}"
        )
    loss = cls(**params)
    loss.require_taps()
    return loss


def register(name: str):
    """LOSSES.register that also records the name on the class (used in error messages)."""

    def decorator(cls):
        cls.registered_name = name
        return LOSSES.register(name)(cls)

    return decorator


# ---------------------------------------------------------------------------------------------------------
# Shared maths
# ---------------------------------------------------------------------------------------------------------


def _as_teacher(features: Features) -> Features:
    """Teacher tensors as plain constants: detached, and cloned out of inference mode when needed."""

    def plain(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        return t.clone() if t.is_inference() else t.detach()

    return Features(
        output=plain(features.output),
        taps={k: plain(v) for k, v in features.taps.items()},
        attention_mask=plain(features.attention_mask),
    )


def _mask(student: Features, teacher: Features) -> Tensor | None:
    return student.attention_mask if student.attention_mask is not None else teacher.attention_mask


def _position_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of per-position values [B] or [B, L]; a [B, L] mask excludes padded positions."""
    if mask is not None and values.dim() == 2 and tuple(mask.shape) == tuple(values.shape):
        m = mask.to(values.dtype)
        return (values * m).sum() / m.sum().clamp_min(1)
    return values.mean()


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a ‖ b) over the last dim, from log-probabilities; 0·log 0 = 0."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def _mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w·a + (1-w)·b) from log-probabilities, stable (w in [0, 1])."""
    wa = math.log(weight_a) if weight_a > 0 else -math.inf
    wb = math.log(1 - weight_a) if weight_a < 1 else -math.inf
    return torch.logaddexp(log_a + wa, log_b + wb)


def _check_range(
    loss: DistillLoss, name: str, value: float, low: float, high: float, *, closed_high: bool
) -> None:
    ok = low <= value <= high if closed_high else low <= value < high
    if not ok:
        bracket = "]" if closed_high else ")"
        raise loss.fail(f"{name} must be in [{low}, {high}{bracket}, got {value}")


def _check_positive(loss: DistillLoss, name: str, value: float) -> None:
    if not value > 0:
        raise loss.fail(f"{name} must be > 0, got {value}")


def _as_pairs(loss: DistillLoss, name: str, pairs: Any) -> Pairs:
    """Recipe lists of [student, teacher] into tuples, with a readable error for anything else."""
    if pairs is None:
        return []
    out = []
    for item in pairs:
        if not (isinstance(item, list | tuple) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            raise loss.fail(f"each entry of {name} must be [student_tap, teacher_tap], got {item!r}")
        out.append((item[0], item[1]))
    return out


def _pairs_from_params(
    loss: DistillLoss, pairs: Any, student_taps: list[str] | None, teacher_taps: list[str] | None
) -> Pairs:
    """`pairs` or `student_taps`/`teacher_taps` (paired by index) → one list of pairs."""
    if pairs is not None and (student_taps is not None or teacher_taps is not None):
        raise loss.fail("give either pairs or student_taps/teacher_taps, not both")
    if student_taps is not None or teacher_taps is not None:
        s, t = list(student_taps or []), list(teacher_taps or [])
        if len(s) != len(t):
            raise loss.fail(
                f"student_taps has {len(s)} entries and teacher_taps {len(t)}; they are paired by index"
            )
        return list(zip(s, t))
    return _as_pairs(loss, "pairs", pairs)


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


# ---------------------------------------------------------------------------------------------------------
# Losses on output distributions
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# Hints: intermediate features matched through a learned regressor
# ---------------------------------------------------------------------------------------------------------


def _make_regressor(student: Tensor, teacher: Tensor) -> nn.Module:
    """1×1 conv for [B, C, H, W] maps, Linear over the last dim otherwise (widths from the tensors)."""
    if student.dim() == 4:
        return nn.Conv2d(student.shape[1], teacher.shape[1], kernel_size=1)
    return nn.Linear(student.shape[-1], teacher.shape[-1])


def _width_dim(x: Tensor) -> int:
    return 1 if x.dim() == 4 else -1


class _HintLoss(DistillLoss):
    """`scale·‖h_T − r(g_S)‖²` per tap pair, summed over pairs; `r` created in prepare() when widths differ."""

    needs = ("taps",)
    learned = True
    scale = 1.0
    default_reduction = "mean"
    default_shared = False

    def __init__(
        self,
        pairs: list[list[str]] | None = None,
        student_taps: list[str] | None = None,
        teacher_taps: list[str] | None = None,
        layer_map: LayerMap = None,
        regressor: str = "auto",
        shared_regressor: bool | None = None,
        reduction: str | None = None,
    ):
        super().__init__(layer_map)
        self.tap_refs = {"pairs": _pairs_from_params(self, pairs, student_taps, teacher_taps)}
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


# ---------------------------------------------------------------------------------------------------------
# Attention maps and feature relations (CNN features)
# ---------------------------------------------------------------------------------------------------------


@register("at")
class AttentionTransfer(DistillLoss):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017).

    `Q = vec(Σ_c |A_c|^p)` per sample (channels are dim 1 of [B, C, H, W], the last dim of [B, L, C]),
    L2-normalised; loss `β/2·Σ_j mean_b ‖Q_S/‖Q_S‖ − Q_T/‖Q_T‖‖₂` over tap pairs (the paper's formula).
    `squared: true` uses the reference code's `mean((Q̂_S − Q̂_T)²)` instead (paired with β≈1000 there).
    Channel counts may differ; spatial sizes must match.
    """

    needs = ("taps",)

    def __init__(
        self,
        pairs: list[list[str]] | None = None,
        student_taps: list[str] | None = None,
        teacher_taps: list[str] | None = None,
        layer_map: LayerMap = None,
        p: float = 2.0,
        beta: float = 1.0,
        squared: bool = False,
    ):
        super().__init__(layer_map)
        self.tap_refs = {"pairs": _pairs_from_params(self, pairs, student_taps, teacher_taps)}
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


# ---------------------------------------------------------------------------------------------------------
# Relations between samples
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# Transformer attention: TinyBERT attention, MiniLM, BiBERT DMD
# ---------------------------------------------------------------------------------------------------------


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
class TinyBertAttention(DistillLoss):
    """TinyBERT attention distillation (Jiao et al., 2020): `mean_h MSE(A_S, A_T)` per layer pair.

    A are [B, heads, L, L] attention maps (heads must be equal). Hugging Face returns softmax
    probabilities (tap `...attention.self:attention`); TinyBERT fitted the pre-softmax scores, which HF
    does not expose — the probabilities are what this loss sees. With an attention mask, only (real query,
    real key) entries are averaged.
    """

    needs = ("taps",)

    def __init__(
        self,
        pairs: list[list[str]] | None = None,
        student_taps: list[str] | None = None,
        teacher_taps: list[str] | None = None,
        layer_map: LayerMap = None,
    ):
        super().__init__(layer_map)
        self.tap_refs = {"pairs": _pairs_from_params(self, pairs, student_taps, teacher_taps)}

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
class DirectionMatching(DistillLoss):
    """BiBERT Direction-Matching Distillation (Qin et al., ICLR 2022).

    For each tap pair (the query, key and value linears of paired layers, [B, L, H]):
    `P_F = F·Fᵀ` per attention head ([B, heads, L, L]; heads=1 uses the whole hidden size),
    `P̂ = P / ‖P‖`, loss `Σ_l Σ_F ‖P̂_S − P̂_T‖`. normalize 'batch' takes ‖·‖ over the whole batch tensor,
    exactly as the reference code does (then ‖P̂_S − P̂_T‖ is one Frobenius norm); 'sample' normalises and
    measures each sample and averages. distance 'norm' is the paper's ‖·‖ (unsquared); 'mse' is the mean
    squared difference. The reference code splits heads: set heads to the model's attention heads to
    match it. Hidden sizes may differ (patterns are L×L); padded tokens' rows and columns are zeroed.
    """

    needs = ("taps",)

    def __init__(
        self,
        pairs: list[list[str]] | None = None,
        student_taps: list[str] | None = None,
        teacher_taps: list[str] | None = None,
        layer_map: LayerMap = None,
        heads: int = 1,
        normalize: str = "batch",
        distance: str = "norm",
    ):
        super().__init__(layer_map)
        self.tap_refs = {"pairs": _pairs_from_params(self, pairs, student_taps, teacher_taps)}
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


__all__ = [
    "LOSSES",
    "Features",
    "DistillLoss",
    "HintonKD",
    "build_loss",
    "cross_entropy_only",
    "CrossEntropy",
    "check_logit_shapes",
    "check_taps_present",
    "check_same_batch",
    "prepare_losses",
    "ReverseKL",
    "SkewKL",
    "SkewReverseKL",
    "GeneralizedJSD",
    "SoftCrossEntropy",
    "NormalizedKD",
    "FitNetsHint",
    "TinyBertHidden",
    "TinyBertEmbedding",
    "TinyBertAttention",
    "TinyBertPrediction",
    "AttentionTransfer",
    "FSP",
    "RKDDistance",
    "RKDAngle",
    "ContrastiveKD",
    "MiniLM",
    "DirectionMatching",
]
