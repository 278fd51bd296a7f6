"""Helpers shared by integration tests (importable because pytest puts tests/ on sys.path)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "digits.yaml"
# Reduced epochs: the pipeline, not the accuracy, is under test here (benchmarks/digits.py measures accuracy).
QUICK = [
    "--set", "teacher.pretrain.epochs=2", "--set", "stages.0.epochs=2", "--set", "stages.1.epochs=1",
    "--set", "bench.iterations=30", "--set", "bench.warmup=5", "--set", "export.parity.min_top1_agreement=0.97",
    "--set", "export.parity.max_abs=0.5", "--set", "export.parity.min_cosine=0.99",
]


def run_cli(args, env, timeout=600, check_rc=None):
    proc = subprocess.run([sys.executable, "-m", "compressor.cli", *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr[-3000:]
    return proc
