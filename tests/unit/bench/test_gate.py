"""Budgets file validation and every verdict path of the gate, on small hand-made reports.

Latency samples are synthetic but valid (what a runner returns); re-measurements come from a seeded
sample source standing in for the target, so each path (pass, fail, inconclusive → re-measure → decided,
measurement failure, fail closed) is exercised deterministically. tests/unit/bench/test_gate_cli.py
runs the same gate against real ONNX Runtime measurements.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compressor.bench.gate import (
    BudgetError,
    BudgetFile,
    Policy,
    exit_code,
    gate_report,
    judge,
    load_budget_file,
    load_budgets,
    parse_quantity,
    run_gate,
)
from compressor.errors import MeasurementError


def measurement(samples, target="x86-cpu", batch=1, version="1.32.0", shape=(1, 8), extra=None) -> dict:
    return {
        "target": target,
        "batch": batch,
        "kind": "end-to-end",
        "stats": {"p50": float(np.median(samples))},
        "protocol": {"warmup": 1, "iterations": len(samples)},
        "environment": {
            "runtime": "onnxruntime",
            "onnxruntime_version": version,
            "intra_op_threads": 1,
            "inputs": {"input": {"shape": [batch, *shape[1:]], "dtype": "float32"}},
        },
        "extra": extra or {},
        "samples_ms": [float(s) for s in samples],
    }


def lognormal(median: float, spread: float, n: int = 200, seed: int = 0) -> np.ndarray:
    return median * np.exp(np.random.default_rng(seed).normal(0.0, spread, n))


def make_report(samples=None, **kw) -> dict:
    samples = lognormal(1.0, 0.05) if samples is None else samples
    return {
        "schema_version": 1,
        "name": "tiny",
        "accuracy": {"teacher": 0.99, "student_onnx": 0.97, "drop_points": 2.0},
        "size": {"model_bytes": 20_000, "parameters": 5000},
        "latency": {"x86-cpu": {"batch_1": measurement(samples, **kw)}},
    }


def spec(*budgets: dict, **policy) -> BudgetFile:
    return BudgetFile.model_validate({"budgets": list(budgets), "policy": policy})


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "budgets.yaml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------ budgets file


@pytest.mark.parametrize(
    ("value", "metric", "expected"),
    [("5ms", "latency_p90", 5.0), ("250us", "latency_p50", 0.25), ("1.5 s", "latency_p99", 1500.0),
     ("4MB", "size", 4e6), ("1KiB", "size", 1024.0), ("64MB", "peak_memory", 64e6), (0.95, "accuracy", 0.95),
     ("97%", "accuracy", 0.97), (1.5, "accuracy_drop", 1.5), ("1.5 points", "accuracy_drop", 1.5)],
)  # fmt: skip
def test_quantities_parse_to_the_metric_unit(value, metric, expected):
    assert parse_quantity(value, metric) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{metric: latency_p90, target: x86-cpu, max: 5}", "'5' needs a unit (us, ms, s), e.g. '5ms'"),
        ("{metric: latency_p90, target: x86-cpu, max: 5 parsecs}", "needs a unit"),
        ("{metric: size, max: 4}", "'4' needs a unit (b, kb, mb"),
        ("{metric: latency_p50, target: x86-cpu, max_regression: 5}", "max_regression '5' needs a percent sign"),
        ("{metric: accuracy, min: 95}", "not a fraction in [0, 1]; write 0.95 or '95%'"),
        ("{metric: latency_p42, target: x86-cpu, max: 1ms}", "metric 'latency_p42' is unknown; allowed: latency_p50"),
        ("{metric: latency_p90, max: 1ms}", "needs a 'target'"),
        ("{metric: latency_p90, target: x86-cpu, min: 1ms}", "lower is better, so give 'max'"),
        ("{metric: accuracy, max: 0.9}", "higher is better, so give 'min'"),
        ("{metric: accuracy, max_regression: 1%}", "max_regression applies to latency"),
        ("{metric: size, max: 1MB, max_regression: 5%}", "exactly one of 'max', 'min' or 'max_regression'"),
        ("{metric: size, max: 1MB, typo: 1}", "budgets.0.typo"),
    ],
)
def test_bad_budgets_are_one_line_exit_2(tmp_path, line, message):
    path = write(tmp_path, f"budgets:\n  - {line}\n")
    with pytest.raises(BudgetError) as info:
        load_budgets(path)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert info.value.exit_code == 2


def test_budget_file_problems(tmp_path):
    with pytest.raises(BudgetError, match="does not exist"):
        load_budgets(tmp_path / "nope.yaml")
    with pytest.raises(BudgetError, match="not valid YAML"):
        load_budgets(write(tmp_path, "budgets: [\n"))
    with pytest.raises(BudgetError, match="budgets: List should have at least 1 item"):
        load_budgets(write(tmp_path, "budgets: []\n"))
    with pytest.raises(BudgetError, match="policy.inconclusive"):
        load_budgets(write(tmp_path, "policy: {inconclusive: maybe}\nbudgets: [{metric: size, max: 1MB}]\n"))


def test_budget_file_policy_and_baseline_path_relative_to_the_file(tmp_path):
    path = write(tmp_path, "baseline: base/x86.json\npolicy: {remeasure: 3, confidence: 0.99}\n"
                 "budgets: [{metric: size, max: 1MB}]\n")  # fmt: skip
    loaded = load_budget_file(path)
    assert loaded.baseline == tmp_path / "base" / "x86.json"
    assert (loaded.policy.remeasure, loaded.policy.confidence, loaded.policy.inconclusive) == (3, 0.99, "fail")


# ------------------------------------------------------------------------------------------ scalar budgets


def test_size_and_accuracy_budgets_are_exact():
    report = make_report()
    verdicts = judge(report, spec({"metric": "size", "max": "20kB"}, {"metric": "size", "max": "19.9kB"},
                                  {"metric": "accuracy", "min": "97%"}, {"metric": "accuracy_drop", "max": 1.5}).budgets)  # fmt: skip
    assert [v.status for v in verdicts] == ["pass", "fail", "pass", "fail"]
    assert verdicts[1].line() == "FAIL size: measured 0.0200 MB, allowed <= 0.0199 MB"
    assert exit_code(verdicts) == 1
    assert exit_code(verdicts[:1]) == 0


def test_missing_metrics_and_targets_are_bad_input():
    report = make_report()
    with pytest.raises(BudgetError, match="target 'jetson-orin-nano' was never benchmarked \\(benchmarked: x86-cpu\\)"):
        judge(report, spec({"metric": "latency_p90", "target": "jetson-orin-nano", "max": "5ms"}).budgets)
    with pytest.raises(BudgetError, match="batch 8 was not measured on x86-cpu \\(measured batches: 1\\)"):
        judge(report, spec({"metric": "latency_p90", "target": "x86-cpu", "batch": 8, "max": "5ms"}).budgets)
    with pytest.raises(BudgetError, match="no 'cosine_to_teacher'"):
        judge(report, spec({"metric": "cosine_to_teacher", "min": 0.9}).budgets)
    with pytest.raises(BudgetError, match="peak memory was not measured"):
        judge(report, spec({"metric": "peak_memory", "target": "x86-cpu", "max": "64MB"}).budgets)
    truncated = make_report()
    del truncated["latency"]["x86-cpu"]["batch_1"]["samples_ms"]
    with pytest.raises(BudgetError, match="has no samples_ms"):
        judge(truncated, spec({"metric": "latency_p50", "target": "x86-cpu", "max": "5ms"}).budgets)


def test_peak_memory_is_judged_where_the_runner_recorded_it():
    report = make_report(extra={"peak_memory_bytes": 30e6})
    budgets = spec({"metric": "peak_memory", "target": "x86-cpu", "max": "32MB"},
                   {"metric": "peak_memory", "target": "x86-cpu", "max": "16MB"}).budgets  # fmt: skip
    assert [v.status for v in judge(report, budgets)] == ["pass", "fail"]


# ------------------------------------------------------------------------------------------ latency verdicts


def latency(limit: str, metric: str = "latency_p50") -> dict:
    return {"metric": metric, "target": "x86-cpu", "batch": 1, "max": limit}


def test_latency_pass_fail_inconclusive_on_the_interval():
    samples = lognormal(1.0, 0.05, n=400)
    report = make_report(samples)
    median = float(np.median(samples))
    verdicts = judge(report, spec(latency("2ms"), latency("0.5ms"), latency(f"{median:.6f}ms")).budgets)
    assert [v.raw for v in verdicts] == ["pass", "fail", "inconclusive"]
    low, high = verdicts[2].interval
    assert low < median < high  # the limit sits inside the interval: it straddles
    assert verdicts[2].status == "fail" and "inconclusive after 1 run; policy: fail" in verdicts[2].note
    passing = judge(report, spec(latency(f"{median:.6f}ms")).budgets, policy=Policy(inconclusive="pass"))
    assert passing[0].status == "pass" and passing[0].raw == "inconclusive"


def test_p50_interval_is_the_reports_bootstrap_ci_and_p90_is_bootstrapped_from_samples():
    from compressor.bench.measure import summarize

    samples = lognormal(1.0, 0.2, n=300, seed=3)
    stats = summarize(samples)
    v50, v90 = judge(make_report(samples), spec(latency("5ms"), latency("5ms", "latency_p90")).budgets)
    assert v50.interval == pytest.approx((stats.median_ci_low, stats.median_ci_high), abs=0)
    assert v90.measured == pytest.approx(stats.p90, rel=1e-12)
    assert v90.interval[0] < stats.p90 < v90.interval[1]
    assert v90.interval[0] > v50.interval[1]  # the p90 interval is its own, not the median's


def source(medians: dict[str, float], spread: float = 0.05, fail_after: int | None = None):
    """Stands in for the target: runs of a model whose median depends on its file name; seeded."""
    calls = {"n": 0}

    def measure(ev, path: Path) -> np.ndarray:
        calls["n"] += 1
        if fail_after is not None and calls["n"] > fail_after:
            raise MeasurementError("the device went away")
        return lognormal(medians[Path(path).stem], spread, n=200, seed=100 + calls["n"])

    measure.calls = calls  # type: ignore[attr-defined]
    return measure


def test_inconclusive_is_remeasured_until_decided(tmp_path):
    # One run says 1.00 ms; the limit is just above; more runs pool samples and narrow the interval.
    report = make_report(lognormal(1.0, 0.3, n=60, seed=1))
    assert judge(report, spec(latency("1.05ms")).budgets)[0].raw == "inconclusive"
    measure = source({"model": 1.0}, spread=0.3)
    result = gate_report(report, spec(latency("1.05ms"), remeasure=20), model=tmp_path / "model.onnx",
                         measure=measure, log=lambda _: None)  # fmt: skip
    v = result.verdicts[0]
    assert v.raw == "pass" and v.status == "pass" and result.exit_code == 0
    assert 2 <= v.runs == result.runs["x86-cpu/batch_1"] == 1 + measure.calls["n"] <= 21


def test_remeasure_cap_then_policy(tmp_path):
    samples = lognormal(1.0, 0.3, n=60, seed=1)
    at_limit = latency(f"{float(np.median(samples)):.6f}ms")
    measure = source({"model": float(np.median(samples))}, spread=0.3)
    result = gate_report(make_report(samples), spec(at_limit, remeasure=3), model=tmp_path / "model.onnx",
                         measure=measure, log=lambda _: None)  # fmt: skip
    v = result.verdicts[0]
    assert v.runs == 4 and measure.calls["n"] == 3
    assert (v.raw, v.status, result.exit_code) == ("inconclusive", "fail", 1)


def test_min_runs_measures_before_any_verdict(tmp_path):
    measure = source({"model": 1.0})
    result = gate_report(make_report(), spec(latency("10ms"), min_runs=4, remeasure=0), model=tmp_path / "model.onnx",
                         measure=measure, log=lambda _: None)  # fmt: skip
    assert result.verdicts[0].runs == 4 and result.verdicts[0].status == "pass"


def test_fail_closed_when_it_cannot_measure(tmp_path):
    samples = lognormal(1.0, 0.3, n=60, seed=1)
    at_limit = latency(f"{float(np.median(samples)):.6f}ms")
    # No model file at hand: the inconclusive verdict cannot be re-measured → error, exit 3, never a pass.
    result = gate_report(make_report(samples), spec(at_limit, remeasure=5, inconclusive="pass"), model=None)
    v = result.verdicts[0]
    assert (v.status, v.passed, result.exit_code) == ("error", False, 3)
    assert "could not re-measure" in v.note
    # The runner failing is the same: exit 3.
    failing = gate_report(make_report(samples), spec(at_limit, remeasure=5, inconclusive="pass"),
                          model=tmp_path / "model.onnx", measure=source({"model": 1.0}, fail_after=1), log=lambda _: None)  # fmt: skip
    assert failing.verdicts[0].status == "error" and "the device went away" in failing.verdicts[0].note
    assert failing.exit_code == 3
    # A definite broken budget beside it wins: exit 1 (it must be fixed whatever the device did).
    mixed = gate_report(make_report(samples), spec(at_limit, {"metric": "size", "max": "1kB"}, remeasure=5), model=None)
    assert [v.status for v in mixed.verdicts] == ["error", "fail"] and mixed.exit_code == 1


def test_no_remeasure_asked_means_the_policy_decides_without_measuring():
    samples = lognormal(1.0, 0.3, n=60, seed=1)
    at_limit = latency(f"{float(np.median(samples)):.6f}ms")
    result = gate_report(make_report(samples), spec(at_limit, remeasure=0, inconclusive="pass"), model=None)
    assert (result.verdicts[0].status, result.exit_code) == ("pass", 0)


def test_truncated_and_empty_reports_are_bad_input(tmp_path):
    budgets = write(tmp_path, "budgets: [{metric: size, max: 1MB}]\n")
    (tmp_path / "report.json").write_text('{"schema_version": 1, "size": {"model_')
    with pytest.raises(Exception, match="not valid JSON \\(truncated\\?\\)") as info:
        run_gate(tmp_path / "report.json", budgets)
    assert info.value.exit_code == 2
    (tmp_path / "report.json").write_text("")
    with pytest.raises(Exception, match="not valid JSON") as info:
        run_gate(tmp_path, budgets)
    assert info.value.exit_code == 2
    (tmp_path / "report.json").write_text('{"schema_version": 1, "latency": []}')
    with pytest.raises(BudgetError, match="'latency' is not a mapping"):
        run_gate(tmp_path, budgets)
