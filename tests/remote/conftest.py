"""A real OpenSSH server on 127.0.0.1 for the SSH runner tests, started and stopped by the tests.

Throwaway host key and client key in a temporary directory; the server runs in the foreground (-D) as a
child of the test process and is terminated at teardown. If sshd is not installed and cannot be installed
with apt-get (needs root and Debian's registry), the tests are skipped with that reason.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"


def _ensure_sshd() -> str | None:
    """Return None when sshd is usable, else why not."""
    if Path(SSHD).exists():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "sshd is not installed and cannot be installed here (needs root and apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "openssh-server", "openssh-client"],
    ):
        if subprocess.run(cmd, env=env, capture_output=True, check=False).returncode != 0:
            return f"installing openssh-server failed ({' '.join(cmd)})"
    return None if Path(SSHD).exists() else "openssh-server installed but /usr/sbin/sshd is missing"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", str(path)], check=True)


@dataclass
class SshServer:
    port: int
    user: str
    host_key_pub: Path
    client_key: Path
    known_hosts: Path  # already trusts the server
    process: subprocess.Popen
    root: Path

    def session_pids(self) -> list[int]:
        """Per-connection sshd processes (children of the listener), which carry live sessions."""
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.process.pid:
                pids.append(int(stat.parent.name))
        return pids

    def profile(self, tmp_path: Path, **overrides) -> dict:
        """Profile data for this server; remote_tmp is a fresh directory the test can inspect."""
        remote_tmp = tmp_path / "remote"
        remote_tmp.mkdir(exist_ok=True)
        connection = {
            "kind": "ssh",
            "host": "127.0.0.1",
            "port": self.port,
            "user": self.user,
            "key": str(self.client_key),
            "known_hosts": str(self.known_hosts),
            "connect_timeout_s": 5,
            "retries": 1,
            "backoff_s": 0.2,
            "remote_tmp": str(remote_tmp),
        }
        connection.update(overrides.pop("connection", {}))
        data = {
            "name": "localhost-ssh",
            "connection": connection,
            # The "device" is this machine, so its Python is the project's venv Python.
            "runtime": {"kind": "onnxruntime", "python": sys.executable},
            "timeout_s": 300,
        }
        data.update(overrides)
        return data


def bench_processes(needle: str) -> list[int]:
    """Pids of device_bench.py interpreters whose command line mentions `needle` (not ssh, sh or timeout)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = [a.decode("utf-8", "replace") for a in cmdline.read_bytes().split(b"\0") if a]
        except OSError:
            continue
        if (
            not argv
            or Path(argv[0]).name in ("ssh", "sh", "bash", "timeout")
            or int(cmdline.parent.name) == os.getpid()
        ):
            continue
        if any(a.endswith("device_bench.py") for a in argv) and any(needle in a for a in argv):
            pids.append(int(cmdline.parent.name))
    return pids


def wait_for(predicate, timeout_s: float = 60.0, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError("condition not met in time")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory) -> SshServer:
    reason = _ensure_sshd()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("sshd")
    host_key, client_key = root / "host_ed25519", root / "client_ed25519"
    _keygen(host_key)
    _keygen(client_key)
    (root / "authorized_keys").write_text((root / "client_ed25519.pub").read_text())
    port = _free_port()
    config = root / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {host_key}",
                f"AuthorizedKeysFile {root / 'authorized_keys'}",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",
                "PermitRootLogin prohibit-password",
                f"PidFile {root / 'sshd.pid'}",
                "MaxStartups 50",
                "LogLevel ERROR",
            ]
        )
        + "\n"
    )
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege-separation directory sshd insists on
    proc = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=open(root / "sshd.log", "w")
    )
    try:
        wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0 or proc.poll() is not None, 20)
        if proc.poll() is not None:
            pytest.skip(f"sshd did not start: {(root / 'sshd.log').read_text().strip()[-300:]}")
        known_hosts = root / "known_hosts"
        pub = (root / "host_ed25519.pub").read_text().split()
        known_hosts.write_text(f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n")
        yield SshServer(
            port, getpass.getuser(), root / "host_ed25519.pub", client_key, known_hosts, proc, root
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
