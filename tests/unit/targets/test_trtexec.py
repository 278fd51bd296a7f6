"""trtexec: the exact command, parsing of real trtexec logs (fixtures/SOURCES.md), exportTimes, bad output."""

import json
import shlex
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from compressor.bench.measure import Protocol
from compressor.errors import MeasurementError
from compressor.targets.profile import TrtexecSpec, parse_profile
from compressor.targets.runner import get_runner
from compressor.targets.trtexec import (
    build_trtexec_command,
    parse_trtexec_output,
    parse_trtexec_times,
    tensorrt_version,
)

FIXTURES = Path(__file__).parent / "fixtures"


def _fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def _spec(**kw) -> TrtexecSpec:
    return TrtexecSpec(kind="trtexec", **kw)


# -- command ----------------------------------------------------------------------------------------


def test_int8_sparse_dla_command_is_exact():
    argv = build_trtexec_command(
        _spec(sparsity=True, dla_core=1, warm_up_ms=300, extra_args=["--useCudaGraph"]),
        onnx="/tmp/w/model.onnx",
        engine="/tmp/w/model.engine",
        times="/tmp/w/times.json",
        protocol=Protocol(iterations=250, min_seconds=2.5),
        precision="int8-fp16",
        shapes={"input_ids": [1, 128], "attention_mask": [1, 128]},
        profile_json="/tmp/w/profile.json",
    )

    assert argv == [
        "/usr/src/tensorrt/bin/trtexec",
        "--onnx=/tmp/w/model.onnx",
        "--saveEngine=/tmp/w/model.engine",
        "--int8",
        "--fp16",
        "--sparsity=enable",
        "--useDLACore=1",
        "--allowGPUFallback",
        "--shapes=input_ids:1x128,attention_mask:1x128",
        "--warmUp=300",
        "--iterations=250",
        "--duration=3",
        "--useSpinWait",
        "--exportTimes=/tmp/w/times.json",
        "--exportProfile=/tmp/w/profile.json",
        "--separateProfileRun",
        "--useCudaGraph",
    ]


@pytest.mark.parametrize(
    "precision, flags",
    [("fp32", []), ("fp16", ["--fp16"]), ("int8", ["--int8"]), ("best", ["--best"])],
)
def test_precision_flags_are_explicit(precision, flags):
    argv = build_trtexec_command(
        _spec(use_spin_wait=False),
        onnx="m",
        engine="e",
        times="t",
        protocol=Protocol(iterations=10),
        precision=precision,
    )
    assert argv[3 : 3 + len(flags)] == flags
    assert not any(a.startswith(("--sparsity", "--shapes", "--useDLACore", "--exportProfile")) for a in argv)
    assert "--duration=0" in argv  # min_seconds 0: iterations alone decide


def test_unknown_precision_is_rejected():
    with pytest.raises(MeasurementError, match="precision 'int4'"):
        build_trtexec_command(_spec(), onnx="m", engine="e", times="t", protocol=Protocol(), precision="int4")


def test_extra_args_must_be_options():
    with pytest.raises(ValueError, match="not a trtexec option"):
        _spec(extra_args=["; rm -rf /"])


# -- printed output -----------------------------------------------------------------------------------


def test_xavier_agx_trt84_summary():
    r = parse_trtexec_output(_fixture("trtexec_xavier_agx_trt8.4.txt"))

    assert r.status == "PASSED"
    assert r.tensorrt_version == "8.4.0"
    assert r.command == "trtexec --loadEngine=mnist16.trt --batch=16"
    assert r.throughput_qps == 41087.7
    assert r.sections["Latency"] == {
        "min": 0.387207, "max": 0.447357, "mean": 0.402238, "median": 0.401947, "p99": 0.420288,
    }  # fmt: skip
    assert r.sections["GPU Compute Time"]["median"] == 0.388443
    assert r.sections["D2H Latency"]["min"] == 0.00195312
    assert (r.total_host_walltime_s, r.total_gpu_compute_s) == (3.00119, 2.99202)


def test_xavier_nx_trt85_has_end_to_end_host_latency():
    r = parse_trtexec_output(_fixture("trtexec_xavier_nx_trt8.5.txt"))

    assert r.sections["End-to-End Host Latency"]["median"] == 0.585938
    assert r.sections["Latency"]["mean"] == 0.573891
    assert set(r.sections) == {
        "Latency", "End-to-End Host Latency", "Enqueue Time", "H2D Latency", "GPU Compute Time", "D2H Latency",
    }  # fmt: skip


def test_prefixed_lines_with_three_percentiles():
    r = parse_trtexec_output(_fixture("trtexec_ais_bench_prefixed.txt"))

    assert r.sections["Latency"]["p90"] == 10.1075
    assert r.sections["Latency"]["p95"] == 10.1624
    assert r.sections["GPU Compute Time"]["p99"] == 9.90002
    assert r.throughput_qps == 120.699


def test_orin_header_gives_version_and_device_but_no_summary_is_an_error():
    text = _fixture("trtexec_orin_trt10.16_header.txt")

    with pytest.raises(
        MeasurementError, match=r"no '=== Performance summary ===' .*Start parsing network model"
    ):
        parse_trtexec_output(text)
    r = parse_trtexec_output(text, require_summary=False)
    assert (r.tensorrt_version, r.device, r.compute_capability) == ("10.16.2", "Orin", "8.7")


