"""Target profiles: where a model runs and how it is timed, as validated data (targets/NAME.yaml).

A profile names a connection (this machine, SSH, adb), a runtime (ONNX Runtime through the shipped
device_bench.py, TensorRT's trtexec, or ONNX Runtime's onnxruntime_perf_test for ORT Mobile), precision,
threads, shapes, and the device setup to record or apply. YAML is data only (`yaml.safe_load`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compressor.config_files import validation_line
from compressor.errors import RecipeError

PROFILE_SUFFIXES = (".yaml", ".yml")
# Extra directories of profiles, searched before the shipped ones (os.pathsep-separated).
PATH_ENV = "COMPRESSOR_TARGETS_PATH"


class ProfileError(RecipeError):
    """A target profile is missing or invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _expand(path: str | None) -> str | None:
    return None if path is None else os.path.expandvars(os.path.expanduser(path))


class LocalConnection(_Strict):
    kind: Literal["local"] = "local"


class SshConnection(_Strict):
    kind: Literal["ssh"]
    host: str
    user: str | None = None
    port: int = Field(22, ge=1, le=65535)
    key: str | None = None  # private key file; None: the ssh agent / ~/.ssh defaults
    known_hosts: str = "~/.ssh/known_hosts"
    # Opt-in only: accept and record a host key never seen before (StrictHostKeyChecking=accept-new).
    trust_unknown_host: bool = False
    connect_timeout_s: float = Field(10.0, gt=0)
    retries: int = Field(3, ge=0, le=10)  # extra attempts when the connection cannot be established
    backoff_s: float = Field(1.0, ge=0)  # first retry delay; doubles each attempt
    remote_tmp: str = "/tmp"  # where the fresh per-run directory is created (mktemp -d)

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if not v or v.startswith("-") or any(c.isspace() for c in v):
            raise ValueError("must be a hostname or IP address (no spaces, not starting with '-')")
        return v

    @field_validator("user")
    @classmethod
    def _user(cls, v: str | None) -> str | None:
        if v is not None and (not v or v.startswith("-") or "@" in v or any(c.isspace() for c in v)):
            raise ValueError("must be a login name (no spaces or '@', not starting with '-')")
        return v

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    @property
    def key_path(self) -> str | None:
        return _expand(self.key)

    @property
    def known_hosts_path(self) -> str:
        return _expand(self.known_hosts) or ""


class AdbConnection(_Strict):
    kind: Literal["adb"]
    serial: str | None = None  # None: the only attached device
    adb: str = "adb"  # path to the adb executable
    remote_tmp: str = "/data/local/tmp"
    command_timeout_s: float = Field(60.0, gt=0)


Connection = Annotated[LocalConnection | SshConnection | AdbConnection, Field(discriminator="kind")]


