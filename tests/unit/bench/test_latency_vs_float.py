""""Quantized but not faster" in the pipeline: a quantized artifact is timed against a float export of the same
student on the bench target; report.json `latency_vs_float`, and a warning when it is not faster.

Timing outcomes are not asserted (a shared, noisy machine): only that the comparison is recorded, and that
the warning follows the ratio it is given."""

from __future__ import annotations

import math
from pathlib import Path

import onnx
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from compressor.bench import run as bench_run
from compressor.data.loaders import build_data
from compressor.export.onnx import export_onnx
from compressor.models.load import build_model
from compressor.pipeline import compare_with_float, float_reference, float_twin
from compressor.quant.binary import BinarizeConfig, BinaryLinear, binarize_
from compressor.quant.qat import QATSpec, quantize_module
from compressor.recipe import BenchSpec, load_recipe
from compressor.state import ModelState, RunContext

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "digits.yaml"


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    recipe = load_recipe(EXAMPLE)
    data = build_data(recipe.data.source, 64, recipe.data.val_fraction, 0, recipe.data.kwargs)
    return recipe, data


def int8_student(recipe, data) -> ModelState:
    """The digits student quantized as the recipe's qat stage does (calibrated, not trained: timing only)."""
    x = next(iter(data.val))[0][:1]
    module = quantize_module(build_model(recipe.student, "student"), QATSpec(act_stats_steps=1), (x,))
    module.train()
    with torch.no_grad():
        module(next(iter(data.train))[0])
    return ModelState(module=module.eval(), example_inputs=(x,), extras={"quant": {"method": "qat"}})


def context(recipe, data, tmp_path, **bench) -> RunContext:
    spec = recipe.model_copy(update={"bench": BenchSpec(warmup=2, iterations=20, batches=[1, 32], compare_float_rounds=1, **bench)})
    return RunContext(recipe=spec, data=data, teacher=None, work_dir=tmp_path, log=lambda message: None, show_progress=False)


def node_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_float_twin_of_a_qat_student_exports_without_quantization(digits, tmp_path):
    recipe, data = digits
    state = int8_student(recipe, data)
    ctx = context(recipe, data, tmp_path)
    quantized = export_onnx(state.module, state.example_inputs, tmp_path / "q.onnx")
    reference = float_reference(state, ctx, tmp_path / "float.onnx")
    assert {"QuantizeLinear", "DequantizeLinear"} <= node_types(quantized)
    assert not node_types(reference) & {"QuantizeLinear", "DequantizeLinear"} and {"Conv", "Gemm"} <= node_types(reference)
    assert {init.data_type for init in onnx.load(str(reference)).graph.initializer} == {onnx.TensorProto.FLOAT}
    assert any(type(m).__module__.startswith("brevitas") for m in state.module.modules())  # the student is untouched


def test_float_twin_of_a_binarized_model_uses_the_latent_weights():
    torch.manual_seed(0)
    model = binarize_(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), BinarizeConfig(modules=["*"]))
    assert isinstance(model[0], BinaryLinear)
    twin = float_twin(model)
    assert [type(m) for m in twin] == [nn.Linear, nn.ReLU, nn.Linear] and isinstance(model[0], BinaryLinear)
    x = torch.randn(3, 8)
    expected = nn.functional.linear(torch.relu(nn.functional.linear(x, model[0].weight, model[0].bias)), model[2].weight, model[2].bias)
    assert torch.allclose(twin(x), expected)
    assert not torch.allclose(model(x), expected)  # the binarized forward differs: the twin really is float


def test_pipeline_records_latency_vs_float_for_the_int8_digits_student(digits, tmp_path):
    recipe, data = digits
    state = int8_student(recipe, data)
    ctx = context(recipe, data, tmp_path)
    model_path = export_onnx(state.module, state.example_inputs, tmp_path / "model.onnx")
    report = {"quant": {"method": "qat"}, "kernels": {"integer_mac_fraction": 1.0}, "warnings": []}
    compare_with_float(report, state, ctx, model_path)
    comparison = report["latency_vs_float"]
    assert comparison["target"] == "x86-cpu" and comparison["batch"] == 1  # the smallest of batches [1, 32]
    for key in ("quantized_p50_ms", "float_p50_ms", "speedup"):
        assert math.isfinite(comparison[key]) and comparison[key] > 0
    assert comparison["speedup"] == pytest.approx(comparison["float_p50_ms"] / comparison["quantized_p50_ms"])
    assert comparison["protocol"] == {"warmup": 2, "iterations": 20, "rounds": 1, "order": comparison["protocol"]["order"]}
    # Whichever way this noisy measurement went, the warning agrees with it.
    warned = any(w.startswith("quantized but not faster") for w in report["warnings"])
    assert warned == (not comparison["faster"])
    assert list(tmp_path.glob("float-reference-*")) == []  # the float file is gone, never published


