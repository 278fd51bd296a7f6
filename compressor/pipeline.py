"""`compress(recipe)`: teacher + student in, a verified, measured artifact directory out."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from compressor.artifact import REPORT, check_out_dir, library_versions, publish, write_json_atomic
from compressor.data.loaders import DataBundle, build_data
from compressor.errors import CompressorError, ModelLoadError, ParityError, RecipeError
from compressor.models.call import example_from_batch
from compressor.models.load import build_model, teacher_cache_path
from compressor.recipe import Recipe, dump_recipe
from compressor.stages import load_stage_modules
from compressor.state import ModelState, RunContext
from compressor.train.evaluate import evaluate

RECIPE_SNAPSHOT = "recipe.resolved.yaml"


def work_dir_for(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def compress(
    recipe: Recipe,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    log=print,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Run every stage of `recipe`, export, check parity, benchmark the targets, publish to `out`.

    Returns the report. Raises CompressorError (one line) for anything the user can fix.
    """
    out = Path(out)
    check_out_dir(out, overwrite)
    work = _prepare_work_dir(recipe, out, resume, overwrite, log)
    try:
        report = _run(recipe, out, work, resume, overwrite, log, show_progress)
    except BaseException:
        # Keep checkpoints for --resume; a run that failed before saving any has nothing worth keeping.
        if not any((work / "checkpoints").glob("*.pt")):
            shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    log(f"artifact written to {out}")
    return report


