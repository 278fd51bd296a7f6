"""onnxruntime_perf_test: command, real printed summaries (fixtures/SOURCES.md), result file, bad output."""

from pathlib import Path

import pytest

from compressor.bench.measure import Protocol
from compressor.errors import MeasurementError
from compressor.targets.perf_test import build_perf_test_command, parse_perf_test_output, parse_result_file

FIXTURES = Path(__file__).parent / "fixtures"


def test_command_times_mode_runs_warmup_plus_iterations():
    argv = build_perf_test_command(
        "/data/local/tmp/w/onnxruntime_perf_test",
        "/data/local/tmp/w/model.ort",
        "/data/local/tmp/w/result.csv",
        protocol=Protocol(warmup=10, iterations=100),
        threads=4,
        execution_provider="xnnpack",
        free_dims={"batch": 1, "sequence": 128},
    )

    assert argv == [
        "/data/local/tmp/w/onnxruntime_perf_test",
        "-I", "-e", "xnnpack", "-x", "4", "-o", "99", "-Z", "-s",
        "-m", "times", "-r", "110",
        "-f", "batch:1", "-f", "sequence:128",
        "/data/local/tmp/w/model.ort", "/data/local/tmp/w/result.csv",
    ]  # fmt: skip


def test_command_duration_mode_when_min_seconds_is_set():
    argv = build_perf_test_command("pt", "m.ort", "r.csv", protocol=Protocol(min_seconds=7.2), threads=0)
    assert argv[argv.index("-m") : argv.index("-m") + 4] == ["-m", "duration", "-t", "8"]
    assert "-r" not in argv


def test_android_acl_summary_ort13():
    s = parse_perf_test_output((FIXTURES / "perf_test_android_acl_ort1.3.txt").read_text())

    assert s.values == {
        "session_creation_s": 0.127918,
        "total_inference_s": 1.44871,
        "total_requests": 10.0,
        "average_ms": 144.871,
        "total_run_s": 1.44916,
        "avg_cpu_percent": 68.0,
        "peak_working_set_bytes": 158171136.0,
    }
    assert s.latency_ms == {}


def test_summary_after_log_lines_without_spaces_after_colons():
    s = parse_perf_test_output((FIXTURES / "perf_test_windows_2020.txt").read_text())
    assert (s.values["session_creation_s"], s.values["total_requests"], s.values["average_ms"]) == (
        1.84149,
        1.0,
        734.606,
    )


def test_legacy_statistics_wording_in_seconds_becomes_milliseconds():
    s = parse_perf_test_output((FIXTURES / "perf_test_statistics_legacy.txt").read_text())

    assert s.values["total_requests"] == 1000
    assert s.values["average_ms"] == 58.8053
    assert s.latency_ms["p50"] == pytest.approx(58.7108, abs=1e-9)
    assert s.latency_ms["p999"] == pytest.approx(62.3472, abs=1e-9)
    assert s.latency_ms["min"] == pytest.approx(55.9777, abs=1e-9)


def _current_stdout(times_s: list[float]) -> str:
    """Summary as PerformanceRunner::Run and DumpToFile print it (ORT >= 1.16)."""
    ordered = sorted(times_s)
    n = len(ordered)
    total = sum(times_s)
    lines = [
        "Session creation time cost: 0.0421 s",
        "First inference time cost: 12 ms",
        f"Total inference time cost: {total:g} s",
        f"Total inference requests: {n}",
        f"Average inference time cost: {total / n * 1000:g} ms",
        f"Total inference run time: {total * 1.01:g} s",
        f"Number of inferences per second: {n / (total * 1.01):g} ",
        "Avg CPU usage: 97 %",
        "Peak working set size: 40157184 bytes",
    ]
    for label, q in (
        ("Min", 0),
        ("Max", None),
        ("P50", 0.5),
        ("P90", 0.9),
        ("P95", 0.95),
        ("P99", 0.99),
        ("P999", 0.999),
    ):
        value = ordered[-1] if q is None else ordered[int(n * q)]
        lines.append(f"{label} Latency: {value:g} s")
    return "\n".join(lines) + "\n"


def test_current_summary_format_round_trips():
    times = [0.010 + 0.0001 * i for i in range(100)]

    s = parse_perf_test_output(_current_stdout(times))

    assert s.values["total_requests"] == 100
    assert s.values["first_inference_ms"] == 12
    assert s.values["average_ms"] == pytest.approx(sum(times) / 100 * 1000, rel=1e-5)
    assert s.latency_ms["p90"] == pytest.approx(times[90] * 1000, rel=1e-5)
    assert s.values["inferences_per_second"] == pytest.approx(100 / (sum(times) * 1.01), rel=1e-5)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "printed no timing summary"),
        ("failed to initialize.\n", "last line: failed to initialize."),
        ("there is no test data for model m\n", "no test data"),
        ("Total inference requests: 0\nAverage inference time cost: 1 ms\n", "impossible summary"),
    ],
)
def test_missing_or_broken_summary_is_an_error(text, message):
    with pytest.raises(MeasurementError, match=message):
        parse_perf_test_output(text)


def _result_file(times_s: list[float], *, columns: int = 5, stats: bool = True) -> str:
    """Per-run lines as PerformanceResult::DumpToFile writes them, then the appended statistics."""
    rows = []
    for run, t in enumerate(times_s):
        time_cols = [f"{t:g}"] if columns == 5 else [f"{t * 0.9:g}", f"{t:g}"]
        rows.append(",".join(["compressor-bench.Ab12Cd", *time_cols, "40157184", "97", str(run)]))
    text = "\n".join(rows) + "\n"
    if stats:
        text += "\nMin Latency: 0.01 s\nMax Latency: 0.02 s\nP50 Latency: 0.015 s\n"
    return text


@pytest.mark.parametrize("columns", [5, 6])
def test_result_file_gives_per_run_milliseconds_minus_warmup(columns):
    times = [0.5, 0.4] + [0.010 + 0.001 * i for i in range(20)]  # two slow warm-up runs first

    samples = parse_result_file(_result_file(times, columns=columns), drop_first=2)

    assert samples == pytest.approx([10.0 + i for i in range(20)], abs=1e-9)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "no per-run times"),
        ("m,0.01,1,2\n", "line 1 is unreadable"),
        ("m,abc,1,2,0\n", "line 1 is unreadable"),
        ("m,0.01,1,2,0\nm,-0.01,1,2,1\n", "impossible time"),
        ("m,0.01,1,2,0\nm,0.01,1,2,2\n", "cut short"),
        ("m,0.01,1,2,0\n", "all of them warm-up"),
    ],
)
def test_bad_result_files_are_errors(text, message):
    with pytest.raises(MeasurementError, match=message):
        parse_result_file(text, drop_first=1 if "all of them" in message else 0)
