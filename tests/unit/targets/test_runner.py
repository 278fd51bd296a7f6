"""The local ONNX Runtime runner for real (device_bench.py in a subprocess), dispatch, and output checking."""

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.bench.measure import Protocol
from compressor.errors import MeasurementError
from compressor.targets import device_bench
from compressor.targets.adb import PerfTestRunner
from compressor.targets.base import RunResult, describe_exit
from compressor.targets.environment import LINUX_PROBE, parse_kv, probe, setup_commands
from compressor.targets.local import LocalTransport
from compressor.targets.profile import DeviceSetup, load_profile, parse_profile
from compressor.targets.runner import OrtRunner, check_target, get_runner, parse_bench_output
from compressor.targets.ssh import SshTransport
from compressor.targets.trtexec import TrtexecRunner

FAST = Protocol(warmup=2, iterations=15, threads=1)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _mlp(path: Path) -> Path:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mlp", [x], [y], [w])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _token_model(path: Path, vocab: int = 100) -> Path:
    """Embedding lookup + mask: int64 ids must be valid indices, or Gather fails at run time."""
    emb = numpy_helper.from_array(np.ones((vocab, 8), np.float32), "emb")
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "sequence", 8])
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axis"], ["m3"]),
        helper.make_node("Mul", ["e", "m3"], ["out"]),
    ]
    axis = numpy_helper.from_array(np.array([-1], np.int64), "axis")
    graph = helper.make_graph(nodes, "tok", [ids, mask], [out], [emb, axis])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _local(**overrides):
    data = {"name": "here", "connection": {"kind": "local"}, "runtime": {"kind": "onnxruntime"}}
    data.update(overrides)
    return parse_profile(data)


def test_local_measurement_is_complete_and_labelled(tmp_path):
    model = _mlp(tmp_path / "m.onnx")

    m = get_runner(_local()).measure(model, FAST, batch=3)

    assert m.kind == "end-to-end" and m.target == "here" and m.batch == 3
    assert len(m.samples_ms) == m.stats.n == 15
    assert all(s > 0 for s in m.samples_ms)
    assert m.stats.min <= m.stats.p50 <= m.stats.max
    assert m.stats.median_ci_low <= m.stats.p50 <= m.stats.median_ci_high
    env = m.environment
    assert env["transport"] == "local" and env["intra_op_threads"] == 1
    assert env["session_providers"] == ["CPUExecutionProvider"]
    assert env["inputs"] == {"x": {"shape": [3, 16], "dtype": "float32"}}
    assert env["onnxruntime_version"] and env["cpu_count"] and env["os"]
    assert m.protocol["iterations"] == 15
    d = m.to_dict()
    assert d["stats"]["n"] == 15 and d["kind"] == "end-to-end" and len(d["samples_ms"]) == 15


def test_min_seconds_keeps_timing_past_the_iteration_count(tmp_path):
    m = get_runner(_local()).measure(
        _mlp(tmp_path / "m.onnx"), Protocol(warmup=0, iterations=5, min_seconds=0.3)
    )
    assert m.stats.n > 5
    assert sum(m.samples_ms) < 300 + 1000  # stopped soon after the time was up


def test_token_ids_are_valid_and_dynamic_axes_need_sizes(tmp_path):
    model = _token_model(tmp_path / "tok.onnx", vocab=100)
    runner = get_runner(_local(shapes={"sequence": 32}))

    m = runner.measure(model, FAST, batch=2)
    with pytest.raises(MeasurementError, match=r"'sequence'\): give its size with --dim sequence=N"):
        get_runner(_local()).measure(model, FAST)
    assert m.environment["inputs"]["input_ids"] == {"shape": [2, 32], "dtype": "int64"}


def test_call_dims_override_the_profile_shapes(tmp_path):
    m = get_runner(_local(shapes={"sequence": 32})).measure(
        _token_model(tmp_path / "t.onnx"), FAST, dims={"sequence": 5}
    )
    assert m.environment["inputs"]["attention_mask"]["shape"] == [1, 5]


def test_missing_provider_is_reported_before_copying(tmp_path):
    runner = get_runner(_local(runtime={"kind": "onnxruntime", "providers": ["CUDAExecutionProvider"]}))
    with pytest.raises(
        MeasurementError, match=r"lacks CUDAExecutionProvider \(it has .*CPUExecutionProvider"
    ):
        runner.measure(_mlp(tmp_path / "m.onnx"), FAST)


