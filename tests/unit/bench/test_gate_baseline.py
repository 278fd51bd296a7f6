"""Baselines (write, read, refusals) and the interval statistics the relative budgets are judged on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import t

from compressor.bench.baseline import BaselineError, identity_of, load_baseline, mismatch, write_baseline
from compressor.bench.gate import BudgetFile, LatencyEvidence, gate_report, judge, run_gate
from compressor.bench.gate_stats import bootstrap_ci, paired_ratio_ci, ratio_ci


def measurement(samples, target="x86-cpu", batch=1, version="1.32.0", shape=(1, 8), threads=1, kind="end-to-end") -> dict:
    return {
        "target": target,
        "batch": batch,
        "kind": kind,
        "stats": {},
        "protocol": {"warmup": 1, "iterations": len(samples)},
        "environment": {
            "runtime": "onnxruntime",
            "onnxruntime_version": version,
            "intra_op_threads": threads,
            "inputs": {"input": {"shape": [batch, *shape[1:]], "dtype": "float32"}},
        },
        "samples_ms": [float(s) for s in samples],
    }


def runs_with_medians(medians, n=101, seed=0) -> list[np.ndarray]:
    """Runs whose medians are exactly `medians` (odd n, symmetric noise around the median)."""
    rng = np.random.default_rng(seed)
    out = []
    for m in medians:
        half = np.abs(rng.normal(0, 0.02, n // 2))
        out.append(m * np.concatenate([1 - half, [1.0], 1 + half]))
    return out


def report_for(samples, **kw) -> dict:
    return {"schema_version": 1, "size": {"model_bytes": 1000}, "latency": {"x86-cpu": {"batch_1": measurement(samples, **kw)}}}


def relative(regression="5%") -> BudgetFile:
    return BudgetFile.model_validate({"budgets": [{"metric": "latency_p50", "target": "x86-cpu", "max_regression": regression},
                                                  {"metric": "size", "max_regression": "1%"}]})  # fmt: skip


def baseline_file(tmp_path, medians, model: Path | None = None, **kw) -> Path:
    runs = runs_with_medians(medians)
    ev = LatencyEvidence("x86-cpu", 1, runs, measurement(runs[0], **kw))
    return write_baseline(tmp_path / "base.json", [ev], metrics={"size": 1000}, model=model, name="tiny")


# ------------------------------------------------------------------------------------------ statistics


def test_ratio_ci_is_the_pooled_t_interval_of_log_run_statistics():
    cand, base = [1.10, 1.12, 1.08], [1.00, 1.02, 0.98, 1.01]
    ratio, low, high = ratio_ci(runs_with_medians(cand), runs_with_medians(base), "latency_p50", 0.95)
    x, y = np.log(cand), np.log(base)
    pooled = (((x - x.mean()) ** 2).sum() + ((y - y.mean()) ** 2).sum()) / 5
    half = t.ppf(0.975, 5) * np.sqrt(pooled * (1 / 3 + 1 / 4))
    d = x.mean() - y.mean()
    assert (ratio, low, high) == pytest.approx((np.exp(d), np.exp(d - half), np.exp(d + half)), rel=1e-12)


def test_one_candidate_run_borrows_the_baselines_run_to_run_spread():
    base = runs_with_medians([1.0, 1.1, 0.9, 1.05, 0.95])
    _, low, high = ratio_ci(runs_with_medians([1.0]), base, "latency_p50", 0.95)
    assert low < 0.9 and high > 1.1  # wide: runs drift ~6% here, one run cannot say much
    assert ratio_ci(runs_with_medians([1.0]), base[:1], "latency_p50", 0.95)[1:] == (None, None)


def test_paired_ratio_ci_is_the_paired_t_interval_of_log_ratios():
    pairs_c, pairs_b = [1.10, 2.22, 1.65], [1.0, 2.0, 1.5]  # machine load moves both; the ratio stays ~1.1
    pairs = list(zip(runs_with_medians(pairs_c), runs_with_medians(pairs_b, seed=1)))
    ratio, low, high = paired_ratio_ci(pairs, "latency_p50", 0.95)
    d = np.log(pairs_c) - np.log(pairs_b)
    half = t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    assert (ratio, low, high) == pytest.approx((np.exp(d.mean()), np.exp(d.mean() - half), np.exp(d.mean() + half)), rel=1e-12)
    assert 1.05 < low < high < 1.15  # load changed 2x between pairs, yet the ratio is pinned down
    unpaired = ratio_ci([c for c, _ in pairs], [b for _, b in pairs], "latency_p50", 0.95)
    assert unpaired[1] < 0.6 and unpaired[2] > 2  # the same runs, unpaired, say almost nothing
    assert paired_ratio_ci(pairs[:1], "latency_p50", 0.95)[1:] == (None, None)


def test_hierarchical_bootstrap_widens_with_run_to_run_drift():
    steady = runs_with_medians([1.0, 1.0, 1.0, 1.0])
    drifting = runs_with_medians([0.9, 1.0, 1.1, 1.2])
    s_low, s_high = bootstrap_ci(steady, "latency_p90", 0.95)
    d_low, d_high = bootstrap_ci(drifting, "latency_p90", 0.95)
    assert (d_high - d_low) > 5 * (s_high - s_low)
    ragged = bootstrap_ci([steady[0], steady[1][:50]], "latency_p90", 0.95)  # runs of different lengths
    assert ragged[0] < np.percentile(np.concatenate([steady[0], steady[1][:50]]), 90) < ragged[1]


# ------------------------------------------------------------------------------------------ baseline files


def test_baseline_round_trip_keeps_runs_identity_and_model(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not really onnx, but bytes with a sha256")
    path = baseline_file(tmp_path, [1.0, 1.1, 0.9], model=model)
    data = json.loads(path.read_text())
    assert data["schema"] == "compressor-baseline/1" and data["model"]["file"] == "base.onnx"
    base = load_baseline(path)
    assert base.keys() == ["x86-cpu/batch_1"]
    assert [float(np.median(r)) for r in base.runs_for("x86-cpu", 1)] == pytest.approx([1.0, 1.1, 0.9], abs=1e-6)
    assert base.identity_for("x86-cpu", 1) == {"target": "x86-cpu", "batch": 1, "kind": "end-to-end",
                                               "runtime": "onnxruntime", "runtime_version": "1.32.0",
                                               "threads": 1, "input_shapes": {"input": [1, 8]}}  # fmt: skip
    assert base.model_file() == tmp_path / "base.onnx" and base.metric("size") == 1000
    (tmp_path / "base.onnx").write_bytes(b"changed")
    with pytest.raises(BaselineError, match="does not match the sha256 .* \\(stale copy\\)"):
        base.model_file()
    (tmp_path / "base.onnx").unlink()
    assert base.model_file() is None  # not committed: the gate falls back to the stored runs


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"version": "1.31.0"}, "runtime version differs (baseline: 1.31.0, this measurement: 1.32.0)"),
        ({"shape": (1, 16)}, 'input shape differs (baseline: {"input": [1, 16]}, this measurement: {"input": [1, 8]})'),
        ({"threads": 4}, "thread count differs (baseline: 4, this measurement: 1)"),
        ({"kind": "compute-only"}, "measurement kind differs (baseline: compute-only, this measurement: end-to-end)"),
        ({"target": "jetson-orin-nano"}, "has no x86-cpu batch 1 (it has: jetson-orin-nano/batch_1)"),
    ],
)
def test_a_baseline_measured_differently_is_refused_saying_what_differs(tmp_path, kw, message):
    runs = runs_with_medians([1.0, 1.0])
    target = kw.get("target", "x86-cpu")
    ev = LatencyEvidence(target, 1, runs, measurement(runs[0], **kw))
    base = load_baseline(write_baseline(tmp_path / "b.json", [ev]))
    with pytest.raises(BaselineError) as info:
        judge(report_for(runs[0]), relative().budgets[:1], baseline=base)
    assert message in str(info.value) and info.value.exit_code == 2


def test_stale_truncated_or_missing_baselines_are_bad_input(tmp_path):
    path = tmp_path / "b.json"
    with pytest.raises(BaselineError, match="does not exist; create it with"):
        load_baseline(path)
    path.write_text('{"schema": "compressor-baseline/1", "entries": {')
    with pytest.raises(BaselineError, match="not valid JSON \\(truncated\\?\\)"):
        load_baseline(path)
    path.write_text('{"schema": "compressor-baseline/0", "entries": {}}')
    with pytest.raises(BaselineError, match="schema 'compressor-baseline/0', expected 'compressor-baseline/1' \\(stale"):
        load_baseline(path)
    path.write_text('{"schema": "compressor-baseline/1", "entries": {"x86-cpu/batch_1": {"runs_ms": [[]]}}}')
    with pytest.raises(BaselineError, match="no valid runs_ms/identity"):
        load_baseline(path)
    with pytest.raises(BaselineError, match="must end in .json"):
        write_baseline(tmp_path / "b.onnx", [])


def test_identity_mismatch_names_the_first_differing_field():
    a = identity_of(measurement([1.0]), "x86-cpu", 1)
    assert mismatch(a, dict(a)) is None
    assert mismatch(a, {**a, "batch": 8}) == "batch size differs (baseline: 1, this measurement: 8)"


# ------------------------------------------------------------------------------------------ relative verdicts


def test_relative_budget_against_stored_runs_pass_and_fail(tmp_path):
    base = load_baseline(baseline_file(tmp_path, [1.0, 1.02, 0.98, 1.01, 0.99]))
    same = judge(report_for(runs_with_medians([1.0])[0]), relative().budgets, baseline=base)
    assert [v.status for v in same] == ["pass", "pass"]
    assert same[0].line().startswith("PASS latency_p50 on x86-cpu batch 1 vs baseline: measured x1.000 (95% CI x0.9")
    assert "1 run vs 5 baseline runs), allowed <= x1.050 (max_regression 5%)" in same[0].line()
    slower = judge(report_for(runs_with_medians([1.2])[0]), relative().budgets, baseline=base)
    assert slower[0].status == "fail" and slower[0].interval[0] > 1.05


def test_relative_budget_side_by_side_with_the_baseline_model(tmp_path):
    """With the baseline's model at hand, runs of both are measured back to back and paired."""
    (tmp_path / "model.onnx").write_bytes(b"candidate")
    (tmp_path / "old.onnx").write_bytes(b"baseline model")
    base = load_baseline(baseline_file(tmp_path, [1.0, 1.0, 1.0], model=tmp_path / "old.onnx"))
    load = iter(np.linspace(1.0, 2.0, 40))  # the machine gets slower and slower while we measure
    order = []

    def measure(ev, path):
        order.append(Path(path).stem)
        factor = next(load)
        median = 1.10 if Path(path).stem == "model" else 1.0
        return runs_with_medians([median * factor], seed=len(order))[0]

    result = gate_report(report_for(runs_with_medians([1.0])[0]), relative(), model=tmp_path / "model.onnx",
                         baseline=base, baseline_model=base.model_file(), measure=measure, log=lambda _: None)  # fmt: skip
    v = result.verdicts[0]
    assert v.paired and v.status == "fail" and result.exit_code == 1
    assert v.runs >= 4 and len(order) == 2 * v.runs  # never decided on fewer than policy.min_pairs pairs
    assert 1.05 < v.interval[0] and v.measured == pytest.approx(1.10, rel=0.05)
    assert order[:4] == ["model", "base", "base", "model"]  # the first to run alternates between pairs
    assert "side-by-side pairs" in v.line()


