"""What every runner returns (`Measurement`) and the two halves of a runner: a transport, a runtime.

A transport moves files to the device, verifies them, runs argument lists there and cleans up
(this machine, SSH, adb). A runtime-specific runner (ONNX Runtime, trtexec, onnxruntime_perf_test)
decides what to run and how to read the output. `get_runner` in runner.py pairs them.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from compressor.bench.measure import LatencyStats, Protocol
from compressor.errors import MeasurementError

Kind = Literal["compute-only", "end-to-end"]


@dataclass
class Measurement:
    """One latency measurement of one model on one target, with everything needed to reproduce it.

    `kind` says what the samples time: "end-to-end" (host call including input/output copies) or
    "compute-only" (device kernels only, e.g. trtexec's GPU Compute Time). `extra` holds secondary
    results (e.g. compute-only stats next to end-to-end ones, throughput, the exact command).
    """

    target: str
    batch: int
    stats: LatencyStats
    environment: dict[str, Any]
    kind: Kind
    samples_ms: list[float]
    protocol: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "batch": self.batch,
            "kind": self.kind,
            "stats": self.stats.to_dict(),
            "protocol": self.protocol,
            "environment": self.environment,
            "extra": self.extra,
            "samples_ms": list(self.samples_ms),
        }


@dataclass
class TargetCheck:
    """Result of `Runner.check()`: can this target measure right now, and what was found."""

    target: str
    ok: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "ok": self.ok, "detail": self.detail}


@dataclass
class RunResult:
    returncode: int
    stdout: str
    stderr: str


@dataclass
class Staged:
    """Files on the device: a fresh working directory and where each named file now lives."""

    workdir: str
    paths: dict[str, str]



def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def describe_exit(returncode: int) -> str:
    """Human wording for how a device process ended (shell convention: 128+N is signal N)."""
    signals = {
        9: "SIGKILL (killed; out of memory?)",
        15: "SIGTERM (terminated)",
        6: "SIGABRT (crashed)",
        11: "SIGSEGV (crashed)",
        2: "SIGINT (interrupted)",
    }
    if returncode < 0:
        return f"signal {-returncode}: {signals.get(-returncode, 'killed')}"
    if returncode == 124:
        return "exit 124 (timed out)"
    if returncode > 128 and returncode - 128 in signals:
        return f"exit {returncode}: {signals[returncode - 128]}"
    return f"exit {returncode}"


class Transport(ABC):
    """Where commands run. Implementations raise MeasurementError for anything the connection breaks."""

    description: str

    @abstractmethod
    def stage(self, files: Mapping[str, Path]) -> Staged:
        """Copy `files` (name -> local path) into a fresh directory on the device and verify their sha256."""

    @abstractmethod
    def run(
        self, argv: Sequence[str], *, timeout_s: float, cwd: str | None = None, what: str = "running"
    ) -> RunResult:
        """Run an argument list on the device (each argument quoted; no shell interpretation)."""

    @abstractmethod
    def read_text(self, path: str, *, what: str = "reading results") -> str:
        """Contents of a file on the device."""

    @abstractmethod
    def cleanup(self, staged: Staged) -> None:
        """Remove the working directory; must not raise."""

    @abstractmethod
    def check(self) -> str:
        """Reach the device once; return a one-line description or raise MeasurementError."""

    @contextlib.contextmanager
    def staged(self, files: Mapping[str, Path]) -> Iterator[Staged]:
        staged = self.stage(files)
        try:
            yield staged
        finally:
            self.cleanup(staged)


class Runner(ABC):
    """Measures a model on one target under a protocol. Obtain one with `get_runner(profile)`."""

    def __init__(self, profile: Any, transport: Transport):
        self.profile = profile
        self.transport = transport

    @abstractmethod
    def measure(
        self, model_path: Path, protocol: Protocol, batch: int = 1, *, dims: Mapping[str, int] | None = None
    ) -> Measurement:
        """Time `model_path`; raise MeasurementError rather than return anything partial."""

    def measure_pair(
        self,
        model_path: Path,
        other_path: Path,
        protocol: Protocol,
        batch: int = 1,
        *,
        dims: Mapping[str, int] | None = None,
    ) -> tuple[Measurement, Measurement]:
        """Time two models side by side, for a ratio: (first's Measurement, second's Measurement)."""
        return self._side_by_side(self._model(model_path), self._model(other_path), protocol, batch, dims)

    def _side_by_side(
        self, first: Path, second: Path, protocol: Protocol, batch: int, dims: Mapping[str, int] | None
    ) -> tuple[Measurement, Measurement]:
        # Runtimes that can hold both models in one process interleave them there (OrtRunner); this
        # fallback measures them one after the other, in two processes.
        return self.measure(first, protocol, batch, dims=dims), self.measure(second, protocol, batch, dims=dims)

    @abstractmethod
    def check(self) -> TargetCheck:
        """Whether the target is reachable and has what measuring needs."""

    def _threads(self, protocol: Protocol) -> int:
        if protocol.threads is not None:
            return protocol.threads
        return self.profile.threads or 0

    def _dims(self, dims: Mapping[str, int] | None) -> dict[str, int]:
        merged = dict(self.profile.shapes)
        merged.update(dims or {})
        return merged

    @staticmethod
    def _model(model_path: Path) -> Path:
        path = Path(model_path)
        if not path.is_file():
            raise MeasurementError(f"model file {path} does not exist")
        if path.with_name(path.name + ".data").exists():
            # Weights in a side file would not travel with the model; export with external_data=False.
            raise MeasurementError(
                f"{path} keeps its weights in {path.name}.data; re-export with external_data=False "
                "so that one file carries the model"
            )
        return path.resolve()
