"""Which teacher the student learns from, as the recipe describes it, built before the stages run.

In order:
1. Every model is built and every training step's objective is dry-run on one batch (`preflight`): a tap
   that names no module, layers that cannot be paired, a loss without the features it needs or a teacher
   whose outputs cannot be compared all fail here, before anything trains.
2. The teacher gets its weights: `teacher.weights`; or the `distillation.teacher_candidates` file with the
   lowest validation KL to the student; or `teacher.pretrain` (trained once, cached per user).
3. `distillation.ensemble`: more teachers, combined with the first (`teachers.MultiTeacher`).
4. `distillation.teacher_assistants` (TAKD, Mirzadeh et al., AAAI 2020): each assistant is distilled from the
   teacher so far and becomes the next teacher; the stages distill the student from the last one.
With `distillation.pskd` there is no teacher: the student's own past predictions play its part.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from compressor.distill.objective import Objective, build_objective
from compressor.distill.teachers import (
    MultiTeacher,
    ProgressiveTargets,
    TeacherCache,
    freeze,
    hash_data,
    validation_kl,
)
from compressor.errors import ModelLoadError, RecipeError
from compressor.models.call import to_device
from compressor.models.load import build_model, cache_dir, load_weights, teacher_cache_path
from compressor.state import RunContext
from compressor.train.distributed import barrier, is_main


def build_teacher(recipe, ctx: RunContext, student: nn.Module | None = None) -> nn.Module | None:
    """The frozen teacher the stages distill from (None without a teacher section)."""
    spec, distillation = recipe.teacher, recipe.distillation
    _check_strategies(recipe)
    if spec is None:
        if student is not None:
            preflight(recipe, ctx, student, None, [])
        return None
    teacher, members, assistants = _architectures(recipe)
    if student is not None:
        untrained = _combine(recipe, teacher, members) if members else teacher
        preflight(recipe, ctx, student, untrained, assistants)

    if distillation.teacher_candidates:
        _choose_candidate(teacher, recipe, ctx, student)
    elif _needs_weights(spec):
        _pretrained(teacher, spec, recipe, ctx, "teacher")
    for i, (member, mspec) in enumerate(zip(members, _members(recipe))):
        if _needs_weights(mspec):
            seeded = recipe.model_copy(update={"seed": mspec.seed}) if mspec.seed is not None else recipe
            _pretrained(member, _member_spec(mspec), seeded, ctx, f"distillation.ensemble.teachers[{i}]")
    result: nn.Module = _combine(recipe, teacher, members) if members else freeze(teacher)
    for i, (assistant, aspec) in enumerate(zip(assistants, distillation.teacher_assistants)):
        result = _train_assistant(i, assistant, aspec, result, ctx)
    return result


def check_recipe(recipe) -> None:
    """Build the models and data and dry-run every objective, training nothing (e.g. before launching DDP)."""
    from compressor.data.loaders import build_data

    _check_strategies(recipe)
    student = build_model(recipe.student, "student")
    data = build_data(recipe.data.source, recipe.data.batch_size, recipe.data.val_fraction, recipe.seed, recipe.data.kwargs)
    ctx = RunContext(recipe=recipe, data=data, teacher=None, work_dir=Path("."), log=lambda message: None)
    if recipe.teacher is None:
        preflight(recipe, ctx, student, None, [])
        return
    teacher, members, assistants = _architectures(recipe)
    preflight(recipe, ctx, student, _combine(recipe, teacher, members) if members else teacher, assistants)


def _architectures(recipe) -> tuple[nn.Module, list[nn.Module], list[nn.Module]]:
    """The teacher, ensemble members and assistants, built (with weights files loaded where given)."""
    d = recipe.distillation
    teacher = build_model(recipe.teacher, "teacher")
    members = [build_model(_member_spec(m), f"distillation.ensemble.teachers[{i}]") for i, m in enumerate(_members(recipe))]
    assistants = [build_model(a, f"distillation.teacher_assistants[{i}]") for i, a in enumerate(d.teacher_assistants)]
    return teacher, members, assistants


def _check_strategies(recipe) -> None:
    d = recipe.distillation
    if d.pskd is not None and (recipe.teacher is not None or d.ensemble or d.teacher_assistants or d.cache):
        raise RecipeError(
            "distillation.pskd makes the student its own teacher; remove teacher, ensemble, teacher_assistants and cache"
        )
    if recipe.teacher is None and (d.ensemble or d.teacher_assistants or d.teacher_candidates):
        which = "ensemble" if d.ensemble else "teacher_assistants" if d.teacher_assistants else "teacher_candidates"
        raise RecipeError(f"distillation.{which} needs a 'teacher:' section to start from")
    if d.teacher_candidates and recipe.teacher is not None and (recipe.teacher.weights or recipe.teacher.pretrain):
        raise RecipeError(
            "distillation.teacher_candidates chooses the teacher's weights; drop teacher.weights and teacher.pretrain"
        )


def _needs_weights(spec) -> bool:
    """A built-in model without a weights file is untrained; an entry point (e.g. compressor.models.hf:load)
    may load its own pretrained weights, so it is used as built unless it asks for pretraining."""
    return spec.weights is None and (spec.pretrain is not None or ":" not in spec.model)


def _members(recipe) -> list:
    return list(recipe.distillation.ensemble.teachers) if recipe.distillation.ensemble else []


def _member_spec(member):
    from compressor.recipe import TeacherSpec

    return TeacherSpec(**member.model_dump(exclude={"weight", "seed"}))


def _combine(recipe, teacher: nn.Module, members: list[nn.Module]) -> nn.Module:
    ensemble = recipe.distillation.ensemble
    weights = [ensemble.teacher_weight, *(m.weight for m in ensemble.teachers)]
    return MultiTeacher([teacher, *members], weights, ensemble.space)


# ---------------------------------------------------------------------------------------------------------
# Checking every objective before anything trains
# ---------------------------------------------------------------------------------------------------------


def preflight(recipe, ctx: RunContext, student: nn.Module, teacher: nn.Module | None, assistants: list[nn.Module]) -> None:
    """Dry-run the objective of every training step (assistants, then each training stage) on one batch.

    Models may be untrained here: names and shapes are what is checked. Raises RecipeError naming the step.
    """
    from compressor.train.stage import TrainingStageSpec

    d = recipe.distillation
    inputs, target = first_batch(ctx.data.train, recipe.train.device)
    batch = (inputs, target)
    steps: list[tuple[str, nn.Module, nn.Module | None, Any, Any]] = []
    current = teacher
    for i, (module, spec) in enumerate(zip(assistants, d.teacher_assistants)):
        taps = spec.taps if spec.taps is not None else d.taps
        steps.append((f"distillation.teacher_assistants[{i}]", module, current, spec.losses or d.losses, taps))
        current = module
    seen = set()
    for index, spec in enumerate(recipe.stages):
        if isinstance(spec, TrainingStageSpec):
            losses = spec.losses or d.losses
            key = repr(losses)
            if key not in seen:
                seen.add(key)
                steps.append((f"stages[{index}] ({spec.kind})", student, current, losses, d.taps))
    for what, module, step_teacher, losses, taps in steps:
        try:
            build_objective(losses, step_teacher, student=module, batch=batch, taps=taps, pskd=progressive_targets(recipe, ctx, 1))
        except RecipeError as exc:
            raise RecipeError(f"{what}: {exc}") from None
    # The dry runs froze the teachers they used; whatever is trained next (pretraining, assistants) unfreezes
    # its own module first.


def first_batch(loader, device: str = "cpu") -> tuple[Any, torch.Tensor | None]:
    inputs, target = next(iter(loader))[:2]
    return to_device(inputs, device), target.to(device) if isinstance(target, torch.Tensor) else None


def progressive_targets(recipe, ctx: RunContext, epochs: int) -> ProgressiveTargets | None:
    """PS-KD state for one training step of `epochs` epochs, or None when the recipe does not use PS-KD."""
    if recipe.distillation.pskd is None:
        return None
    if ctx.data.num_classes is None:
        raise RecipeError("distillation.pskd trains on labels, but this data has none")
    dataset = getattr(ctx.data.train, "dataset", None)
    if dataset is None or not hasattr(dataset, "__len__"):
        raise RecipeError("distillation.pskd needs a DataLoader over a map-style dataset (one prediction per sample)")
    return ProgressiveTargets(len(dataset), ctx.data.num_classes, max(epochs, 1), recipe.distillation.pskd.alpha_T)


# ---------------------------------------------------------------------------------------------------------
# Teacher weights: pretrained once, or chosen among candidates
# ---------------------------------------------------------------------------------------------------------


def _pretrained(teacher: nn.Module, spec, recipe, ctx: RunContext, role: str) -> None:
    """Load the cached pretrained weights, or train the teacher on the recipe's data and cache them."""
    if spec.pretrain is None:
        raise RecipeError(f"{role} has no weights: set {role}.weights to a state dict file, or {role}.pretrain to train it here")
    cache = teacher_cache_path(recipe.model_copy(update={"teacher": spec}))
    if cache.is_file():
        try:
            teacher.load_state_dict(torch.load(cache, map_location="cpu", weights_only=True))
            ctx.log(f"{role}: using cached pretrained weights {cache}")
            return
        except (RuntimeError, EOFError, ValueError, KeyError):
            ctx.log(f"{role}: cached weights {cache} are unreadable; retraining")
    _pretrain(teacher, spec, role, ctx, cache)


