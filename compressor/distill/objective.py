"""The distillation objective: runs student and teacher on a batch and sums the weighted losses.

Built in three steps, all before the optimizer exists, so every bad input is a one-line RecipeError before
training starts:
1. `build_objective` instantiates the recipe's losses and resolves their tap references (aliases from
   `distillation.taps`, module names, globs) on both models, pairing layers by each loss's layer map.
2. A dry run on one batch captures the taps and lets each loss check shapes and create its learned parts
   (FitNets/TinyBERT regressors, contrastive projections). Those parameters belong to the objective: they
   train with the student (optimise `objective.parameters()` too), are checkpointed with it, and are never
   exported.
3. Optionally the teacher's answers come from somewhere other than a live forward pass: an on-disk cache
   (`use_cache`) or the student's own last-epoch predictions (PS-KD, `pskd=`).

The teacher never gets gradients: it runs in eval mode under `torch.inference_mode`; losses copy its
tensors out of inference mode before using them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from compressor.distill.losses import LOSSES, DistillLoss, Features, build_loss
from compressor.distill.taps import TapPlan, bind_taps, capture
from compressor.distill.teachers import ProgressiveTargets, TeacherCache, call_model, freeze, teacher_forward
from compressor.errors import RecipeError
from compressor.models.call import primary_output
from compressor.train.distributed import all_sum_, is_distributed


class Objective(nn.Module):
    """Weighted sum of distillation losses. Its own parameters (e.g. FitNets regressors) train with the student."""

    def __init__(
        self,
        losses: Sequence[tuple[str, float, DistillLoss]],
        teacher: nn.Module | None,
        plan: TapPlan | None = None,
        pskd: ProgressiveTargets | None = None,
    ):
        super().__init__()
        self.names = [name for name, _, _ in losses]
        self.weights = [weight for _, weight, _ in losses]
        self.losses = nn.ModuleList([loss for _, _, loss in losses])
        # Kept out of the module tree on purpose: the teacher's parameters must not reach the optimizer,
        # the checkpoint, or DistributedDataParallel's gradient averaging.
        self._teacher = [teacher] if teacher is not None else []
        self.plan = plan or TapPlan()
        self.pskd = pskd
        self.cache: TeacherCache | None = None
        self.needs_teacher = any(getattr(loss, "uses_teacher", True) for loss in self.losses)
        self.epoch = 0
        self.last_parts: dict[str, float] = {}
        self._pskd_updated = torch.zeros(pskd.seen.shape[0], dtype=torch.bool) if pskd is not None else None

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    @property
    def indexed(self) -> bool:
        """Whether each batch's dataset indices are needed (the cache and PS-KD look answers up by index)."""
        return self.cache is not None or self.pskd is not None

    # --- features ---------------------------------------------------------------------------------------
    def student_features(self, student: nn.Module, inputs: Any) -> Features:
        with capture(student, self.plan.student) as taps:
            out = call_model(student, inputs, **self.plan.model_kwargs("student"))
        return Features(primary_output(out), dict(taps), attention_mask=_mask_of(inputs))

    def live_teacher_features(self, inputs: Any) -> Features:
        """One forward pass of the frozen teacher, with its taps, under inference_mode."""
        teacher = self.teacher
        if teacher is None:
            raise RecipeError("the distillation losses need a teacher; add a 'teacher:' section to the recipe")
        with capture(teacher, self.plan.teacher) as taps:
            out = teacher_forward(teacher, inputs, **self.plan.model_kwargs("teacher"))
        return Features(primary_output(out), dict(taps), attention_mask=_mask_of(inputs))

    def teacher_features(self, inputs: Any, target: Tensor | None = None, index: Tensor | None = None) -> Features:
        if self.pskd is not None:
            if index is None or target is None:
                raise RecipeError("PS-KD needs labelled data and sample indices")
            return self.pskd.teacher_features(index, target, self.epoch)
        if self.cache is not None:
            if index is None:
                raise RecipeError("the teacher cache needs sample indices; train through compressor.train.loop.fit")
            device = _device_of(inputs)
            feats = self.cache.features(index, inputs, device)
            return Features(feats.output, feats.taps, attention_mask=_mask_of(inputs))
        return self.live_teacher_features(inputs)

    # --- the step ---------------------------------------------------------------------------------------
    def compute(self, student: nn.Module, inputs: Any, target: Tensor | None, index: Tensor | None = None) -> Tensor:
        s = self.student_features(student, inputs)
        if self.needs_teacher:
            t = self.teacher_features(inputs, target, index)
        else:
            t = Features(output=s.output.detach(), attention_mask=s.attention_mask)
        total = s.output.new_zeros(())
        parts = {}
        for name, weight, loss in zip(self.names, self.weights, self.losses):
            value = loss(s, t, target)
            parts[name] = float(value.detach())
            total = total + weight * value
        self.last_parts = parts
        if self.pskd is not None and index is not None:
            self.pskd.update(index, s.output)
            self._pskd_updated[index.long().cpu()] = True
        return total

    def prepare(self, student: nn.Module, inputs: Any, target: Tensor | None = None) -> None:
        """Dry run on one batch: every loss checks its features and creates its learned parts."""
        was_training = student.training
        student.eval()
        try:
            with torch.no_grad():
                s = self.student_features(student, inputs)
                if not self.needs_teacher:
                    t = Features(output=s.output, attention_mask=s.attention_mask)
                elif self.pskd is not None:
                    if target is None:
                        raise RecipeError("distillation.pskd trains on labels, but this data has none")
                    index = torch.arange(s.output.shape[0])
                    t = self.pskd.teacher_features(index, target, 0)
                else:
                    t = self.live_teacher_features(inputs)
            for name, loss in zip(self.names, self.losses):
                if "target" in loss.needs and target is None:
                    raise RecipeError(f"distillation loss '{name}' needs labels, but this data has none")
                loss.prepare(s, t)
        finally:
            student.train(was_training)

    # --- teacher sources --------------------------------------------------------------------------------
    def use_cache(self, cache: TeacherCache) -> None:
        """Read the teacher's answers from `cache` (filled with `fill_cache`) instead of running it."""
        self.cache = cache

    def cache_run(self, inputs: Any) -> Features:
        """What the cache stores for a batch: the teacher's output and the taps the losses read."""
        feats = self.live_teacher_features(inputs)
        return Features(feats.output, feats.taps)

    # --- epochs (PS-KD) ---------------------------------------------------------------------------------
    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.pskd is not None:
            self._pskd_updated = torch.zeros(self.pskd.seen.shape[0], dtype=torch.bool)

    def end_epoch(self, epoch: int) -> None:
        """Under DDP each rank saw a share of the samples: share this epoch's PS-KD predictions."""
        if self.pskd is None or not is_distributed() or self._pskd_updated is None:
            return
        mask = self._pskd_updated.to(torch.float64)
        # Each sample was seen by one rank this epoch: summing masked predictions over ranks collects them.
        sums = all_sum_(self.pskd.predictions.double() * mask[:, None])
        counts = all_sum_(mask)
        seen_now = counts > 0
        merged = sums / counts.clamp_min(1)[:, None]
        self.pskd.predictions[seen_now] = merged[seen_now].to(self.pskd.predictions.dtype)
        self.pskd.seen |= seen_now

    # PS-KD's predictions are training state: checkpointed with the objective (not as buffers, which
    # DistributedDataParallel would overwrite with rank 0's copy every step).
    def get_extra_state(self) -> dict[str, Any]:
        if self.pskd is None:
            return {}
        return {"pskd_predictions": self.pskd.predictions, "pskd_seen": self.pskd.seen}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if self.pskd is not None and state:
            self.pskd.predictions.copy_(state["pskd_predictions"])
            self.pskd.seen.copy_(state["pskd_seen"])


