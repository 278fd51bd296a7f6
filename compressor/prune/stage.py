"""The `prune` and `sparsity` stages of a recipe, and what they add to the artifact.

`prune` removes structure for real, in `steps` steps of a schedule (1 = one-shot; cubic AGP by default),
each followed by fine-tuning with the recipe's distillation objective (teacher frozen, in float):
prune → recover → prune ... inside one stage. CNNs lose channels through Torch-Pruning
(`structured.py`: `ratio`, `importance`, `global_pruning`, `layer_ratios`, `ignore`, `round_to`);
Hugging Face BERT-like students lose attention heads, FFN neurons and whole layers (`transformer.py`:
`heads`, `ffn`, `layers`), ranked on calibration batches from the training data.

`sparsity` puts magnitude masks (unstructured, or 2:4) on Linear/Conv2d weights and keeps them through
fine-tuning (`sparsity.py`); they are made permanent at the end of the stage. ONNX Runtime on CPU gains
no speed from the zeros (dense kernels); 2:4 is for TensorRT's sparse tensor cores, so the manifest
records `trtexec --sparsity=enable` and the exported file's 2:4 pattern is checked.

Resume: each step fine-tunes under its own checkpoint label (`<stage>.step<k>` when steps > 1), and the
records of every pruning step are written to `checkpoints/<stage>.pruning.json` as soon as the step is
taken. With `--resume`, the stage replays those records (no re-ranking, so random or Taylor importance
cannot choose differently) and each step's checkpoint meets the shapes it was saved with. Sparsity masks
are magnitude-ranked (deterministic) and travel in the checkpoints as `weight_mask` buffers.

Artifact (`artifact_extras`, called by the pipeline after export): `structure.json` + `weights.pt`, so
the pruned student is rebuilt from the recipe's constructor and loaded with `weights_only=True`
(`load_student(artifact)`); for sparsity, the zero fraction and 2:4 pattern of the exported file.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError
from torch import nn

from compressor.errors import CompressorError, ParityError, RecipeError
from compressor.models.call import to_device
from compressor.prune.structure import REPLAYS, STRUCTURE_FILE, WEIGHTS_FILE, save_pruned, shapes_of
from compressor.prune.structured import (
    IMPORTANCES,
    NEEDS_GRADIENTS,
    ChannelPruner,
    PruningError,
    count_macs_params,
    count_params,
    kept_count,
    match_modules,
    replay_channels,
    schedule_ratios,
)
from compressor.stages import register_stage
from compressor.state import LineageEntry, ModelState, RunContext
from compressor.train.stage import TrainingStageSpec, train_student

PRUNED_DIR = "pruned"  # in the work dir: the student as the last prune stage left it (structure + weights)
# Stages that do not train or restructure the student, so masks made permanent before them survive.
KEEPS_WEIGHTS = frozenset({"ptq"})
# Stages after which Torch-Pruning cannot restructure the student (Brevitas layers, FX graph, ±α weights).
QUANTIZING = frozenset({"qat", "binarize"})


def _ratio(value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise PydanticCustomError("ratio", "must be in [0, 1): 0.5 removes half, 1 would remove everything")
    return value


Ratio = Annotated[float, AfterValidator(_ratio)]


class ScheduleFields(TrainingStageSpec):
    """`steps` masking/pruning steps, each followed by `epochs` of distillation (`final_epochs` after the last)."""

    steps: int = Field(1, ge=1)
    schedule: Literal["agp", "linear"] = "agp"  # cumulative ratio per step: cubic (Zhu & Gupta 2017) or even
    final_epochs: int | None = Field(None, ge=0)


class PruneSpec(ScheduleFields):
    """Structured pruning. CNN channels: `ratio` (+ options). BERT-like encoders: `heads`, `ffn`, `layers`."""

    kind: str = "prune"
    ratio: Ratio | None = None  # fraction of channels removed per layer (overall with global_pruning)
    importance: str = "l2"  # l1, l2, bn_scale, taylor (gradients of the distillation loss), random
    global_pruning: bool = False
    layer_ratios: dict[str, Ratio] = Field(default_factory=dict)  # {module glob: ratio}
    ignore: list[str] = Field(default_factory=list)  # module globs never pruned (the classifier never is)
    round_to: int | None = Field(None, ge=1)  # keep channel/FFN widths a multiple of this (e.g. 8)
    heads: Ratio | None = None  # fraction of attention heads removed per layer
    ffn: Ratio | None = None  # fraction of FFN intermediate neurons removed per layer
    layers: Ratio | list[Annotated[int, Field(ge=0)]] | None = None  # fraction of blocks, or block indices to drop
    transformer_importance: Literal["activation", "l2", "random"] = "activation"  # for heads and ffn
    global_ranking: bool = False  # rank heads / FFN neurons across layers instead of per layer
    calibration_batches: int = Field(4, ge=1)  # training batches for activation and Taylor importance

    @field_validator("importance")
    @classmethod
    def _known_importance(cls, value: str) -> str:
        if value not in IMPORTANCES:
            raise PydanticCustomError(
                "importance", "unknown importance '{value}'; known: {known}", {"value": value, "known": ", ".join(IMPORTANCES.names())}
            )
        return value

    @model_validator(mode="after")
    def _one_target(self) -> PruneSpec:
        transformer = [k for k in ("heads", "ffn", "layers") if getattr(self, k) is not None]
        if self.ratio is None and not transformer:
            raise ValueError("say what to prune: ratio (CNN channels) or heads / ffn / layers (BERT-like encoders)")
        if self.ratio is not None and transformer:
            raise ValueError(f"ratio (CNN channels) and {transformer[0]} (BERT-like encoders) cannot be combined in one stage")
        if self.ratio is None and (self.layer_ratios or self.ignore or self.global_pruning):
            raise ValueError("layer_ratios, ignore and global_pruning are channel options: they need ratio")
        if isinstance(self.layers, list) and len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers {self.layers} lists a layer twice")
        return self


class SparsitySpec(ScheduleFields):
    """Magnitude masks kept through fine-tuning, made permanent at the end of the stage."""

    kind: str = "sparsity"
    pattern: Literal["2:4", "unstructured"] = "2:4"
    sparsity: Ratio | None = None  # unstructured target; 2:4 is always 0.5
    layers: list[str] | None = None  # Linear/Conv2d globs; default: every such layer the pattern fits
    global_ranking: bool = False  # unstructured: one magnitude threshold across layers

    @model_validator(mode="after")
    def _pattern_fields(self) -> SparsitySpec:
        if self.pattern == "2:4":
            if self.sparsity not in (None, 0.5):
                raise ValueError(f"2:4 keeps 2 of every 4 weights (sparsity 0.5); remove sparsity: {self.sparsity}")
            if self.steps != 1:
                raise ValueError("2:4 masks are set in one step and then fine-tuned; use steps: 1")
        elif self.sparsity is None:
            raise ValueError("unstructured sparsity needs a target, e.g. sparsity: 0.8")
        return self


# --- shared helpers ------------------------------------------------------------------------------------


def _step_label(label: str, step: int, steps: int) -> str:
    return label if steps == 1 else f"{label}.step{step + 1}"


def _step_spec(spec: ScheduleFields, step: int) -> ScheduleFields:
    if step == spec.steps - 1 and spec.final_epochs is not None:
        return spec.model_copy(update={"epochs": spec.final_epochs})
    return spec


def _index_of(recipe, spec) -> int:
    """Position of a running stage in the recipe (the pipeline names each stage after `stage_names()`)."""
    names = recipe.stage_names()
    return names.index(spec.name) if spec.name in names else len(names)


def _require_unquantized(state: ModelState, kind: str, owners: tuple[str, ...]) -> None:
    """Refuse a student that an earlier stage quantized (`owners`: extras keys, "quant" / "binary")."""
    done = [key for key in owners if state.extras.get(key)]
    if done:
        raise RecipeError(
            f"a {kind} stage after {'qat' if done[0] == 'quant' else 'binarize'}: {kind} the float student first, "
            "then quantize (order: distill → prune → qat)"
        )


def _calibration(ctx: RunContext, count: int) -> list[tuple[Any, Any]]:
    device = ctx.recipe.train.device
    batches = []
    for batch in itertools.islice(ctx.data.train, count):
        inputs, target = batch[0], batch[1]
        batches.append((to_device(inputs, device), target.to(device) if isinstance(target, torch.Tensor) else None))
    return batches


def _keep_ratio(current: int, target: int) -> float:
    """The ratio that keeps exactly `target` of `current` units under `kept_count`'s int() rounding:
    AGP targets are fractions of the *original* count, the library's ratios fractions of the current."""
    return 0.0 if target >= current else 1.0 - (target + 0.5) / current


