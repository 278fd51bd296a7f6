"""report.md: the stages and their effect, with 'not measured' where a stage measured nothing."""

from __future__ import annotations

from compressor.bench.report import render_markdown


def report() -> dict:
    return {
        "name": "digits",
        "task": "classification",
        "accuracy": {"teacher": 0.99, "student_torch": 0.975, "student_onnx": 0.97, "drop_points": 2.0},
        "baseline": {"student_initial": {"accuracy": 0.10, "teacher_agreement": 0.11}},
        "size": {"model_bytes": 18_898, "parameters": 9_933},
        "lineage": [
            {"stage": "0-distill", "kind": "distill", "metrics": {"accuracy": 0.96, "teacher_agreement": 0.97}},
            {"stage": "1-prune", "kind": "prune", "metrics": {"accuracy": 0.95, "parameters": 5_000, "latency_p50_ms": 0.02}},
            {"stage": "2-qat", "kind": "qat", "metrics": {"accuracy": 0.975}},
        ],
        "latency": {"x86-cpu": {"batch_1": {"batch": 1, "kind": "end-to-end", "stats": {
            "n": 300, "p50": 0.0286, "p90": 0.032, "p99": 0.06, "cv": 0.1, "median_ci_low": 0.0285,
            "median_ci_high": 0.0287, "confidence": 0.95}}}},
    }  # fmt: skip


def table(md: str, heading: str) -> list[list[str]]:
    lines = md.splitlines()
    start = lines.index(heading) + 4  # heading, blank, header, separator
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_lineage_table_shows_each_stage_and_its_effect():
    rows = table(render_markdown(report()), "## Stages and their effect")
    assert [r[0] for r in rows] == ["teacher (reference)", "student before stages", "0-distill", "1-prune", "2-qat",
                                    "exported `model.onnx` (ONNX Runtime)"]  # fmt: skip
    teacher, start, distill, prune, qat, exported = rows
    assert teacher[2] == "99.00%" and start[2] == "10.00%" and start[4] == "11.00%"
    assert distill[3] == "+86.00 pts" and prune[3] == "-1.00 pts" and qat[3] == "+2.50 pts"
    assert exported[3] == "-0.50 pts"  # exported file vs the last stage: what export cost
    assert prune[5] == "5000" and prune[7] == "0.0200 ms"  # what the prune stage measured is shown...
    assert distill[6] == distill[7] == qat[7] == "not measured"  # ...what nobody measured is not invented
    assert exported[5] == "9933" and exported[6] == "0.019 MB" and exported[7] == "0.0286 ms (x86-cpu, batch 1)"


def test_latency_table_shows_the_median_ci_and_pareto_link():
    md = render_markdown(report(), pareto="pareto.png")
    row = table(md, "## Latency (measured)")[0]
    assert row[:4] == ["x86-cpu", "1", "0.0286", "0.0285–0.0287 (95%)"]
    assert "![Pareto plot](pareto.png)" in md
    assert "Pareto" not in render_markdown(report())


def test_no_lineage_no_section():
    r = report()
    r["lineage"] = []
    assert "## Stages and their effect" not in render_markdown(r)
