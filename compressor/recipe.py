"""The recipe: everything a run does, validated before any work starts.

YAML is data only (`yaml.safe_load`). Models and data are named by built-in name or by an explicit
`package.module:function` entry point. `--set a.b=c` overrides are applied to the raw data and then
validated like the file itself, so an override has the same type checks and error messages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator

from compressor.config_files import validation_line
from compressor.errors import RecipeError
from compressor.stages import STAGES, StageSpec, load_stage_modules


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(Strict):
    """A model: a built-in name (see `compress models`) or `package.module:function` returning an nn.Module."""

    model: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: Path | None = None  # a state dict file, loaded with torch.load(weights_only=True)


class TeacherPretrain(Strict):
    """Train the teacher on the recipe's data when no weights are given; cached per user, reused."""

    epochs: int = Field(20, ge=1)
    lr: float = Field(1e-3, gt=0)


class TeacherSpec(ModelSpec):
    pretrain: TeacherPretrain | None = None


class DataSpec(Strict):
    source: str = "digits"  # built-in name, or `package.module:function` returning (train_loader, val_loader)
    batch_size: int = Field(64, ge=1)
    val_fraction: float = Field(0.25, gt=0, lt=1)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class OptimizerSpec(Strict):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0)


class SchedulerSpec(Strict):
    name: Literal["none", "cosine", "step"] = "cosine"
    step_size: int = Field(10, ge=1)
    gamma: float = Field(0.1, gt=0)


class TrainSpec(Strict):
    """Defaults for every stage that trains; a stage can override any of them."""

    epochs: int = Field(10, ge=0)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    grad_clip: float | None = Field(None, gt=0)
    device: str = "cpu"
    max_steps_per_epoch: int | None = Field(None, ge=1)  # for smoke runs and tests


class LossSpec(Strict):
    name: str
    weight: float = Field(1.0, ge=0)
    params: dict[str, Any] = Field(default_factory=dict)


class CacheSpec(Strict):
    """Teacher outputs (and tapped features) computed once per training sample, kept on disk, reused."""

    top_k: int | None = Field(None, ge=1)  # keep only the k largest logits per sample (large output spaces)
    topk_mode: Literal["uniform", "renormalize"] = "uniform"
    location: Literal["user", "work"] = "user"  # the user cache (reused across runs) or the run's work dir


class EnsembleMember(TeacherSpec):
    weight: float = Field(1.0, ge=0)
    seed: int | None = None  # pretraining seed (default: the recipe's), so equal architectures can differ


class EnsembleSpec(Strict):
    """More teachers: the student learns from the weighted combination of `teacher` and these."""

    teachers: list[EnsembleMember] = Field(min_length=1)
    teacher_weight: float = Field(1.0, ge=0)  # weight of the recipe's `teacher:`
    space: Literal["logits", "probs"] = "logits"  # average logits, or mix the probability distributions


class AssistantSpec(ModelSpec):
    """A teacher assistant (TAKD): trained from the teacher (or the previous assistant) before the stages."""

    epochs: int = Field(10, ge=1)
    lr: float | None = Field(None, gt=0)
    losses: list[LossSpec] | None = None  # default: distillation.losses
    taps: dict[str, dict[str, str]] | None = None  # tap aliases while this assistant is the student


class PSKDSpec(Strict):
    """Progressive self-knowledge distillation: the student's own last-epoch predictions are its teacher."""

    alpha_T: float = Field(0.8, ge=0, le=1)


class DistillationSpec(Strict):
    """The knowledge the student learns from the teacher; used by every stage that trains."""

    losses: list[LossSpec] = Field(default_factory=lambda: [LossSpec(name="hinton")])
    taps: dict[str, dict[str, str]] = Field(default_factory=dict)  # {"student": {tap: module}, "teacher": {...}}
    cache: CacheSpec | None = None  # `true` for the defaults
    ensemble: EnsembleSpec | None = None
    teacher_assistants: list[AssistantSpec] = Field(default_factory=list)
    pskd: PSKDSpec | None = None  # `true` for the defaults; needs labels and no teacher
    teacher_candidates: list[Path] = Field(default_factory=list)  # teacher weights files; lowest validation KL wins
    selection_temperature: float = Field(1.0, gt=0)

    @field_validator("cache", "pskd", mode="before")
    @classmethod
    def _flag(cls, value: Any) -> Any:
        if value is True:
            return {}
        return None if value is False else value


class ParitySpec(Strict):
    samples: int = Field(256, ge=1)
    max_abs: float = Field(1e-3, gt=0)  # absolute output difference allowed (fake-quant vs integer kernels)
    min_top1_agreement: float = Field(0.99, ge=0, le=1)
    min_cosine: float = Field(0.999, ge=-1, le=1)


class ExportSpec(Strict):
    format: Literal["onnx"] = "onnx"
    opset: int = Field(17, ge=13)
    dynamic_batch: bool = True
    parity: ParitySpec = Field(default_factory=ParitySpec)