def _pretrain(teacher: nn.Module, spec, role: str, ctx: RunContext, cache: Path) -> None:
    from compressor.recipe import OptimizerSpec, TrainSpec
    from compressor.train.evaluate import evaluate
    from compressor.train.loop import _atomic_save, fit

    if ctx.data.num_classes is None:
        raise ModelLoadError(f"{role}.pretrain trains on labels, but this data has none; give {role}.weights")
    ctx.log(f"{role}: pretraining {spec.model} for {spec.pretrain.epochs} epochs (cached at {cache})")
    teacher.requires_grad_(True)
    train = TrainSpec(epochs=spec.pretrain.epochs, optimizer=OptimizerSpec(lr=spec.pretrain.lr, weight_decay=1e-4), device=ctx.recipe.train.device)
    label = "teacher" if role == "teacher" else role.rsplit(".", 1)[-1]
    fit(
        teacher,
        lambda inputs, target: torch.nn.functional.cross_entropy(teacher(inputs), target),
        ctx.data.train,
        train,
        ctx.work_dir / "checkpoints" / f"{label}-pretrain.pt",
        epochs=spec.pretrain.epochs,
        evaluate=lambda: evaluate(teacher, ctx.data.val, "classification", device=train.device),
        resume=ctx.resume,
        seed=ctx.recipe.seed,
        log=ctx.log,
        show_progress=ctx.show_progress,
        label=label,
    )
    if is_main():
        _atomic_save(teacher.state_dict(), cache)
    barrier()


