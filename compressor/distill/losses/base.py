"""The base of every loss: `Features`, `DistillLoss`, the registry, validation helpers and shared maths.

See the package docstring for the life cycle of a loss.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
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


class PairedTapLoss(DistillLoss):
    """A loss over (student tap, teacher tap) pairs, given as `pairs` or as `student_taps`/`teacher_taps`
    paired by index (or by `layer_map`). Subclasses take their own parameters and pass `**taps` on."""

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


def accepted_params(cls: type) -> list[str]:
    """The recipe parameters of a loss class: its __init__'s, plus its base's where it passes `**taps` on."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = list(inspect.signature(klass.__init__).parameters.values())[1:]
        names += [p.name for p in params if p.kind is not p.VAR_KEYWORD and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
    return names


def build_loss(name: str, params: dict | None = None) -> DistillLoss:
    """Instantiate a registered loss with its recipe parameters."""
    cls = LOSSES.get(name)
    params = dict(params or {})
    accepted = accepted_params(cls)
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
