"""`compress run --nproc-per-node 2`: 2-process gloo DistributedDataParallel on CPU, launched by torchrun.

Why 1 and 2 processes can be compared at all: `data.batch_size` is the global batch and every step sees the
same samples with any number of processes (rank r takes the r-th half of each global batch), so DDP's
averaged gradient is the single-process gradient. What still differs:
- float summation order (gradients are summed per half, then averaged): ~1e-7 relative per step;
- BatchNorm, which normalises each rank's half-batch with its own statistics (DDP does not sync them; the
  running statistics are rank 0's). A BatchNorm-free student shows the first effect alone: its weights after
  training agree to 1e-4 (with Hinton KD, and with PS-KD, whose per-sample predictions the ranks pool every
  epoch). The digits CNN student shows both: held-out accuracy within 2 points (9 of 450 samples) and epoch
  losses within 5%, after being killed mid-run with 2 processes and resumed with 1.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support import EXAMPLE, run_cli
from torch import nn

pytestmark = pytest.mark.slow  # several CLI runs of ~15-25 s each on 2 shared cores

HERE = Path(__file__).resolve().parent
BASE = [
    "--set", "teacher={model: digits_cnn, kwargs: {widths: [16, 16]}, pretrain: {epochs: 2}}",
    "--set", "targets=[]", "--set", "budgets=null", "--set", "export.parity.max_abs=0.001", "--no-progress",
]  # fmt: skip


class MLP(nn.Module):
    """A student without BatchNorm: with it, 1 and 2 processes differ only by float summation order."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)


def mlp() -> nn.Module:
    return MLP()


@pytest.fixture
def env(cli_env):
    # The student entry point `test_ddp:mlp` is this module (which imports `support` from tests/).
    return {**cli_env, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent), cli_env.get("PYTHONPATH", "")])}


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def epoch_losses(stderr: str) -> list[float]:
    return [float(line.split("loss=")[1].split()[0]) for line in stderr.splitlines() if "[0-distill] epoch" in line]


PSKD = ["--set", "teacher=null", "--set", "distillation.pskd=true", "--set", "distillation.losses=[{name: soft_ce}]"]


@pytest.mark.parametrize("strategy", ["hinton", "pskd"])
def test_two_processes_train_the_same_bn_free_student_as_one(env, tmp_path, strategy):
    args = [*BASE, "--set", "student.model=test_ddp:mlp", "--set", "stages=[{kind: distill, epochs: 3}]"]
    args += PSKD if strategy == "pskd" else []
    one = run_cli(["run", EXAMPLE, "--out", tmp_path / "one", *args], env, check_rc=0)
    two = run_cli(["run", EXAMPLE, "--out", tmp_path / "two", *args, "--nproc-per-node", "2"], env, check_rc=0)
    assert len(epoch_losses(two.stderr)) == 3  # rank 0 alone logs
    a = torch.load(tmp_path / "one" / "checkpoints" / "0-distill.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "checkpoints" / "0-distill.pt", weights_only=True)
    assert a["world_size"] == 1 and b["world_size"] == 2
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, atol=1e-4, rtol=1e-4, msg=name)
    if strategy == "pskd":  # each rank predicted its share of the samples; the ranks pooled them each epoch
        for key in ("pskd_predictions", "pskd_seen"):
            torch.testing.assert_close(b["extra"]["_extra_state"][key], a["extra"]["_extra_state"][key], atol=1e-4, rtol=1e-4)
        assert bool(a["extra"]["_extra_state"]["pskd_seen"].all())
    for x, y in zip(epoch_losses(one.stderr), epoch_losses(two.stderr)):
        assert abs(x - y) <= 1e-4 * max(1.0, abs(x))
    report_one = json.loads((tmp_path / "one" / "report.json").read_text())["accuracy"]
    report_two = json.loads((tmp_path / "two" / "report.json").read_text())["accuracy"]
    assert abs(report_one["student_onnx"] - report_two["student_onnx"]) <= 1 / 450  # at most one sample flips


def test_killed_two_process_run_resumes_with_one_process(env, tmp_path):
    args = [*BASE, "--set", "stages=[{kind: distill, epochs: 4}]"]
    out = tmp_path / "run"
    checkpoint = tmp_path / "run.partial" / "checkpoints" / "0-distill.pt"
    command = [sys.executable, "-m", "compressor.cli", "run", str(EXAMPLE), "--out", str(out), *args, "--nproc-per-node", "2"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    # SIGKILL the CLI, torchrun and both workers at once (no chance to clean up), like a lost machine.
    # torchrun starts each worker in its own session, so the process tree is walked rather than a group.
    for pid in [*descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    assert checkpoint.exists() and not out.exists()
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["world_size"] == 2 and 1 <= saved["epoch"] < 4

    resumed = run_cli(["run", EXAMPLE, "--out", out, *args, "--resume"], env, check_rc=0)  # one process now
    assert f"[0-distill] resuming after epoch {saved['epoch']}/4" in resumed.stderr
    run_cli(["run", EXAMPLE, "--out", tmp_path / "straight", *args], env, check_rc=0)
    got = json.loads((out / "report.json").read_text())["accuracy"]
    want = json.loads((tmp_path / "straight" / "report.json").read_text())["accuracy"]
    assert abs(got["student_onnx"] - want["student_onnx"]) <= 0.02  # per-rank BatchNorm statistics in epoch 1
    final = torch.load(out / "checkpoints" / "0-distill.pt", weights_only=True)
    assert final["epoch"] == 4 and final["world_size"] == 1
    losses_resumed = [h["loss"] for h in final["history"]]
    losses_straight = [h["loss"] for h in torch.load(tmp_path / "straight" / "checkpoints" / "0-distill.pt", weights_only=True)["history"]]
    for x, y in zip(losses_resumed, losses_straight):
        assert abs(x - y) <= 0.05 * y