def _choose_candidate(teacher: nn.Module, recipe, ctx: RunContext, student: nn.Module | None) -> None:
    """Load the candidate weights whose teacher is closest to the student (lowest validation KL)."""
    candidates = recipe.distillation.teacher_candidates
    if student is None:
        raise RecipeError("distillation.teacher_candidates needs the student to compare against")
    temperature = recipe.distillation.selection_temperature
    scores = []
    for i, path in enumerate(candidates):
        probe = copy.deepcopy(teacher)
        load_weights(probe, path, f"distillation.teacher_candidates[{i}]")
        scores.append(validation_kl(freeze(probe), student, ctx.data.val, temperature))
        del probe
    best = min(range(len(scores)), key=lambda i: (scores[i], i))
    listing = ", ".join(f"{Path(p).name}={s:.4f}" for p, s in zip(candidates, scores))
    ctx.log(f"teacher: chose {candidates[best]} by validation KL(teacher ‖ student) at T={temperature:g} ({listing})")
    load_weights(teacher, candidates[best], f"distillation.teacher_candidates[{best}]")


# ---------------------------------------------------------------------------------------------------------
# Teacher assistants
# ---------------------------------------------------------------------------------------------------------


def _train_assistant(index: int, assistant: nn.Module, spec, teacher: nn.Module, ctx: RunContext) -> nn.Module:
    from compressor.train.evaluate import evaluate
    from compressor.train.stage import train_module

    recipe = ctx.recipe
    train = recipe.train.model_copy(deep=True)
    train.epochs = spec.epochs
    if spec.lr is not None:
        train.optimizer.lr = spec.lr
    label = f"assistant-{index + 1}"
    ctx.log(f"{label}: distilling {spec.model} from the {'teacher' if index == 0 else f'assistant-{index}'} for {spec.epochs} epochs")
    assistant.requires_grad_(True)
    taps = spec.taps if spec.taps is not None else recipe.distillation.taps
    result = train_module(
        assistant, teacher, spec.losses or recipe.distillation.losses, taps, train, ctx, label,
        evaluate=lambda: evaluate(assistant, ctx.data.val, recipe.task, teacher=teacher, device=train.device),
    )  # fmt: skip
    final = ", ".join(f"{k}={v:.4f}" for k, v in result.final.items() if k != "epoch")
    ctx.log(f"{label}: {final}")
    return freeze(assistant)


