"""The README's user path, end to end through the CLI: run → artifact → bench → gate, and bad input."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from support import EXAMPLE, QUICK, run_cli

from compressor.artifact import verify
from compressor.export.inspect import integer_kernel_report


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, cli_env):
    out = tmp_path_factory.mktemp("runs") / "digits"
    run_cli(["run", EXAMPLE, "--out", out, *QUICK, "--set", "budgets=null"], cli_env, check_rc=0)
    return out


def test_run_produces_a_verified_int8_artifact(artifact):
    assert {p.name for p in artifact.iterdir()} >= {"model.onnx", "manifest.json", "report.json", "report.md", "checkpoints"}
    assert verify(artifact) == []
    assert not artifact.with_name("digits.partial").exists()
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["recipe"]["stages"][1]["kind"] == "qat"
    assert [e["kind"] for e in manifest["lineage"]] == ["distill", "qat"]
    assert {"torch", "onnxruntime", "brevitas"} <= set(manifest["libraries"])
    # The exported file runs, and ORT executes its convolutions as integer kernels.
    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": np.random.rand(3, 1, 8, 8).astype(np.float32)})[0]
    assert out.shape == (3, 10)
    kernels = integer_kernel_report(artifact / "model.onnx")
    assert kernels["integer_ops"].get("QLinearConv", 0) >= 2 and not kernels["float_ops"]


def test_report_holds_measured_numbers(artifact):
    report = json.loads((artifact / "report.json").read_text())
    acc = report["accuracy"]
    assert 0.8 < acc["teacher"] <= 1 and 0.5 < acc["student_onnx"] <= 1
    assert acc["drop_points"] == pytest.approx((acc["teacher"] - acc["student_onnx"]) * 100, abs=1e-3)
    assert report["size"]["model_bytes"] == (artifact / "model.onnx").stat().st_size
    latency = report["latency"]["x86-cpu"]["batch_1"]
    assert latency["stats"]["n"] >= 30 and 0 < latency["stats"]["p50"] <= latency["stats"]["p99"]
    assert report["parity"]["passed"] and report["parity"]["samples"] > 0
    # "Quantized but not faster": the int8 file was timed side by side with a float export of the same student.
    versus = report["latency_vs_float"]
    assert versus["quantized_p50_ms"] > 0 and versus["float_p50_ms"] > 0 and len(versus["round_speedups"]) >= 1
    assert versus["speedup"] == pytest.approx(versus["float_p50_ms"] / versus["quantized_p50_ms"])
    assert not (artifact / "model.float.onnx").exists()  # the float file is a measuring stick, not published


def test_bench_and_gate_on_the_artifact(artifact, cli_env, tmp_path):
    run_cli(["bench", artifact, "--target", "x86-cpu", "--batch", "4", "--iterations", "20"], cli_env, check_rc=0)
    assert "batch_4" in json.loads((artifact / "report.json").read_text())["latency"]["x86-cpu"]
    assert verify(artifact) == []  # bench refreshed the manifest
    passing = tmp_path / "pass.yaml"
    passing.write_text("budgets:\n  - {metric: size, max: 10MB}\n  - {metric: latency_p50, target: x86-cpu, batch: 1, max: 10s}\n")
    result = run_cli(["gate", artifact / "report.json", "--budgets", passing], cli_env, check_rc=0)
    assert result.stdout.count("PASS") == 2
    failing = tmp_path / "fail.yaml"
    failing.write_text("budgets:\n  - {metric: size, max: 1KB}\n  - {metric: accuracy, min: 0.5}\n")
    result = run_cli(["gate", artifact, "--budgets", failing], cli_env, check_rc=1)
    assert "FAIL size: measured" in result.stdout and "PASS accuracy" in result.stdout
    unknown_target = tmp_path / "bad.yaml"
    unknown_target.write_text("budgets:\n  - {metric: latency_p90, target: jetson-orin-nano, max: 5ms}\n")
    result = run_cli(["gate", artifact, "--budgets", unknown_target], cli_env, check_rc=2)
    assert "target 'jetson-orin-nano' was never benchmarked" in result.stderr


def test_existing_output_is_refused(artifact, cli_env):
    result = run_cli(["run", EXAMPLE, "--out", artifact, *QUICK], cli_env, check_rc=2)
    assert "already exists; pass --overwrite" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stages.0.kind=squash", "stages[0].kind 'squash' is unknown; allowed:"),
        ("student.model=nosuchpkg.models:tiny", "cannot import 'nosuchpkg.models'"),
        ("data.source=nosuch", "neither a built-in dataset"),
        ("train.optimizer.name=lion", "train.optimizer.name"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(override, message, cli_env, tmp_path):
    result = run_cli(["run", EXAMPLE, "--out", tmp_path / "o", "--set", override, *QUICK], cli_env, check_rc=2)
    assert message in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_teacher_weights_that_do_not_match(cli_env, tmp_path):
    weights = tmp_path / "teacher.pt"
    torch.save({"features.0.weight": torch.zeros(3, 3)}, weights)
    result = run_cli(["run", EXAMPLE, "--out", tmp_path / "o", "--set", f"teacher.weights={weights}", *QUICK], cli_env, check_rc=2)
    assert "teacher.weights" in result.stderr and "do not match teacher.model" in result.stderr


def test_missing_recipe_and_dry_run(cli_env, tmp_path):
    result = run_cli(["run", tmp_path / "missing.yaml"], cli_env, check_rc=2)
    assert "does not exist" in result.stderr
    result = run_cli(["run", EXAMPLE, "--dry-run", "--set", "train.epochs=1"], cli_env, check_rc=0)
    assert "epochs: 1" in result.stdout and not (tmp_path / "runs").exists()


def test_verify_exit_codes_and_a_tampered_copy(artifact, cli_env, tmp_path):
    import shutil

    run_cli(["verify", artifact], cli_env, check_rc=0)
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    with open(copy / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    result = run_cli(["verify", copy], cli_env, check_rc=1)
    assert "model.onnx" in result.stdout + result.stderr


def test_bench_on_an_unreachable_target_is_exit_3_and_records_nothing(artifact, cli_env, tmp_path):
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "gone.yaml").write_text(
        "name: gone\nconnection: {kind: ssh, host: 127.0.0.1, port: 1, user: nobody, connect_timeout_s: 2, retries: 0}\n"
        "runtime: {kind: onnxruntime}\n"
    )
    before = (artifact / "report.json").read_bytes()
    result = run_cli(["bench", artifact, "--target", "gone", "--iterations", "5"], {**cli_env, "COMPRESSOR_TARGETS_PATH": str(profiles)}, check_rc=3)
    assert len(result.stderr.strip().splitlines()) == 1 and (artifact / "report.json").read_bytes() == before
