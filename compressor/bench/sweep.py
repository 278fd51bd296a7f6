"""`compress sweep`: run variants of one recipe, measure every one on the same target, draw the Pareto plot.

Variants file (YAML; without one, the variants are the teacher, then each prefix of the recipe's stages):

    target: x86-cpu            # default: the recipe's first target, else x86-cpu
    batch: 1
    variants:
      - {name: teacher, teacher: true}                 # export and measure the teacher itself
      - {name: kd-fp32, stages: [distill]}             # the recipe's stages of these kinds, in this order
      - {name: kd-int8, stages: [distill, qat]}
      - {name: kd-prune-int8, stages: [{kind: prune, ratio: 0.5}, distill, qat]}   # a stage given in full
      - {name: short, stages: [distill], set: ["stages.0.epochs=5"]}             # --set style overrides

A variant naming a stage kind that is not registered here is skipped with a note (not an error), so one
file can describe variants for stages that are still being built. Writes, under the output directory:
variants/<name>/ (each variant's artifact), sweep.json, sweep.md and pareto.png.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from compressor.bench.plot import Point, pareto_front, plot_pareto
from compressor.config_files import load_yaml_model
from compressor.errors import CompressorError, MeasurementError, RecipeError

DEFAULT_TARGET = "x86-cpu"


class VariantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")  # also a directory name
    teacher: bool = False
    # None: the recipe's stages as they are. Items: a kind (the recipe's stage of that kind), a position in
    # the recipe's stages (0-based), or a stage given in full.
    stages: list[int | str | dict[str, Any]] | None = None
    set: list[str] = Field(default_factory=list)

    @field_validator("stages")
    @classmethod
    def _kinds(cls, v: list[int | str | dict[str, Any]] | None) -> list[int | str | dict[str, Any]] | None:
        for item in v or []:
            if isinstance(item, dict) and "kind" not in item:
                raise ValueError("a stage given in full needs a 'kind'")
        return v


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: str | None = None
    batch: int = Field(1, ge=1)
    variants: list[VariantSpec] = Field(min_length=1)

    @field_validator("variants")
    @classmethod
    def _unique(cls, v: list[VariantSpec]) -> list[VariantSpec]:
        names = [x.name for x in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(dupes)}")
        return v


def load_sweep_spec(path: Path) -> SweepSpec:
    return load_yaml_model(path, SweepSpec, RecipeError, "variants file")


def default_variants(raw: dict[str, Any]) -> list[VariantSpec]:
    """The teacher (if any), then the student after each prefix of the recipe's stages."""
    kinds = [s.get("kind") for s in raw.get("stages") or [] if isinstance(s, dict)]
    variants = [VariantSpec(name="teacher", teacher=True)] if raw.get("teacher") else []
    for i in range(1, len(kinds) + 1):
        variants.append(VariantSpec(name="+".join(kinds[:i]), stages=list(range(i))))
    return variants


@dataclass
class VariantResult:
    name: str
    status: str  # ok | skipped | failed
    note: str = ""
    stages: list[str] = field(default_factory=list)
    accuracy: float | None = None
    size_bytes: int | None = None
    latency: dict[str, Any] | None = None  # p50, median CI, p90 (ms), n
    artifact: str | None = None
    exit_code: int = 0

    def point(self) -> Point | None:
        if self.status != "ok" or self.accuracy is None or not self.latency:
            return None
        return Point(self.name, self.accuracy, self.latency["p50"], self.latency.get("median_ci_low"),
                     self.latency.get("median_ci_high"), self.size_bytes)  # fmt: skip

    def line(self) -> str:
        if self.status != "ok":
            return f"{self.status.upper()} {self.name}: {self.note}"
        lat = self.latency or {}
        return (
            f"OK {self.name} [{' → '.join(self.stages) or 'teacher'}]: accuracy {self.accuracy * 100:.2f}%, "  # type: ignore[operator]
            f"p50 {lat.get('p50', float('nan')):.4f} ms, size {(self.size_bytes or 0) / 1e6:.3f} MB"
        )


@dataclass
class SweepResult:
    variants: list[VariantResult]
    out: Path
    target: str
    batch: int

    @property
    def exit_code(self) -> int:
        codes = [v.exit_code for v in self.variants if v.status == "failed"]
        return 0 if not codes else (1 if 1 in codes or 2 in codes else max(codes))

    def lines(self) -> list[str]:
        return [v.line() for v in self.variants] + [f"wrote {self.out / 'sweep.md'} and {self.out / 'pareto.png'}"]