def test_python_without_onnxruntime_or_missing_python_says_what_to_install(tmp_path):
    bare = tmp_path / "bare python"
    # The same interpreter without site-packages (-S): a device whose Python has neither numpy nor onnxruntime.
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S -I "$@"\n')
    bare.chmod(0o755)
    model = _mlp(tmp_path / "m.onnx")

    with pytest.raises(
        MeasurementError,
        match=r"lacks (numpy|onnxruntime): run '.*bare python -m pip install numpy onnxruntime'",
    ):
        get_runner(_local(runtime={"kind": "onnxruntime", "python": str(bare)})).measure(model, FAST)
    with pytest.raises(MeasurementError, match=r"not found on this machine"):
        get_runner(_local(runtime={"kind": "onnxruntime", "python": str(tmp_path / "nope")})).measure(
            model, FAST
        )


def test_model_problems_are_clear(tmp_path):
    runner = get_runner(_local())
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x01junk")
    split = _mlp(tmp_path / "split.onnx")
    (tmp_path / "split.onnx.data").write_bytes(b"")

    with pytest.raises(MeasurementError, match="does not exist"):
        runner.measure(tmp_path / "absent.onnx", FAST)
    with pytest.raises(MeasurementError, match="onnxruntime cannot load"):
        runner.measure(garbage, FAST)
    with pytest.raises(MeasurementError, match="external_data=False"):
        runner.measure(split, FAST)


def test_dispatch_by_connection_and_runtime():
    assert isinstance(get_runner(load_profile("x86-cpu")), OrtRunner)
    arm = get_runner(load_profile("arm64-linux"))
    assert isinstance(arm, OrtRunner) and isinstance(arm.transport, SshTransport)
    assert isinstance(get_runner(load_profile("jetson-orin-nano")), TrtexecRunner)
    assert isinstance(get_runner(load_profile("android-phone")), PerfTestRunner)
    assert isinstance(get_runner(load_profile("x86-cpu")).transport, LocalTransport)


def test_check_reports_instead_of_raising():
    ok = check_target(load_profile("x86-cpu"))
    assert ok.ok and "onnxruntime" in ok.detail


# -- what the device printed ---------------------------------------------------------------------------

GOOD = {"schema": 1, "samples_ms": [1.0, 2.0, 3.0], "environment": {}, "kind": "end-to-end"}


def _line(obj) -> str:
    import json

    return f"{device_bench.MARKER} {json.dumps(obj)}\n"


def test_result_line_is_found_among_noise():
    res = RunResult(0, "Welcome to Ubuntu\n" + _line(GOOD) + "bye\n", "warning: something\n")
    assert parse_bench_output(res, "dev", min_samples=3)["samples_ms"] == [1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    "res, message",
    [
        (RunResult(137, "", ""), r"ended with exit 137: SIGKILL .* nothing was recorded"),
        (RunResult(-9, "", ""), "signal 9"),
        (RunResult(0, _line(GOOD)[:40], ""), "no readable result line"),
        (RunResult(0, "\x1b[31m\x00\x01garbage\n", ""), "garbage output"),
        (RunResult(0, _line({**GOOD, "samples_ms": [1.0, "x"]}), ""), "malformed result"),
        (RunResult(0, _line({**GOOD, "schema": 99}), ""), "malformed result"),
        (
            RunResult(0, _line({**GOOD, "samples_ms": [1.0]}), ""),
            "reported 1 samples, fewer than the 3 asked",
        ),
        (RunResult(1, _line(GOOD), "Traceback ..."), "ended with exit 1"),
        (
            RunResult(4, _line({"schema": 1, "error": "model file x does not exist"}), ""),
            "dev: model file x does not exist",
        ),
    ],
)
def test_anything_but_a_complete_result_is_an_error(res, message):
    with pytest.raises(MeasurementError, match=message):
        parse_bench_output(res, "dev", min_samples=3)


def test_describe_exit():
    assert describe_exit(124) == "exit 124 (timed out)"
    assert describe_exit(143).startswith("exit 143: SIGTERM")
    assert describe_exit(2) == "exit 2"


