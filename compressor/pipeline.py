"""`compress(recipe)`: teacher + student in, a verified, measured artifact directory out."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from compressor.artifact import REPORT, check_out_dir, library_versions, publish, write_json_atomic
from compressor.data.loaders import DataBundle, build_data
from compressor.errors import CompressorError, ParityError
from compressor.models.call import example_from_batch
from compressor.models.load import build_model
from compressor.recipe import Recipe, dump_recipe
from compressor.stages import check_stages, load_stage_modules
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
    from compressor.train.distributed import init_from_env, is_main, main_first

    out = Path(out)
    init_from_env(recipe.train.device)  # under torchrun: join the process group; every rank runs the stages
    if not is_main():
        log, show_progress = (lambda message: None), False  # rank 0 speaks for all
    check_out_dir(out, overwrite)
    work = main_first(lambda: _prepare_work_dir(recipe, out, resume, overwrite, log))
    try:
        report = _run(recipe, out, work, resume, overwrite, log, show_progress)
    except BaseException:
        # Keep checkpoints for --resume; a run that failed before saving any has nothing worth keeping.
        if is_main() and not any((work / "checkpoints").glob("*.pt")):
            shutil.rmtree(work, ignore_errors=True)
        raise
    if not is_main():
        return report  # {}: rank 0 alone exports, measures and publishes
    shutil.rmtree(work, ignore_errors=True)
    log(f"artifact written to {out}")
    return report


def _run(recipe: Recipe, out: Path, work: Path, resume: bool, overwrite: bool, log, show_progress: bool) -> dict[str, Any]:
    torch.manual_seed(recipe.seed)
    # Cheap checks first: models and data must load before the teacher trains for minutes.
    student = build_model(recipe.student, "student")
    data = build_data(recipe.data.source, recipe.data.batch_size, recipe.data.val_fraction, recipe.seed, recipe.data.kwargs)
    ctx = RunContext(recipe=recipe, data=data, teacher=None, work_dir=work, resume=resume, log=log, show_progress=show_progress)
    check_stages(recipe, student, example_from_batch(next(iter(data.val))[0]))  # model-dependent recipe errors, before anything trains
    ctx.teacher = build_teacher(recipe, ctx, student)
    state = ModelState(module=student, example_inputs=example_from_batch(next(iter(data.val))[0]))

    baseline = {"teacher": _metrics(ctx.teacher, data, recipe) if ctx.teacher is not None else {}}
    baseline["student_initial"] = _metrics(student, data, recipe, teacher=ctx.teacher)
    log(f"teacher: {_fmt(baseline['teacher'])} | student before stages: {_fmt(baseline['student_initial'])}")

    registry = load_stage_modules()
    for index, (spec, name) in enumerate(zip(recipe.stages, recipe.stage_names())):
        log(f"stage {index + 1}/{len(recipe.stages)}: {name}")
        state = registry.get(spec.kind).run(state, spec.model_copy(update={"name": name}), ctx)

    from compressor.train.distributed import is_main

    if not is_main():
        return {}  # no collective calls from here on: the other ranks may already have exited

    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent if out.parent.exists() else None))
    try:
        report = export_and_check(state, ctx, staging, baseline)
        if recipe.targets:
            from compressor.bench.run import bench_into_report

            bench_into_report(report, staging / "model.onnx", recipe.targets, recipe.bench, log)
            compare_with_float(report, state, ctx, staging / "model.onnx")
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
    from compressor.export.inspect import initializer_census, integer_kernel_report
    from compressor.export.keywords import export_plan
    from compressor.export.onnx import export_onnx
    from compressor.export.parity import check_parity, first_batch, localize_divergence

    recipe = ctx.recipe
    val_inputs = next(iter(ctx.data.val))[0]
    exported, example, io = export_plan(state.module, val_inputs)
    post = state.extras.get("post_export_quant")  # a ptq stage: quantize the float export (quant/ptq.py)
    parity_spec = recipe.export.parity
    float_path = None
    binary = parity = None
    if post:
        from compressor.quant.ptq import quantize_exported
        from compressor.recipe import ParitySpec

        float_path = export_onnx(exported, example, ctx.work_dir / "model.float.onnx", opset=recipe.export.opset, dynamic_batch=recipe.export.dynamic_batch, **io)
        model_path = quantize_exported(float_path, staging / "model.onnx", post, ctx.data.train)
        parity_spec = ParitySpec(**{**post["parity"], "samples": recipe.export.parity.samples})
        ctx.log(f"ptq: {post['mode']} quantization; parity against the float model within top-1 >= {parity_spec.min_top1_agreement}, cosine >= {parity_spec.min_cosine}")
    elif state.extras.get("binary"):  # a binarize stage: int8 Q/DQ ±α export, exact sign parity, weights.1bit
        from compressor.quant.binary_stage import export_binary_artifact

        model_path, binary, parity = export_binary_artifact(state, ctx, staging, exported, example, io)  # its own parity
    else:
        model_path = export_onnx(exported, example, staging / "model.onnx", opset=recipe.export.opset, dynamic_batch=recipe.export.dynamic_batch, **io)
    parity = parity or check_parity(state.module, model_path, ctx.data.val, parity_spec, recipe.task)
    if not parity.passed:
        where = localize_divergence(exported, model_path, first_batch(ctx.data.val, 32)).message()
        raise ParityError(
            f"export parity failed on {parity.samples} held-out samples: {'; '.join(parity.failures)}; {where}; no artifact written"
        )
    ctx.log(f"parity: max|Δ|={parity.max_abs:.2e}, top-1 agreement={parity.top1_agreement}")
    kernels = integer_kernel_report(model_path)
    full = check_parity(state.module, model_path, ctx.data.val, parity_spec.model_copy(update={"samples": 10**9}), recipe.task)
    accuracy = {"teacher": baseline["teacher"].get("accuracy"), "student_torch": state.metrics.get("accuracy"), "student_onnx": full.onnx_accuracy}
    if accuracy["teacher"] is not None and accuracy["student_onnx"] is not None:
        accuracy["drop_points"] = round((accuracy["teacher"] - accuracy["student_onnx"]) * 100, 4)
    if recipe.task == "embedding":
        accuracy = {"cosine_to_teacher": state.metrics.get("cosine_to_teacher")}
    quant = state.extras.get("quant")
    warnings = list((quant or {}).get("notes", []))
    if quant and kernels["integer_mac_fraction"] < 0.9:
        warnings.append(
            f"quantized, but only {kernels['integer_mac_fraction']:.0%} of the MACs run in integer kernels (kernels.layers "
            "names the float ones); a conv whose output is not quantized (e.g. feeding a residual Add) stays float: "
            "set output_quant: true in the qat stage"
        )
    for warning in warnings:
        ctx.log(f"warning: {warning}")
    size = {"model_bytes": model_path.stat().st_size, "parameters": sum(p.numel() for p in state.module.parameters()), "stored": initializer_census(model_path)}
    if quant and quant.get("parameters"):
        size["parameters_by_precision"] = quant["parameters"]
    if float_path is not None:
        size["float_export_bytes"] = float_path.stat().st_size
    if binary:
        size["packed_bytes"] = binary["size"]["packed_bytes"]
    from compressor.prune.stage import artifact_extras

    pruned = artifact_extras(state, ctx, staging, model_path)  # structure.json + weights.pt; the file's 2:4 check
    return {
        "schema_version": 1,
        "name": recipe.name,
        "task": recipe.task,
        "accuracy": accuracy,
        "baseline": baseline,
        "size": size,
        "parity": parity.to_dict(),
        "kernels": kernels,
        "lineage": [vars(entry) for entry in state.lineage],
        "quant": quant,
        "binary": binary,
        **pruned,
        "warnings": warnings,
        "latency": {},
    }


def compare_with_float(report: dict[str, Any], state: ModelState, ctx: RunContext, model_path: Path) -> None:
    """"Quantized but not faster": time a quantized artifact against a float export of the same student on the
    first target; report.json `latency_vs_float`, plus a warning when it is not faster (bench.compare_float)."""
    from compressor.bench.run import is_quantized_report, latency_vs_float_into_report

    recipe = ctx.recipe
    if not (recipe.bench.compare_float and recipe.targets and is_quantized_report(report)):
        return
    # In the work dir, not staging: the float file is a measuring stick, not part of the artifact. The
    # temporary directory is removed whatever happens, so no partial file is left behind.
    with tempfile.TemporaryDirectory(prefix="float-reference-", dir=ctx.work_dir) as tmp:
        try:
            float_path = float_reference(state, ctx, Path(tmp) / "model.float.onnx")
        except Exception as error:  # the artifact is verified already; a missing comparison must not sink it
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            warning = f"not compared with a float export: exporting the float student failed ({reason})"
            ctx.log(f"warning: {warning}")
            report.setdefault("warnings", []).append(warning)
            return
        latency_vs_float_into_report(report, model_path, float_path, recipe.targets[0], recipe.bench, ctx.log)


def float_reference(state: ModelState, ctx: RunContext, path: Path) -> Path:
    """The float ONNX export of the student the artifact was made from.

    PTQ quantized a float export already (kept in the work dir). QAT: the same module with its Brevitas
    quantizers off (BatchNorm stays folded, as in the quantized file). Binarized: the 1-bit layers as the
    plain Linear/Conv2d/Embedding they subclass, with their latent float weights (a BiBERT attention module
    stays as it is: it runs in float ops already).
    """
    from compressor.export.keywords import export_plan
    from compressor.export.onnx import export_onnx

    ptq_float = ctx.work_dir / "model.float.onnx"  # written by export_and_check for a ptq stage
    if state.extras.get("post_export_quant") and ptq_float.exists():
        return ptq_float
    exported, example, io = export_plan(float_twin(state.module), next(iter(ctx.data.val))[0])
    return export_onnx(exported, example, path, opset=ctx.recipe.export.opset, dynamic_batch=ctx.recipe.export.dynamic_batch, **io)


def float_twin(module: torch.nn.Module) -> torch.nn.Module:
    """A float copy of a quantized student: Brevitas quantizers off, 1-bit layers as their float base class."""
    import copy

    from compressor.quant.binary import BINARY_MODULES
    from compressor.quant.qat import is_quantized, set_quantization

    twin = copy.deepcopy(module).eval()
    if is_quantized(twin):
        set_quantization(twin, False)
    for sub in twin.modules():
        if isinstance(sub, BINARY_MODULES):
            # nn.Linear / nn.Conv2d / nn.Embedding: same parameters, float forward (the act quantizer child is unused).
            sub.__class__ = next(base for base in type(sub).__mro__[1:] if base.__module__.startswith("torch.nn"))
    return twin


def build_teacher(recipe: Recipe, ctx: RunContext, student=None):
    """The frozen teacher the stages distill from: weights, pretraining, candidates, ensembles, assistants.

    Every training step's objective is checked on one batch first (see compressor.distill.strategy).
    """
    from compressor.distill.strategy import build_teacher as build

    return build(recipe, ctx, student)


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


