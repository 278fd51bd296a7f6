import json

import pytest

from compressor.artifact import publish, read_report, update_files, verify
from compressor.errors import CompressorError


def staged(tmp_path, name="stage"):
    staging = tmp_path / name
    staging.mkdir()
    (staging / "model.onnx").write_bytes(b"\x08\x01model")
    (staging / "report.json").write_text(json.dumps({"schema_version": 1}))
    return staging


def test_publish_then_verify_then_detect_tampering(tmp_path):
    out = publish(staged(tmp_path), tmp_path / "out", {"name": "t"}, overwrite=False)
    assert verify(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["model.onnx"]["bytes"] == 7
    (out / "model.onnx").write_bytes(b"tampered")
    (out / "extra.bin").write_bytes(b"x")
    problems = verify(out)
    assert any("model.onnx does not match its sha256" in p for p in problems)
    assert any("extra.bin is not listed" in p for p in problems)


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    out = publish(staged(tmp_path, "a"), tmp_path / "out", {}, overwrite=False)
    with pytest.raises(CompressorError, match="already exists; pass --overwrite"):
        publish(staged(tmp_path, "b"), out, {}, overwrite=False)
    publish(staged(tmp_path, "c"), out, {"name": "second"}, overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["name"] == "second"


def test_update_files_keeps_manifest_valid(tmp_path):
    out = publish(staged(tmp_path), tmp_path / "out", {}, overwrite=False)
    update_files(out, {"report.json": {"schema_version": 1, "latency": {"x": 1}}})
    assert verify(out) == []
    assert read_report(out)["latency"] == {"x": 1}


def test_read_report_rejects_truncated_json(tmp_path):
    (tmp_path / "report.json").write_text('{"schema_version": 1, "accur')
    with pytest.raises(CompressorError, match="not valid JSON"):
        read_report(tmp_path / "report.json")
