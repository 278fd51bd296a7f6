"""Time an ONNX model with ONNX Runtime on this machine and print one JSON line. Runs on the device.

Self-contained on purpose: it is copied to Jetsons and Linux boards over SSH and run there with their
own python3, so it imports only the standard library, numpy and onnxruntime, and stays compatible with
Python 3.8 (JetPack 5). The local runner runs this same file in a subprocess, so local and remote
numbers come from identical code.

Output: one line `@@COMPRESSOR-BENCH@@ {json}` on stdout, either a result (samples_ms, environment, ...)
or an error ({"error": ..., "error_kind": ...}) with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import time

MARKER = "@@COMPRESSOR-BENCH@@"
SCHEMA = 1
EXIT_MISSING = 3
EXIT_BAD_INPUT = 4


class BenchError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _emit(obj: dict) -> None:
    sys.stdout.write(MARKER + " " + json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip().replace("\x00", "")
    except OSError:
        return None


def _command(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.decode("utf-8", "replace").strip() or None


def _cpu_model() -> str | None:
    text = _read("/proc/cpuinfo") or ""
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        for line in text.splitlines():
            if line.split(":")[0].strip() == key:
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _devfreq() -> dict:
    """Current/min/max clocks of devfreq devices (the Jetson GPU, EMC, ...), in Hz."""
    found = {}
    for d in sorted(glob.glob("/sys/class/devfreq/*")):
        cur = _read(os.path.join(d, "cur_freq"))
        if cur is not None:
            found[os.path.basename(d)] = {
                "cur": cur,
                "min": _read(os.path.join(d, "min_freq")),
                "max": _read(os.path.join(d, "max_freq")),
                "governor": _read(os.path.join(d, "governor")),
            }
    return found


def environment() -> dict:
    """What decides the numbers: hardware, OS, clocks, governor, load. Missing facts are null."""
    cpu = "/sys/devices/system/cpu/cpu0/cpufreq/"
    env = {
        "hostname": platform.node(),
        "os": platform.platform(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_governor": _read(cpu + "scaling_governor"),
        "cpu_freq_khz": {"cur": _read(cpu + "scaling_cur_freq"), "max": _read(cpu + "scaling_max_freq")},
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "device_model": _read("/proc/device-tree/model"),
        # L4T release line, e.g. "# R36 (release), REVISION: 4.3" (JetPack 6.2).
        "l4t_release": ((_read("/etc/nv_tegra_release") or "").splitlines() or [None])[0],
        "nvpmodel": _command(["nvpmodel", "-q"]),
        "devfreq": _devfreq() or None,
    }
    return env


def _resolve_shape(name: str, shape: list, batch: int, dims: dict) -> list[int]:
    resolved = []
    for axis, dim in enumerate(shape):
        if isinstance(dim, int) and dim > 0:
            resolved.append(dim)
        elif isinstance(dim, str) and dim in dims:
            resolved.append(dims[dim])
        elif axis == 0:
            resolved.append(batch)
        else:
            raise BenchError(
                "bad-input",
                f"input '{name}' has dynamic axis {axis} ('{dim}'): give its size with "
                f"--dim {dim if isinstance(dim, str) and dim else 'NAME'}=N (profile: shapes)",
            )
    return resolved


def make_inputs(session, batch: int, dims: dict, seed: int) -> dict:
    """Random inputs from the model's signature; integer inputs get small valid ids (0..99)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    floats = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
    ints = {
        "tensor(int64)": np.int64,
        "tensor(int32)": np.int32,
        "tensor(int8)": np.int8,
        "tensor(uint8)": np.uint8,
        "tensor(int16)": np.int16,
        "tensor(uint16)": np.uint16,
    }
    feeds = {}
    for inp in session.get_inputs():
        shape = _resolve_shape(inp.name, list(inp.shape), batch, dims)
        lname = inp.name.lower()
        if inp.type in floats:
            feeds[inp.name] = rng.standard_normal(shape).astype(floats[inp.type])
        elif inp.type in ints:
            # Masks are all ones and segment ids zeros, as a real batch would be; other ids stay far below
            # any vocabulary size so that Gather never indexes out of range.
            if "mask" in lname:
                value = np.ones(shape)
            elif "token_type" in lname or "segment" in lname:
                value = np.zeros(shape)
            else:
                value = rng.integers(0, 100, size=shape)
            feeds[inp.name] = value.astype(ints[inp.type])
        elif inp.type == "tensor(bool)":
            feeds[inp.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise BenchError(
                "bad-input", f"input '{inp.name}' has type {inp.type}, which the benchmark cannot generate"
            )
    return feeds


def _import_runtime():
    try:
        import numpy  # noqa: F401
    except ImportError:
        py = sys.executable
        raise BenchError(
            "missing-numpy", f"numpy is not installed for {py}: run '{py} -m pip install numpy'"
        ) from None
    try:
        import onnxruntime
    except ImportError:
        raise BenchError(
            "missing-onnxruntime",
            f"onnxruntime is not installed for {sys.executable}: run '{sys.executable} -m pip install onnxruntime' "
            "(Jetson with CUDA: the onnxruntime-gpu wheel for your JetPack from NVIDIA's Jetson pip index)",
        ) from None
    return onnxruntime


def run(args: argparse.Namespace) -> dict:
    ort = _import_runtime()
    available = ort.get_available_providers()
    missing = [p for p in args.providers if p not in available]
    if missing:
        raise BenchError(
            "missing-provider",
            f"onnxruntime {ort.__version__} here lacks {', '.join(missing)} (available: {', '.join(available)}); "
            "install the onnxruntime build that has it",
        )
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle intra-op workers keep spinning after run() returns and steal cores from whatever runs next.
    so.add_session_config_entry("session.force_spinning_stop", "1")
    dims = dict(args.dim)
    timed = [{"path": args.model, "sessions": [], "load_s": 0.0, "samples_ns": []}]
    if args.compare:
        timed.append({"path": args.compare, "sessions": [], "load_s": 0.0, "samples_ns": []})
    # With --compare, each model gets --sessions sessions, loaded in A B B A ... order: where a session's
    # memory lands shifts all of its samples by a few percent, and which model loads first must not decide
    # the ratio.
    for copy in range(args.sessions if args.compare else 1):
        for model in timed if copy % 2 == 0 else timed[::-1]:
            t0 = time.perf_counter()
            model["sessions"].append(_load(ort, so, model["path"], args))
            model["load_s"] += time.perf_counter() - t0
    for model in timed:
        model["feeds"] = make_inputs(model["sessions"][0], args.batch, dims, args.seed)

    for _ in range(args.warmup):
        for model in timed:
            for session in model["sessions"]:
                session.run(None, model["feeds"])
    clock = time.perf_counter_ns
    # With --compare, the two models run in alternating blocks of --block iterations, and the order flips
    # every block (A B, B A, ...): whatever the machine does meanwhile (load, clocks) hits both alike, so
    # their ratio is far steadier than that of two separate processes (measured: benchmarks/gate_noise.md).
    block = args.block if args.compare else 1
    first = timed[0]["samples_ns"]
    start = clock()
    min_ns = int(args.min_seconds * 1e9)
    rounds = 0
    while len(first) < args.max_iterations and (len(first) < args.iterations or clock() - start < min_ns):
        for model in timed if rounds % 2 == 0 else timed[::-1]:
            sessions, feeds, out = model["sessions"], model["feeds"], model["samples_ns"]
            session = sessions[(rounds // 2) % len(sessions)]
            for _ in range(block):
                t = clock()
                session.run(None, feeds)
                out.append(clock() - t)
        rounds += 1

    env = environment()
    env.update(
        {
            "runtime": "onnxruntime",
            "onnxruntime_version": ort.__version__,
            "available_providers": available,
            "session_providers": timed[0]["sessions"][0].get_providers(),
            "intra_op_threads": args.threads,
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "numpy_version": __import__("numpy").__version__,
        }
    )
    result = {
        "schema": SCHEMA,
        "samples_ms": [t / 1e6 for t in first],
        "warmup": args.warmup,
        "session_load_s": timed[0]["load_s"] / len(timed[0]["sessions"]),
        "inputs": _shapes(timed[0]["feeds"]),
        "environment": env,
        # run() with host numpy arrays: includes input/output copies, so it is end-to-end, not compute-only.
        "kind": "end-to-end",
    }
    if args.compare:
        other = timed[1]
        result["compare"] = {
            "samples_ms": [t / 1e6 for t in other["samples_ns"]],
            "session_load_s": other["load_s"] / len(other["sessions"]),
            "inputs": _shapes(other["feeds"]),
            "block": block,
            "sessions": len(other["sessions"]),
        }
    return result


def _load(ort, so, path: str, args: argparse.Namespace):
    try:
        return ort.InferenceSession(path, sess_options=so, providers=args.providers)
    except Exception as exc:  # ORT raises its own exception types for unreadable or invalid models.
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BenchError("bad-model", f"onnxruntime cannot load {path}: {first}") from None


def _shapes(feeds: dict) -> dict:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in feeds.items()}


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _dim(text: str):
    name, sep, value = text.partition("=")
    if not sep or not name or not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected NAME=POSITIVE_INT, got {text!r}")
    return name, int(value)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--min-seconds", type=float, default=0.0)
    p.add_argument("--max-iterations", type=int, default=100000)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument(
        "--providers", type=lambda s: [x for x in s.split(",") if x], default=["CPUExecutionProvider"]
    )
    p.add_argument("--dim", type=_dim, action="append", default=[])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", help="a second model, timed in the same process in alternating blocks")
    p.add_argument("--block", type=_positive, default=10, help="iterations per block with --compare")
    p.add_argument("--sessions", type=_positive, default=2, help="sessions per model with --compare")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        for path in filter(None, (args.model, args.compare)):
            if not os.path.isfile(path):
                raise BenchError("bad-input", f"model file {path} does not exist")
        _emit(run(args))
        return 0
    except BenchError as exc:
        _emit({"schema": SCHEMA, "error": str(exc), "error_kind": exc.kind})
        return EXIT_MISSING if exc.kind.startswith("missing") else EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
