"""The artifact directory: complete or absent, with a manifest that proves what is in it.

A run writes into `<out>.partial/` (its checkpoints survive a crash there, for `--resume`), then
writes the artifact files into a temporary directory, hashes them into `manifest.json`, verifies, and
renames it to `<out>` in one step. A failed run never leaves something that looks like an artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from compressor.errors import CompressorError

MANIFEST = "manifest.json"
REPORT = "report.json"
LIBRARIES = ["compressor", "torch", "onnx", "onnxruntime", "brevitas", "torch-pruning", "transformers", "numpy"]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def file_entries(root: Path) -> dict[str, dict[str, Any]]:
    entries = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel != MANIFEST:
            entries[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return entries


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise CompressorError(f"output directory '{out}' already exists; pass --overwrite to replace it or choose another --out")
    if out.exists() and not (out / MANIFEST).exists() and any(out.iterdir()):
        raise CompressorError(f"'{out}' exists and is not a compressor artifact; refusing to replace it")


def publish(staging: Path, out: Path, manifest: dict[str, Any], overwrite: bool) -> Path:
    """Hash `staging` into its manifest, verify it, and move it to `out` in one rename."""
    manifest = {**manifest, "files": file_entries(staging), "created": datetime.now(timezone.utc).isoformat()}
    write_json_atomic(staging / MANIFEST, manifest)
    problems = verify(staging)
    if problems:
        raise CompressorError(f"artifact failed verification before publishing: {problems[0]}")
    check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / out.name)
        os.replace(staging, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, out)
    return out


def verify(artifact: Path) -> list[str]:
    """Every file listed in the manifest exists with its sha256; no unlisted files. Returns problems."""
    manifest_path = Path(artifact) / MANIFEST
    if not manifest_path.is_file():
        return [f"{manifest_path} is missing: '{artifact}' is not a complete artifact"]
    manifest = json.loads(manifest_path.read_text())
    problems = []
    listed = manifest.get("files", {})
    for rel, entry in listed.items():
        path = Path(artifact) / rel
        if not path.is_file():
            problems.append(f"{rel} is listed in the manifest but missing")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{rel} does not match its sha256 in the manifest (modified or corrupt)")
    for rel in file_entries(Path(artifact)):
        if rel not in listed:
            problems.append(f"{rel} is not listed in the manifest")
    return problems


def update_files(artifact: Path, updates: dict[str, Any]) -> None:
    """Rewrite JSON/text files of a published artifact (e.g. report.json after `compress bench`) and
    refresh their hashes, so the manifest keeps verifying."""
    artifact = Path(artifact)
    problems = verify(artifact)
    if problems:
        raise CompressorError(f"'{artifact}' does not verify ({problems[0]}); refusing to modify it")
    for rel, content in updates.items():
        path = artifact / rel
        if isinstance(content, str):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(content)
            os.replace(tmp, path)
        else:
            write_json_atomic(path, content)
    manifest = json.loads((artifact / MANIFEST).read_text())
    manifest["files"] = file_entries(artifact)
    write_json_atomic(artifact / MANIFEST, manifest)


def read_report(artifact_or_report: Path) -> dict[str, Any]:
    path = Path(artifact_or_report)
    if path.is_dir():
        path = path / REPORT
    if not path.is_file():
        raise CompressorError(f"report '{path}' does not exist; run `compress run` first")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CompressorError(f"report '{path}' is not valid JSON (truncated?): {exc.msg} at line {exc.lineno}") from None
    if not isinstance(data, dict) or "schema_version" not in data:
        raise CompressorError(f"report '{path}' is not a compressor report (no schema_version)")
    return data
