"""TensorRT's trtexec: the exact command, its output parsed, and a runner that builds and times on the device.

trtexec builds an engine from the (Q/DQ) ONNX file on the device itself, because an engine is tied to the
GPU and the TensorRT version that built it; both are recorded with the result. Per-query times come from
`--exportTimes` (JSON); trtexec's own printed summary is parsed too and kept for cross-checking.

Samples: "Latency" = H2D + GPU compute + D2H of one query (reported as end-to-end); "GPU Compute Time" =
kernels only (compute-only, kept in `extra`).
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.bench.measure import Protocol, summarize
from compressor.errors import MeasurementError
from compressor.targets import signature
from compressor.targets.base import Measurement, Runner, TargetCheck, describe_exit, last_line
from compressor.targets.environment import LINUX_PROBE, apply_setup, probe
from compressor.targets.profile import TrtexecSpec

PRECISION_FLAGS: dict[str, list[str]] = {
    "fp32": [],
    "fp16": ["--fp16"],
    # Explicit quantization: with Q/DQ nodes in the graph, --int8 makes TensorRT honour their scales.
    "int8": ["--int8"],
    "int8-fp16": ["--int8", "--fp16"],
    "best": ["--best"],
}
SECTIONS = (
    "Latency",
    "End-to-End Host Latency",
    "Enqueue Time",
    "H2D Latency",
    "GPU Compute Time",
    "D2H Latency",
)

_PREFIX = re.compile(r"^(?:\[[^\]]*\]\s*)*")
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf)"
_STAT = re.compile(rf"^(min|max|mean|median|percentile\((\d+(?:\.\d+)?)%\)) = ({_NUMBER}) ms$", re.IGNORECASE)
_BANNER = re.compile(r"&&&& (RUNNING|PASSED|FAILED) TensorRT\.trtexec \[TensorRT v(\d+)\](?: # (.*))?")


def build_trtexec_command(
    spec: TrtexecSpec,
    *,
    onnx: str,
    engine: str,
    times: str,
    protocol: Protocol,
    precision: str,
    shapes: Mapping[str, list[int]] | None = None,
    profile_json: str | None = None,
) -> list[str]:
    """The trtexec argument list (no shell): build with the requested precision, then time and export."""
    if precision not in PRECISION_FLAGS:
        raise MeasurementError(
            f"precision '{precision}' has no trtexec flags; use one of {sorted(PRECISION_FLAGS)}"
        )
    argv = [spec.trtexec, f"--onnx={onnx}", f"--saveEngine={engine}", *PRECISION_FLAGS[precision]]
    if spec.sparsity:
        argv.append("--sparsity=enable")
    if spec.dla_core is not None:
        argv += [f"--useDLACore={spec.dla_core}", "--allowGPUFallback"]
    if shapes:
        argv.append("--shapes=" + ",".join(f"{name}:{'x'.join(map(str, s))}" for name, s in shapes.items()))
    argv += [
        f"--warmUp={spec.warm_up_ms}",
        f"--iterations={protocol.iterations}",
        # trtexec keeps timing for at least --duration seconds (default 3); 0 leaves only --iterations.
        f"--duration={int(math.ceil(protocol.min_seconds))}",
    ]
    if spec.use_spin_wait:
        argv.append("--useSpinWait")
    argv.append(f"--exportTimes={times}")
    if profile_json:
        argv += [f"--exportProfile={profile_json}", "--separateProfileRun"]
    return [*argv, *spec.extra_args]


def tensorrt_version(code: str) -> str:
    """`8400` -> 8.4.0, `100300` -> 10.3.0 (NV_TENSORRT_VERSION is major*1000 before 10, major*10000 after)."""
    n = int(code)
    if n >= 100000:
        return f"{n // 10000}.{n % 10000 // 100}.{n % 100}"
    return f"{n // 1000}.{n % 1000 // 100}.{n % 100}"


@dataclass
class TrtexecReport:
    """What trtexec printed. Section values are milliseconds: min, max, mean, median, p90/p95/p99..."""

    sections: dict[str, dict[str, float]] = field(default_factory=dict)
    throughput_qps: float | None = None
    total_host_walltime_s: float | None = None
    total_gpu_compute_s: float | None = None
    tensorrt_version: str | None = None
    device: str | None = None
    compute_capability: str | None = None
    status: str | None = None  # RUNNING / PASSED / FAILED from the &&&& banner
    command: str | None = None
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "errors"}


def _number(text: str, line: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise MeasurementError(f"trtexec printed an impossible value in: {line.strip()}")
    return value


def _section(body: str, line: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for part in body.split(", "):
        m = _STAT.match(part.strip())
        if m is None:
            raise MeasurementError(f"cannot read trtexec statistics '{part.strip()}' in: {line.strip()}")
        key = f"p{float(m.group(2)):g}" if m.group(2) else m.group(1).lower()
        values[key] = _number(m.group(3), line)
    missing = {"min", "max", "mean", "median"} - set(values)
    if missing:
        raise MeasurementError(f"trtexec statistics lack {sorted(missing)} in: {line.strip()}")
    return values


def parse_trtexec_output(text: str, *, require_summary: bool = True) -> TrtexecReport:
    """Read trtexec's log (any TensorRT 8.x-10.x, with or without prefixes on each line).

    `require_summary=False` reads what is there (version, device) from a log that has no timing yet.

    Raises:
        MeasurementError: trtexec failed, or printed no (or an unreadable) performance summary.
    """
    report = TrtexecReport()
    in_summary = False
    for raw in text.splitlines():
        banner = _BANNER.search(raw)
        if banner:
            report.status = banner.group(1)
            report.tensorrt_version = report.tensorrt_version or tensorrt_version(banner.group(2))
            report.command = banner.group(3) or report.command
            continue
        is_error = "[E]" in raw
        line = _PREFIX.sub("", raw).strip()
        if is_error:
            report.errors.append(line)
        if line.startswith("=== Performance summary ==="):
            in_summary = True
            continue
        if line.startswith("TensorRT version:"):
            report.tensorrt_version = line.split(":", 1)[1].strip()
        elif line.startswith("Selected Device:"):
            report.device = line.split(":", 1)[1].strip()
        elif line.startswith("Compute Capability:"):
            report.compute_capability = line.split(":", 1)[1].strip()
        if not in_summary:
            continue
        name, sep, body = line.partition(": ")
        if name in SECTIONS and sep:
            report.sections[name] = _section(body, raw)
        elif name == "Throughput" and body.endswith(" qps"):
            report.throughput_qps = _number(body[:-4], raw)
        elif name == "Total Host Walltime" and body.endswith(" s"):
            report.total_host_walltime_s = _number(body[:-2], raw)
        elif name == "Total GPU Compute Time" and body.endswith(" s"):
            report.total_gpu_compute_s = _number(body[:-2], raw)
    if report.status == "FAILED":
        reason = report.errors[-1] if report.errors else last_line(text)
        raise MeasurementError(f"trtexec failed: {reason}")
    if not require_summary:
        return report
    if not in_summary:
        raise MeasurementError(
            f"trtexec printed no '=== Performance summary ===' (it stopped early?); last line: {last_line(text)}"
        )
    for required in ("Latency", "GPU Compute Time"):
        if required not in report.sections:
            raise MeasurementError(
                f"trtexec's performance summary has no '{required}' line; the output is incomplete"
            )
    return report


def parse_trtexec_times(text: str, warm_up_ms: float = 0.0) -> tuple[list[float], list[float]]:
    """Per-query (latency_ms, gpu_compute_ms) from an --exportTimes JSON file.

    Queries that started computing before `warm_up_ms` are warm-up (TensorRT < 8.6 exports them too) and are
    dropped by the same rule trtexec applies to its own summary.
    """
    try:
        trace = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MeasurementError(
            f"trtexec's --exportTimes file is not JSON ({exc.msg} at line {exc.lineno})"
        ) from None
    if not isinstance(trace, list) or not trace:
        raise MeasurementError("trtexec's --exportTimes file holds no timed queries")
    latency, compute = [], []
    for i, query in enumerate(trace):
        try:
            start, lat, comp = (float(query[k]) for k in ("startComputeMs", "latencyMs", "computeMs"))
        except (TypeError, KeyError, ValueError):
            raise MeasurementError(
                f"trtexec's --exportTimes entry {i} lacks numeric startComputeMs/latencyMs/computeMs: "
                f"{str(query)[:120]}"
            ) from None
        if not all(math.isfinite(v) and v >= 0 for v in (lat, comp)):
            raise MeasurementError(
                f"trtexec's --exportTimes entry {i} has an impossible time: {str(query)[:120]}"
            )
        if start >= warm_up_ms:
            latency.append(lat)
            compute.append(comp)
    if not latency:
        raise MeasurementError(
            f"every query in trtexec's --exportTimes started during the {warm_up_ms} ms warm-up"
        )
    return latency, compute


class TrtexecRunner(Runner):
    """Build the engine with trtexec on the device (SSH or this machine) and time it there."""

    @property
    def spec(self) -> TrtexecSpec:
        return self.profile.runtime

    def _require_trtexec(self) -> None:
        res = self.transport.run(
            ["sh", "-c", 'command -v "$0"', self.spec.trtexec], timeout_s=60, what="finding trtexec"
        )
        if res.returncode != 0:
            raise MeasurementError(
                f"trtexec not found at {self.spec.trtexec} on {self.transport.description}: install TensorRT "
                "(JetPack puts trtexec in /usr/src/tensorrt/bin) or set runtime.trtexec in the profile"
            )

    def check(self) -> TargetCheck:
        try:
            where = self.transport.check()
            self._require_trtexec()
        except MeasurementError as exc:
            return TargetCheck(self.profile.name, False, str(exc))
        return TargetCheck(self.profile.name, True, f"{where}; trtexec at {self.spec.trtexec}")

    def measure(
        self, model_path: Path, protocol: Protocol, batch: int = 1, *, dims: Mapping[str, int] | None = None
    ) -> Measurement:
        model = self._model(model_path)
        inputs = signature.model_inputs(model)
        shapes = signature.resolve(inputs, batch, self._dims(dims)) if signature.is_dynamic(inputs) else None
        self._require_trtexec()
        applied = apply_setup(self.transport, self.profile.device_setup)
        env = probe(self.transport, LINUX_PROBE)
        with self.transport.staged({"model.onnx": model}) as st:
            times = f"{st.workdir}/times.json"
            argv = build_trtexec_command(
                self.spec,
                onnx=st.paths["model.onnx"],
                engine=f"{st.workdir}/model.engine",
                times=times,
                protocol=protocol,
                precision=self.profile.precision,
                shapes=shapes,
                profile_json=f"{st.workdir}/profile.json" if self.spec.export_profile else None,
            )
            res = self.transport.run(
                argv, timeout_s=min(protocol.timeout_s, self.profile.timeout_s), cwd=st.workdir,
                what="building and timing the TensorRT engine",
            )  # fmt: skip
            output = res.stdout + "\n" + res.stderr
            if res.returncode != 0:
                errors = [ln for ln in output.splitlines() if "[E]" in ln]
                reason = _PREFIX.sub("", errors[-1]).strip() if errors else last_line(output)
                raise MeasurementError(
                    f"trtexec on {self.transport.description} ended with {describe_exit(res.returncode)}: {reason}"
                )
            report = parse_trtexec_output(output)
            latency, compute = parse_trtexec_times(self.transport.read_text(times), self.spec.warm_up_ms)
            layer_profile = None
            if self.spec.export_profile:
                try:
                    layer_profile = json.loads(self.transport.read_text(f"{st.workdir}/profile.json"))
                except (MeasurementError, json.JSONDecodeError):
                    layer_profile = None  # per-layer detail is a bonus, never a reason to drop a timing
        if len(latency) < protocol.iterations:
            raise MeasurementError(
                f"trtexec timed {len(latency)} queries, fewer than the {protocol.iterations} asked; nothing recorded"
            )
        env.update(
            {
                "runtime": "tensorrt",
                "tensorrt_version": report.tensorrt_version,
                "gpu": report.device,
                "compute_capability": report.compute_capability,
                "precision": self.profile.precision,
                "sparsity": self.spec.sparsity,
                "dla_core": self.spec.dla_core,
                "device_setup_applied": applied,
                "transport": self.transport.description,
            }
        )
        return Measurement(
            target=self.profile.name,
            batch=batch,
            stats=summarize(latency),
            environment=env,
            kind="end-to-end",
            samples_ms=latency,
            protocol={**protocol.to_dict(), "warm_up_ms": self.spec.warm_up_ms},
            extra={
                "compute_only": summarize(compute).to_dict(),
                "trtexec_summary": report.to_dict(),
                "command": shlex.join(argv),
                "engine": f"built on the device for {report.device} with TensorRT {report.tensorrt_version}; "
                "valid only for that GPU and TensorRT version",
                "layer_profile": layer_profile,
            },
        )
