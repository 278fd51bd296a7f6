"""report.md shows the quantization facts report.json holds: integer MACs, warnings, stored bytes, notes,
and the quantized-vs-float latency, each section only when its data is there."""

from __future__ import annotations

import copy

from compressor.bench.report import render_markdown


def quantized_report() -> dict:
    """The shape the pipeline writes for the digits int8 QAT run (numbers from a real run, trimmed)."""
    return {
        "name": "digits",
        "task": "classification",
        "accuracy": {"teacher": 0.9956, "student_torch": 0.9933, "student_onnx": 0.9933, "drop_points": 0.2222},
        "size": {
            "model_bytes": 18_898,
            "parameters": 9_936,
            "stored": {
                "float": {"tensors": 9, "elements": 119, "bytes": 476},
                "int8": {"tensors": 8, "elements": 9_932, "bytes": 9_932},
                "int32": {"tensors": 6, "elements": 116, "bytes": 464},
            },
            "parameters_by_precision": {"int7 weights (stored int8)": 9_872, "int32 bias": 58},
        },
        "kernels": {
            "integer_ops": {"QLinearConv": 2, "QGemm": 1},
            "float_ops": {},
            "macs": {"total": 309_248, "integer": 309_248, "float": 0, "unmapped": 0},
            "integer_mac_fraction": 1.0,
        },
        "quant": {
            "method": "qat", "library": "brevitas", "weight_bits": 4, "act_bits": 8, "per_channel": True,
            "act_signed": False, "reduce_range": True, "keep_float": ["last"],
            "notes": ["4-bit weights: ONNX has no 4-bit tensor type that ONNX Runtime's CPU kernels run; they are stored as int8"],
        },  # fmt: skip
        "latency_vs_float": {
            "target": "x86-cpu", "batch": 1, "rounds": 3, "quantized_p50_ms": 0.0331, "float_p50_ms": 0.0308,
            "round_speedups": [0.90, 0.93, 0.95], "speedup": 0.0308 / 0.0331, "faster": False,
            "protocol": {"warmup": 20, "iterations": 100, "rounds": 3},
        },  # fmt: skip
        "warnings": ["quantized but not faster: 0.0331 ms vs float 0.0308 ms p50 on x86-cpu at batch 1 (speed-up 0.93×)"],
        "lineage": [],
        "latency": {},
    }


def section(md: str, heading: str) -> list[str]:
    """The lines under `heading` up to the next heading."""
    lines = md.splitlines()
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return [line for line in lines[start:end] if line]


def table_rows(lines: list[str]) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    return [r for r in rows if not set("".join(r)) <= {"-"}]  # drop the separator


def test_warnings_come_first_and_say_quantized_but_not_faster():
    md = render_markdown(quantized_report())
    assert section(md, "## Warnings") == ["- quantized but not faster: 0.0331 ms vs float 0.0308 ms p50 on x86-cpu at batch 1 (speed-up 0.93×)"]
    assert md.index("## Warnings") < md.index("## What ONNX Runtime executes")


def test_integer_mac_fraction_is_rendered_with_the_ops():
    lines = section(render_markdown(quantized_report()), "## What ONNX Runtime executes")
    assert "integer compute ops QGemm ×1, QLinearConv ×2; float compute ops none." in lines[0]
    assert lines[1] == "**100% of the 309,248 MACs** (batch 1) run in integer kernels (309,248 integer, 0 float)."
    partly = quantized_report()
    partly["kernels"].update(macs={"total": 1000, "integer": 410, "float": 500, "unmapped": 90}, integer_mac_fraction=0.41)
    line = section(render_markdown(partly), "## What ONNX Runtime executes")[1]
    assert line.startswith("**41% of the 1,000 MACs**") and "90 fused into other kernels" in line


def test_quantization_section_has_method_notes_and_latency_vs_float():
    lines = section(render_markdown(quantized_report()), "## Quantization")
    assert lines[0] == "QAT (brevitas): 4-bit per-channel weights, unsigned 8-bit activations; kept in float: last"
    assert lines[1].startswith("- note: 4-bit weights: ONNX has no 4-bit tensor type")
    assert lines[2].startswith("Quantized vs a float export of the same student on x86-cpu at batch 1: p50 0.0331 ms vs 0.0308 ms")
    assert "speed-up **0.93×** (slower; 3 side-by-side rounds × 100 iterations" in lines[2]
    assert "per-round speed-ups 0.90, 0.93, 0.95" in lines[2]


def test_speedup_verdict_follows_the_comparison():
    report = quantized_report()
    report["latency_vs_float"].update(speedup=2.4, faster=True)
    assert "speed-up **2.40×** (faster;" in section(render_markdown(report), "## Quantization")[2]
    report["latency_vs_float"].update(speedup=1.02, faster=False)  # above 1, inside the noise of a round
    assert "(not faster beyond noise;" in section(render_markdown(report), "## Quantization")[2]


def test_ptq_method_line():
    report = quantized_report()
    report["quant"] = {"method": "ptq", "library": "onnxruntime", "mode": "static", "calibration": "entropy",
                       "calibration_samples": 256, "per_channel": True, "notes": []}  # fmt: skip
    assert section(render_markdown(report), "## Quantization")[0] == (
        "static PTQ (onnxruntime), entropy calibration on 256 samples, per-channel weights"
    )


def test_int8_qat_says_seven_bit_range():
    report = quantized_report()
    report["quant"].update(weight_bits=8, keep_float=[], notes=[])
    assert section(render_markdown(report), "## Quantization")[0] == (
        "QAT (brevitas): 8-bit per-channel weights (7-bit range: x86 without VNNI), unsigned 8-bit activations"
    )


def test_size_section_stored_bytes_by_type_and_parameters_by_precision():
    report = quantized_report()
    report["size"]["float_export_bytes"] = 41_117
    lines = section(render_markdown(report), "## Size")
    stored = table_rows(lines[: lines.index("Parameters of the trained model by precision:")])
    assert stored[0] == ["stored as", "tensors", "elements", "bytes", "share"]
    # largest first; shares of the 10,872 stored bytes
    assert stored[1:] == [["int8", "8", "9,932", "9,932 B", "91%"], ["float", "9", "119", "476 B", "4%"], ["int32", "6", "116", "464 B", "4%"]]
    assert "For comparison, the float export it was quantized from: 0.041 MB." in lines
    by_precision = table_rows(lines[lines.index("Parameters of the trained model by precision:") :])
    assert by_precision[1:] == [["int7 weights (stored int8)", "9,872"], ["int32 bias", "58"]]


def test_float_run_has_no_quantization_size_or_warning_sections():
    report = copy.deepcopy(quantized_report())
    for key in ("quant", "latency_vs_float"):
        report.pop(key)
    report["warnings"] = []
    report["size"] = {"model_bytes": 41_117, "parameters": 9_936}
    report["kernels"] = {"integer_ops": {}, "float_ops": {"Conv": 2, "Gemm": 1}, "integer_mac_fraction": 0.0,
                         "macs": {"total": 309_248, "integer": 0, "float": 309_248, "unmapped": 0}}  # fmt: skip
    md = render_markdown(report)
    assert "## Quantization" not in md and "## Size" not in md and "## Warnings" not in md
    assert "**0% of the 309,248 MACs**" in md  # the kernel facts are shown for float files too


def test_warnings_render_without_quantization():
    report = quantized_report()
    report.pop("quant")
    report.pop("latency_vs_float")
    report["warnings"] = ["something a reader must know"]
    md = render_markdown(report)
    assert section(md, "## Warnings") == ["- something a reader must know"] and "## Quantization" not in md
