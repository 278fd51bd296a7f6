"""What every training stage shares: its recipe fields and one call that trains the student."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from pydantic import Field
from torch import nn

from compressor.distill.objective import build_objective
from compressor.recipe import LossSpec
from compressor.stages import StageSpec
from compressor.state import ModelState, RunContext
from compressor.train.distributed import shard_loader, weighted_mean
from compressor.train.evaluate import evaluate
from compressor.train.loop import FitResult, fit


class TrainingStageSpec(StageSpec):
    """Fields left unset fall back to the recipe's `train:` and `distillation:` sections."""

    epochs: int | None = Field(None, ge=0)
    lr: float | None = Field(None, gt=0)
    losses: list[LossSpec] | None = None


def stage_train_spec(ctx: RunContext, spec: TrainingStageSpec):
    train = ctx.recipe.train.model_copy(deep=True)
    if spec.epochs is not None:
        train.epochs = spec.epochs
    if spec.lr is not None:
        train.optimizer.lr = spec.lr
    return train


def evaluate_module(module: nn.Module, ctx: RunContext, teacher: nn.Module | None) -> dict[str, float]:
    """Metrics on the held-out split; under DDP each rank evaluates its share and the means are combined."""
    loader, count = shard_loader(ctx.data.val)
    metrics = evaluate(module, loader, ctx.recipe.task, teacher=teacher, device=ctx.recipe.train.device)
    return weighted_mean(metrics, count)


def evaluate_state(state: ModelState, ctx: RunContext) -> dict[str, float]:
    return evaluate_module(state.module, ctx, ctx.teacher)


def train_module(
    module: nn.Module,
    teacher: nn.Module | None,
    losses: list[LossSpec],
    taps: Mapping[str, Mapping[str, str]],
    train,
    ctx: RunContext,
    label: str,
    *,
    evaluate: Callable[[], dict[str, float]] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> FitResult:
    """Distill `module` from `teacher` with `losses` for `train.epochs` epochs (checkpointed as `label`).

    The recipe's teacher strategies apply: `distillation.cache` (teacher answers from disk) and
    `distillation.pskd` (the module's own past predictions as the teacher).
    """
    from compressor.distill.strategy import first_batch, open_cache, progressive_targets

    pskd = progressive_targets(ctx.recipe, ctx, train.epochs)
    batch = first_batch(ctx.data.train, train.device)
    objective = build_objective(losses, teacher, student=module, batch=batch, taps=taps, pskd=pskd)
    cache_spec = ctx.recipe.distillation.cache
    if cache_spec is not None and objective.needs_teacher and teacher is not None:
        objective.use_cache(open_cache(objective, ctx.data.train, cache_spec, ctx, train.device))
    return fit(
        module,
        lambda inputs, target, index=None: objective.compute(module, inputs, target, index),
        ctx.data.train,
        train,
        ctx.work_dir / "checkpoints" / f"{label}.pt",
        epochs=train.epochs,
        extra_modules=objective,
        evaluate=evaluate or (lambda: evaluate_module(module, ctx, teacher)),
        resume=ctx.resume,
        seed=ctx.recipe.seed,
        log=ctx.log,
        show_progress=ctx.show_progress,
        label=label,
        on_step=on_step,
        indexed=objective.indexed,
        on_epoch_start=objective.start_epoch,
        on_epoch_end=objective.end_epoch,
    )


def train_student(state: ModelState, spec: TrainingStageSpec, ctx: RunContext, label: str, on_step=None) -> FitResult:
    """Train the student with the recipe's distillation objective (teacher in float, frozen)."""
    train = stage_train_spec(ctx, spec)
    return train_module(
        state.module, ctx.teacher, spec.losses or ctx.recipe.distillation.losses, ctx.recipe.distillation.taps,
        train, ctx, label, evaluate=lambda: evaluate_state(state, ctx), on_step=on_step,
    )  # fmt: skip
