"""This machine as a transport: argument lists run in a subprocess (never through a shell)."""

from __future__ import annotations

import platform
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from compressor.errors import MeasurementError
from compressor.targets.base import RunResult, Staged, Transport


class LocalTransport(Transport):
    description = "local"

    def stage(self, files: Mapping[str, Path]) -> Staged:
        # Nothing travels, so nothing can be corrupted in transit: use the files where they are and give
        # tools a private scratch directory for their outputs (engines, timing exports).
        workdir = tempfile.mkdtemp(prefix="compressor-bench.")
        return Staged(workdir=workdir, paths={name: str(Path(p).resolve()) for name, p in files.items()})

    def run(
        self, argv: Sequence[str], *, timeout_s: float, cwd: str | None = None, what: str = "running"
    ) -> RunResult:
        try:
            proc = subprocess.run(
                list(argv), cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False
            )
        except FileNotFoundError:
            raise MeasurementError(f"{argv[0]} not found on this machine while {what}") from None
        except subprocess.TimeoutExpired:
            raise MeasurementError(
                f"{what} took longer than {timeout_s:.0f} s and was stopped; raise timeout_s in the profile "
                "or measure fewer iterations"
            ) from None
        return RunResult(proc.returncode, proc.stdout, proc.stderr)

    def read_text(self, path: str, *, what: str = "reading results") -> str:
        try:
            return Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise MeasurementError(f"cannot read {path} while {what}: {exc.strerror}") from None

    def cleanup(self, staged: Staged) -> None:
        shutil.rmtree(staged.workdir, ignore_errors=True)

    def check(self) -> str:
        return f"this machine ({platform.node()}, {platform.machine()})"
