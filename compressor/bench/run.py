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


def bench_artifact(artifact: Path, targets: list[str], bench_spec, log=print) -> dict[str, Any]:
    """Measure a published artifact and rewrite its report (the manifest's hashes are refreshed)."""
    report = read_report(artifact)
    bench_into_report(report, Path(artifact) / "model.onnx", targets, bench_spec, log)
    update_files(Path(artifact), {"report.json": report, "report.md": render_markdown(report)})
    return report
