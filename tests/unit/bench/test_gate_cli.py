"""`compress gate` end to end on a tiny real ONNX model measured by the real x86-cpu runner (ONNX Runtime)."""

from __future__ import annotations

import json
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from torch import nn

from compressor.bench.gate import load_budget_file
from compressor.bench.measure import Protocol
from compressor.cli import _parser, main
from compressor.export.onnx import export_onnx
from compressor.targets.profile import load_profile
from compressor.targets.runner import get_runner


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """model.onnx + a report.json holding one real measurement of it (what `compress bench` records)."""
    directory = tmp_path_factory.mktemp("artifact")
    model = export_onnx(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), (torch.randn(1, 8),),
                        directory / "model.onnx")  # fmt: skip
    m = get_runner(load_profile("x86-cpu")).measure(model, Protocol(warmup=2, iterations=30, threads=1), batch=1)
    report = {"schema_version": 1, "name": "tiny", "accuracy": {"student_onnx": 0.9},
              "size": {"model_bytes": model.stat().st_size}, "latency": {"x86-cpu": {"batch_1": m.to_dict()}}}  # fmt: skip
    (directory / "report.json").write_text(json.dumps(report))
    return directory


def budgets(tmp_path: Path, *lines: str, policy: str = "{remeasure: 3}") -> Path:
    path = tmp_path / "budgets.yaml"
    path.write_text(f"policy: {policy}\nbudgets:\n" + "".join(f"  - {ln}\n" for ln in lines))
    return path


def test_pass_fail_and_outputs(artifact, tmp_path, capsys):
    ok = budgets(tmp_path, "{metric: latency_p50, target: x86-cpu, max: 1s}", "{metric: size, max: 1MB}")
    junit, md, js = tmp_path / "gate.xml", tmp_path / "summary.md", tmp_path / "gate.json"
    args = ["--junit", str(junit), "--markdown", str(md), "--json", str(js)]
    assert main(["gate", str(artifact), "--budgets", str(ok), *args]) == 0
    assert capsys.readouterr().out.count("PASS") == 2
    assert ET.parse(junit).getroot().find("testsuite").get("failures") == "0"
    broken = budgets(tmp_path, "{metric: latency_p50, target: x86-cpu, max: 1us}", "{metric: accuracy, min: 95%}")
    assert main(["gate", str(artifact / "report.json"), "--budgets", str(broken), *args]) == 1
    assert json.loads(js.read_text())["outcome"] == "budget broken"
    assert md.read_text().count("### Latency contract") == 2  # appended


def test_bad_input_exit_2_writes_the_error_for_ci(artifact, tmp_path, capsys):
    junit = tmp_path / "gate.xml"
    bad = budgets(tmp_path, "{metric: latency_p50, target: x86-cpu, max: 5}")
    assert main(["gate", str(artifact), "--budgets", str(bad), "--junit", str(junit)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: budget latency_p50: '5' needs a unit (us, ms, s), e.g. '5ms'"
    assert ET.parse(junit).getroot().find("testsuite/testcase/error").get("type") == "bad input"
    unknown = budgets(tmp_path, "{metric: latency_p90, target: jetson-orin-nano, max: 5ms}")
    assert main(["gate", str(artifact), "--budgets", str(unknown)]) == 2
    assert "target 'jetson-orin-nano' was never benchmarked" in capsys.readouterr().err


def test_update_baseline_then_gate_side_by_side(artifact, tmp_path, capsys):
    rel = budgets(tmp_path, "{metric: latency_p50, target: x86-cpu, max_regression: 400%}", "{metric: size, max_regression: 0%}",
                  policy="{remeasure: 4, baseline_runs: 3}")  # fmt: skip
    base = tmp_path / "baselines" / "x86-cpu.json"
    junit = tmp_path / "gate.xml"
    assert main(["gate", str(artifact), "--budgets", str(rel), "--update-baseline", str(base), "--junit", str(junit)]) == 0
    out = capsys.readouterr().out
    assert "SKIPPED latency_p50 on x86-cpu batch 1 vs baseline: not judged" in out and "baseline written to" in out
    suite = ET.parse(junit).getroot()
    skipped = [case for case in suite.iter("testcase") if case.find("skipped") is not None]
    assert [case.get("name") for case in skipped] == ["latency_p50 on x86-cpu batch 1 vs baseline", "size vs baseline"]
    data = json.loads(base.read_text())
    assert len(data["entries"]["x86-cpu/batch_1"]["runs_ms"]) == 3
    assert (base.parent / "x86-cpu.onnx").read_bytes() == (artifact / "model.onnx").read_bytes()
    # The same model against its baseline: within 5x, judged on back-to-back pairs of real runs.
    assert main(["gate", str(artifact), "--budgets", str(rel), "--baseline", str(base)]) == 0
    out = capsys.readouterr().out
    assert "PASS latency_p50 on x86-cpu batch 1 vs baseline" in out and "side-by-side pairs" in out
    assert "PASS size vs baseline: measured x1.000" in out


def test_the_ci_examples_use_options_the_gate_has():
    import yaml

    ci = Path(__file__).resolve().parents[3] / "examples" / "ci"
    spec = load_budget_file(ci / "budgets.yaml")
    assert any(b.relative for b in spec.budgets) and spec.policy.inconclusive == "fail"
    commands = [c for name in ("github-actions.yml", "gitlab-ci.yml") for c in _gate_commands(yaml.safe_load((ci / name).read_text()))]
    assert len(commands) == 4
    for command in commands:
        argv = shlex.split(command.replace("\\\n", " ").replace('"$GITHUB_STEP_SUMMARY"', "summary.md"))
        args = _parser().parse_args(argv[argv.index("gate"):])
        assert args.budgets == Path("examples/ci/budgets.yaml")


def _gate_commands(node) -> list[str]:
    """Every `compress gate` command line in a CI file."""
    if isinstance(node, dict):
        return [c for v in node.values() for c in _gate_commands(v)]
    if isinstance(node, list):
        return [c for v in node for c in _gate_commands(v)]
    return [node] if isinstance(node, str) and "compress gate" in node else []
