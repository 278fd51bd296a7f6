"""What CI reads: JUnit XML (parsed back), the Markdown summary, the JSON, for each kind of outcome."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np

from compressor.bench.ci_outputs import junit_xml, markdown_summary, result_json, write_outputs
from compressor.bench.gate import BudgetFile, GateResult, gate_report


def report() -> dict:
    samples = 1.0 * np.exp(np.random.default_rng(0).normal(0, 0.3, 60))
    m = {"target": "x86-cpu", "batch": 1, "kind": "end-to-end", "protocol": {}, "environment": {},
         "samples_ms": samples.tolist()}  # fmt: skip
    return {"schema_version": 1, "accuracy": {"student_onnx": 0.97, "drop_points": 2.0},
            "size": {"model_bytes": 20_000}, "latency": {"x86-cpu": {"batch_1": m}}}  # fmt: skip


def mixed_result() -> GateResult:
    """One budget of each outcome: pass, fail, measurement error (inconclusive, cannot re-measure)."""
    spec = BudgetFile.model_validate({
        "policy": {"remeasure": 2},
        "budgets": [
            {"metric": "size", "max": "1MB"},
            {"metric": "accuracy_drop", "max": 1.0},
            {"metric": "latency_p50", "target": "x86-cpu", "max": f"{float(np.median(report()['latency']['x86-cpu']['batch_1']['samples_ms'])):.6f}ms"},
        ],
    })  # fmt: skip
    return gate_report(report(), spec, model=None)


def test_junit_has_one_case_per_budget_and_parses_back(tmp_path):
    result = mixed_result()
    assert [v.status for v in result.verdicts] == ["pass", "fail", "error"] and result.exit_code == 1
    write_outputs(result, junit=tmp_path / "gate.xml")
    root = ET.parse(tmp_path / "gate.xml").getroot()
    suite = root.find("testsuite")
    assert root.tag == "testsuites" and suite is not None
    assert {k: suite.get(k) for k in ("tests", "failures", "errors", "skipped")} == {
        "tests": "3", "failures": "1", "errors": "1", "skipped": "0"}  # fmt: skip
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["size", "accuracy_drop", "latency_p50 on x86-cpu batch 1"]
    assert cases[0].find("failure") is None and cases[0].find("error") is None
    failure = cases[1].find("failure")
    assert failure is not None and failure.get("message").startswith("FAIL accuracy_drop: measured 2.000 points")
    error = cases[2].find("error")
    assert error is not None and "could not re-measure" in error.get("message")
    assert cases[2].get("classname") == "compressor.gate.x86-cpu"


def test_junit_for_bad_input_is_one_error_case():
    xml = junit_xml(GateResult([], 2, error="budget latency_p90: '5' needs a unit"))
    suite = ET.fromstring(xml).find("testsuite")
    assert suite.get("errors") == "1" and suite.get("tests") == "1"
    assert suite.find("testcase/error").get("type") == "bad input"


def test_markdown_summary_for_the_step_summary(tmp_path):
    result = mixed_result()
    text = markdown_summary(result)
    lines = text.splitlines()
    assert lines[0] == "### Latency contract: ❌ BUDGET BROKEN (exit 1)"
    rows = [ln for ln in lines if ln.startswith("| ") and "budget" not in ln]
    assert len(rows) == 3
    assert rows[0].startswith("| ✅ | `size` | 0.0200 MB | - | ≤ 1.0000 MB |")
    assert rows[1].startswith("| ❌ | `accuracy_drop` | 2.000 points |")
    assert rows[2].startswith("| ⚠️ | `latency_p50 on x86-cpu batch 1` |") and "(95%)" in rows[2]
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    write_outputs(result, markdown=summary)
    assert summary.read_text().startswith("earlier step\n### Latency contract")  # appended, as GitHub expects
    assert markdown_summary(GateResult([], 0)).startswith("### Latency contract: ✅ PASS (exit 0)")


def test_json_carries_every_verdict(tmp_path):
    result = mixed_result()
    write_outputs(result, json_path=tmp_path / "gate.json")
    data = json.loads((tmp_path / "gate.json").read_text())
    assert data == result_json(result)
    assert (data["exit_code"], data["outcome"]) == (1, "budget broken")
    size, drop, lat = data["verdicts"]
    assert size["status"] == "pass" and size["measured"] == 20_000 and size["unit"] == "bytes" and size["limit"] == 1e6
    assert drop["status"] == "fail" and drop["operator"] == "<="
    assert lat["status"] == "error" and lat["raw"] == "inconclusive" and len(lat["interval"]) == 2
