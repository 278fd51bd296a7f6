"""report.md: the same facts as report.json, for people."""

from __future__ import annotations

from typing import Any

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
