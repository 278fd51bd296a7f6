"""Baseline files: what a model measured on a target, meant to be committed and compared against.

A baseline records, per (target, batch), every run's latency samples (each run a fresh process, so the
run-to-run drift of the target is in the file) and the identity of the measurement: target, runtime and
its version, batch, input shapes, measurement kind, threads. The gate refuses to compare a measurement
with a baseline whose identity differs, and says which field differs.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compressor.artifact import sha256_file
from compressor.errors import CompressorError

if TYPE_CHECKING:
    from compressor.bench.gate import LatencyEvidence

SCHEMA = "compressor-baseline/1"
IDENTITY_FIELDS = ("target", "batch", "kind", "runtime", "runtime_version", "threads", "input_shapes")
_FIELD_WORDS = {
    "target": "target",
    "batch": "batch size",
    "kind": "measurement kind",
    "runtime": "runtime",
    "runtime_version": "runtime version",
    "threads": "thread count",
    "input_shapes": "input shape",
}


class BaselineError(CompressorError):
    """A baseline is missing, unreadable, stale or was measured differently (exit 2)."""

    exit_code = 2


def identity_of(measurement: dict[str, Any], target: str, batch: int) -> dict[str, Any]:
    """The facts that make two latency measurements comparable, from a report's measurement entry."""
    env = measurement.get("environment") or {}
    runtime = env.get("runtime")
    inputs = env.get("inputs")
    shapes = {name: list(v.get("shape", [])) for name, v in inputs.items()} if isinstance(inputs, dict) else None
    return {
        "target": measurement.get("target", target),
        "batch": int(measurement.get("batch", batch)),
        "kind": measurement.get("kind"),
        "runtime": runtime,
        "runtime_version": env.get("runtime_version") or (env.get(f"{runtime}_version") if runtime else None),
        "threads": env.get("intra_op_threads"),
        "input_shapes": shapes,
    }


def mismatch(recorded: dict[str, Any], current: dict[str, Any]) -> str | None:
    """One line naming the first identity field that differs, or None when they match."""
    for name in IDENTITY_FIELDS:
        if recorded.get(name) != current.get(name):
            return (
                f"{_FIELD_WORDS[name]} differs (baseline: {_show(recorded.get(name))}, "
                f"this measurement: {_show(current.get(name))})"
            )
    return None


def _show(value: Any) -> str:
    return "not recorded" if value is None else json.dumps(value) if isinstance(value, dict | list) else str(value)


@dataclass
class Baseline:
    path: Path
    data: dict[str, Any]

    def keys(self) -> list[str]:
        return sorted(self.data["entries"])

    def _entry(self, target: str, batch: int) -> dict[str, Any] | None:
        return self.data["entries"].get(f"{target}/batch_{batch}")

    def identity_for(self, target: str, batch: int) -> dict[str, Any] | None:
        entry = self._entry(target, batch)
        return None if entry is None else entry["identity"]

    def runs_for(self, target: str, batch: int) -> list[np.ndarray]:
        entry = self._entry(target, batch)
        return [] if entry is None else [np.asarray(run, dtype=np.float64) for run in entry["runs_ms"]]

    def model_file(self) -> Path | None:
        """The baseline's own model (copied beside it by --update-baseline), checked against its sha256.

        None when it is not there (e.g. not committed): relative latency is then judged on the stored runs.
        """
        recorded = self.data.get("model") or {}
        if not recorded.get("file"):
            return None
        path = self.path.parent / recorded["file"]
        if not path.is_file():
            return None
        if recorded.get("sha256") and sha256_file(path) != recorded["sha256"]:
            raise BaselineError(
                f"baseline model {path} does not match the sha256 in {self.path} (stale copy); re-create both with "
                "--update-baseline"
            )
        return path

    def metric(self, name: str) -> float | None:
        value = (self.data.get("metrics") or {}).get(name)
        return None if value is None else float(value)


def load_baseline(path: Path) -> Baseline:
    """Read and check a baseline file; every problem is one BaselineError line (exit 2)."""
    path = Path(path)
    if not path.is_file():
        raise BaselineError(
            f"baseline '{path}' does not exist; create it with `compress gate ARTIFACT --budgets FILE --update-baseline {path}`"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BaselineError(f"baseline '{path}' is not valid JSON (truncated?): {exc.msg} at line {exc.lineno}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else None
        raise BaselineError(
            f"baseline '{path}' has schema {found!r}, expected '{SCHEMA}' (stale or not a baseline); re-create it "
            "with --update-baseline"
        )
    entries = data.get("entries")
    if not isinstance(entries, dict):
        raise BaselineError(f"baseline '{path}' has no 'entries' mapping; re-create it with --update-baseline")
    for key, entry in entries.items():
        runs = entry.get("runs_ms") if isinstance(entry, dict) else None
        ok = (
            isinstance(runs, list)
            and runs
            and all(isinstance(r, list) and r and all(isinstance(s, (int, float)) and s >= 0 for s in r) for r in runs)
            and isinstance(entry.get("identity"), dict)
        )
        if not ok:
            raise BaselineError(f"baseline '{path}' entry '{key}' has no valid runs_ms/identity; re-create it")
    return Baseline(path, data)


def write_baseline(
    path: Path,
    evidence: Iterable[LatencyEvidence],
    *,
    metrics: dict[str, Any] | None = None,
    model: Path | None = None,
    name: str | None = None,
) -> Path:
    """Write a baseline (JSON, samples rounded to 1 ns) atomically; returns its path.

    `model` is copied beside it as `<name>.onnx`, so that later gates can measure both models side by side.
    """
    path = Path(path)
    if path.suffix.lower() != ".json":
        raise BaselineError(f"baseline path '{path}' must end in .json (its model is written beside it as .onnx)")
    entries = {}
    for ev in evidence:
        pooled = np.concatenate(ev.runs)
        entries[ev.key] = {
            "identity": identity_of(ev.measurement, ev.target, ev.batch),
            "protocol": ev.measurement.get("protocol") or {},
            "environment": {
                k: (ev.measurement.get("environment") or {}).get(k)
                for k in ("hostname", "cpu_model", "os", "transport", "gpu", "device_model")
            },
            "summary": {
                "runs": len(ev.runs),
                "samples": int(pooled.size),
                "p50_ms": float(np.percentile(pooled, 50)),
                "p90_ms": float(np.percentile(pooled, 90)),
                "run_p50_ms": [float(np.percentile(r, 50)) for r in ev.runs],
            },
            "runs_ms": [[round(float(s), 6) for s in run] for run in ev.runs],
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    model_entry = None
    if model is not None:
        copy = path.with_suffix(".onnx")
        shutil.copyfile(model, copy.with_name(copy.name + ".tmp"))
        os.replace(copy.with_name(copy.name + ".tmp"), copy)
        model_entry = {"file": copy.name, "sha256": sha256_file(copy)}
    data = {
        "schema": SCHEMA,
        "name": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model_entry,
        "metrics": {k: v for k, v in (metrics or {}).items() if v is not None},
        "entries": entries,
    }
    # Readable and diffable: fields indented, each run's samples on one line.
    runs = {key: entry.pop("runs_ms") for key, entry in entries.items()}
    for key in entries:
        entries[key]["runs_ms"] = f"@@RUNS {key}@@"
    text = json.dumps(data, indent=1)
    for key, rows in runs.items():
        block = "[\n   " + ",\n   ".join(json.dumps(r, separators=(",", ":")) for r in rows) + "\n  ]"
        text = text.replace(json.dumps(f"@@RUNS {key}@@"), block)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
    return path

