"""A Linux device over SSH (Jetson, any board), through the system OpenSSH client.

Safety rules, each for a reason:
- Host keys are checked against the profile's known_hosts (StrictHostKeyChecking=yes). An unknown host is
  refused with the server's fingerprint and the command that trusts it; only `trust_unknown_host: true`
  accepts a new key, and a changed key is always refused.
- ssh runs with argument lists (no local shell). The remote side always has a shell, so every remote
  argument goes through shlex.quote.
- Files travel as `ssh HOST 'cat > PATH'`, not scp: scp's remote-path handling differs between its legacy
  protocol (remote shell expands the path) and the SFTP protocol (OpenSSH >= 9.0, literal), so a quoting
  that is right for one is wrong for the other.
- Every copy is verified with sha256 on the device before anything runs; the per-run directory comes from
  `mktemp -d` and is removed in `finally`.
- Only failures to *establish* a connection are retried (with exponential backoff). A connection that drops
  after the command started is an error: the measurement is not repeated behind the user's back.
"""

from __future__ import annotations

import math
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from compressor.artifact import sha256_file
from compressor.errors import MeasurementError
from compressor.targets.base import RunResult, Staged, Transport, last_line
from compressor.targets.profile import SshConnection

SSH_ERROR = 255  # ssh's own exit status for connection and authentication failures
WORKDIR_PREFIX = "compressor-bench."
_RETRYABLE = re.compile(
    r"Connection refused|Connection timed out|Operation timed out|No route to host|Network is unreachable"
    r"|Could not resolve hostname|kex_exchange_identification|ssh_exchange_identification"
    r"|Connection closed by \S+ port \d+"
)


def _ssh_literal(value: str) -> str:
    """An ssh option value that stays literal: ssh expands %-tokens and splits on unquoted spaces."""
    if '"' in value:
        raise MeasurementError(
            f"path {value!r} contains a double quote, which ssh options cannot carry; rename it"
        )
    return '"' + value.replace("%", "%%") + '"'


def remote_shell_command(
    argv: Sequence[str], *, cwd: str | None = None, timeout_s: float | None = None
) -> str:
    """The one string ssh hands to the remote shell: `cd DIR && [timeout N] ARGV...`, all quoted."""
    cmd = " ".join(shlex.quote(a) for a in argv)
    if timeout_s is not None:
        limit = str(int(math.ceil(timeout_s)))
        # coreutils/busybox `timeout` stops a runaway benchmark even if our side of the connection is gone.
        # No `exec`: when the benchmark dies from a signal, timeout re-raises it on itself and ssh would only
        # say 255; a waiting shell turns it into the usual 128+N exit status.
        cmd = f"if command -v timeout >/dev/null 2>&1; then timeout -k 10 {limit} {cmd}; else {cmd}; fi"
    if cwd is not None:
        cmd = f"cd {shlex.quote(cwd)} && {cmd}"
    return cmd