def resolve_variant(raw: dict[str, Any], variant: VariantSpec, registered: list[str]) -> tuple[dict[str, Any] | None, str]:
    """The recipe data of one variant, or (None, why it is skipped)."""
    from compressor.recipe import apply_overrides

    data = copy.deepcopy(raw)
    if variant.stages is not None:
        recipe_stages = [s for s in data.get("stages") or [] if isinstance(s, dict)]
        chosen: list[dict[str, Any]] = []
        used: set[int] = set()
        for item in variant.stages:
            if isinstance(item, int):
                if not 0 <= item < len(recipe_stages):
                    raise RecipeError(f"variant '{variant.name}': stage position {item} is not in the recipe's {len(recipe_stages)} stages")
                chosen.append(copy.deepcopy(recipe_stages[item]))
                continue
            if isinstance(item, dict):
                chosen.append(copy.deepcopy(item))
                continue
            index = next((i for i, s in enumerate(recipe_stages) if s.get("kind") == item and i not in used), None)
            if index is None:
                if item not in registered:
                    chosen.append({"kind": item})  # reported as unregistered below
                    continue
                raise RecipeError(
                    f"variant '{variant.name}': the recipe has no '{item}' stage to reuse; give it in full, "
                    f"e.g. {{kind: {item}, ...}}"
                )
            used.add(index)
            chosen.append(copy.deepcopy(recipe_stages[index]))
        data["stages"] = chosen
    missing = [s["kind"] for s in data.get("stages") or [] if isinstance(s, dict) and s.get("kind") not in registered]
    if missing:
        return None, (
            f"stage kind '{missing[0]}' is not registered here (registered: {', '.join(registered)}); skipped"
        )
    return apply_overrides(data, list(variant.set)), ""


def run_sweep(
    recipe_path: Path,
    *,
    variants: Path | None = None,
    out: Path | None = None,
    target: str | None = None,
    batch: int | None = None,
    overrides: list[str] | None = None,
    overwrite: bool = False,
    log=print,
    show_progress: bool = False,
) -> SweepResult:
    """Run every variant (bad input in any of them is found before anything trains), then plot."""
    from compressor.recipe import apply_overrides, parse_recipe
    from compressor.stages import load_stage_modules
    from compressor.targets.profile import load_profile

    recipe_path = Path(recipe_path)
    if not recipe_path.is_file():
        raise RecipeError(f"recipe file '{recipe_path}' does not exist")
    raw = yaml.safe_load(recipe_path.read_text())
    if not isinstance(raw, dict):
        raise RecipeError(f"{recipe_path}: expected a mapping of recipe fields at the top level")
    raw = apply_overrides(raw, overrides or [])
    spec = load_sweep_spec(variants) if variants else SweepSpec(variants=default_variants(raw) or _no_variants())
    target = target or spec.target or next(iter(raw.get("targets") or []), DEFAULT_TARGET)
    batch = batch or spec.batch
    load_profile(target)  # an unknown target is bad input now, not after the first training run
    registered = load_stage_modules().names()
    out = Path(out) if out else Path("runs") / f"{raw.get('name', recipe_path.stem)}-sweep"

    plans: list[tuple[VariantSpec, Any, str]] = []
    for variant in spec.variants:
        data, note = resolve_variant(raw, variant, registered)
        if data is None:
            plans.append((variant, None, note))
            continue
        data["targets"], data["budgets"] = [target], None
        data.setdefault("bench", {})["batches"] = [batch]
        recipe = parse_recipe(data, source=f"{recipe_path} (variant {variant.name})", base_dir=recipe_path.parent.resolve())
        if variant.teacher and recipe.teacher is None:
            raise RecipeError(f"variant '{variant.name}' measures the teacher, but the recipe has none")
        plans.append((variant, recipe, ""))

    results = []
    for variant, recipe, note in plans:
        if recipe is None:
            log(f"sweep: {variant.name}: {note}")
            results.append(VariantResult(variant.name, "skipped", note))
            continue
        log(f"sweep: variant {variant.name}")
        try:
            if variant.teacher:
                results.append(_teacher_variant(variant.name, recipe, out / "variants" / variant.name, target, batch, log))
            else:
                results.append(_student_variant(variant.name, recipe, out / "variants" / variant.name, target, batch,
                                                overwrite, log, show_progress))  # fmt: skip
        except CompressorError as exc:
            log(f"sweep: {variant.name} failed: {exc}")
            results.append(VariantResult(variant.name, "failed", str(exc), exit_code=exc.exit_code))
    result = SweepResult(results, out, target, batch)
    write_sweep(result, raw.get("name", recipe_path.stem))
    return result


def _no_variants() -> list[VariantSpec]:
    raise RecipeError("the recipe has no teacher and no stages: give variants with --variants FILE")


def _latency_entry(report: dict[str, Any], target: str, batch: int) -> dict[str, Any]:
    entry = ((report.get("latency") or {}).get(target) or {}).get(f"batch_{batch}")
    if not entry:
        raise MeasurementError(f"the variant was not measured on {target} batch {batch}")
    s = entry["stats"]
    return {k: s[k] for k in ("p50", "median_ci_low", "median_ci_high", "p90", "n", "confidence")}