# -- environment ------------------------------------------------------------------------------------


def test_linux_probe_runs_here_and_parses():
    env = probe(LocalTransport(), LINUX_PROBE)
    assert env["os"] and env["os"].startswith("Linux")
    assert env["cpu_count"] and int(env["cpu_count"]) >= 1
    assert "nvpmodel" in env and env["nvpmodel"] is None  # not a Jetson: recorded as absent


def test_parse_kv_and_setup_commands():
    assert parse_kv("a=1\nb=\nnot a pair\nc=x=y\n") == {"a": "1", "b": None, "c": "x=y"}
    cmds = setup_commands(DeviceSetup(apply=True, nvpmodel=0, jetson_clocks=True, cpu_governor="performance"))
    assert cmds[0] == ["sudo", "-n", "nvpmodel", "-m", "0"]
    assert cmds[1] == ["sudo", "-n", "jetson_clocks"]
    assert cmds[2][:4] == ["sudo", "-n", "sh", "-c"] and "echo performance >" in cmds[2][4]
    assert setup_commands(DeviceSetup()) == []


def test_paired_measurement_times_both_models_in_one_process_in_alternating_blocks(tmp_path, capsys):
    small, large = _mlp(tmp_path / "small.onnx"), _token_model(tmp_path / "tokens.onnx")
    # device_bench itself: both models, the same number of samples each, the block size reported.
    code = device_bench.main(["--model", str(small), "--compare", str(large), "--iterations", "25", "--warmup", "1",
                              "--block", "4", "--threads", "1", "--dim", "sequence=8"])  # fmt: skip
    payload = parse_bench_output(RunResult(code, capsys.readouterr().out, ""), "here", min_samples=25)
    assert len(payload["samples_ms"]) == len(payload["compare"]["samples_ms"]) == 28  # 7 blocks of 4
    assert payload["compare"]["block"] == 4 and payload["compare"]["sessions"] == 2
    assert payload["inputs"] == {"x": {"shape": [1, 16], "dtype": "float32"}}
    assert set(payload["compare"]["inputs"]) == {"input_ids", "attention_mask"}

    # The runner: two labelled Measurements, each naming the model it timed and the one it was paired with.
    runner = get_runner(_local(shapes={"sequence": 8}))
    mine, theirs = runner.measure_pair(small, large, FAST, batch=2)
    assert mine.stats.n >= 15 and theirs.stats.n == mine.stats.n
    assert mine.environment["model_sha256"] == theirs.environment["interleaved_with"] != theirs.environment["model_sha256"]
    assert mine.environment["inputs"] == {"x": {"shape": [2, 16], "dtype": "float32"}}
    assert theirs.environment["inputs"]["input_ids"]["shape"] == [2, 8]


def test_paired_measurement_refuses_a_missing_second_model(tmp_path):
    with pytest.raises(MeasurementError, match=r"model file .*absent.onnx does not exist"):
        get_runner(_local()).measure_pair(_mlp(tmp_path / "m.onnx"), tmp_path / "absent.onnx", FAST)


def test_paired_measurement_loads_a_b_b_a_and_flips_the_order_every_block(tmp_path, monkeypatch, capsys):
    first, second = _mlp(tmp_path / "a.onnx"), _mlp(tmp_path / "b.onnx")
    loads, runs = [], []
    real_load = device_bench._load

    class Recorded:
        def __init__(self, session, name):
            self.session, self.name = session, name

        def __getattr__(self, attr):
            return getattr(self.session, attr)

        def run(self, outputs, feeds):
            runs.append(self.name)
            return self.session.run(outputs, feeds)

    def load(ort, so, path, args):
        loads.append(Path(path).stem)
        return Recorded(real_load(ort, so, path, args), Path(path).stem)

    monkeypatch.setattr(device_bench, "_load", load)
    code = device_bench.main(["--model", str(first), "--compare", str(second), "--iterations", "6", "--warmup", "0",
                              "--block", "3", "--threads", "1"])  # fmt: skip
    assert code == 0 and capsys.readouterr().out
    assert loads == ["a", "b", "b", "a"]  # two sessions each; neither model always loads first
    assert runs == ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3  # blocks of 3, order flipped every round