def _is_main() -> bool:
    from compressor.train.distributed import is_main

    return is_main()


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)  # a kill mid-write leaves the previous records intact


def _one_sample(example_inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(t[:1] for t in example_inputs)


def _macs(module: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> int | None:
    try:
        return count_macs_params(module, _one_sample(example_inputs))[0]
    except Exception:  # noqa: BLE001 - MAC counting is a report nicety; an uncountable model still prunes
        return None


# --- prune: CNN channels -------------------------------------------------------------------------------


def _channel_pruner(module: nn.Module, spec: PruneSpec, example_inputs, **override: Any) -> ChannelPruner:
    inputs = example_inputs[0] if len(example_inputs) == 1 else tuple(example_inputs)
    options = {
        "ratio": spec.ratio, "importance": spec.importance, "global_pruning": spec.global_pruning,
        "layer_ratios": spec.layer_ratios or None, "ignore": spec.ignore, "round_to": spec.round_to,
    }  # fmt: skip
    options.update(override)
    return ChannelPruner(module, inputs, options.pop("ratio"), **options)


def _widths(module: nn.Module) -> dict[str, int]:
    return {
        name: sub.out_channels if isinstance(sub, nn.modules.conv._ConvNd) else sub.out_features
        for name, sub in module.named_modules()
        if isinstance(sub, nn.modules.conv._ConvNd | nn.Linear)
    }


class _ChannelSteps:
    """Channel pruning of a CNN, one schedule step at a time.

    Every step is a fresh one-step `ChannelPruner` whose per-layer ratios take each layer from its current
    width to the schedule's target for that step, a fraction of its *original* width. So a step depends
    on nothing but the model in front of it, its record is exactly that step's removals, and a resumed
    run can replay recorded steps and prune on from there.
    """

    def __init__(self, state: ModelState, spec: PruneSpec, ctx: RunContext):
        self.state, self.spec, self.ctx = state, spec, ctx
        first = _channel_pruner(state.module, spec, state.example_inputs)  # validates globs, ratios, tracing
        self.original = _widths(state.module)
        ignored = tuple(first.ignored)  # the classifier and `ignore` (with everything inside those modules)
        final = {
            name: spec.ratio for name in self.original
            if not any(name == i or name.startswith(i + ".") for i in ignored)
        }  # fmt: skip
        for pattern, ratio in spec.layer_ratios.items():
            final.update({name: ratio for name in match_modules(state.module, [pattern], "layer_ratios") if name in final})
        self.schedules = {name: schedule_ratios(ratio, spec.steps, spec.schedule) for name, ratio in final.items()}
        self.global_schedule = schedule_ratios(spec.ratio, spec.steps, spec.schedule)
        self.index = 0

    def step(self) -> list[dict[str, Any]]:
        self.index += 1
        k, spec, widths = self.index, self.spec, _widths(self.state.module)

        def step_ratio(name: str) -> float:
            target = kept_count(self.original[name], self.schedules[name][k], spec.round_to)
            return _keep_ratio(widths[name], target)

        if spec.global_pruning:
            # One ranking across layers: this step removes the share of the current channels that takes the
            # total from the previous cumulative ratio to this one (layers named in layer_ratios keep theirs).
            before, after = self.global_schedule[k - 1], self.global_schedule[k]
            ratio = 1.0 - (1.0 - after) / (1.0 - before)
            layer_ratios = {name: step_ratio(name) for name in self._user_layers()}
        else:
            ratio, layer_ratios = spec.ratio, {name: step_ratio(name) for name in self.schedules}
        pruner = _channel_pruner(self.state.module, spec, self.state.example_inputs, ratio=ratio, layer_ratios=layer_ratios or None)
        calibration, loss_fn = None, None
        if spec.importance in NEEDS_GRADIENTS:
            calibration = _calibration(self.ctx, spec.calibration_batches)
            loss_fn = _taylor_loss(self.state.module, spec, self.ctx, calibration[0])
        pruner.step(calibration=calibration, loss_fn=loss_fn)
        return [pruner.record()]

    def _user_layers(self) -> list[str]:
        names: list[str] = []
        for pattern in self.spec.layer_ratios:
            names += [n for n in match_modules(self.state.module, [pattern], "layer_ratios") if n in self.schedules]
        return names

    def replay(self, records: list[dict[str, Any]]) -> None:
        self.index += 1
        for record in records:
            replay_channels(self.state.module, record)

    def changed(self) -> dict[str, list[int]]:
        now = _widths(self.state.module)
        return {name: [width, now[name]] for name, width in self.original.items() if now.get(name) != width}


def _taylor_loss(module: nn.Module, spec: PruneSpec, ctx: RunContext, batch):
    """Taylor importance ranks channels by |w · dL/dw| of the recipe's distillation loss (labels' CE
    when there is no teacher)."""
    if ctx.teacher is None:
        return None  # structured.default_loss: cross-entropy on (inputs, labels)
    from compressor.distill.objective import build_objective

    objective = build_objective(
        spec.losses or ctx.recipe.distillation.losses, ctx.teacher, student=module, batch=batch,
        taps=ctx.recipe.distillation.taps,
    )  # fmt: skip
    return lambda model, b: objective.compute(model, b[0], b[1])


# --- prune: transformer heads, FFN width, depth --------------------------------------------------------


def encoder_owner(module: nn.Module) -> tuple[str, nn.Module]:
    """(path, model) of the Hugging Face BERT-like model in the student: the student itself (path '') or a
    submodule such as `compressor.models.hf.SentenceEncoder.model`."""
    from compressor.prune.transformer import encoder_layers

    for name, sub in module.named_modules():
        if hasattr(sub, "config") and hasattr(sub, "base_model"):
            try:
                encoder_layers(sub)
            except PruningError:
                continue
            return name, sub
    raise PruningError(
        f"heads / ffn / layers prune Hugging Face BERT-like encoders, and {type(module).__name__} contains none; "
        "use ratio: to prune CNN channels"
    )


def _replay_submodule(model: nn.Module, record: dict[str, Any]) -> None:
    inner = record["record"]
    REPLAYS.get(inner["kind"])(model.get_submodule(record["path"]), inner)


# A transformer record applies to the encoder inside the student; this kind says where it is.
if "submodule" not in REPLAYS:
    REPLAYS.add("submodule", _replay_submodule)


class _TransformerSteps:
    """Heads, FFN neurons and layers of a BERT-like encoder, removed step by step towards the targets."""

    def __init__(self, state: ModelState, spec: PruneSpec, ctx: RunContext):
        from compressor.prune.transformer import encoder_layers

        self.state, self.spec, self.ctx = state, spec, ctx
        self.path, self.model = encoder_owner(state.module)
        layers = encoder_layers(self.model)
        self.layers0 = len(layers)
        self.heads0 = sum(layer.attention.self.num_attention_heads for layer in layers)
        self.ffn0 = sum(layer.intermediate.dense.out_features for layer in layers)
        self.ratios = {
            key: schedule_ratios(value, spec.steps, spec.schedule)
            for key, value in (("heads", spec.heads), ("ffn", spec.ffn), ("layers", spec.layers))
            if isinstance(value, float) and value > 0
        }
        self.index = 0
        check_transformer_targets(self.model, spec)

    def _wrap(self, record: dict[str, Any]) -> dict[str, Any]:
        return record if not self.path else {"kind": "submodule", "path": self.path, "record": record}

    def _units(self) -> tuple[int, list[int], list[int]]:
        from compressor.prune.transformer import encoder_layers

        layers = encoder_layers(self.model)
        heads = [layer.attention.self.num_attention_heads for layer in layers]
        return len(layers), heads, [layer.intermediate.dense.out_features for layer in layers]

    def step(self) -> list[dict[str, Any]]:
        from compressor.prune.transformer import prune_ffn, prune_heads, prune_layers

        self.index += 1
        spec, records = self.spec, []
        calibration = [inputs for inputs, _ in _calibration(self.ctx, spec.calibration_batches)]
        # Depth first: no point ranking heads and neurons of blocks about to be dropped.
        if isinstance(spec.layers, list):
            if self.index == 1 and spec.layers:
                records.append(prune_layers(self.model, drop=list(spec.layers)).record)
        elif "layers" in self.ratios:
            count, _, _ = self._units()
            drop = count - kept_count(self.layers0, self.ratios["layers"][self.index])
            if drop > 0:
                records.append(prune_layers(self.model, drop=drop, calibration=calibration).record)
        count, heads, widths = self._units()
        if "heads" in self.ratios:
            ratio = self._ratio(heads, self.heads0 * count // self.layers0, self.ratios["heads"][self.index], None)
            if ratio > 0:
                records.append(
                    prune_heads(
                        self.model, ratio, calibration=calibration, importance=spec.transformer_importance,
                        global_ranking=spec.global_ranking,
                    ).record
                )  # fmt: skip
        if "ffn" in self.ratios:
            ratio = self._ratio(widths, self.ffn0 * count // self.layers0, self.ratios["ffn"][self.index], spec.round_to)
            if ratio > 0:
                records.append(
                    prune_ffn(
                        self.model, ratio, calibration=calibration, importance=spec.transformer_importance,
                        global_ranking=spec.global_ranking, round_to=spec.round_to,
                    ).record
                )  # fmt: skip
        return [self._wrap(record) for record in records]

    def _ratio(self, current: list[int], original_total: int, target: float, round_to: int | None) -> float:
        """This step's ratio of the current units reaching `target` of the original ones."""
        if self.index == 1:
            return target  # nothing of this kind removed yet: the target is a fraction of the current units
        if self.spec.global_ranking:
            return _keep_ratio(sum(current), kept_count(original_total, target))
        per_layer = original_total // len(current)
        if len(set(current)) != 1:
            raise PruningError(
                f"per-layer pruning in several steps needs equal widths in every layer, got {sorted(set(current))}; "
                "set global_ranking: true or steps: 1"
            )
        return _keep_ratio(current[0], kept_count(per_layer, target, round_to))

    def replay(self, records: list[dict[str, Any]]) -> None:
        self.index += 1
        for record in records:
            REPLAYS.get(record["kind"])(self.state.module if record["kind"] == "submodule" else self.model, record)


def check_transformer_targets(model: nn.Module, spec: PruneSpec) -> None:
    """Refuse up front what would empty a layer or the encoder (the library checks again when it prunes)."""
    from compressor.prune.transformer import encoder_layers

    layers = encoder_layers(model)
    total = len(layers)
    if isinstance(spec.layers, list):
        bad = [i for i in spec.layers if i >= total]
        if bad:
            raise PruningError(f"prune.layers: layer {bad[0]} does not exist; the encoder has {total} layers (0-{total - 1})")
        if len(spec.layers) >= total:
            raise PruningError(f"prune.layers drops all {total} encoder layers; keep at least one")
    elif spec.layers and kept_count(total, spec.layers) < 1:
        raise PruningError(f"prune.layers: {spec.layers} of {total} encoder layers leaves none; lower it")
    heads = min(layer.attention.self.num_attention_heads for layer in layers)
    if spec.heads and not spec.global_ranking and kept_count(heads, spec.heads) < 1:
        raise PruningError(f"prune.heads: {spec.heads} of {heads} heads per layer removes them all; lower it")
    width = min(layer.intermediate.dense.out_features for layer in layers)
    if spec.ffn and not spec.global_ranking and kept_count(width, spec.ffn, spec.round_to) < 1:
        rounding = f" with round_to {spec.round_to}" if spec.round_to else ""
        raise PruningError(f"prune.ffn: {spec.ffn} of {width} FFN neurons per layer{rounding} keeps none; lower it")


# --- sparsity helpers ---------------------------------------------------------------------------------


def default_sparse_layers(module: nn.Module, pattern: str) -> list[str]:
    """Every Linear/Conv2d, and for 2:4 only those whose input dimension is a multiple of 4."""
    from compressor.prune.sparsity import SPARSE_TYPES

    names = []
    for name, sub in module.named_modules():
        if isinstance(sub, SPARSE_TYPES):
            # 2:4 groups run along the input dimension (input channels of a conv, per output and tap).
            if pattern != "2:4" or sub.weight.shape[1] % 4 == 0:
                names.append(name)
    if not names:
        raise PruningError(
            f"{type(module).__name__} has no Linear/Conv2d layer "
            + ("whose input dimension is a multiple of 4 (2:4 needs one)" if pattern == "2:4" else "to sparsify")
        )
    return names


def _sparsifier(module: nn.Module, spec: SparsitySpec):
    from compressor.prune.sparsity import Sparsifier

    layers = spec.layers if spec.layers is not None else default_sparse_layers(module, spec.pattern)
    return Sparsifier(
        module, spec.pattern, spec.sparsity, layers=layers, steps=spec.steps, schedule=spec.schedule,
        global_ranking=spec.global_ranking,
    )  # fmt: skip


def _check_sparsity_order(recipe, index: int) -> None:
    later = [s.kind for s in recipe.stages[index + 1 :] if s.kind not in KEEPS_WEIGHTS]
    if later:
        raise RecipeError(
            f"a '{later[0]}' stage after sparsity would train the zeroed weights back and lose the pattern; "
            f"put sparsity last (only {', '.join(sorted(KEEPS_WEIGHTS))} may follow it)"
        )


# --- checks before any training (see compressor.stages.check_stages) ------------------------------------


def check_prune(spec: PruneSpec, *, recipe, index: int, module: nn.Module, example_inputs) -> None:
    """Model-dependent errors of a prune stage, found on a copy of the student before anything trains:
    globs that match nothing, a ratio that empties a layer, an untraceable model, a non-BERT model."""
    quantizing = [s.kind for s in recipe.stages[:index] if s.kind in QUANTIZING]
    if quantizing:
        raise RecipeError(f"prune after {quantizing[0]}: prune the float student first, then quantize (order: distill → prune → qat)")
    if spec.ratio is not None:
        _channel_pruner(copy.deepcopy(module), spec, example_inputs)
    else:
        check_transformer_targets(encoder_owner(module)[1], spec)


def check_sparsity(spec: SparsitySpec, *, recipe, index: int, module: nn.Module, example_inputs) -> None:
    """Model-dependent errors of a sparsity stage before anything trains: stage order, layer globs, 2:4 widths."""
    _check_sparsity_order(recipe, index)
    if any(s.kind == "binarize" for s in recipe.stages[:index]):
        raise RecipeError("sparsity after binarize: 1-bit weights are ±α, never zero; mask the student before binarizing")
    _sparsifier(copy.deepcopy(module), spec)


# --- prune: the stage ----------------------------------------------------------------------------------


def _records_path(ctx: RunContext, label: str) -> Path:
    return ctx.work_dir / "checkpoints" / f"{label}.pruning.json"


def _saved_steps(ctx: RunContext, label: str, steps: int) -> list[list[dict[str, Any]]]:
    path = _records_path(ctx, label)
    if not (ctx.resume and path.exists()):
        return []
    saved = json.loads(path.read_text())
    if saved.get("steps_total") != steps:
        raise CompressorError(
            f"--resume: {path} was written for {saved.get('steps_total')} pruning steps, the recipe has {steps}; "
            "start over with --overwrite"
        )
    return saved["steps"]


@register_stage("prune", PruneSpec, check=check_prune)
def run_prune(state: ModelState, spec: PruneSpec, ctx: RunContext) -> ModelState:
    label = spec.name or "prune"
    _require_unquantized(state, "prune", ("quant", "binary"))
    module = state.module
    params_before, macs_before = count_params(module), _macs(module, state.example_inputs)
    pruner = _ChannelSteps(state, spec, ctx) if spec.ratio is not None else _TransformerSteps(state, spec, ctx)
    saved = _saved_steps(ctx, label, spec.steps)
    done: list[list[dict[str, Any]]] = []
    targets = schedule_ratios(spec.ratio or 0.0, spec.steps, spec.schedule)
    result = None
    for step in range(spec.steps):
        if step < len(saved):
            pruner.replay(saved[step])
            done.append(saved[step])
            ctx.log(f"[{label}] step {step + 1}/{spec.steps}: replayed the recorded pruning (resume)")
        else:
            done.append(pruner.step())
            if _is_main():
                _write_json(_records_path(ctx, label), {"steps_total": spec.steps, "steps": done})
            ratio = f"ratio {targets[step + 1]:.3f}, " if spec.ratio is not None else ""
            ctx.log(f"[{label}] step {step + 1}/{spec.steps}: {ratio}{count_params(module):,} of {params_before:,} parameters left")
        result = train_student(state, _step_spec(spec, step), ctx, _step_label(label, step, spec.steps))
    records = [record for step_records in done for record in step_records]
    macs_after = _macs(module, state.example_inputs)
    metrics = {k: v for k, v in (result.final if result else {}).items() if k != "epoch"}
    state.metrics.update(metrics)
    details = {
        "target": spec.ratio if spec.ratio is not None else {k: getattr(spec, k) for k in ("heads", "ffn", "layers")},
        "steps": spec.steps, "schedule": spec.schedule,
        "ratios": [round(r, 4) for r in targets[1:]] if spec.ratio is not None else None,
        "importance": spec.importance if spec.ratio is not None else spec.transformer_importance,
        "params_before": params_before, "params_after": count_params(module), "macs_before": macs_before,
        "macs_after": macs_after, "shapes_changed": _changed(pruner),
    }  # fmt: skip
    pruning = state.extras.setdefault("pruning", {"records": [], "stages": []})
    pruning["records"] += records
    pruning["stages"].append(label)
    pruning["params"] = count_params(module)
    if _is_main():
        save_pruned(module, pruning["records"], ctx.work_dir / PRUNED_DIR)
        (ctx.work_dir / PRUNED_DIR / "stage.txt").write_text(label)
    state.lineage.append(LineageEntry(stage=label, kind="prune", metrics=metrics, details=details))
    ctx.log(
        f"[{label}] parameters {params_before:,} → {details['params_after']:,}"
        + (f", MACs {macs_before:,} → {macs_after:,}" if macs_before and macs_after else "")
    )
    return state


def _changed(pruner: _ChannelSteps | _TransformerSteps) -> dict[str, list[int]]:
    """{layer: [out channels before, after]} of a CNN; {layers|heads|ffn_neurons: [before, after]} of an encoder."""
    if isinstance(pruner, _ChannelSteps):
        return pruner.changed()
    count, heads, widths = pruner._units()
    return {"layers": [pruner.layers0, count], "heads": [pruner.heads0, sum(heads)], "ffn_neurons": [pruner.ffn0, sum(widths)]}


# --- sparsity: the stage -------------------------------------------------------------------------------


@register_stage("sparsity", SparsitySpec, check=check_sparsity)
def run_sparsity(state: ModelState, spec: SparsitySpec, ctx: RunContext) -> ModelState:
    label = spec.name or "sparsity"
    _require_unquantized(state, "sparsity", ("binary",))  # after qat is fine: int8 keeps zeros exact
    _check_sparsity_order(ctx.recipe, _index_of(ctx.recipe, spec))
    sparsifier = _sparsifier(state.module, spec)
    result = None
    for step in range(spec.steps):
        # Magnitude ranking is deterministic, so a resumed run sets the same masks before loading the
        # checkpoint (which holds them as weight_mask buffers).
        target = sparsifier.step()
        ctx.log(f"[{label}] step {step + 1}/{spec.steps}: {spec.pattern} masks at sparsity {target:.3f} on {len(sparsifier.layers)} layers")
        result = train_student(state, _step_spec(spec, step), ctx, _step_label(label, step, spec.steps))
    extras = sparsifier.finalize()
    zeros = sum(round(extras["measured"][name] * m.weight.numel()) for name, m in sparsifier.layers.items())
    total = sum(m.weight.numel() for m in sparsifier.layers.values())
    extras["zero_fraction"] = zeros / total
    state.extras["sparsity"] = extras
    metrics = {k: v for k, v in (result.final if result else {}).items() if k != "epoch"}
    state.metrics.update(metrics)
    details = {
        "pattern": spec.pattern, "target": extras["target"], "layers": len(extras["layers"]),
        "zero_fraction": round(extras["zero_fraction"], 4), "trtexec_flags": extras["trtexec_flags"],
    }  # fmt: skip
    state.lineage.append(LineageEntry(stage=label, kind="sparsity", metrics=metrics, details=details))
    ctx.log(
        f"[{label}] {extras['zero_fraction']:.1%} of the sparsified weights are zero; ONNX Runtime CPU runs them "
        "no faster (dense kernels)" + ("; TensorRT: build with --sparsity=enable" if spec.pattern == "2:4" else "")
    )
    return state


# --- the artifact --------------------------------------------------------------------------------------


def artifact_extras(state: ModelState, ctx: RunContext, staging: Path, model_path: Path) -> dict[str, Any]:
    """What pruning and sparsity add to the artifact in `staging`, for the report (and state.extras for
    the manifest): structure.json + weights.pt of the pruned student; the exported file's sparsity.

    Raises:
        ParityError: the exported file lost the 2:4 pattern that the student had.
    """
    added: dict[str, Any] = {}
    if state.extras.get("pruning"):
        added["pruning"] = _write_structure(state, ctx, staging)
    if state.extras.get("sparsity"):
        added["sparsity"] = exported_sparsity(state.extras["sparsity"], model_path)
        state.extras["sparsity"]["exported"] = added["sparsity"]
    return added


def _write_structure(state: ModelState, ctx: RunContext, staging: Path) -> dict[str, Any]:
    pruning = state.extras["pruning"]
    snapshot = ctx.work_dir / PRUNED_DIR
    saved_shapes = json.loads((snapshot / STRUCTURE_FILE).read_text())["shapes"]
    if shapes_of(state.module) == saved_shapes:
        save_pruned(state.module, pruning["records"], staging)  # later stages kept the architecture: final weights
        weights = "final"
    else:
        # A later stage (qat, binarize) changed the module's parameters: keep the float pruned student.
        for name in (STRUCTURE_FILE, WEIGHTS_FILE):
            shutil.copy2(snapshot / name, staging / name)
        weights = f"after stage '{(snapshot / 'stage.txt').read_text()}' (float, before later stages)"
    info = {
        "structure": STRUCTURE_FILE, "weights": WEIGHTS_FILE, "weights_from": weights,
        "records": len(pruning["records"]), "stages": pruning["stages"],
        "rebuild": "compressor.prune.stage.load_student(artifact_dir)",
    }  # fmt: skip
    pruning.update({k: v for k, v in info.items() if k != "records"})
    return info


def exported_sparsity(extras: dict[str, Any], model_path: Path) -> dict[str, Any]:
    """Zeros and (for 2:4) the 2:4 pattern of the Conv/Gemm/MatMul weights in the exported file.

    Every sparsified layer whose weight is found by name must satisfy 2:4, and at least as many weights
    as layers were sparsified must do so (names change when export folds or quantizes a weight).
    """
    from compressor.prune.sparsity import _onnx_weights, check_2_4

    weights = _onnx_weights(model_path)
    zeros = sum(int((array == 0).sum()) for _, array, _ in weights)
    total = sum(array.size for _, array, _ in weights)
    report: dict[str, Any] = {
        "pattern": extras["pattern"],
        "weights": len(weights),
        "zero_fraction": zeros / max(total, 1),
        "onnxruntime_cpu_speedup": False,
        "trtexec_flags": extras["trtexec_flags"],
    }
    if extras["pattern"] != "2:4":
        return report
    pattern = check_2_4(model_path)
    # Float exports keep parameter names ('fc.weight'); Brevitas' QCDQ export names them '/fc/weight_quant/...'.
    failing_named = [
        layer for layer in extras["layers"]
        if any(not ok and (name == f"{layer}.weight" or name.startswith(f"/{layer}/")) for name, ok in pattern.items())
    ]  # fmt: skip
    passing = sum(pattern.values())
    report.update({"weights_2_4": passing, "sparsified_layers": len(extras["layers"])})
    if failing_named or passing < len(extras["layers"]):
        which = f"'{failing_named[0]}'" if failing_named else f"only {passing} of {len(extras['layers'])} weights"
        raise ParityError(
            f"the exported {model_path.name} breaks the 2:4 pattern ({which} has more than 2 non-zeros in 4); "
            "no artifact written — a stage after sparsity changed the weights"
        )
    report["passed"] = True
    return report


def load_student(artifact: str | Path) -> nn.Module:
    """The pruned student of an artifact: the recipe's constructor, the recorded pruning replayed, and
    weights.pt loaded with `torch.load(weights_only=True)` (no code from the files is run)."""
    from compressor.models.load import build_model
    from compressor.prune.structure import load_pruned
    from compressor.recipe import Recipe

    artifact = Path(artifact)
    manifest = json.loads((artifact / "manifest.json").read_text())
    recipe = Recipe.model_validate(manifest["recipe"])
    original = recipe.student.model_copy(update={"weights": None})  # weights.pt replaces them anyway
    return load_pruned(lambda: build_model(original, "student"), artifact)


__all__ = [
    "PruneSpec",
    "SparsitySpec",
    "artifact_extras",
    "check_prune",
    "check_sparsity",
    "default_sparse_layers",
    "encoder_owner",
    "exported_sparsity",
    "load_student",
    "run_prune",
    "run_sparsity",
]
