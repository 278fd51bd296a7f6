"""`compress sweep`: variants of a recipe, the Pareto front, and the plot file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from compressor.bench.plot import Point, pareto_front, plot_pareto
from compressor.bench.sweep import SweepSpec, VariantSpec, default_variants, resolve_variant, run_sweep
from compressor.errors import CompressorError, RecipeError

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
RAW = {
    "name": "r",
    "teacher": {"model": "digits_teacher"},
    "student": {"model": "digits_student"},
    "stages": [{"kind": "distill", "epochs": 3}, {"kind": "qat", "epochs": 2}],
}
REGISTERED = ["distill", "ptq", "qat"]


def test_pareto_front_keeps_only_undominated_variants():
    points = [Point("teacher", 0.99, 1.0), Point("kd", 0.97, 0.1), Point("int8", 0.97, 0.05),
              Point("bad", 0.90, 0.5), Point("tiny", 0.80, 0.01)]  # fmt: skip
    assert [p.name for p in pareto_front(points)] == ["tiny", "int8", "teacher"]


def test_plot_file_is_a_png_with_every_point(tmp_path):
    import matplotlib.image

    points = [Point("teacher", 0.99, 1.0, 0.9, 1.1, 4_000_000), Point("kd-int8", 0.97, 0.05, 0.04, 0.06, 20_000)]
    path = plot_pareto(points, tmp_path / "out" / "pareto.png", title="t", where="x86-cpu, batch 1")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (540, 840)  # 7 x 4.5 in at 120 dpi
    with pytest.raises(CompressorError, match="nothing to plot"):
        plot_pareto([], tmp_path / "empty.png")


def test_variants_choose_stages_by_kind_position_or_in_full():
    by_kind, _ = resolve_variant(RAW, VariantSpec(name="a", stages=["qat"]), REGISTERED)
    assert by_kind["stages"] == [{"kind": "qat", "epochs": 2}]
    by_position, _ = resolve_variant(RAW, VariantSpec(name="b", stages=[0]), REGISTERED)
    assert by_position["stages"] == [{"kind": "distill", "epochs": 3}]
    full, _ = resolve_variant(RAW, VariantSpec(name="c", stages=["distill", {"kind": "ptq"}], set=["stages.0.epochs=9"]), REGISTERED)
    assert full["stages"] == [{"kind": "distill", "epochs": 9}, {"kind": "ptq"}]
    assert RAW["stages"][0]["epochs"] == 3  # the recipe itself is untouched
    unchanged, _ = resolve_variant(RAW, VariantSpec(name="d"), REGISTERED)
    assert unchanged["stages"] == RAW["stages"]


def test_unregistered_stage_kinds_skip_the_variant_with_a_note():
    data, note = resolve_variant(RAW, VariantSpec(name="p", stages=[{"kind": "prune", "ratio": 0.5}, "distill"]), REGISTERED)
    assert data is None and note == "stage kind 'prune' is not registered here (registered: distill, ptq, qat); skipped"
    data, _ = resolve_variant(RAW, VariantSpec(name="p", stages=[{"kind": "prune", "ratio": 0.5}]), [*REGISTERED, "prune"])
    assert data["stages"] == [{"kind": "prune", "ratio": 0.5}]  # the same variant runs once the stage exists
    data, note = resolve_variant(RAW, VariantSpec(name="b", stages=["distill", "binary"]), REGISTERED)
    assert data is None and "'binary' is not registered" in note
    with pytest.raises(RecipeError, match="the recipe has no 'ptq' stage to reuse; give it in full"):
        resolve_variant(RAW, VariantSpec(name="x", stages=["ptq"]), REGISTERED)


def test_default_variants_are_the_teacher_then_each_prefix_of_the_stages():
    variants = default_variants(RAW)
    assert [(v.name, v.teacher, v.stages) for v in variants] == [
        ("teacher", True, None), ("distill", False, [0]), ("distill+qat", False, [0, 1])]  # fmt: skip


def test_variants_file_validation(tmp_path):
    with pytest.raises(ValueError, match="repeated: a"):
        SweepSpec.model_validate({"variants": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(ValueError, match="needs a 'kind'"):
        VariantSpec.model_validate({"name": "a", "stages": [{"epochs": 3}]})
    spec = SweepSpec.model_validate(yaml.safe_load((EXAMPLES / "digits-sweep.yaml").read_text()))
    assert [v.name for v in spec.variants][:3] == ["teacher", "kd-fp32", "kd-int8"]


def test_bad_input_is_found_before_anything_trains(tmp_path):
    variants = tmp_path / "v.yaml"
    variants.write_text("variants: [{name: kd, stages: [distill]}]\n")
    with pytest.raises(CompressorError, match="nosuch") as info:
        run_sweep(EXAMPLES / "digits.yaml", variants=variants, out=tmp_path / "s", target="nosuch", log=lambda _: None)
    assert info.value.exit_code == 2
    variants.write_text("variants: [{name: kd, stages: [distill], set: ['train.optimizer.name=lion']}]\n")
    with pytest.raises(RecipeError, match="variant kd.*train.optimizer.name"):
        run_sweep(EXAMPLES / "digits.yaml", variants=variants, out=tmp_path / "s", log=lambda _: None)


def test_a_sweep_of_skipped_variants_still_writes_its_summary(tmp_path):
    variants = tmp_path / "v.yaml"
    variants.write_text("variants: [{name: later, stages: [{kind: not-a-stage-yet}]}]\n")
    result = run_sweep(EXAMPLES / "digits.yaml", variants=variants, out=tmp_path / "s", log=lambda _: None)
    assert result.exit_code == 0 and result.variants[0].status == "skipped"
    data = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert data["variants"][0]["status"] == "skipped" and data["target"] == "x86-cpu"
    assert "_Nothing was measured; no plot._" in (tmp_path / "s" / "sweep.md").read_text()
    assert not (tmp_path / "s" / "pareto.png").exists()


@pytest.mark.slow
def test_sweep_end_to_end_on_digits(tmp_path, monkeypatch):
    """Teacher, KD student and KD + int8 QAT, trained briefly, each exported and measured on x86-cpu."""
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    variants = tmp_path / "v.yaml"
    variants.write_text(
        "variants:\n  - {name: teacher, teacher: true}\n  - {name: kd-fp32, stages: [distill]}\n"
        "  - {name: kd-int8, stages: [distill, qat]}\n  - {name: kd-later, stages: [{kind: not-a-stage-yet}, distill]}\n"
    )
    quick = ["teacher.pretrain.epochs=2", "stages.0.epochs=2", "stages.1.epochs=1", "bench.iterations=50",
             "bench.warmup=5", "export.parity.min_top1_agreement=0.98"]  # fmt: skip
    result = run_sweep(EXAMPLES / "digits.yaml", variants=variants, out=tmp_path / "s", overrides=quick, log=lambda _: None)
    assert result.exit_code == 0, result.lines()
    by_name = {v.name: v for v in result.variants}
    assert [by_name[n].status for n in ("teacher", "kd-fp32", "kd-int8", "kd-later")] == ["ok", "ok", "ok", "skipped"]
    for v in (by_name["teacher"], by_name["kd-fp32"], by_name["kd-int8"]):
        assert 0.5 < v.accuracy <= 1 and v.latency["p50"] > 0 and v.size_bytes == Path(v.artifact, "model.onnx").stat().st_size
    assert by_name["teacher"].size_bytes > 20 * by_name["kd-int8"].size_bytes  # 528K-parameter teacher vs 10K int8 student
    assert (tmp_path / "s" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "s" / "sweep.md").read_text()
    assert "| kd-int8 | distill → qat |" in md and "![accuracy vs latency](pareto.png)" in md
    # A second sweep with the same resolved recipes reuses the trained artifacts and measures them again.
    logs: list[str] = []
    again = run_sweep(EXAMPLES / "digits.yaml", variants=variants, out=tmp_path / "s", overrides=quick, log=logs.append)
    assert again.exit_code == 0 and sum("reusing the trained artifact" in line for line in logs) == 2
    assert {v.name: v.accuracy for v in again.variants if v.name.startswith("kd-")} == {
        n: by_name[n].accuracy for n in ("kd-fp32", "kd-int8")} | {"kd-later": None}
