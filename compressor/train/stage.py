"""What every training stage shares: its recipe fields and one call that trains the student."""

from __future__ import annotations

from pydantic import Field

from compressor.distill.objective import build_objective
from compressor.recipe import LossSpec
from compressor.stages import StageSpec
from compressor.state import ModelState, RunContext
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


def evaluate_state(state: ModelState, ctx: RunContext) -> dict[str, float]:
    return evaluate(state.module, ctx.data.val, ctx.recipe.task, teacher=ctx.teacher, device=ctx.recipe.train.device)


def train_student(state: ModelState, spec: TrainingStageSpec, ctx: RunContext, label: str, on_step=None) -> FitResult:
    """Train the student with the recipe's distillation objective (teacher in float, frozen)."""
    train = stage_train_spec(ctx, spec)
    objective = build_objective(spec.losses or ctx.recipe.distillation.losses, ctx.teacher)
    module = state.module
    return fit(
        module,
        lambda inputs, target: objective.compute(module, inputs, target),
        ctx.data.train,
        train,
        ctx.work_dir / "checkpoints" / f"{label}.pt",
        epochs=train.epochs,
        extra_modules=objective,
        evaluate=lambda: evaluate_state(state, ctx),
        resume=ctx.resume,
        seed=ctx.recipe.seed,
        log=ctx.log,
        show_progress=ctx.show_progress,
        label=label,
        on_step=on_step,
    )