def test_update_baseline_replaces_a_baseline_from_an_older_runtime(tmp_path):
    """Refreshing after a runtime upgrade must work: the file being replaced is not judged against."""
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "model.onnx").write_bytes(b"model bytes")
    (artifact / "report.json").write_text(json.dumps(report_for(runs_with_medians([1.0])[0])))
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text("policy: {baseline_runs: 4}\nbudgets:\n"
                       "  - {metric: latency_p50, target: x86-cpu, max_regression: 5%}\n  - {metric: size, max: 1MB}\n")  # fmt: skip
    old = baseline_file(tmp_path, [1.0, 1.0], version="1.31.0")
    with pytest.raises(BaselineError, match="runtime version differs"):
        run_gate(artifact, budgets, baseline_path=old, measure=lambda ev, path: runs_with_medians([1.0])[0])
    result = run_gate(artifact, budgets, baseline_path=old, update_baseline=old, log=lambda _: None,
                      measure=lambda ev, path: runs_with_medians([1.0])[0])  # fmt: skip
    assert [v.status for v in result.verdicts] == ["skipped", "pass"] and result.exit_code == 0
    fresh = load_baseline(old)
    assert fresh.identity_for("x86-cpu", 1)["runtime_version"] == "1.32.0"
    assert len(fresh.runs_for("x86-cpu", 1)) == 4 and fresh.model_file().read_bytes() == b"model bytes"


