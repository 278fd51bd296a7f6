"""report.md: the same facts as report.json, for people."""

from __future__ import annotations

from typing import Any

from compressor.export.inspect import is_faster

NOT_MEASURED = "not measured"
# Keys a stage may record in its lineage metrics; only what a stage measured is shown.
_PARAM_KEYS = ("parameters", "params")
_SIZE_KEYS = ("size_bytes", "model_bytes")
_LATENCY_KEYS = ("latency_p50_ms", "latency_ms")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.3f} MB"


def _first(mapping: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((mapping[k] for k in keys if mapping.get(k) is not None), None)


def _delta(value: float | None, previous: float | None) -> str:
    if value is None or previous is None:
        return "-"
    return f"{(value - previous) * 100:+.2f} pts"


def _ops(counts: dict[str, int] | None) -> str:
    return ", ".join(f"{op} ×{n}" for op, n in sorted((counts or {}).items())) or "none"


def _bytes(n: int) -> str:
    return f"{n:,} B" if n < 10_000 else _mb(n)


def warnings_section(report: dict[str, Any]) -> list[str]:
    """What the run wants a reader to know before trusting a number (quantized but not faster, ...)."""
    warnings = report.get("warnings") or []
    if not warnings:
        return []
    return ["## Warnings", "", *[f"- {w}" for w in warnings], ""]


def kernels_section(report: dict[str, Any]) -> list[str]:
    """The compute ops ONNX Runtime keeps after its graph optimizations and the integer share of the MACs."""
    kernels = report.get("kernels") or {}
    if not kernels:
        return []
    lines = [
        "## What ONNX Runtime executes",
        "",
        f"After ONNX Runtime's graph optimizations: integer compute ops {_ops(kernels.get('integer_ops'))}; "
        f"float compute ops {_ops(kernels.get('float_ops'))}.",
    ]
    fraction, macs = kernels.get("integer_mac_fraction"), kernels.get("macs") or {}
    if fraction is not None and macs.get("total"):
        unmapped = f", {macs.get('unmapped', 0):,} fused into other kernels" if macs.get("unmapped") else ""
        lines.append(
            f"**{fraction:.0%} of the {macs['total']:,} MACs** (batch 1) run in integer kernels "
            f"({macs.get('integer', 0):,} integer, {macs.get('float', 0):,} float{unmapped})."
        )
    return lines + [""]


def _quant_method(quant: dict[str, Any]) -> str:
    """One line: how the artifact was quantized, from report.json `quant`."""
    if quant.get("method") == "ptq":
        how = f"{quant.get('mode')} PTQ ({quant.get('library')})"
        if quant.get("calibration"):
            how += f", {quant['calibration']} calibration on {quant.get('calibration_samples')} samples"
        return how + (", per-channel weights" if quant.get("per_channel") else "")
    if quant.get("method") == "qat":
        act = f"{'signed' if quant.get('act_signed') else 'unsigned'} {quant.get('act_bits')}-bit activations"
        weights = f"{quant.get('weight_bits')}-bit {'per-channel' if quant.get('per_channel') else 'per-tensor'} weights"
        if quant.get("reduce_range") and quant.get("weight_bits") == 8:
            weights += " (7-bit range: x86 without VNNI)"
        kept = f"; kept in float: {', '.join(quant['keep_float'])}" if quant.get("keep_float") else ""
        return f"QAT ({quant.get('library')}): {weights}, {act}{kept}"
    return str(quant.get("method", "quantized"))


def _latency_vs_float_line(comparison: dict[str, Any]) -> str:
    protocol = comparison.get("protocol") or {}
    # Faster means beyond the ~5% noise of a side-by-side round (compare_latency's rule), not just > 1.
    verdict = "faster" if is_faster(comparison["speedup"]) else "slower" if comparison["speedup"] < 1 else "not faster beyond noise"
    return (
        f"Quantized vs a float export of the same student on {comparison.get('target')} at batch {comparison.get('batch')}: "
        f"p50 {comparison['quantized_p50_ms']:.4f} ms vs {comparison['float_p50_ms']:.4f} ms, speed-up **{comparison['speedup']:.2f}×** "
        f"({verdict}; {protocol.get('rounds', comparison.get('rounds'))} side-by-side rounds × {protocol.get('iterations', '-')} iterations, "
        f"per-round speed-ups {', '.join(f'{r:.2f}' for r in comparison.get('round_speedups', []))})."
    )


def quantization_section(report: dict[str, Any]) -> list[str]:
    """How the artifact was quantized, what that means on the target, and whether it is faster than float."""
    quant, comparison = report.get("quant") or {}, report.get("latency_vs_float") or {}
    if not quant and not comparison:
        return []
    lines = ["## Quantization", ""]
    if quant:
        lines += [_quant_method(quant), ""]
        lines += [f"- note: {note}" for note in quant.get("notes") or []]
        if quant.get("notes"):
            lines.append("")
    if comparison:
        lines += [_latency_vs_float_line(comparison), ""]
    return lines


def size_section(report: dict[str, Any]) -> list[str]:
    """Bytes on disk by stored element type and parameters by precision: what the size claim is made of."""
    size = report.get("size") or {}
    stored, by_precision = size.get("stored") or {}, size.get("parameters_by_precision") or {}
    if not stored and not by_precision:
        return []
    lines = ["## Size", ""]
    if stored:
        total = sum(entry["bytes"] for entry in stored.values())
        lines += ["Constants stored in `model.onnx` by element type:", "", "| stored as | tensors | elements | bytes | share |", "|---|---|---|---|---|"]
        for kind, entry in sorted(stored.items(), key=lambda item: -item[1]["bytes"]):
            share = entry["bytes"] / total if total else 0.0
            lines.append(f"| {kind} | {entry['tensors']} | {entry['elements']:,} | {_bytes(entry['bytes'])} | {share:.0%} |")
        extra = []
        if size.get("float_export_bytes"):
            extra.append(f"the float export it was quantized from: {_bytes(size['float_export_bytes'])}")
        if size.get("packed_bytes"):
            extra.append(f"1-bit packed weights (`weights.1bit`): {_bytes(size['packed_bytes'])}")
        lines += ["", *([f"For comparison, {'; '.join(extra)}.", ""] if extra else [])]
    if by_precision:
        lines += ["Parameters of the trained model by precision:", "", "| precision | parameters |", "|---|---|"]
        lines += [f"| {kind} | {count:,} |" for kind, count in by_precision.items()]
        lines.append("")
    return lines


def headline_latency(report: dict[str, Any]) -> tuple[str, float] | None:
    """(where, p50 ms) of the first measured target, batch 1 preferred: the number a reader looks for."""
    for target, per_batch in (report.get("latency") or {}).items():
        if not per_batch:
            continue
        key = "batch_1" if "batch_1" in per_batch else next(iter(per_batch))
        p50 = (per_batch[key].get("stats") or {}).get("p50")
        if p50 is not None:
            return f"{target}, batch {key.removeprefix('batch_')}", float(p50)
    return None


def lineage_section(report: dict[str, Any]) -> list[str]:
    """The stages in order and what each did: accuracy, its change, parameters, size, latency.

    Size and latency are usually measured only on the exported file; a stage that did not measure them
    says so instead of showing a number nobody measured.
    """
    lineage = report.get("lineage") or []
    if not lineage:
        return []
    acc = report.get("accuracy") or {}
    start = (report.get("baseline") or {}).get("student_initial") or {}
    lines = [
        "## Stages and their effect",
        "",
        "| step | kind | accuracy (held-out) | change | teacher agreement | parameters | size | latency p50 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if acc.get("teacher") is not None:
        lines.append(f"| teacher (reference) | - | {_pct(acc.get('teacher'))} | - | - | - | - | {NOT_MEASURED} |")
    previous = start.get("accuracy")
    if start:
        agree = start.get("teacher_agreement")
        lines.append(
            f"| student before stages | - | {_pct(previous)} | - | {_pct(agree)} | - | - | {NOT_MEASURED} |"
        )
    for entry in lineage:
        metrics = entry.get("metrics") or {}
        details = entry.get("details") or {}
        value = metrics.get("accuracy")
        params = _first(metrics, _PARAM_KEYS) or _first(details, _PARAM_KEYS)
        size = _first(metrics, _SIZE_KEYS)
        latency = _first(metrics, _LATENCY_KEYS)
        lines.append(
            f"| {entry.get('stage')} | {entry.get('kind')} | {_pct(value)} | {_delta(value, previous)} | "
            f"{_pct(metrics.get('teacher_agreement'))} | {params if params is not None else '-'} | "
            f"{_mb(size) if size is not None else NOT_MEASURED} | "
            f"{f'{latency:.4f} ms' if latency is not None else NOT_MEASURED} |"
        )
        previous = value if value is not None else previous
    size = report.get("size") or {}
    head = headline_latency(report)
    exported = acc.get("student_onnx")
    lines.append(
        f"| exported `model.onnx` (ONNX Runtime) | export | {_pct(exported)} | {_delta(exported, previous)} | - | "
        f"{size.get('parameters', '-')} | {_mb(size.get('model_bytes'))} | "
        f"{f'{head[1]:.4f} ms ({head[0]})' if head else NOT_MEASURED} |"
    )
    lines.append("")
    return lines


def render_markdown(report: dict[str, Any], pareto: str | None = None) -> str:
    """report.md; `pareto`: a relative path to a Pareto plot (from `compress sweep`) to show."""
    acc = report.get("accuracy", {})
    lines = [f"# {report.get('name', 'run')}: compression report", ""]
    if report.get("task") == "classification":
        lines += [
            "| | accuracy (held-out) |",
            "|---|---|",
            f"| teacher (PyTorch fp32) | {_pct(acc.get('teacher'))} |",
            f"| student (PyTorch) | {_pct(acc.get('student_torch'))} |",
            f"| student (exported `model.onnx`, ONNX Runtime) | {_pct(acc.get('student_onnx'))} |",
            "",
            f"Accuracy drop vs teacher: **{acc.get('drop_points', '-')} points**.",
            "",
        ]
    else:
        lines += [f"Cosine to teacher (held-out): {acc.get('cosine_to_teacher')}", ""]
    size = report.get("size", {})
    lines += [
        f"Size on disk: **{_mb(size.get('model_bytes'))}** (`model.onnx`), {size.get('parameters', '-')} parameters.",
        "",
    ]
    lines += warnings_section(report)
    parity = report.get("parity", {})
    if parity:
        lines += [
            "## Export parity (PyTorch vs the exported file in ONNX Runtime)",
            "",
            f"{parity.get('samples')} held-out samples: max |Δ| {parity.get('max_abs', 0):.3g}, "
            f"min cosine {parity.get('min_cosine', 0):.6f}, top-1 agreement {parity.get('top1_agreement')}.",
            "",
        ]
    lines += kernels_section(report)
    lines += quantization_section(report)
    lines += size_section(report)
    lines += lineage_section(report)
    latency = report.get("latency", {})
    if latency:
        lines += [
            "## Latency (measured)",
            "",
            "| target | batch | p50 ms | p50 CI ms | p90 ms | p99 ms | CV | runs × iterations | kind |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for target, per_batch in latency.items():
            for key, m in per_batch.items():
                s = m.get("stats", {})
                ci = "-"
                if s.get("median_ci_low") is not None and s.get("median_ci_high") is not None:
                    ci = f"{s['median_ci_low']:.4f}–{s['median_ci_high']:.4f} ({s.get('confidence', 0.95):.0%})"
                lines.append(
                    f"| {target} | {m.get('batch', key)} | {s.get('p50', 0):.4f} | {ci} | {s.get('p90', 0):.4f} | "
                    f"{s.get('p99', 0):.4f} | {s.get('cv', 0):.3f} | 1 × {s.get('n', '-')} | {m.get('kind', '')} |"
                )
        lines.append("")
    if pareto:
        lines += ["## Accuracy vs latency over the recipe's variants", "", f"![Pareto plot]({pareto})", ""]
    return "\n".join(lines)
