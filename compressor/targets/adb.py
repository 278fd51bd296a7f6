"""An Android phone over adb, timed with onnxruntime_perf_test on an ORT-format model.

ORT Mobile builds read the ORT format (.ort), so the ONNX file is converted on the host with ONNX Runtime's
own tool (`python -m onnxruntime.tools.convert_onnx_models_to_ort`). `adb shell` hands one string to the
phone's shell, so every argument is quoted with shlex.quote; `adb push` paths are not shell-interpreted.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from compressor.artifact import sha256_file
from compressor.bench.measure import Protocol, summarize
from compressor.errors import MeasurementError
from compressor.targets import signature
from compressor.targets.base import (
    Measurement,
    Runner,
    RunResult,
    Staged,
    TargetCheck,
    Transport,
    describe_exit,
    last_line,
)
from compressor.targets.environment import ANDROID_PROBE, probe
from compressor.targets.perf_test import build_perf_test_command, parse_perf_test_output, parse_result_file
from compressor.targets.profile import AdbConnection, PerfTestSpec

WORKDIR_PREFIX = "compressor-bench."


def convert_to_ort(onnx_path: Path, out_dir: Path, *, target_platform: str = "arm") -> Path:
    """Convert an ONNX model to ORT format with ONNX Runtime's converter; return the .ort file.

    `target_platform="arm"` lets the converter pick graph optimizations that suit ARM phones. Called
    in-process: the converter imports torch and onnx, which the toolchain has loaded already.
    """
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        convert_onnx_models_to_ort(
            Path(onnx_path),
            output_dir=out_dir,
            optimization_styles=[OptimizationStyle.Fixed],
            target_platform=target_platform,
        )
    except Exception as exc:  # the converter raises whatever ONNX Runtime or protobuf raised
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MeasurementError(
            f"ONNX Runtime could not convert {Path(onnx_path).name} to ORT format: {first}"
        ) from None
    produced = sorted(out_dir.glob("*.ort"))
    if not produced:
        raise MeasurementError(f"ONNX Runtime's converter wrote no .ort file for {Path(onnx_path).name}")
    return produced[0]


def check_mobile_usability(onnx_path: Path) -> str:
    """ONNX Runtime's own verdict on how well the model suits ORT Mobile (NNAPI/CoreML coverage), as text."""
    cmd = [sys.executable, "-m", "onnxruntime.tools.check_onnx_model_mobile_usability", str(onnx_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return (proc.stdout + proc.stderr).strip()


class AdbTransport(Transport):
    def __init__(self, conn: AdbConnection):
        self.conn = conn
        self.description = f"adb {conn.serial or '(only device)'}"

    def adb_argv(self, *args: str) -> list[str]:
        prefix = [self.conn.adb] + (["-s", self.conn.serial] if self.conn.serial else [])
        return [*prefix, *args]

    def shell_argv(self, command: str) -> list[str]:
        return self.adb_argv("shell", command)

    def _adb(self, argv: list[str], *, timeout_s: float, what: str) -> RunResult:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
        except FileNotFoundError:
            raise MeasurementError(
                f"'{self.conn.adb}' not found: install Android platform-tools or set connection.adb in the profile"
            ) from None
        except subprocess.TimeoutExpired:
            raise MeasurementError(
                f"{self.description}: no answer within {timeout_s:.0f} s while {what}"
            ) from None
        err = proc.stderr.strip()
        for needle, hint in (
            ("no devices", "connect the phone and enable USB debugging"),
            ("not found", "check connection.serial against 'adb devices'"),
            ("unauthorized", "accept the debugging prompt on the phone"),
            ("offline", "reconnect the phone"),
            ("more than one device", "set connection.serial in the profile"),
        ):
            if proc.returncode != 0 and err.startswith(("error:", "adb: error:")) and needle in err:
                raise MeasurementError(f"{self.description}: {last_line(err)} while {what}; {hint}")
        return RunResult(proc.returncode, proc.stdout, proc.stderr)

    def shell(self, command: str, *, what: str, timeout_s: float | None = None) -> RunResult:
        return self._adb(
            self.shell_argv(command), timeout_s=timeout_s or self.conn.command_timeout_s, what=what
        )

    def stage(self, files: Mapping[str, Path]) -> Staged:
        template = f"{self.conn.remote_tmp.rstrip('/')}/{WORKDIR_PREFIX}XXXXXX"
        made = self.shell(f"mktemp -d {shlex.quote(template)}", what="creating a working directory")
        workdir = made.stdout.strip()
        if made.returncode != 0 or not workdir.startswith("/") or "\n" in workdir:
            raise MeasurementError(
                f"{self.description}: cannot create a directory under {self.conn.remote_tmp}"
            )
        staged = Staged(workdir=workdir, paths={name: f"{workdir}/{name}" for name in files})
        try:
            for name, local in files.items():
                res = self._adb(
                    self.adb_argv("push", str(Path(local).resolve()), staged.paths[name]),
                    timeout_s=max(self.conn.command_timeout_s, 600), what=f"pushing {name}",
                )  # fmt: skip
                if res.returncode != 0:
                    full = "No space left" in res.stderr + res.stdout
                    hint = "; free space on the phone" if full else ""
                    raise MeasurementError(
                        f"{self.description}: pushing {name} failed ({last_line(res.stderr)}){hint}"
                    )
            script = " && ".join(f"sha256sum < {shlex.quote(staged.paths[n])}" for n in files)
            res = self.shell(script, what="verifying the copies")
            digests = [line.split()[0] for line in res.stdout.splitlines() if line.strip()]
            if res.returncode != 0 or len(digests) != len(files):
                raise MeasurementError(
                    f"{self.description}: cannot compute sha256 on the phone ({last_line(res.stderr)})"
                )
            for (name, local), digest in zip(files.items(), digests):
                if digest.lower() != sha256_file(Path(local)):
                    raise MeasurementError(
                        f"sha256 mismatch for {name} on the phone: the copy is corrupted; nothing was run"
                    )
        except BaseException:
            self.cleanup(staged)
            raise
        return staged

    def run(
        self, argv: Sequence[str], *, timeout_s: float, cwd: str | None = None, what: str = "running"
    ) -> RunResult:
        return self.shell(shell_command(argv, cwd=cwd), what=what, timeout_s=timeout_s)

    def read_text(self, path: str, *, what: str = "reading results") -> str:
        res = self.shell(f"cat {shlex.quote(path)}", what=what)
        if res.returncode != 0:
            raise MeasurementError(f"{self.description}: cannot read {path} ({last_line(res.stderr)})")
        return res.stdout

    def cleanup(self, staged: Staged) -> None:
        if WORKDIR_PREFIX not in Path(staged.workdir).name:
            return
        try:
            self.shell(f"rm -rf {shlex.quote(staged.workdir)}", what="cleaning up")
        except MeasurementError:
            pass

    def check(self) -> str:
        res = self._adb(self.adb_argv("get-state"), timeout_s=30, what="checking the device")
        state = res.stdout.strip()
        if res.returncode != 0 or state != "device":
            raise MeasurementError(f"{self.description}: not ready ({state or last_line(res.stderr)})")
        model = self.shell("getprop ro.product.model", what="checking the device").stdout.strip()
        return f"{self.description} ({model or 'unknown model'})"


def shell_command(
    argv: Sequence[str], *, cwd: str | None = None, env: Mapping[str, str] | None = None
) -> str:
    """One shell string for `adb shell`: `cd DIR && [K=V ...] ARGV...`, every piece quoted."""
    parts = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    parts += [shlex.quote(a) for a in argv]
    cmd = " ".join(parts)
    return f"cd {shlex.quote(cwd)} && {cmd}" if cwd else cmd


class PerfTestRunner(Runner):
    """Push the ORT model and the user's onnxruntime_perf_test to the phone, run it, read its result file."""

    @property
    def spec(self) -> PerfTestSpec:
        return self.profile.runtime

    def _binary(self) -> Path:
        path = self.spec.binary_path
        if not path:
            raise MeasurementError(
                f"target '{self.profile.name}' needs runtime.binary: the path of onnxruntime_perf_test built for the "
                "phone (onnxruntime: ./build.sh --android --android_abi arm64-v8a --build_shared_lib ...)"
            )
        if not Path(path).is_file():
            raise MeasurementError(
                f"runtime.binary {path} does not exist (build onnxruntime_perf_test for Android)"
            )
        return Path(path)

    def check(self) -> TargetCheck:
        try:
            where = self.transport.check()
            binary = self._binary()
        except MeasurementError as exc:
            return TargetCheck(self.profile.name, False, str(exc))
        return TargetCheck(self.profile.name, True, f"{where}; perf test binary {binary}")

    def measure(
        self, model_path: Path, protocol: Protocol, batch: int = 1, *, dims: Mapping[str, int] | None = None
    ) -> Measurement:
        model = self._model(model_path)
        binary = self._binary()
        free = signature.free_dimension_values(signature.model_inputs(model), batch, self._dims(dims))
        env = probe(self.transport, ANDROID_PROBE)
        with tempfile.TemporaryDirectory(prefix="compressor-ort.") as tmp:
            ort_model = convert_to_ort(model, Path(tmp)) if self.spec.convert_to_ort else model
            usability = check_mobile_usability(model)
            files = {"model" + ort_model.suffix: ort_model, "onnxruntime_perf_test": binary}
            files.update({Path(lib).name: Path(lib).expanduser() for lib in self.spec.libraries})
            with self.transport.staged(files) as st:
                result_file = f"{st.workdir}/result.csv"
                argv = build_perf_test_command(
                    st.paths["onnxruntime_perf_test"], st.paths["model" + ort_model.suffix], result_file,
                    protocol=protocol, threads=self._threads(protocol),
                    execution_provider=self.spec.execution_provider, free_dims=free,
                )  # fmt: skip
                command = (
                    shell_command(["chmod", "755", st.paths["onnxruntime_perf_test"]])
                    + " && "
                    + shell_command(argv, cwd=st.workdir, env={"LD_LIBRARY_PATH": st.workdir})
                )
                res = self.transport.shell(
                    command, what="running onnxruntime_perf_test", timeout_s=protocol.timeout_s
                )
                if res.returncode != 0:
                    raise MeasurementError(
                        f"onnxruntime_perf_test on {self.transport.description} ended with "
                        f"{describe_exit(res.returncode)}: {last_line(res.stderr or res.stdout)}"
                    )
                summary = parse_perf_test_output(res.stdout)
                samples = parse_result_file(self.transport.read_text(result_file), drop_first=protocol.warmup)
        if len(samples) < protocol.iterations:
            raise MeasurementError(
                f"onnxruntime_perf_test timed {len(samples)} runs, fewer than the {protocol.iterations} asked"
            )
        env.update(
            {
                "runtime": "onnxruntime_perf_test",
                "execution_provider": self.spec.execution_provider,
                "intra_op_threads": self._threads(protocol),
                "model_format": ort_model.suffix.lstrip("."),
                "transport": self.transport.description,
            }
        )
        return Measurement(
            target=self.profile.name,
            batch=batch,
            stats=summarize(samples),
            environment=env,
            kind="end-to-end",
            samples_ms=samples,
            protocol=protocol.to_dict(),
            extra={"perf_test_summary": summary.to_dict(), "command": command, "mobile_usability": usability},
        )
