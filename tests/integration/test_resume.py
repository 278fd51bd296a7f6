"""Kill a run mid-training (SIGKILL, no chance to clean up), resume it, and lose nothing."""

import json
import signal
import subprocess
import sys
import time

from support import EXAMPLE, run_cli

ARGS = [
    "--set", "teacher.pretrain.epochs=1", "--set", "stages=[{kind: distill, epochs: 6}]", "--set", "targets=[]",
    "--set", "budgets=null", "--set", "export.parity.max_abs=0.001",
]


def test_killed_run_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(cli_env, tmp_path):
    out = tmp_path / "run"
    checkpoint = tmp_path / "run.partial" / "checkpoints" / "0-distill.pt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "compressor.cli", "run", str(EXAMPLE), "--out", str(out), *ARGS],
        env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists() and not out.exists()  # killed mid-run: no artifact, checkpoint kept

    resumed = run_cli(["run", EXAMPLE, "--out", out, *ARGS, "--resume"], cli_env, check_rc=0)
    assert "[0-distill] resuming after epoch" in resumed.stderr
    assert "epoch 1/6" not in resumed.stderr.split("resuming after epoch")[1]

    straight = run_cli(["run", EXAMPLE, "--out", tmp_path / "straight", *ARGS], cli_env, check_rc=0)
    assert "straight" in straight.stderr
    resumed_acc = json.loads((out / "report.json").read_text())["accuracy"]
    straight_acc = json.loads((tmp_path / "straight" / "report.json").read_text())["accuracy"]
    assert resumed_acc == straight_acc  # same batches, same optimizer state: the same model


def test_resume_refuses_a_changed_recipe(cli_env, tmp_path):
    out = tmp_path / "run"
    (tmp_path / "run.partial").mkdir()
    (tmp_path / "run.partial" / "recipe.resolved.yaml").write_text("name: something-else\n")
    result = run_cli(["run", EXAMPLE, "--out", out, *ARGS, "--resume"], cli_env, check_rc=2)
    assert "the recipe differs from the interrupted run's" in result.stderr
    result = run_cli(["run", EXAMPLE, "--out", out, *ARGS], cli_env, check_rc=2)
    assert "pass --resume to continue it or --overwrite" in result.stderr
