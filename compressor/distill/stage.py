"""The `distill` stage: train the student against the teacher with the recipe's losses."""

from __future__ import annotations

from compressor.stages import register_stage
from compressor.state import LineageEntry, ModelState, RunContext
from compressor.train.stage import TrainingStageSpec, train_student


class DistillSpec(TrainingStageSpec):
    kind: str = "distill"


@register_stage("distill", DistillSpec)
def run_distill(state: ModelState, spec: DistillSpec, ctx: RunContext) -> ModelState:
    label = spec.name or "distill"
    result = train_student(state, spec, ctx, label)
    metrics = {k: v for k, v in result.final.items() if k != "epoch"}
    state.metrics.update(metrics)
    state.lineage.append(LineageEntry(stage=label, kind="distill", metrics=metrics, details={"epochs": len(result.history)}))
    return state