def test_no_comparison_when_turned_off_or_not_quantized(digits, tmp_path):
    recipe, data = digits
    state = int8_student(recipe, data)
    model_path = export_onnx(state.module, state.example_inputs, tmp_path / "model.onnx")
    off = {"quant": {"method": "qat"}, "warnings": []}
    compare_with_float(off, state, context(recipe, data, tmp_path, compare_float=False), model_path)
    float_run = {"quant": None, "binary": None, "warnings": []}
    compare_with_float(float_run, state, context(recipe, data, tmp_path), model_path)
    assert "latency_vs_float" not in off and "latency_vs_float" not in float_run


@pytest.mark.parametrize(("speedup", "warned"), [(0.93, True), (1.04, True), (1.05, True), (1.051, False), (2.4, False)])
def test_warning_follows_the_measured_ratio(monkeypatch, speedup, warned):
    def measured(model_path, float_path, target, bench_spec):
        return {"target": target, "batch": 1, "quantized_p50_ms": 0.031 / speedup, "float_p50_ms": 0.031,
                "speedup": speedup, "round_speedups": [speedup], "protocol": {}}  # fmt: skip

    monkeypatch.setattr(bench_run, "latency_vs_float", measured)
    report = {"kernels": {"integer_mac_fraction": 1.0}, "warnings": ["an earlier warning"]}
    bench_run.latency_vs_float_into_report(report, Path("q.onnx"), Path("f.onnx"), "x86-cpu", BenchSpec(), log=lambda m: None)
    assert report["latency_vs_float"]["speedup"] == speedup
    assert report["warnings"][0] == "an earlier warning"
    if warned:
        assert report["warnings"][1].startswith(f"quantized but not faster: {0.031 / speedup:.4f} ms vs float 0.0310 ms")
        assert f"(speed-up {speedup:.2f}×)" in report["warnings"][1] and "per-call overhead" in report["warnings"][1]
    else:
        assert report["warnings"] == ["an earlier warning"]


def test_bench_option_is_validated():
    assert BenchSpec().compare_float is True and BenchSpec().compare_float_rounds == 3
    with pytest.raises(ValidationError):
        BenchSpec(compare_float_rounds=0)


def test_ptq_pipeline_run_compares_with_its_own_float_export_and_renders_it(tmp_path):
    from compressor.pipeline import compress
    from compressor.recipe import parse_recipe

    recipe = parse_recipe(
        {
            "name": "ptq-digits",
            "student": {"model": "digits_cnn", "kwargs": {"widths": [8, 16]}},
            "data": {"source": "digits", "batch_size": 64},
            "stages": [{"kind": "ptq", "calibration": "minmax", "calibration_samples": 128,
                        "parity": {"max_abs": 1e9, "min_top1_agreement": 0.5, "min_cosine": 0.9}}],  # untrained: near-tied logits
            "export": {"parity": {"samples": 64}},
            "targets": ["x86-cpu"],
            "bench": {"warmup": 2, "iterations": 20, "compare_float_rounds": 1},
        }
    )  # fmt: skip
    report = compress(recipe, tmp_path / "out", log=lambda _m: None)
    comparison = report["latency_vs_float"]
    assert comparison["quantized_p50_ms"] > 0 and comparison["float_p50_ms"] > 0 and math.isfinite(comparison["speedup"])
    published = {p.name for p in (tmp_path / "out").iterdir()}
    assert "model.float.onnx" not in published and not (tmp_path / "out.partial").exists()
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Quantization" in md and "static PTQ (onnxruntime), minmax calibration on 128 samples" in md
    assert f"p50 {comparison['quantized_p50_ms']:.4f} ms vs {comparison['float_p50_ms']:.4f} ms" in md
    assert "## Size" in md and "| int8 |" in md
