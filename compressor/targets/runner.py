"""`get_runner(profile)`: the one entry point. Pairs a transport (local, SSH, adb) with a runtime runner.

The ONNX Runtime runner is defined here: it runs device_bench.py (shipped in this package) with the
device's Python, over whichever transport the profile names, so local and SSH numbers come from the
same code. A result is returned only when the device printed a complete, well-formed result.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from compressor.artifact import sha256_file
from compressor.bench.measure import Protocol, summarize
from compressor.errors import MeasurementError
from compressor.targets import device_bench
from compressor.targets.base import (
    Measurement,
    Runner,
    RunResult,
    TargetCheck,
    Transport,
    describe_exit,
    last_line,
)
from compressor.targets.environment import apply_setup
from compressor.targets.profile import OnnxRuntimeSpec, TargetProfile

__all__ = [
    "Measurement",
    "OrtRunner",
    "Runner",
    "TargetCheck",
    "check_target",
    "get_runner",
    "parse_bench_output",
]

BENCH_SCRIPT = Path(device_bench.__file__).resolve()
# Iterations of one model before the other takes over in a paired measurement: long enough that switching
# costs little, short enough that a burst of load lands on both.
INTERLEAVE_BLOCK = 10
# Sessions per model in a paired measurement (each holds its own copy of the weights): a session's memory
# placement shifts all of its samples, and two sessions average that out (benchmarks/gate_noise.md).
PAIR_SESSIONS = 2
# Runs on the device before anything is copied: is there a Python with numpy and onnxruntime?
_PROBE = (
    "import json, sys\n"
    "info = {'python': sys.version.split()[0]}\n"
    "try:\n"
    "    import numpy, onnxruntime\n"
    "    info.update(onnxruntime=onnxruntime.__version__, providers=onnxruntime.get_available_providers())\n"
    "except ImportError as e:\n"
    "    info['missing'] = getattr(e, 'name', None) or str(e)\n"
    "print('" + device_bench.MARKER + " ' + json.dumps(info))\n"
)


def _marked_json(stdout: str) -> dict[str, Any] | None:
    lines = [ln for ln in stdout.splitlines() if ln.startswith(device_bench.MARKER + " ")]
    if not lines:
        return None
    try:
        payload = json.loads(lines[-1][len(device_bench.MARKER) + 1 :])
    except json.JSONDecodeError:
        return None
    return payload if isinstance(payload, dict) else None


def parse_bench_output(res: RunResult, where: str, *, min_samples: int) -> dict[str, Any]:
    """The result object printed by device_bench.py, checked; anything else is a MeasurementError."""
    payload = _marked_json(res.stdout)
    if payload is not None and "error" in payload:
        raise MeasurementError(f"{where}: {payload['error']}")
    if res.returncode != 0:
        detail = last_line(res.stderr) if res.stderr.strip() else last_line(res.stdout)
        raise MeasurementError(
            f"the benchmark on {where} ended with {describe_exit(res.returncode)} before reporting a result "
            f"({detail}); nothing was recorded"
        )
    if payload is None:
        raise MeasurementError(
            f"the benchmark on {where} printed no readable result line (garbage output: {last_line(res.stdout)!r})"
        )
    samples = payload.get("samples_ms")
    if (
        payload.get("schema") != device_bench.SCHEMA
        or not isinstance(samples, list)
        or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in samples)
        or not isinstance(payload.get("environment"), dict)
    ):
        raise MeasurementError(
            f"the benchmark on {where} printed a malformed result (schema, samples or environment)"
        )
    if len(samples) < min_samples:
        raise MeasurementError(
            f"the benchmark on {where} reported {len(samples)} samples, fewer than the {min_samples} asked; "
            "nothing was recorded"
        )
    return payload


class OrtRunner(Runner):
    """ONNX Runtime through device_bench.py, in a fresh process per measurement (here or on the device)."""

    @property
    def spec(self) -> OnnxRuntimeSpec:
        return self.profile.runtime

    @property
    def python(self) -> str:
        if self.spec.python:
            return self.spec.python
        return sys.executable if self.profile.connection.kind == "local" else "python3"

    def probe(self) -> dict[str, Any]:
        """Check the device's Python, numpy and onnxruntime before copying anything there."""
        where = self.transport.description
        res = self.transport.run(
            [self.python, "-c", _PROBE], timeout_s=120, what="checking Python and onnxruntime"
        )
        info = _marked_json(res.stdout)
        if res.returncode == 127 or (info is None and "not found" in res.stderr):
            raise MeasurementError(
                f"{self.python} not found on {where}: install Python 3 there (with numpy and onnxruntime) or set "
                "runtime.python in the target profile"
            )
        if info is None:
            raise MeasurementError(
                f"{self.python} on {where} failed to start: {last_line(res.stderr or res.stdout)}"
            )
        if "missing" in info:
            raise MeasurementError(
                f"{self.python} on {where} lacks {info['missing']}: run '{self.python} -m pip install numpy onnxruntime' "
                "there (Jetson GPU: the onnxruntime-gpu wheel for its JetPack)"
            )
        missing = [p for p in self.spec.providers if p not in info.get("providers", [])]
        if missing:
            raise MeasurementError(
                f"onnxruntime {info.get('onnxruntime')} on {where} lacks {', '.join(missing)} "
                f"(it has {', '.join(info.get('providers', []))}); install a build with it or change runtime.providers"
            )
        return info

    def check(self) -> TargetCheck:
        try:
            where = self.transport.check()
            info = self.probe()
        except MeasurementError as exc:
            return TargetCheck(self.profile.name, False, str(exc))
        detail = f"{where}; Python {info['python']}, onnxruntime {info['onnxruntime']}"
        return TargetCheck(self.profile.name, True, detail)

    def bench_argv(
        self, model: str, script: str, protocol: Protocol, batch: int, dims: Mapping[str, int]
    ) -> list[str]:
        argv = [
            self.python, script, "--model", model,
            "--warmup", str(protocol.warmup), "--iterations", str(protocol.iterations),
            "--min-seconds", repr(protocol.min_seconds), "--max-iterations", str(protocol.max_iterations),
            "--batch", str(batch), "--threads", str(self._threads(protocol)),
            "--providers", ",".join(self.spec.providers),
        ]  # fmt: skip
        for name, size in dims.items():
            argv += ["--dim", f"{name}={size}"]
        return argv

    def measure(
        self, model_path: Path, protocol: Protocol, batch: int = 1, *, dims: Mapping[str, int] | None = None
    ) -> Measurement:
        return self._bench([self._model(model_path)], protocol, batch, dims)[0]

    def _side_by_side(
        self, first: Path, second: Path, protocol: Protocol, batch: int, dims: Mapping[str, int] | None
    ) -> tuple[Measurement, Measurement]:
        """Both models in one process on the device, in alternating blocks (device_bench.py --compare)."""
        a, b = self._bench([first, second], protocol, batch, dims)
        return a, b

    def _bench(
        self, models: list[Path], protocol: Protocol, batch: int, dims: Mapping[str, int] | None
    ) -> list[Measurement]:
        self.probe()
        applied = apply_setup(self.transport, self.profile.device_setup)
        resolved_dims = self._dims(dims)
        files = dict(zip(("model.onnx", "compare.onnx"), models))
        with self.transport.staged({**files, "device_bench.py": BENCH_SCRIPT}) as st:
            argv = self.bench_argv(st.paths["model.onnx"], st.paths["device_bench.py"], protocol, batch, resolved_dims)
            if len(models) > 1:
                argv += ["--compare", st.paths["compare.onnx"], "--block", str(INTERLEAVE_BLOCK), "--sessions", str(PAIR_SESSIONS)]
            res = self.transport.run(
                argv,
                timeout_s=min(protocol.timeout_s * len(models), self.profile.timeout_s * len(models)),
                cwd=st.workdir,
                what="benchmarking",
            )
        payload = parse_bench_output(res, self.transport.description, min_samples=protocol.iterations)
        results = [payload]
        if len(models) > 1:
            other = payload.get("compare")
            samples = other.get("samples_ms") if isinstance(other, dict) else None
            if not isinstance(samples, list) or len(samples) < protocol.iterations:
                raise MeasurementError(
                    f"the paired benchmark on {self.transport.description} printed no complete second result"
                )
            results.append({**payload, **other})
        measurements = []
        for model, result in zip(models, results):
            samples = [float(s) for s in result["samples_ms"]]
            env = dict(payload["environment"])
            env.update(
                {
                    "transport": self.transport.description,
                    "device_setup_applied": applied,
                    "model_sha256": sha256_file(model),
                    "inputs": result.get("inputs"),
                    "session_load_s": result.get("session_load_s"),
                }
            )
            if len(models) > 1:
                env["interleaved_with"] = sha256_file(models[1 - len(measurements)])
                env["interleave_block"] = INTERLEAVE_BLOCK
                env["sessions_per_model"] = PAIR_SESSIONS
            measurements.append(
                Measurement(
                    target=self.profile.name,
                    batch=batch,
                    stats=summarize(samples),
                    environment=env,
                    kind=payload.get("kind", "end-to-end"),
                    samples_ms=samples,
                    protocol=protocol.to_dict(),
                )
            )
        return measurements


def make_transport(profile: TargetProfile) -> Transport:
    conn = profile.connection
    if conn.kind == "local":
        from compressor.targets.local import LocalTransport

        return LocalTransport()
    if conn.kind == "ssh":
        from compressor.targets.ssh import SshTransport

        return SshTransport(conn)
    from compressor.targets.adb import AdbTransport

    return AdbTransport(conn)


def get_runner(profile: TargetProfile) -> Runner:
    """The runner for a profile: dispatch on runtime kind, over the profile's connection."""
    transport = make_transport(profile)
    kind = profile.runtime.kind
    if kind == "onnxruntime":
        return OrtRunner(profile, transport)
    if kind == "trtexec":
        from compressor.targets.trtexec import TrtexecRunner

        return TrtexecRunner(profile, transport)
    from compressor.targets.adb import PerfTestRunner

    return PerfTestRunner(profile, transport)


def check_target(profile: TargetProfile) -> TargetCheck:
    """Reachability for `compress targets`: never raises for an unreachable device, reports it."""
    try:
        return get_runner(profile).check()
    except MeasurementError as exc:
        return TargetCheck(profile.name, False, str(exc))
