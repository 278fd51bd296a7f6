"""`compress bench`: measure an artifact's model on target profiles and record it in its report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compressor.artifact import read_report, update_files
from compressor.bench.report import render_markdown


def measure_targets(model_path: Path, targets: list[str], bench_spec, log=print) -> dict[str, dict[str, Any]]:
    """{target: {"batch_N": measurement}} for every target and batch size of the recipe's bench section."""
    from compressor.bench.measure import Protocol
    from compressor.targets.profile import load_profile
    from compressor.targets.runner import get_runner

    protocol = Protocol(warmup=bench_spec.warmup, iterations=bench_spec.iterations)
    results: dict[str, dict[str, Any]] = {}
    for name in targets:
        profile = load_profile(name)
        runner = get_runner(profile)
        for batch in bench_spec.batches:
            measurement = runner.measure(Path(model_path), protocol, batch=batch)
            stats = measurement.stats
            log(
                f"bench {profile.name} batch {batch}: p50 {stats.p50:.4f} ms, p90 {stats.p90:.4f} ms, CV {stats.cv:.3f}"
            )
            results.setdefault(profile.name, {})[f"batch_{batch}"] = measurement.to_dict()
    return results


def bench_into_report(
    report: dict[str, Any], model_path: Path, targets: list[str], bench_spec, log=print
) -> None:
    for target, per_batch in measure_targets(model_path, targets, bench_spec, log).items():
        report.setdefault("latency", {}).setdefault(target, {}).update(per_batch)


# The float comparison runs in every pipeline run: short, whatever the recipe's bench section asks for.
COMPARE_MAX_WARMUP = 20
COMPARE_MAX_ITERATIONS = 100


def is_quantized_report(report: dict[str, Any]) -> bool:
    """A QAT or PTQ stage (report["quant"]) or a binarize stage (report["binary"]) made this artifact."""
    return bool(report.get("quant")) or bool(report.get("binary"))


def latency_vs_float(model_path: Path, float_path: Path, target: str, bench_spec) -> dict[str, Any]:
    """Time the quantized file against the float export of the same student on `target`, interleaved.

    Batch: the smallest of the recipe's batches (batch 1 is where per-call overhead hides integer kernels).
    Returns compare_latency's result plus the protocol; `speedup` > 1 means the quantized file is faster.
    """
    from compressor.bench.measure import Protocol
    from compressor.export.inspect import compare_latency

    protocol = Protocol(warmup=min(bench_spec.warmup, COMPARE_MAX_WARMUP), iterations=min(bench_spec.iterations, COMPARE_MAX_ITERATIONS))
    batch = min(bench_spec.batches)
    result = compare_latency(Path(model_path), Path(float_path), target=target, batch=batch, protocol=protocol, rounds=bench_spec.compare_float_rounds)
    result["protocol"] = {
        "warmup": protocol.warmup, "iterations": protocol.iterations, "rounds": bench_spec.compare_float_rounds,
        "order": "side by side: both files in one process per round, alternating blocks, first file swapped each round; p50 = median of the per-round p50s",
    }  # fmt: skip
    return result


def latency_vs_float_into_report(report: dict[str, Any], model_path: Path, float_path: Path, target: str, bench_spec, log=print) -> None:
    """Record `latency_vs_float` and, when the quantized file is not faster, the warning that says so."""
    from compressor.export.inspect import not_faster_warning

    comparison = latency_vs_float(model_path, float_path, target, bench_spec)
    report["latency_vs_float"] = comparison
    log(
        f"bench {target} batch {comparison['batch']}: quantized p50 {comparison['quantized_p50_ms']:.4f} ms vs float "
        f"{comparison['float_p50_ms']:.4f} ms ({comparison['speedup']:.2f}x)"
    )
    warning = not_faster_warning(comparison, (report.get("kernels") or {}).get("integer_mac_fraction"))
    if warning:
        log(f"warning: {warning}")
        report.setdefault("warnings", []).append(warning)


def bench_artifact(artifact: Path, targets: list[str], bench_spec, log=print) -> dict[str, Any]:
    """Measure a published artifact and rewrite its report (the manifest's hashes are refreshed)."""
    report = read_report(artifact)
    bench_into_report(report, Path(artifact) / "model.onnx", targets, bench_spec, log)
    update_files(Path(artifact), {"report.json": report, "report.md": render_markdown(report)})
    return report
