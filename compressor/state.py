"""What flows between stages: the student (`ModelState`) and what every stage may read (`RunContext`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from compressor.data.loaders import DataBundle
    from compressor.recipe import Recipe


@dataclass
class LineageEntry:
    """One stage that ran, with what it measured (accuracy, params, ...) right after it."""

    stage: str
    kind: str
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelState:
    """The student as it moves through the stages.

    `extras` carries facts a later step needs and the manifest records, by owner:
    e.g. "pruning" (the structure to rebuild), "sparsity" (2:4 layers, TensorRT flag), "quant", "binary".
    """

    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    lineage: list[LineageEntry] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunContext:
    """Read-only surroundings of a run: the recipe, the teacher, the data, where checkpoints go."""

    recipe: Recipe
    data: DataBundle
    teacher: nn.Module | None
    work_dir: Path
    resume: bool = False
    log: Any = print  # a callable taking one string; the CLI passes rich's console.log
    show_progress: bool = True