class BenchSpec(Strict):
    warmup: int = Field(20, ge=0)
    iterations: int = Field(200, ge=1)
    batches: list[int] = Field(default_factory=lambda: [1])
    # A quantized (QAT/PTQ/binarized) artifact is also timed against a float export of the same student on the
    # first target, interleaved, at the smallest batch: report.json `latency_vs_float`, and a warning when it
    # is not faster. A few short rounds (warmup/iterations capped at 20/100): it runs in every pipeline run.
    compare_float: bool = True
    compare_float_rounds: int = Field(3, ge=1)


class Recipe(Strict):
    name: str = "run"
    seed: int = 0
    task: Literal["classification", "embedding"] = "classification"
    teacher: TeacherSpec | None = None
    student: ModelSpec
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    distillation: DistillationSpec = Field(default_factory=DistillationSpec)
    stages: list[SerializeAsAny[StageSpec]] = Field(default_factory=list)
    export: ExportSpec = Field(default_factory=ExportSpec)
    targets: list[str] = Field(default_factory=list)
    bench: BenchSpec = Field(default_factory=BenchSpec)
    budgets: Path | None = None

    @field_validator("stages", mode="before")
    @classmethod
    def _stages_by_kind(cls, value: Any) -> list[StageSpec]:
        if not isinstance(value, list):
            raise ValueError("must be a list of stages, each with a 'kind'")
        registry = load_stage_modules()
        specs = []
        for index, raw in enumerate(value):
            if isinstance(raw, StageSpec):
                specs.append(raw)
                continue
            if not isinstance(raw, dict) or "kind" not in raw:
                raise ValueError(f"stages[{index}] needs a 'kind' (one of: {', '.join(registry.names())})")
            kind = raw["kind"]
            if kind not in registry:
                raise ValueError(f"stages[{index}].kind '{kind}' is unknown; allowed: {', '.join(registry.names())}")
            try:
                specs.append(registry.get(kind).spec.model_validate(raw))
            except ValidationError as exc:
                raise ValueError(f"stages[{index}] ({kind}): {validation_line(exc)}") from None
        return specs

    def stage_names(self) -> list[str]:
        return [spec.name or f"{i}-{spec.kind}" for i, spec in enumerate(self.stages)]


def _error_line(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    path = ".".join(str(p) for p in err["loc"] if p != "function-after") or "(top level)"
    if err["type"] == "extra_forbidden":
        parent = path.rsplit(".", 1)[0] if "." in path else None
        allowed = _allowed_fields(parent)
        return f"{source}: unknown field '{path}'" + (f"; allowed here: {', '.join(allowed)}" if allowed else "")
    return f"{source}: {validation_line(exc)}"


def _allowed_fields(parent: str | None) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in (parent.split(".") if parent else []):
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        sub = next((a for a in candidates if issubclass(a, BaseModel)), None)
        if sub is None:
            return []
        model = sub
    return sorted(model.model_fields)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` overrides; values are parsed as YAML scalars (`3`, `0.1`, `true`, `[1, 32]`)."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set '{item}': expected KEY=VALUE, e.g. --set train.epochs=3")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else None
        node: Any = data
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
            else:
                raise RecipeError(f"--set '{item}': '{part}' is not a section of the recipe")
        last = parts[-1]
        if isinstance(node, list) and last.isdigit() and int(last) < len(node):
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise RecipeError(f"--set '{item}': cannot set '{last}' here")
    return data


def parse_recipe(data: Any, source: str = "recipe", base_dir: Path | None = None) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: expected a mapping of recipe fields at the top level, got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_error_line(exc, source)) from None
    if base_dir is not None:
        recipe = _resolve_paths(recipe, base_dir)
    return recipe


def _resolve_paths(recipe: Recipe, base_dir: Path) -> Recipe:
    """Relative file paths in a recipe are relative to the recipe file, not the working directory."""

    def fix(path: Path | None) -> Path | None:
        return path if path is None or path.is_absolute() else (base_dir / path)

    if recipe.teacher is not None and recipe.teacher.weights is not None:
        recipe.teacher.weights = fix(recipe.teacher.weights)
    recipe.student.weights = fix(recipe.student.weights)
    recipe.budgets = fix(recipe.budgets)
    distillation = recipe.distillation
    distillation.teacher_candidates = [fix(p) for p in distillation.teacher_candidates]
    for spec in [*(distillation.ensemble.teachers if distillation.ensemble else []), *distillation.teacher_assistants]:
        spec.weights = fix(spec.weights)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file. Raises RecipeError with one line on any problem."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file '{path}' does not exist; pass a YAML recipe, e.g. examples/digits.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if isinstance(data, dict):
        data = apply_overrides(data, overrides or [])
    return parse_recipe(data, source=str(path), base_dir=path.parent.resolve())


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


__all__ = ["Recipe", "StageSpec", "STAGES", "load_recipe", "parse_recipe", "dump_recipe", "apply_overrides"]
