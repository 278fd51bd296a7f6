"""adb runner up to the phone: real ORT-format conversion, shell quoting run through a real sh, errors."""

import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.bench.measure import Protocol
from compressor.errors import MeasurementError
from compressor.targets.adb import AdbTransport, check_mobile_usability, convert_to_ort, shell_command
from compressor.targets.profile import AdbConnection, parse_profile
from compressor.targets.runner import get_runner


def _mlp(path: Path) -> Path:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    model = helper.make_model(
        helper.make_graph(nodes, "mlp", [x], [y], [w, b]), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_convert_to_ort_produces_a_model_that_computes_the_same(tmp_path):
    onnx_path = _mlp(tmp_path / "mlp.onnx")

    ort_path = convert_to_ort(onnx_path, tmp_path / "out")

    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    reference = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[
        0
    ]
    converted = ort.InferenceSession(str(ort_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert ort_path.suffix == ".ort"
    assert ort_path.read_bytes()[4:8] == b"ORTM"  # flatbuffer file identifier of the ORT format
    np.testing.assert_allclose(converted, reference, rtol=0, atol=1e-6)


def test_convert_to_ort_reports_a_broken_model(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")

    with pytest.raises(MeasurementError, match="could not convert broken.onnx to ORT format"):
        convert_to_ort(broken, tmp_path / "out")


@pytest.mark.slow  # a fresh interpreter importing torch and onnxruntime.tools: 8-13 s on the shared cores
def test_mobile_usability_check_runs_onnx_runtime_tool(tmp_path):
    report = check_mobile_usability(_mlp(tmp_path / "mlp.onnx"))
    assert "NNAPI" in report or "nnapi" in report.lower()


@pytest.mark.parametrize(
    "arg",
    [
        "plain",
        "with space",
        "it's",
        'dq"q',
        "$(touch PWNED)",
        "`touch PWNED`",
        "a;b",
        "x|y&z",
        "*",
        "~",
        "\\n",
    ],
)
def test_shell_command_keeps_every_argument_literal(tmp_path, arg):
    workdir = tmp_path / "dir $(touch PWNED) 'q'"
    workdir.mkdir()
    command = shell_command(["printf", "%s\\n", arg], cwd=str(workdir), env={"LD_LIBRARY_PATH": "/a b;c"})

    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, cwd=tmp_path, check=True)

    assert out.stdout == arg + "\n"
    assert not list(tmp_path.rglob("PWNED"))


def test_adb_argv_targets_the_serial():
    t = AdbTransport(AdbConnection(kind="adb", serial="R58M123", adb="/opt/pt/adb"))
    assert t.shell_argv("getprop ro.product.model") == [
        "/opt/pt/adb",
        "-s",
        "R58M123",
        "shell",
        "getprop ro.product.model",
    ]
    assert AdbTransport(AdbConnection(kind="adb")).adb_argv("get-state") == ["adb", "get-state"]


def test_missing_adb_says_what_to_install(tmp_path):
    t = AdbTransport(AdbConnection(kind="adb", adb=str(tmp_path / "adb")))
    with pytest.raises(MeasurementError, match="not found: install Android platform-tools"):
        t.check()


def test_perf_test_runner_needs_the_users_binary(tmp_path):
    profile = parse_profile(
        {
            "name": "phone",
            "connection": {"kind": "adb", "adb": str(tmp_path / "adb")},
            "runtime": {"kind": "ort-perf-test"},
        }
    )
    runner = get_runner(profile)

    with pytest.raises(MeasurementError, match="needs runtime.binary: the path of onnxruntime_perf_test"):
        runner.measure(_mlp(tmp_path / "m.onnx"), Protocol(iterations=5))
    assert not runner.check().ok
