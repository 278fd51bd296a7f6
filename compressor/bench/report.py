"""report.md: the same facts as report.json, for people."""

from __future__ import annotations

from typing import Any


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.3f} MB"


def render_markdown(report: dict[str, Any]) -> str:
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
    parity = report.get("parity", {})
    if parity:
        lines += [
            "## Export parity (PyTorch vs the exported file in ONNX Runtime)",
            "",
            f"{parity.get('samples')} held-out samples: max |Δ| {parity.get('max_abs', 0):.3g}, "
            f"min cosine {parity.get('min_cosine', 0):.6f}, top-1 agreement {parity.get('top1_agreement')}.",
            "",
        ]
    kernels = report.get("kernels", {})
    if kernels:
        lines += [
            "## What ONNX Runtime executes",
            "",
            f"Integer compute ops: {kernels.get('integer_ops')}; float compute ops: {kernels.get('float_ops') or 'none'}.",
            "",
        ]
    lineage = report.get("lineage", [])
    if lineage:
        lines += ["## Stages", "", "| stage | kind | metrics after |", "|---|---|---|"]
        for entry in lineage:
            metrics = ", ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                for k, v in entry.get("metrics", {}).items()
            )
            lines.append(f"| {entry.get('stage')} | {entry.get('kind')} | {metrics} |")
        lines.append("")
    latency = report.get("latency", {})
    if latency:
        lines += [
            "## Latency (measured)",
            "",
            "| target | batch | p50 ms | p90 ms | p99 ms | CV | kind |",
            "|---|---|---|---|---|---|---|",
        ]
        for target, per_batch in latency.items():
            for key, m in per_batch.items():
                s = m.get("stats", {})
                lines.append(
                    f"| {target} | {m.get('batch', key)} | {s.get('p50', 0):.4f} | {s.get('p90', 0):.4f} | "
                    f"{s.get('p99', 0):.4f} | {s.get('cv', 0):.3f} | {m.get('kind', '')} |"
                )
        lines.append("")
    return "\n".join(lines)