def test_failed_run_reports_the_last_error_line():
    with pytest.raises(MeasurementError, match=r"^trtexec failed: Engine set up failed$"):
        parse_trtexec_output(_fixture("trtexec_orin_failed_trt8.4.txt"))


def test_running_banner_version_and_command():
    r = parse_trtexec_output(_fixture("trtexec_running_banner_trt10.3.txt"), require_summary=False)

    assert r.status == "RUNNING"
    assert r.tensorrt_version == "10.3.0"
    assert "--int8" in shlex.split(r.command)


@pytest.mark.parametrize(
    "code, version", [("8000", "8.0.0"), ("8502", "8.5.2"), ("100300", "10.3.0"), ("101602", "10.16.2")]
)
def test_tensorrt_version_codes(code, version):
    assert tensorrt_version(code) == version


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda t: t.replace("median = 0.401947 ms", "median = abc ms"),
            "cannot read trtexec statistics 'median = abc ms'",
        ),
        (lambda t: t.replace("max = 0.447357 ms", "max = nan ms"), "impossible value"),
        (lambda t: t.replace("mean = 0.402238 ms, ", ""), r"lack \['mean'\]"),
        (
            lambda t: "\n".join(ln for ln in t.splitlines() if "GPU Compute Time:" not in ln),
            "no 'GPU Compute Time' line",
        ),
        (lambda t: t.split("Enqueue Time")[0], "no 'GPU Compute Time' line"),  # cut off mid-summary
        (lambda t: "\x00\x17garbage\n" * 5, "no '=== Performance summary ==='"),
        (lambda t: t.replace("PASSED", "FAILED"), "trtexec failed"),
    ],
)
def test_malformed_output_is_an_error_never_a_partial_result(mutate, message):
    with pytest.raises(MeasurementError, match=message):
        parse_trtexec_output(mutate(_fixture("trtexec_xavier_agx_trt8.4.txt")))


# -- --exportTimes -------------------------------------------------------------------------------------


def _export_times(queries: list[dict]) -> str:
    """Write a trace exactly as exportJSONTrace (sampleReporting.cpp) does: `[`, `  { ... }`, `, { ... }`, `]`."""
    lines = ["["]
    sep = "  "
    for q in queries:
        body = ", ".join(f'"{k}" : {v:g}' for k, v in q.items())
        lines.append(f"{sep}{{ {body} }}")
        sep = ", "
    lines.append("]")
    return "\n".join(lines) + "\n"


def _query(start: float, h2d: float, compute: float, d2h: float) -> dict:
    return {
        "startEnqMs": start, "endEnqMs": start + 0.05,
        "startH2dMs": start, "endH2dMs": start + h2d,
        "startComputeMs": start + h2d, "endComputeMs": start + h2d + compute,
        "startD2hMs": start + h2d + compute, "endD2hMs": start + h2d + compute + d2h,
        "h2dMs": h2d, "computeMs": compute, "d2hMs": d2h, "latencyMs": h2d + compute + d2h,
    }  # fmt: skip


def test_export_times_drops_warm_up_queries_like_trtexec():
    # TensorRT < 8.6 exports warm-up queries too; a query is timed once its compute starts after warm-up.
    warm = [_query(float(t), 0.25, 2.0, 0.125) for t in range(0, 200, 3)]
    timed = [_query(200.0 + 3 * i, 0.25, 2.0 + i / 100, 0.125) for i in range(10)]

    latency, compute = parse_trtexec_times(_export_times(warm + timed), warm_up_ms=200)

    assert compute == pytest.approx([2.0 + i / 100 for i in range(10)], abs=1e-9)
    assert latency == pytest.approx([2.375 + i / 100 for i in range(10)], abs=1e-9)


@pytest.mark.parametrize(
    "text, message",
    [
        ('[\n  { "startEnqMs" : 1, ', "not JSON"),
        ("[]", "no timed queries"),
        ("{}", "no timed queries"),
        ('[{"startComputeMs": 5, "latencyMs": 1.0}]', "lacks numeric"),
        ('[{"startComputeMs": 5, "latencyMs": "fast", "computeMs": 1}]', "lacks numeric"),
        ('[{"startComputeMs": 5, "latencyMs": -1.0, "computeMs": 1}]', "impossible time"),
        ('[{"startComputeMs": 5, "latencyMs": 1.0, "computeMs": 1}]', "during the 500 ms warm-up"),
    ],
)
def test_bad_export_times_are_errors(text, message):
    with pytest.raises(MeasurementError, match=message):
        parse_trtexec_times(text, warm_up_ms=500)


# -- runner up to the boundary ----------------------------------------------------------------------


def _tiny_model(path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_local_trtexec_runner_says_what_to_install_when_trtexec_is_missing(tmp_path):
    profile = parse_profile(
        {
            "name": "gpu-box",
            "connection": {"kind": "local"},
            "runtime": {"kind": "trtexec", "trtexec": str(tmp_path / "no" / "trtexec")},
        }
    )
    runner = get_runner(profile)

    check = runner.check()
    with pytest.raises(MeasurementError, match=r"trtexec not found at .* install TensorRT"):
        runner.measure(_tiny_model(tmp_path / "m.onnx"), Protocol(iterations=5))
    assert not check.ok and "install TensorRT" in check.detail


def test_export_times_generator_matches_the_cpp_writer_layout():
    text = _export_times([_query(0.0, 0.5, 1.0, 0.25)])
    assert text.startswith('[\n  { "startEnqMs" : 0, "endEnqMs" : 0.05, ')
    assert json.loads(text)[0]["latencyMs"] == 1.75