# ---------------------------------------------------------------------------------------------------------
# The teacher cache
# ---------------------------------------------------------------------------------------------------------


def open_cache(objective: Objective, loader: DataLoader, spec, ctx: RunContext, device: str = "cpu") -> TeacherCache:
    """The objective's teacher answers for every training sample, computed once (rank 0) and kept on disk.

    The file name hashes the teacher's weights, the data and the cache settings; a file that fails its
    sha256 is recomputed. Under DDP rank 0 fills it while the others wait, then they read it.
    """
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__len__"):
        raise RecipeError("distillation.cache needs a DataLoader over a map-style dataset (with len and indexing)")
    directory = ctx.work_dir / "teacher-cache" if spec.location == "work" else cache_dir() / "teacher-outputs"
    started = time.perf_counter()
    data_hash = hash_data(dataset)

    def make() -> TeacherCache:
        return TeacherCache(
            directory, objective.teacher, len(dataset), data_hash=data_hash, top_k=spec.top_k,
            topk_mode=spec.topk_mode, tap_keys=[t.key for t in objective.plan.teacher], run=objective.cache_run,
        )  # fmt: skip

    cache = make() if is_main() else None
    if cache is not None and not cache.complete:
        fill_cache(cache, dataset, loader, device)
        ctx.log(f"teacher cache: {len(dataset)} teacher answers computed in {time.perf_counter() - started:.1f} s → {cache.path}")
    elif cache is not None:
        ctx.log(f"teacher cache: reusing {cache.path}")
    barrier()
    if cache is None:
        cache = make()
        if not cache.complete:
            raise RecipeError(
                f"teacher cache {cache.path} is incomplete on this rank; with several machines put it on a shared "
                "filesystem (distillation.cache.location: work, with --out on shared storage)"
            )
    return cache


def fill_cache(cache: TeacherCache, dataset, loader: DataLoader, device: str = "cpu") -> None:
    """Run the teacher once over the dataset in order and store every answer."""
    from compressor.train.distributed import WithIndex, indexed_collate

    ordered = DataLoader(
        WithIndex(dataset), batch_size=max(loader.batch_size or 1, 64), shuffle=False,
        collate_fn=indexed_collate(loader.collate_fn),
    )  # fmt: skip
    for index, (inputs, _target) in ordered:
        cache.features(index, to_device(inputs, device))  # writes the file once every index is filled
    if not cache.complete:
        raise RecipeError("teacher cache: the dataset did not yield every index; cannot cache this data")


__all__ = ["build_teacher", "check_recipe", "preflight", "first_batch", "progressive_targets", "open_cache", "fill_cache"]
