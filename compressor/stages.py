"""The stage registry: each `kind` in a recipe maps to a spec (pydantic) and a run function.

A stage is `run(state: ModelState, spec, ctx: RunContext) -> ModelState`. Stage modules register
themselves at import; `load_stage_modules()` imports the built-in ones.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from compressor.registry import Registry

if TYPE_CHECKING:
    from compressor.state import ModelState, RunContext


class StageSpec(BaseModel):
    """Base of every stage's recipe section. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
    kind: str
    name: str | None = None  # shown in lineage/report; defaults to the kind


@dataclass(frozen=True)
class StageDef:
    spec: type[StageSpec]
    run: Callable[[ModelState, StageSpec, RunContext], ModelState]
    # Optional cheap checks against the student before anything trains (see `check_stages`).
    check: Callable[..., None] | None = None


STAGES: Registry[StageDef] = Registry("stage kind")

# Spec classes live beside their stage; these modules are imported to register them.
BUILTIN_STAGE_MODULES = [
    "compressor.distill.stage",
    "compressor.quant.qat",
    "compressor.quant.ptq",
    "compressor.quant.binary_stage",
    "compressor.prune.stage",
]


def register_stage(kind: str, spec: type[StageSpec], check: Callable[..., None] | None = None):
    """Decorator: register `run` as the stage for recipe entries with `kind: <kind>`.

    `check(spec, *, recipe, index, module, example_inputs)`, if given, raises a CompressorError for
    problems only the student reveals (a glob matching no layer, ...), before any stage trains.
    """

    def decorator(run):
        STAGES.add(kind, StageDef(spec=spec, run=run, check=check))
        return run

    return decorator


def load_stage_modules() -> Registry[StageDef]:
    for module in BUILTIN_STAGE_MODULES:
        importlib.import_module(module)
    return STAGES


def check_stages(recipe, module, example_inputs) -> None:
    """Run every stage's `check` against the student as built, so that model-dependent recipe errors
    surface before the teacher or any stage trains."""
    for index, spec in enumerate(recipe.stages):
        check = load_stage_modules().get(spec.kind).check
        if check is not None:
            name = recipe.stage_names()[index]
            check(spec.model_copy(update={"name": name}), recipe=recipe, index=index, module=module, example_inputs=example_inputs)
