"""ONNX Runtime's onnxruntime_perf_test: the command, its printed summary, and its per-run result file.

The tool is not shipped in the onnxruntime wheel; users build it for their phone (`build.sh --android
--build_shared_lib`, it lands next to libonnxruntime.so) and give its path in the target profile.
Per-iteration latencies come from its result file (one line per run, seconds); the printed summary is
parsed too, for the record and as a cross-check. Output formats: see `performance_runner.cc` upstream.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from compressor.bench.measure import Protocol
from compressor.errors import MeasurementError
from compressor.targets.base import last_line

_NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
# Both wordings: "Average inference time cost: 144.871 ms" (ORT >= 1.1) and "Average time cost:58.8 ms".
_FIELDS = {
    "session_creation_s": re.compile(rf"^Session creation time cost:\s*{_NUM} s"),
    "first_inference_ms": re.compile(rf"^First inference time cost:\s*{_NUM} ms"),
    "total_inference_s": re.compile(rf"^Total (?:inference )?time cost:\s*{_NUM}(?: s)?\s*$"),
    "total_requests": re.compile(rf"^Total (?:inference requests|iterations):\s*{_NUM}\s*$"),
    "average_ms": re.compile(rf"^Average (?:inference )?time cost:\s*{_NUM} ms"),
    "total_run_s": re.compile(rf"^Total (?:inference )?run time:\s*{_NUM} s"),
    "inferences_per_second": re.compile(rf"^Number of inferences per second:\s*{_NUM}"),
    "avg_cpu_percent": re.compile(rf"^Avg CPU usage:\s*{_NUM}\s*%"),
    "peak_working_set_bytes": re.compile(rf"^Peak working set size:\s*{_NUM} bytes"),
}
# "P90 Latency: 0.0599 s" (current) and "P90 Latency is 0.0599845 sec" (older).
_LATENCY = re.compile(rf"^(Min|Max|P50|P90|P95|P99|P999) Latency(?::| is)\s*{_NUM}\s*(?:s|sec)\s*$")


def build_perf_test_command(
    binary: str,
    model: str,
    result_file: str,
    *,
    protocol: Protocol,
    threads: int,
    execution_provider: str = "cpu",
    free_dims: Mapping[str, int] | None = None,
) -> list[str]:
    """The onnxruntime_perf_test argument list.

    `-I` generates random inputs from the signature (no test-data directory needed); free dimensions are
    pinned with `-f`. The tool does one untimed run of its own; our protocol's warm-up runs are extra timed
    runs that `parse_result_file` drops. `-Z` stops worker spinning between runs, as device_bench.py does.
    """
    argv = [binary, "-I", "-e", execution_provider, "-x", str(threads), "-o", "99", "-Z", "-s"]
    if protocol.min_seconds > 0:
        argv += ["-m", "duration", "-t", str(int(math.ceil(protocol.min_seconds)))]
    else:
        argv += ["-m", "times", "-r", str(protocol.warmup + protocol.iterations)]
    for name, size in (free_dims or {}).items():
        argv += ["-f", f"{name}:{size}"]
    return [*argv, model, result_file]


@dataclass
class PerfTestSummary:
    """The printed summary. Latency percentiles converted to milliseconds."""

    values: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**self.values, "latency_ms": dict(self.latency_ms)}


def parse_perf_test_output(text: str) -> PerfTestSummary:
    """Read onnxruntime_perf_test's stdout (ORT 1.x wordings; log lines in between are ignored).

    Raises:
        MeasurementError: the tool failed or printed no timing summary.
    """
    summary = PerfTestSummary()
    for raw in text.splitlines():
        line = raw.strip()
        for key, pattern in _FIELDS.items():
            m = pattern.match(line)
            if m:
                summary.values[key] = float(m.group(1))
        m = _LATENCY.match(line)
        if m:
            summary.latency_ms[m.group(1).lower()] = float(m.group(2)) * 1000.0
    if "average_ms" not in summary.values or "total_requests" not in summary.values:
        raise MeasurementError(
            f"onnxruntime_perf_test printed no timing summary; last line: {last_line(text)}"
        )
    if summary.values["total_requests"] < 1 or not all(math.isfinite(v) for v in summary.values.values()):
        raise MeasurementError(f"onnxruntime_perf_test printed an impossible summary: {summary.values}")
    return summary


def parse_result_file(text: str, *, drop_first: int = 0) -> list[float]:
    """Per-run latencies (ms) from the result file, skipping the first `drop_first` runs (warm-up).

    Lines are `model,seconds,peak_bytes,cpu_percent,run`; newer builds insert a second time column
    (submission time, then total time; the total is used). Statistics lines after a blank line are ignored.
    """
    samples: list[tuple[int, float]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.split(" ")[0] in ("Min", "Max", "P50", "P90", "P95", "P99", "P999"):
            continue
        parts = line.split(",")
        try:
            if len(parts) == 5:
                seconds, run = float(parts[1]), int(parts[4])
            elif len(parts) == 6:
                seconds, run = float(parts[2]), int(parts[5])
            else:
                raise ValueError
        except ValueError:
            raise MeasurementError(
                f"onnxruntime_perf_test result file line {number} is unreadable: {line[:120]}"
            ) from None
        if not math.isfinite(seconds) or seconds < 0:
            raise MeasurementError(
                f"onnxruntime_perf_test result file line {number} has an impossible time: {line[:120]}"
            )
        samples.append((run, seconds * 1000.0))
    if not samples:
        raise MeasurementError("onnxruntime_perf_test wrote no per-run times to its result file")
    runs = [r for r, _ in samples]
    if runs != list(range(len(runs))):
        raise MeasurementError(
            "onnxruntime_perf_test result file has missing or repeated run numbers; it was cut short"
        )
    kept = [ms for _, ms in samples[drop_first:]]
    if not kept:
        raise MeasurementError(f"onnxruntime_perf_test recorded {len(samples)} runs, all of them warm-up")
    return kept