def _run(recipe: Recipe, out: Path, work: Path, resume: bool, overwrite: bool, log, show_progress: bool) -> dict[str, Any]:
    torch.manual_seed(recipe.seed)
    # Cheap checks first: models and data must load before the teacher trains for minutes.
    student = build_model(recipe.student, "student")
    data = build_data(recipe.data.source, recipe.data.batch_size, recipe.data.val_fraction, recipe.seed, recipe.data.kwargs)
    ctx = RunContext(recipe=recipe, data=data, teacher=None, work_dir=work, resume=resume, log=log, show_progress=show_progress)
    ctx.teacher = build_teacher(recipe, ctx)
    state = ModelState(module=student, example_inputs=example_from_batch(next(iter(data.val))[0]))

    baseline = {"teacher": _metrics(ctx.teacher, data, recipe) if ctx.teacher is not None else {}}
    baseline["student_initial"] = _metrics(student, data, recipe, teacher=ctx.teacher)
    log(f"teacher: {_fmt(baseline['teacher'])} | student before stages: {_fmt(baseline['student_initial'])}")

    registry = load_stage_modules()
    for index, (spec, name) in enumerate(zip(recipe.stages, recipe.stage_names())):
        log(f"stage {index + 1}/{len(recipe.stages)}: {name}")
        state = registry.get(spec.kind).run(state, spec.model_copy(update={"name": name}), ctx)

    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent if out.parent.exists() else None))
    try:
        report = export_and_check(state, ctx, staging, baseline)
        if recipe.targets:
            from compressor.bench.run import bench_into_report

            bench_into_report(report, staging / "model.onnx", recipe.targets, recipe.bench, log)
        from compressor.bench.report import render_markdown

        write_json_atomic(staging / REPORT, report)
        (staging / "report.md").write_text(render_markdown(report))
        if (work / "checkpoints").exists():
            shutil.copytree(work / "checkpoints", staging / "checkpoints")
        manifest = {
            "name": recipe.name,
            "recipe": recipe.model_dump(mode="json"),
            "lineage": report["lineage"],
            "metrics": report["accuracy"],
            "extras": state.extras,
            "libraries": library_versions(),
        }
        publish(staging, out, manifest, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def export_and_check(state: ModelState, ctx: RunContext, staging: Path, baseline: dict) -> dict[str, Any]:
    """Export the student, run the file on held-out data, and refuse it when parity fails."""
    from compressor.export.inspect import integer_kernel_report
    from compressor.export.onnx import export_onnx
    from compressor.export.parity import check_parity

    recipe = ctx.recipe
    model_path = export_onnx(
        state.module, state.example_inputs, staging / "model.onnx", opset=recipe.export.opset, dynamic_batch=recipe.export.dynamic_batch
    )
    parity = check_parity(state.module, model_path, ctx.data.val, recipe.export.parity, recipe.task)
    if not parity.passed:
        raise ParityError(
            f"export parity failed on {parity.samples} held-out samples: {'; '.join(parity.failures)}; no artifact written"
        )
    ctx.log(f"parity: max|Δ|={parity.max_abs:.2e}, top-1 agreement={parity.top1_agreement}")
    kernels = integer_kernel_report(model_path)
    full = check_parity(state.module, model_path, ctx.data.val, recipe.export.parity.model_copy(update={"samples": 10**9}), recipe.task)
    accuracy = {"teacher": baseline["teacher"].get("accuracy"), "student_torch": state.metrics.get("accuracy"), "student_onnx": full.onnx_accuracy}
    if accuracy["teacher"] is not None and accuracy["student_onnx"] is not None:
        accuracy["drop_points"] = round((accuracy["teacher"] - accuracy["student_onnx"]) * 100, 4)
    if recipe.task == "embedding":
        accuracy = {"cosine_to_teacher": state.metrics.get("cosine_to_teacher")}
    return {
        "schema_version": 1,
        "name": recipe.name,
        "task": recipe.task,
        "accuracy": accuracy,
        "baseline": baseline,
        "size": {"model_bytes": model_path.stat().st_size, "parameters": sum(p.numel() for p in state.module.parameters())},
        "parity": parity.to_dict(),
        "kernels": kernels,
        "lineage": [vars(entry) for entry in state.lineage],
        "quant": state.extras.get("quant"),
        "latency": {},
    }


def build_teacher(recipe: Recipe, ctx: RunContext):
    """The frozen teacher: from its weights file, from the user cache, or pretrained once and cached."""
    spec = recipe.teacher
    if spec is None:
        return None
    teacher = build_model(spec, "teacher")
    if spec.weights is None:
        if spec.pretrain is None:
            raise RecipeError("teacher has no weights: set teacher.weights to a state dict file, or teacher.pretrain to train it here")
        cache = teacher_cache_path(recipe)
        if cache.is_file():
            ctx.log(f"teacher: using cached pretrained weights {cache}")
            try:
                teacher.load_state_dict(torch.load(cache, map_location="cpu", weights_only=True))
            except (RuntimeError, EOFError, ValueError):
                ctx.log(f"teacher cache {cache} is unreadable; retraining")
                cache.unlink()
                return build_teacher(recipe, ctx)
        else:
            _pretrain_teacher(teacher, spec.pretrain, ctx, cache)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _pretrain_teacher(teacher, pretrain, ctx: RunContext, cache: Path) -> None:
    from compressor.recipe import OptimizerSpec, TrainSpec
    from compressor.train.loop import _atomic_save, fit

    if ctx.data.num_classes is None:
        raise ModelLoadError("teacher.pretrain trains on labels, but this data has none; give teacher.weights")
    ctx.log(f"teacher: pretraining {ctx.recipe.teacher.model} for {pretrain.epochs} epochs (cached at {cache})")
    spec = TrainSpec(epochs=pretrain.epochs, optimizer=OptimizerSpec(lr=pretrain.lr, weight_decay=1e-4))
    fit(
        teacher,
        lambda inputs, target: torch.nn.functional.cross_entropy(teacher(inputs), target),
        ctx.data.train,
        spec,
        ctx.work_dir / "checkpoints" / "teacher-pretrain.pt",
        epochs=pretrain.epochs,
        evaluate=lambda: evaluate(teacher, ctx.data.val, "classification"),
        resume=ctx.resume,
        seed=ctx.recipe.seed,
        log=ctx.log,
        show_progress=ctx.show_progress,
        label="teacher",
    )
    _atomic_save(teacher.state_dict(), cache)


def _prepare_work_dir(recipe: Recipe, out: Path, resume: bool, overwrite: bool, log) -> Path:
    work = work_dir_for(out)
    snapshot = dump_recipe(recipe)
    if work.exists():
        previous = (work / RECIPE_SNAPSHOT).read_text() if (work / RECIPE_SNAPSHOT).exists() else None
        if resume:
            if previous is not None and previous != snapshot:
                raise CompressorError(
                    f"--resume: the recipe differs from the interrupted run's ({work / RECIPE_SNAPSHOT}); "
                    "resume with the same recipe and overrides, or start over with --overwrite"
                )
            log(f"resuming the interrupted run in {work}")
            return work
        if not overwrite:
            raise CompressorError(f"an interrupted run of this output exists in '{work}'; pass --resume to continue it or --overwrite to start over")
        shutil.rmtree(work)
    elif resume:
        log(f"--resume: nothing to resume in {work}; starting from the beginning")
    work.mkdir(parents=True, exist_ok=True)
    (work / RECIPE_SNAPSHOT).write_text(snapshot)
    return work


def _metrics(model, data: DataBundle, recipe: Recipe, teacher=None) -> dict[str, float]:
    return evaluate(model, data.val, recipe.task, teacher=teacher, device=recipe.train.device)


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()) or "-"