class SshTransport(Transport):
    def __init__(self, conn: SshConnection, *, command_timeout_s: float = 120.0):
        self.conn = conn
        self.command_timeout_s = command_timeout_s
        self.description = f"ssh {conn.destination}:{conn.port}"
        self._host_key_checked = False
        # Test seam: called with the Staged directory after the copy and before verification, so a test
        # can tamper with the device's copy through a real connection and see the check catch it.
        self.after_upload = None

    # -- ssh plumbing -------------------------------------------------------------------------------

    @property
    def host_spec(self) -> str:
        """How known_hosts names this server: `host`, or `[host]:port` off port 22."""
        return self.conn.host if self.conn.port == 22 else f"[{self.conn.host}]:{self.conn.port}"

    def ssh_argv(self, remote_command: str) -> list[str]:
        c = self.conn
        checking = "accept-new" if c.trust_unknown_host else "yes"
        argv = [
            "ssh",
            "-p", str(c.port),
            "-o", "BatchMode=yes",
            "-o", f"StrictHostKeyChecking={checking}",
            "-o", f"UserKnownHostsFile={_ssh_literal(c.known_hosts_path)}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", f"ConnectTimeout={int(math.ceil(c.connect_timeout_s))}",
            "-o", "ServerAliveInterval=5",
            "-o", "ServerAliveCountMax=3",
            "-o", "LogLevel=ERROR",
        ]  # fmt: skip
        if c.key_path:
            argv += ["-o", f"IdentityFile={_ssh_literal(c.key_path)}", "-o", "IdentitiesOnly=yes"]
        return [*argv, "--", c.destination, remote_command]

    def _call(
        self,
        remote_command: str,
        *,
        what: str,
        timeout_s: float | None = None,
        stdin: IO[bytes] | None = None,
    ) -> RunResult:
        self.ensure_host_key()
        timeout = timeout_s or self.command_timeout_s
        attempts = self.conn.retries + 1
        for attempt in range(attempts):
            if stdin is not None:
                stdin.seek(0)
            try:
                proc = subprocess.run(
                    self.ssh_argv(remote_command),
                    stdin=stdin if stdin is not None else subprocess.DEVNULL,
                    capture_output=True,
                    timeout=timeout,
                    check=False,
                )
            except FileNotFoundError:
                raise MeasurementError(
                    "the OpenSSH client 'ssh' is not installed: apt-get install openssh-client"
                ) from None
            except subprocess.TimeoutExpired:
                raise MeasurementError(
                    f"{self.description}: no answer within {timeout:.0f} s while {what}; nothing was recorded "
                    "(raise timeout_s in the profile if the device is just slow)"
                ) from None
            stderr = proc.stderr.decode("utf-8", "replace")
            retry = (
                proc.returncode == SSH_ERROR
                and not proc.stdout
                and _RETRYABLE.search(stderr) is not None
                and attempt + 1 < attempts
            )
            if not retry:
                break
            time.sleep(self.conn.backoff_s * 2**attempt)
        if proc.returncode == SSH_ERROR:
            raise MeasurementError(self._explain(stderr, what, attempts))
        return RunResult(proc.returncode, proc.stdout.decode("utf-8", "replace"), stderr)

    def _explain(self, stderr: str, what: str, attempts: int) -> str:
        c, line = self.conn, last_line(stderr)
        if "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr or "Host key verification failed" in stderr:
            return (
                f"host key of {self.host_spec} does not match {c.known_hosts_path} (possible man-in-the-middle); "
                f"if the device was reinstalled, remove the old key with: ssh-keygen -R '{self.host_spec}' "
                f"-f {shlex.quote(c.known_hosts_path)}"
            )
        if "Permission denied" in stderr:
            key = c.key_path or "your default SSH keys"
            return (
                f"{c.destination} refused the SSH login ({line}): check that the public half of {key} is in "
                "~/.ssh/authorized_keys of that user on the device (connection.user / connection.key)"
            )
        if _RETRYABLE.search(stderr):
            return (
                f"cannot reach {c.host}:{c.port} after {attempts} attempt(s) ({line}): check that the device is "
                "on, the address and port in the profile, and that sshd runs there"
            )
        if not stderr.strip():
            # ssh exits 255 without a word when the remote command itself was killed by a signal.
            return f"the command on {c.destination}:{c.port} was killed by a signal while {what}; no result was recorded"
        return f"connection to {c.destination}:{c.port} dropped while {what} ({line}); no result was recorded"

    # -- host keys ----------------------------------------------------------------------------------

    def ensure_host_key(self) -> None:
        """Refuse an unknown host before connecting, naming its fingerprint and how to trust it."""
        if self._host_key_checked:
            return
        if shutil.which("ssh-keygen") is None or shutil.which("ssh") is None:
            raise MeasurementError("the OpenSSH client is not installed: apt-get install openssh-client")
        c = self.conn
        known = Path(c.known_hosts_path)
        if c.trust_unknown_host:
            known.parent.mkdir(parents=True, exist_ok=True)
        else:
            present = (
                known.is_file()
                and subprocess.run(
                    ["ssh-keygen", "-F", self.host_spec, "-f", str(known)], capture_output=True, check=False
                ).returncode
                == 0
            )
            if not present:
                fingerprints = self.scan_fingerprints()
                raise MeasurementError(
                    f"host key of {self.host_spec} is not in {known}; the server offers {fingerprints}. "
                    f"If that matches the device (on its console: ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub), "
                    f"trust it with: ssh-keyscan -p {c.port} {c.host} >> {shlex.quote(str(known))} "
                    "(or set connection.trust_unknown_host: true)"
                )
        self._host_key_checked = True

    def scan_fingerprints(self) -> str:
        c = self.conn
        timeout = str(int(math.ceil(c.connect_timeout_s)))
        try:
            scan = subprocess.run(
                ["ssh-keyscan", "-T", timeout, "-p", str(c.port), "--", c.host],
                capture_output=True, text=True, timeout=c.connect_timeout_s + 10, check=False,
            )  # fmt: skip
        except (FileNotFoundError, subprocess.TimeoutExpired):
            scan = None
        if scan is None or not scan.stdout.strip():
            raise MeasurementError(
                f"cannot reach {c.host}:{c.port} to read its host key: check that the device is on, the address "
                "and port in the profile, and that sshd runs there"
            )
        with tempfile.NamedTemporaryFile("w", suffix=".keys") as f:
            f.write(scan.stdout)
            f.flush()
            listed = subprocess.run(
                ["ssh-keygen", "-lf", f.name], capture_output=True, text=True, check=False
            )
        prints = []
        for line in listed.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2:
                prints.append(f"{parts[1]} {parts[-1]}")  # "SHA256:... (ED25519)"
        return ", ".join(prints) or "no readable key"

    # -- Transport ----------------------------------------------------------------------------------

    def stage(self, files: Mapping[str, Path]) -> Staged:
        template = f"{self.conn.remote_tmp.rstrip('/')}/{WORKDIR_PREFIX}XXXXXX"
        made = self._call(f"mktemp -d {shlex.quote(template)}", what="creating a working directory")
        workdir = made.stdout.strip()
        if made.returncode != 0 or not workdir.startswith("/") or "\n" in workdir:
            raise MeasurementError(
                f"{self.description}: cannot create a working directory under {self.conn.remote_tmp} "
                f"({last_line(made.stderr)}); set connection.remote_tmp to a writable directory"
            )
        staged = Staged(workdir=workdir, paths={name: f"{workdir}/{name}" for name in files})
        try:
            for name, local in files.items():
                self._upload(Path(local), staged.paths[name])
            if self.after_upload is not None:
                self.after_upload(staged)
            self._verify(files, staged)
        except BaseException:
            self.cleanup(staged)
            raise
        return staged

    def _upload(self, local: Path, remote: str) -> None:
        with open(local, "rb") as f:
            res = self._call(f"cat > {shlex.quote(remote)}", what=f"copying {local.name}", stdin=f)
        if res.returncode != 0:
            if "No space left" in res.stderr:
                raise MeasurementError(
                    f"{self.description}: the device ran out of disk space copying {local.name} "
                    f"({local.stat().st_size / 1e6:.1f} MB) to {self.conn.remote_tmp}; free space there or set "
                    "connection.remote_tmp"
                )
            raise MeasurementError(
                f"{self.description}: copying {local.name} failed ({last_line(res.stderr)})"
            )

    def _verify(self, files: Mapping[str, Path], staged: Staged) -> None:
        names = list(files)
        hasher = "{ command -v sha256sum >/dev/null 2>&1 && sha256sum || shasum -a 256; }"
        script = " && ".join(f"{hasher} < {shlex.quote(staged.paths[n])}" for n in names)
        res = self._call(script, what="verifying the copies")
        digests = [line.split()[0] for line in res.stdout.splitlines() if line.strip()]
        if res.returncode != 0 or len(digests) != len(names):
            raise MeasurementError(
                f"{self.description}: cannot compute sha256 on the device ({last_line(res.stderr)}); "
                "install coreutils (sha256sum)"
            )
        for name, remote_digest in zip(names, digests):
            local_digest = sha256_file(Path(files[name]))
            if remote_digest.lower() != local_digest:
                raise MeasurementError(
                    f"sha256 mismatch for {name} on {self.conn.host}: local {local_digest[:16]}..., device "
                    f"{remote_digest[:16]}...; the copy was corrupted or changed on the device, nothing was run"
                )

    def run(
        self, argv: Sequence[str], *, timeout_s: float, cwd: str | None = None, what: str = "running"
    ) -> RunResult:
        command = remote_shell_command(argv, cwd=cwd, timeout_s=timeout_s)
        # Our own deadline is later than the device-side `timeout`, so the device reports first when it can.
        return self._call(command, what=what, timeout_s=timeout_s + 30)

    def read_text(self, path: str, *, what: str = "reading results") -> str:
        res = self._call(f"cat -- {shlex.quote(path)}", what=what)
        if res.returncode != 0:
            raise MeasurementError(
                f"{self.description}: cannot read {path} while {what} ({last_line(res.stderr)})"
            )
        return res.stdout

    def cleanup(self, staged: Staged) -> None:
        # Only ever delete a directory this transport created (mktemp's prefix), never an arbitrary path.
        if WORKDIR_PREFIX not in Path(staged.workdir).name:
            return
        try:
            self._call(f"rm -rf -- {shlex.quote(staged.workdir)}", what="cleaning up", timeout_s=60)
        except MeasurementError:
            pass  # the device is gone; the original error (if any) is the one worth reporting

    def check(self) -> str:
        res = self._call("uname -srm", what="checking the connection")
        if res.returncode != 0:
            raise MeasurementError(f"{self.description}: 'uname' failed ({last_line(res.stderr)})")
        return f"{self.conn.destination}:{self.conn.port} ({res.stdout.strip()})"
