"""The SSH runner against a real OpenSSH server on 127.0.0.1 (see conftest.py): success and every fault."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.bench.measure import Protocol
from compressor.errors import MeasurementError
from compressor.targets.profile import parse_profile
from compressor.targets.runner import check_target, get_runner

from .conftest import bench_processes, wait_for

pytestmark = pytest.mark.remote

FAST = Protocol(warmup=2, iterations=20, threads=1)


def _model(path: Path, width: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((width, width)).astype(np.float32), "w"
    )
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _runner(sshd, tmp_path, **overrides):
    return get_runner(parse_profile(sshd.profile(tmp_path, **overrides)))


def _left_on_device(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "remote").iterdir())


def test_full_remote_benchmark_matches_the_local_runner(sshd, tmp_path):
    model = _model(tmp_path / "m.onnx")
    local = get_runner(parse_profile({"name": "here", "runtime": {"kind": "onnxruntime"}}))

    remote = _runner(sshd, tmp_path).measure(model, FAST, batch=2)
    here = local.measure(model, FAST, batch=2)

    assert remote.stats.n == len(remote.samples_ms) == 20
    assert remote.kind == "end-to-end"
    assert remote.environment["transport"] == f"ssh {sshd.user}@127.0.0.1:{sshd.port}"
    assert (
        remote.environment["inputs"]
        == here.environment["inputs"]
        == {"x": {"shape": [2, 32], "dtype": "float32"}}
    )
    assert remote.environment["onnxruntime_version"] == here.environment["onnxruntime_version"]
    assert remote.environment["model_sha256"] == here.environment["model_sha256"]
    assert remote.stats.median_ci_low <= remote.stats.p50 <= remote.stats.median_ci_high
    assert _left_on_device(tmp_path) == []  # the per-run directory was removed


def test_targets_check_reaches_the_device(sshd, tmp_path):
    check = check_target(parse_profile(sshd.profile(tmp_path)))
    assert check.ok, check.detail
    assert f"127.0.0.1:{sshd.port}" in check.detail and "onnxruntime" in check.detail


def test_unknown_host_key_is_refused_with_its_fingerprint(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    runner = _runner(sshd, tmp_path, connection={"known_hosts": str(empty)})
    fingerprint = subprocess.run(
        ["ssh-keygen", "-lf", str(sshd.host_key_pub)], capture_output=True, text=True, check=True
    ).stdout.split()[1]

    with pytest.raises(MeasurementError) as info:
        runner.measure(_model(tmp_path / "m.onnx"), FAST)

    message = str(info.value)
    assert f"host key of [127.0.0.1]:{sshd.port} is not in {empty}" in message
    assert fingerprint in message and "(ED25519)" in message
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {empty}" in message
    assert "trust_unknown_host: true" in message and "\n" not in message
    assert empty.read_text() == ""  # nothing was trusted behind the user's back
    assert _left_on_device(tmp_path) == []


def test_trust_unknown_host_is_an_explicit_opt_in(sshd, tmp_path):
    fresh = tmp_path / "new dir" / "known_hosts"
    profile = parse_profile(
        sshd.profile(tmp_path, connection={"known_hosts": str(fresh), "trust_unknown_host": True})
    )

    check = check_target(profile)

    assert check.ok, check.detail
    assert (
        subprocess.run(
            ["ssh-keygen", "-F", f"[127.0.0.1]:{sshd.port}", "-f", str(fresh)], capture_output=True
        ).returncode
        == 0
    )


def test_changed_host_key_is_refused_even_with_trust_unknown_host(sshd, tmp_path):
    impostor = tmp_path / "impostor"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(impostor)], check=True)
    pub = (tmp_path / "impostor.pub").read_text().split()
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {pub[0]} {pub[1]}\n")
    runner = _runner(sshd, tmp_path, connection={"known_hosts": str(known), "trust_unknown_host": True})

    with pytest.raises(MeasurementError, match=r"does not match .*possible man-in-the-middle.*ssh-keygen -R"):
        runner.measure(_model(tmp_path / "m.onnx"), FAST)


def test_wrong_key_is_refused_clearly(sshd, tmp_path):
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    runner = _runner(sshd, tmp_path, connection={"key": str(stranger)})

    with pytest.raises(
        MeasurementError, match=r"refused the SSH login \(.*Permission denied.*authorized_keys"
    ):
        runner.measure(_model(tmp_path / "m.onnx"), FAST)


def test_unreachable_port_is_retried_with_backoff_then_reported(sshd, tmp_path):
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    runner = _runner(
        sshd,
        tmp_path,
        connection={"port": closed, "trust_unknown_host": True, "retries": 2, "backoff_s": 0.3},
    )

    start = time.monotonic()
    with pytest.raises(
        MeasurementError,
        match=rf"cannot reach 127.0.0.1:{closed} after 3 attempt\(s\) \(.*Connection refused",
    ):
        runner.measure(_model(tmp_path / "m.onnx"), FAST)
    assert time.monotonic() - start >= 0.3 + 0.6  # two waits: 0.3 s, then 0.6 s


def _measure_in_background(runner, model, protocol):
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = runner.measure(model, protocol)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def _kill_benchmarks(marker: str) -> None:
    for pid in bench_processes(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_connection_killed_mid_run_is_a_clean_error(sshd, tmp_path):
    runner = _runner(sshd, tmp_path)
    marker = str(tmp_path / "remote")
    thread, outcome = _measure_in_background(
        runner, _model(tmp_path / "m.onnx"), Protocol(warmup=0, iterations=1, min_seconds=120)
    )
    try:
        wait_for(lambda: bench_processes(marker))
        time.sleep(0.5)  # inside the timing loop now
        for pid in sshd.session_pids():  # drop every live SSH session, as a lost network would
            os.kill(pid, signal.SIGKILL)
        thread.join(60)
    finally:
        _kill_benchmarks(marker)  # the orphaned benchmark this test started on the "device"

    assert not thread.is_alive()
    assert "result" not in outcome
    error = outcome["error"]
    assert isinstance(error, MeasurementError)
    assert "dropped while benchmarking" in str(error) and "no result was recorded" in str(error)
    wait_for(lambda: _left_on_device(tmp_path) == [], 30)  # cleanup ran over a new connection


def test_benchmark_killed_midway_is_a_clean_error(sshd, tmp_path):
    runner = _runner(sshd, tmp_path)
    marker = str(tmp_path / "remote")
    thread, outcome = _measure_in_background(
        runner, _model(tmp_path / "m.onnx"), Protocol(warmup=0, iterations=1, min_seconds=120)
    )
    try:
        pids = wait_for(lambda: bench_processes(marker))
        time.sleep(0.5)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)  # e.g. the out-of-memory killer on the device
        thread.join(60)
    finally:
        _kill_benchmarks(marker)

    assert "result" not in outcome
    assert isinstance(outcome["error"], MeasurementError)
    assert "ended with exit 137: SIGKILL" in str(outcome["error"])
    assert _left_on_device(tmp_path) == []


def test_sha256_mismatch_on_the_device_is_detected_and_nothing_runs(sshd, tmp_path):
    runner = _runner(sshd, tmp_path)
    transport = runner.transport

    def tamper(staged):
        # Corrupt the device's copy through a real SSH connection, between copy and verification.
        cmd = f"printf X >> {shlex.quote(staged.paths['model.onnx'])}"
        subprocess.run(transport.ssh_argv(cmd), check=True, capture_output=True)

    transport.after_upload = tamper
    with pytest.raises(
        MeasurementError,
        match=r"sha256 mismatch for model.onnx on 127.0.0.1: local [0-9a-f]{16}\.\.\., device",
    ):
        runner.measure(_model(tmp_path / "m.onnx"), FAST)
    assert bench_processes(str(tmp_path / "remote")) == []
    assert _left_on_device(tmp_path) == []


def test_shell_metacharacters_in_paths_are_harmless(sshd, tmp_path):
    nasty = "we ird $(touch PWNED1); `touch PWNED2` 'q' \"dq\" & | ; %h %%"
    model = _model(tmp_path / nasty / "m $(touch PWNED3);x'y.onnx")
    remote_tmp = tmp_path / "remote" / "tmp $(touch PWNED4); 'z' %p"
    remote_tmp.mkdir(parents=True)
    keys = tmp_path / "keys %d dir with space"
    keys.mkdir()
    (keys / "id key").write_bytes(sshd.client_key.read_bytes())
    (keys / "id key").chmod(0o600)
    (keys / "known hosts").write_text(sshd.known_hosts.read_text())
    runner = _runner(
        sshd,
        tmp_path,
        connection={
            "remote_tmp": str(remote_tmp),
            "key": str(keys / "id key"),
            "known_hosts": str(keys / "known hosts"),
        },
    )

    m = runner.measure(model, FAST)

    assert m.stats.n == 20
    assert list(remote_tmp.iterdir()) == []
    for where in (tmp_path, Path.home(), Path.cwd(), Path("/tmp")):
        assert not [p for p in where.glob("PWNED*")], where
    assert not list(tmp_path.rglob("PWNED*"))


def test_device_without_python_or_onnxruntime_says_what_to_install(sshd, tmp_path):
    model = _model(tmp_path / "m.onnx")
    nopython = _runner(sshd, tmp_path, runtime={"kind": "onnxruntime", "python": "/opt/none/python3"})
    bare = tmp_path / "bare-python"
    bare.write_text(f'#!/bin/sh\nexec {os.path.realpath(__import__("sys").executable)} -S -I "$@"\n')
    bare.chmod(0o755)
    noort = _runner(sshd, tmp_path, runtime={"kind": "onnxruntime", "python": str(bare)})

    with pytest.raises(MeasurementError, match=r"/opt/none/python3 not found on ssh .*install Python 3"):
        nopython.measure(model, FAST)
    with pytest.raises(
        MeasurementError, match=r"lacks numpy: run '.*bare-python -m pip install numpy onnxruntime'"
    ):
        noort.measure(model, FAST)
    assert _left_on_device(tmp_path) == []  # refused before copying anything


def test_trtexec_missing_on_the_device_says_what_to_install(sshd, tmp_path):
    runner = _runner(sshd, tmp_path, runtime={"kind": "trtexec"}, precision="int8")

    with pytest.raises(
        MeasurementError,
        match=r"trtexec not found at /usr/src/tensorrt/bin/trtexec on ssh .*install TensorRT",
    ):
        runner.measure(_model(tmp_path / "m.onnx"), FAST)


def test_disk_full_on_the_device_is_reported(sshd, tmp_path):
    small = tmp_path / "remote" / "small disk"
    small.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        runner = _runner(sshd, tmp_path, connection={"remote_tmp": str(small)})
        with pytest.raises(MeasurementError, match=r"ran out of disk space copying big.onnx \(0.3 MB\)"):
            runner.measure(_model(tmp_path / "big.onnx", width=256), FAST)  # 256 KB of weights
        assert list(small.iterdir()) == []  # the partial copy was removed
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_paired_measurement_runs_both_models_in_one_remote_process(sshd, tmp_path):
    first = _model(tmp_path / "a.onnx")
    second = tmp_path / "b.onnx"
    second.write_bytes(first.read_bytes())  # an identical copy: same shapes, its own session on the device

    mine, theirs = _runner(sshd, tmp_path).measure_pair(first, second, FAST, batch=2)

    assert mine.stats.n == theirs.stats.n == 20
    assert mine.environment["transport"] == theirs.environment["transport"] == f"ssh {sshd.user}@127.0.0.1:{sshd.port}"
    assert theirs.environment["inputs"] == mine.environment["inputs"] == {"x": {"shape": [2, 32], "dtype": "float32"}}
    assert _left_on_device(tmp_path) == []