def test_side_by_side_pairs_alternate_the_slot_so_a_position_bias_cancels(tmp_path):
    """A runner whose first slot (loaded first, timed first) reads 6% slow must not fail an unchanged model."""
    (tmp_path / "model.onnx").write_bytes(b"same model")
    (tmp_path / "old.onnx").write_bytes(b"same model")
    base = load_baseline(baseline_file(tmp_path, [1.0, 1.0, 1.0], model=tmp_path / "old.onnx"))
    slots = []

    def measure_pair(ev, first, second):
        slots.append(Path(first).stem)
        jitter = 1 + 0.01 * ((len(slots) % 3) - 1)  # a little noise, so that the interval has a width
        return runs_with_medians([1.06 * jitter])[0], runs_with_medians([1.0])[0]

    spec = relative()
    result = gate_report(report_for(runs_with_medians([1.0])[0]), spec, model=tmp_path / "model.onnx", baseline=base,
                         baseline_model=base.model_file(), measure_pair=measure_pair, log=lambda _: None)  # fmt: skip
    v = result.verdicts[0]
    assert slots[:4] == ["model", "base", "model", "base"]
    assert v.paired and v.status == "pass" and v.measured == pytest.approx(1.0, abs=0.01)
    assert v.interval[0] < 1.0 < v.interval[1] <= 1.05