def _student_variant(name: str, recipe, out: Path, target: str, batch: int, overwrite: bool, log, show_progress) -> VariantResult:
    from compressor.artifact import MANIFEST, read_report
    from compressor.pipeline import compress

    manifest = out / MANIFEST
    same = manifest.is_file() and json.loads(manifest.read_text()).get("recipe") == recipe.model_dump(mode="json")
    if same and not overwrite:
        # The training is reused, the timing is not: every variant of a sweep is measured in this sweep.
        log(f"sweep: {name}: reusing the trained artifact {out} (same resolved recipe); measuring it again")
        report = read_report(out)
        latency = _latency_entry(_measure(out / "model.onnx", recipe, target, batch), target, batch)
    else:
        report = compress(recipe, out, overwrite=overwrite, log=log, show_progress=show_progress)
        latency = _latency_entry(report, target, batch)
    return VariantResult(
        name, "ok", stages=[s.kind for s in recipe.stages], accuracy=(report.get("accuracy") or {}).get("student_onnx"),
        size_bytes=(report.get("size") or {}).get("model_bytes"), latency=latency, artifact=str(out),
    )  # fmt: skip


def _measure(model: Path, recipe, target: str, batch: int) -> dict[str, Any]:
    """A report-shaped latency entry for `model` on `target`, with the recipe's bench protocol."""
    from compressor.bench.measure import Protocol
    from compressor.targets.profile import load_profile
    from compressor.targets.runner import get_runner

    protocol = Protocol(warmup=recipe.bench.warmup, iterations=recipe.bench.iterations)
    m = get_runner(load_profile(target)).measure(model, protocol, batch=batch)
    return {"latency": {target: {f"batch_{batch}": m.to_dict()}}}


def _teacher_variant(name: str, recipe, out: Path, target: str, batch: int, log) -> VariantResult:
    """The teacher itself, exported and measured like any student (accuracy from PyTorch on held-out data)."""
    import torch

    from compressor.data.loaders import build_data
    from compressor.export.onnx import export_onnx
    from compressor.models.call import example_from_batch
    from compressor.pipeline import build_teacher
    from compressor.state import RunContext
    from compressor.train.evaluate import evaluate

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    data = build_data(recipe.data.source, recipe.data.batch_size, recipe.data.val_fraction, recipe.seed, recipe.data.kwargs)
    ctx = RunContext(recipe=recipe, data=data, teacher=None, work_dir=out / "work", log=log, show_progress=False)
    teacher = build_teacher(recipe, ctx)
    accuracy = evaluate(teacher, data.val, recipe.task).get("accuracy")
    model = export_onnx(teacher, example_from_batch(next(iter(data.val))[0]), out / "model.onnx", opset=recipe.export.opset)
    report = {"name": name, "accuracy": {"teacher": accuracy}, "size": {"model_bytes": model.stat().st_size},
              **_measure(model, recipe, target, batch)}  # fmt: skip
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return VariantResult(name, "ok", stages=[], accuracy=accuracy, size_bytes=model.stat().st_size,
                         latency=_latency_entry(report, target, batch), artifact=str(out))  # fmt: skip


def write_sweep(result: SweepResult, title: str) -> None:
    """sweep.json, pareto.png (when anything was measured) and sweep.md in the output directory."""
    out = result.out
    out.mkdir(parents=True, exist_ok=True)
    points = [p for p in (v.point() for v in result.variants) if p is not None]
    front = {p.name for p in pareto_front(points)}
    where = f"{result.target}, batch {result.batch}"
    data = {
        "schema": "compressor-sweep/1",
        "title": title,
        "target": result.target,
        "batch": result.batch,
        "variants": [{**vars(v), "pareto": v.name in front} for v in result.variants],
    }
    (out / "sweep.json").write_text(json.dumps(data, indent=1) + "\n")
    if points:
        plot_pareto(points, out / "pareto.png", title=f"{title}: accuracy vs latency", where=where)
    lines = [
        f"# {title}: variants measured on {where}",
        "",
        "| variant | stages | accuracy (held-out) | latency p50 ms (95% CI) | size | Pareto | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in result.variants:
        lat = v.latency or {}
        shown = "-" if not lat else f"{lat['p50']:.4f} ({lat['median_ci_low']:.4f}–{lat['median_ci_high']:.4f})"
        acc = "-" if v.accuracy is None else f"{v.accuracy * 100:.2f}%"
        size = "-" if v.size_bytes is None else f"{v.size_bytes / 1e6:.3f} MB"
        stages = " → ".join(v.stages) if v.status == "ok" else "-"
        lines.append(
            f"| {v.name} | {stages or 'teacher (fp32)'} | {acc} | {shown} | {size} | "
            f"{'yes' if v.name in front else ''} | {v.note if v.status != 'ok' else ''} |"
        )
    lines += ["", "![accuracy vs latency](pareto.png)" if points else "_Nothing was measured; no plot._", ""]
    lines.append(
        "Every variant is measured on the same target with the same protocol; accuracy is the exported file's "
        "(the teacher's: PyTorch fp32). All were timed in this sweep, one run each; the CIs are within that run, "
        "so differences of a few percent between variants are within run-to-run drift (see docs/gate.md)."
    )
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