def _mask_of(inputs: Any) -> Tensor | None:
    return inputs.get("attention_mask") if isinstance(inputs, Mapping) else None


def _device_of(inputs: Any) -> torch.device:
    if isinstance(inputs, Tensor):
        return inputs.device
    if isinstance(inputs, Mapping):
        return next(iter(inputs.values())).device
    return inputs[0].device


def _labelled(built: list[tuple[str, float, DistillLoss]]) -> dict[str, DistillLoss]:
    """Loss name → loss for error messages; a name used twice becomes 'name#2'."""
    out: dict[str, DistillLoss] = {}
    for name, _, loss in built:
        label, n = name, 1
        while label in out:
            n += 1
            label = f"{name}#{n}"
        out[label] = loss
    return out


def build_losses(loss_specs) -> list[tuple[str, float, DistillLoss]]:
    built = []
    for spec in loss_specs:
        if spec.name not in LOSSES:
            raise RecipeError(f"distillation loss '{spec.name}' is unknown; known: {', '.join(LOSSES.names())}")
        try:
            loss = build_loss(spec.name, spec.params)
        except TypeError as exc:
            raise RecipeError(f"distillation loss '{spec.name}': bad params {spec.params} ({exc})") from None
        built.append((spec.name, spec.weight, loss))
    if not built:
        raise RecipeError("no distillation losses configured; add at least one under distillation.losses")
    return built


def build_objective(
    loss_specs,
    teacher: nn.Module | None,
    *,
    student: nn.Module | None = None,
    batch: tuple[Any, Tensor | None] | None = None,
    taps: Mapping[str, Mapping[str, str]] | None = None,
    pskd: ProgressiveTargets | None = None,
) -> Objective:
    """Instantiate the recipe's losses, bind their taps and dry-run them on `batch`; fail before training.

    `student` and `batch` are needed for losses that read taps or learn parameters; without them only the
    losses themselves are checked (the old, output-only behaviour).
    """
    built = build_losses(loss_specs)
    needs_teacher = any(getattr(loss, "uses_teacher", True) for _, _, loss in built)
    if pskd is not None:
        if teacher is not None:
            raise RecipeError("distillation.pskd makes the student its own teacher; remove the 'teacher:' section")
        tapping = [name for name, _, loss in built if loss.tap_refs]
        if tapping:
            raise RecipeError(f"distillation loss '{tapping[0]}' reads teacher features, which PS-KD does not have")
    elif needs_teacher and teacher is None:
        name = next(name for name, _, loss in built if getattr(loss, "uses_teacher", True))
        raise RecipeError(f"distillation loss '{name}' needs a teacher; add a 'teacher:' section to the recipe")
    if teacher is not None:
        freeze(teacher)
    plan = TapPlan()
    if student is not None and any(loss.tap_refs for _, _, loss in built):
        if teacher is None:
            raise RecipeError("distillation losses with taps need a teacher; add a 'teacher:' section")
        plan = bind_taps(_labelled(built), student, teacher, taps or {})
    elif taps and student is not None and teacher is not None:
        bind_taps({}, student, teacher, taps)  # unused aliases must still name real modules
    objective = Objective(built, teacher, plan, pskd)
    if student is not None and batch is not None:
        objective.prepare(student, batch[0], batch[1])
    return objective


__all__ = ["Objective", "build_objective", "build_losses"]
