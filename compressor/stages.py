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


STAGES: Registry[StageDef] = Registry("stage kind")

# Spec classes live beside their stage; these modules are imported to register them.
BUILTIN_STAGE_MODULES = [
    "compressor.distill.stage",
    "compressor.quant.qat",
]


def register_stage(kind: str, spec: type[StageSpec]):
    """Decorator: register `run` as the stage for recipe entries with `kind: <kind>`."""

    def decorator(run):
        STAGES.add(kind, StageDef(spec=spec, run=run))
        return run

    return decorator


def load_stage_modules() -> Registry[StageDef]:
    for module in BUILTIN_STAGE_MODULES:
        importlib.import_module(module)
    return STAGES