class OnnxRuntimeSpec(_Strict):
    """ONNX Runtime driven by the shipped device_bench.py (Python + onnxruntime on the device)."""

    kind: Literal["onnxruntime"]
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"], min_length=1)
    python: str | None = None  # the device's interpreter; None: python3 remotely, this Python locally

    @field_validator("providers")
    @classmethod
    def _providers(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p.endswith("ExecutionProvider") or "," in p:
                raise ValueError(f"'{p}' is not an ONNX Runtime provider name (e.g. CPUExecutionProvider)")
        return v


class TrtexecSpec(_Strict):
    """TensorRT's trtexec: builds the engine on the device and times it (--exportTimes)."""

    kind: Literal["trtexec"]
    trtexec: str = "/usr/src/tensorrt/bin/trtexec"  # where JetPack installs it
    warm_up_ms: int = Field(500, ge=0)  # trtexec counts warm-up in milliseconds, not iterations
    sparsity: bool = False  # --sparsity=enable: use 2:4 structured-sparse kernels where weights allow
    dla_core: int | None = Field(None, ge=0)  # Jetson AGX/NX deep-learning accelerator; GPU fallback allowed
    export_profile: bool = True  # per-layer times, in a separate run so they do not perturb the timing
    use_spin_wait: bool = True  # spin instead of blocking on CUDA events: more stable latencies
    extra_args: list[str] = Field(default_factory=list)

    @field_validator("extra_args")
    @classmethod
    def _extra(cls, v: list[str]) -> list[str]:
        for a in v:
            if not a.startswith("--"):
                raise ValueError(f"'{a}' is not a trtexec option (they look like --name=value)")
        return v


class PerfTestSpec(_Strict):
    """ONNX Runtime's onnxruntime_perf_test binary (built by the user for the phone), on an ORT-format model."""

    kind: Literal["ort-perf-test"]
    binary: str | None = None  # local path of onnxruntime_perf_test built for the device; required to measure
    libraries: list[str] = Field(default_factory=list)  # e.g. libonnxruntime.so when the binary is not static
    execution_provider: Literal["cpu", "xnnpack", "nnapi", "qnn"] = "cpu"
    convert_to_ort: bool = True  # push an ORT-format (.ort) model, as ORT Mobile builds require

    @property
    def binary_path(self) -> str | None:
        return _expand(self.binary)


Runtime = Annotated[OnnxRuntimeSpec | TrtexecSpec | PerfTestSpec, Field(discriminator="kind")]


class DeviceSetup(_Strict):
    """Power and clock state. Always recorded; changed on the device only when `apply` is true."""

    apply: bool = False
    nvpmodel: int | None = Field(None, ge=0)  # Jetson power mode (nvpmodel -m N); 0 is MAXN on Orin
    jetson_clocks: bool = False  # Jetson: pin clocks at their maximum (jetson_clocks)
    cpu_governor: str | None = None  # e.g. "performance"; Linux cpufreq / Android (root)


class TargetProfile(_Strict):
    """Validated data from targets/NAME.yaml."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    description: str = ""
    connection: Connection = Field(default_factory=LocalConnection)
    runtime: Runtime
    precision: Literal["fp32", "fp16", "int8", "int8-fp16", "best"] = "fp32"
    threads: int | None = Field(None, ge=0)  # intra-op threads; None/0: the runtime's default
    batch: int = Field(1, ge=1)
    shapes: dict[str, int] = Field(default_factory=dict)  # sizes of named dynamic axes, e.g. {sequence: 128}
    device_setup: DeviceSetup = Field(default_factory=DeviceSetup)
    timeout_s: float = Field(900.0, gt=0)

    @field_validator("shapes")
    @classmethod
    def _shapes(cls, v: dict[str, int]) -> dict[str, int]:
        for k, n in v.items():
            if n < 1:
                raise ValueError(f"shapes.{k}={n}: sizes must be >= 1")
        return v

    @model_validator(mode="after")
    def _compatible(self) -> TargetProfile:
        conn, rt = self.connection.kind, self.runtime.kind
        if conn == "adb" and rt != "ort-perf-test":
            raise ValueError(f"connection 'adb' needs runtime kind 'ort-perf-test', not '{rt}'")
        if rt == "ort-perf-test" and conn != "adb":
            raise ValueError(f"runtime 'ort-perf-test' runs on an adb device; connection is '{conn}'")
        if rt == "onnxruntime" and self.precision not in ("fp32", "int8"):
            raise ValueError(
                f"precision '{self.precision}' is a TensorRT build flag; with onnxruntime the model file "
                "decides the precision: use fp32 or int8 (as documentation)"
            )
        return self

    @property
    def kind(self) -> str:
        return f"{self.connection.kind}/{self.runtime.kind}"


def search_path() -> list[Path]:
    """Directories searched for NAME.yaml, first match wins: $COMPRESSOR_TARGETS_PATH, ./targets, shipped."""
    dirs = [Path(p) for p in os.environ.get(PATH_ENV, "").split(os.pathsep) if p]
    dirs.append(Path.cwd() / "targets")
    dirs.append(shipped_dir())
    seen: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [s.resolve() for s in seen]:
            seen.append(d)
    return seen


def shipped_dir() -> Path:
    """targets/ at the repository root (the package is installed editable from the repository)."""
    return Path(__file__).resolve().parents[2] / "targets"


def list_profiles() -> list[str]:
    names: set[str] = set()
    for d in search_path():
        names.update(p.stem for p in d.iterdir() if p.suffix in PROFILE_SUFFIXES)
    return sorted(names)


def _find(name: str) -> Path | None:
    for d in search_path():
        for suffix in PROFILE_SUFFIXES:
            candidate = d / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def parse_profile(data: object, source: str = "<data>") -> TargetProfile:
    if not isinstance(data, dict):
        raise ProfileError(f"target profile {source} must be a YAML mapping, got {type(data).__name__}")
    try:
        return TargetProfile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(f"target profile {source}: {validation_line(exc)}") from None


def load_profile(name_or_path: str) -> TargetProfile:
    """Load targets/<name>.yaml (see `search_path`) or a YAML file given by path.

    Raises:
        ProfileError: unknown name, unreadable file, invalid YAML or invalid profile data.
    """
    as_path = Path(os.path.expanduser(name_or_path))
    if as_path.suffix in PROFILE_SUFFIXES or os.sep in name_or_path:
        if not as_path.is_file():
            raise ProfileError(f"target profile file {as_path} does not exist")
        path = as_path
    else:
        found = _find(name_or_path)
        if found is None:
            known = ", ".join(list_profiles()) or "none"
            raise ProfileError(
                f"unknown target '{name_or_path}'; known targets: {known} (or pass a path to a .yaml profile)"
            )
        path = found
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        detail = str(exc).replace("\n", " ")
        raise ProfileError(f"target profile {path} cannot be read: {detail}") from None
    return parse_profile(data, str(path))
