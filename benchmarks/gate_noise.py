"""Does the noise-aware latency gate flake on a noisy machine, and does it catch a 10% slowdown?

Builds a small MLP (ONNX, ~1 ms per batch of 16 on one thread) and the same MLP with one more hidden layer
(~10% more compute), measures the real slowdown, writes a baseline of the first with
`compress gate --update-baseline`'s code path, then runs the gate N times on each:

  (a) the unchanged model against its baseline: every failure is a false failure;
  (b) the slower model: every pass is a missed regression.

Each gate starts from a fresh "report" measurement (what `compress bench` records) and may re-measure while
the verdict is inconclusive, exactly as `compress gate ARTIFACT` does. Trials of (a) and (b) alternate so
both see the same machine load. Results: benchmarks/_work/gate_noise.json; the write-up is gate_noise.md.

    python benchmarks/gate_noise.py                # 30 trials each; minutes depend on the machine's load
    python benchmarks/gate_noise.py --trials 5     # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compressor.bench.baseline import load_baseline
from compressor.bench.gate import judge, load_budget_file, run_gate
from compressor.bench.measure import Protocol
from compressor.export.onnx import export_onnx
from compressor.targets.profile import load_profile
from compressor.targets.runner import get_runner

WORK = Path(__file__).resolve().parent / "_work" / "gate_noise"
TARGET = "x86-cpu"
BATCH = 16
WIDTH, LAYERS = 512, 10  # 10 hidden layers; the slower variant has 11 (≈ +10.5% multiply-adds)


def mlp(hidden_layers: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(256, WIDTH), nn.ReLU()]
    for _ in range(hidden_layers - 1):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    layers.append(nn.Linear(WIDTH, 10))
    return nn.Sequential(*layers).eval()


def macs(hidden_layers: int) -> int:
    return 256 * WIDTH + (hidden_layers - 1) * WIDTH * WIDTH + WIDTH * 10


def make_artifact(name: str, hidden_layers: int) -> Path:
    """A directory the gate accepts: model.onnx and (later) a report.json with one measurement."""
    directory = WORK / name
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    export_onnx(mlp(hidden_layers), (torch.randn(1, 256),), directory / "model.onnx")
    return directory


def bench_into(directory: Path, protocol: Protocol) -> float:
    """One measurement, recorded as `compress bench` records it; returns its median (ms)."""
    m = get_runner(load_profile(TARGET)).measure(directory / "model.onnx", protocol, batch=BATCH)
    report = {
        "schema_version": 1,
        "name": directory.name,
        "size": {"model_bytes": (directory / "model.onnx").stat().st_size},
        "latency": {TARGET: {f"batch_{BATCH}": m.to_dict()}},
    }
    (directory / "report.json").write_text(json.dumps(report))
    return m.stats.p50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--remeasure", type=int, default=20, help="policy.remeasure: side-by-side pairs while inconclusive")
    parser.add_argument("--out", type=Path, default=WORK / "gate_noise.json")
    parser.add_argument("--baseline-runs", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--slowdown-pairs", type=int, default=12)
    parser.add_argument("--max-minutes", type=float, default=30.0, help="start no new trial after this long")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    protocol = Protocol(warmup=20, iterations=args.iterations, threads=args.threads)

    same, slower = make_artifact("unchanged", LAYERS), make_artifact("slower", LAYERS + 1)
    # The real slowdown, two ways. Separate processes: alternate the two models, compare the medians of their
    # per-run medians. One process (what the gate does): both models in alternating blocks, per-pair ratios.
    pairs = [(bench_into(same, protocol), bench_into(slower, protocol)) for _ in range(args.slowdown_pairs)]
    a_meds, b_meds = np.array(pairs).T
    slowdown = float(np.median(b_meds) / np.median(a_meds))
    # The noise a side-by-side gate fights: spread of log(slower/unchanged) over back-to-back pairs.
    pair_sd = float(np.std(np.log(b_meds / a_meds), ddof=1))
    runner = get_runner(load_profile(TARGET))
    in_process = []
    for _ in range(args.slowdown_pairs):
        mine, theirs = runner.measure_pair(slower / "model.onnx", same / "model.onnx", protocol, batch=BATCH)
        in_process.append(mine.stats.p50 / theirs.stats.p50)
    in_process_slowdown = float(np.exp(np.mean(np.log(in_process))))
    in_process_sd = float(np.std(np.log(in_process), ddof=1))
    print(f"slowdown: {slowdown:.3f}x (unchanged p50 {np.median(a_meds):.3f} ms, slower {np.median(b_meds):.3f} ms; "
          f"run-to-run sd(log) {np.std(np.log(a_meds), ddof=1):.3f} / {np.std(np.log(b_meds), ddof=1):.3f}, "
          f"paired {pair_sd:.3f}); in one process: {in_process_slowdown:.3f}x, sd(log) {in_process_sd:.3f}",
          flush=True)  # fmt: skip

    budgets = WORK / "budgets.yaml"
    budgets.write_text(
        f"policy: {{confidence: 0.95, remeasure: {args.remeasure}, inconclusive: fail, "
        f"baseline_runs: {args.baseline_runs}}}\n"
        f"budgets:\n  - {{metric: latency_p50, target: {TARGET}, batch: {BATCH}, max_regression: 5%}}\n"
    )
    baseline = WORK / "baseline.json"
    bench_into(same, protocol)
    t0 = time.perf_counter()
    run_gate(same, budgets, update_baseline=baseline, log=lambda _: None)
    baseline_s = time.perf_counter() - t0
    print(f"baseline: {args.baseline_runs} runs in {baseline_s:.1f} s", flush=True)

    spec, stored = load_budget_file(budgets), load_baseline(baseline)
    trials: dict[str, list[dict]] = {"unchanged": [], "slower": []}
    for i in range(args.trials):
        if time.perf_counter() - started > args.max_minutes * 60:
            print(f"stopping after {i} trials: --max-minutes {args.max_minutes} reached", flush=True)
            break
        for name, directory in (("unchanged", same), ("slower", slower)):
            t0 = time.perf_counter()
            bench_into(directory, protocol)
            # For comparison: the report's single run against the stored baseline runs (no pairing, no re-measuring).
            report = json.loads((directory / "report.json").read_text())
            alone = judge(report, spec.budgets, policy=spec.policy, baseline=stored)[0]
            result = run_gate(directory, budgets, baseline_path=baseline, log=lambda _: None)
            v = result.verdicts[0]
            trials[name].append(
                {
                    "exit_code": result.exit_code,
                    "status": v.status,
                    "raw": v.raw,
                    "runs": v.runs,
                    "ratio": v.measured,
                    "interval": v.interval,
                    "unpaired_one_run": {"raw": alone.raw, "ratio": alone.measured, "interval": alone.interval},
                    "seconds": time.perf_counter() - t0,
                    "load_average_1min": os.getloadavg()[0],
                }
            )
            elapsed = time.perf_counter() - started
            print(f"{i + 1:2d} {name:9s} exit {result.exit_code} pairs {v.runs:2d} [{elapsed:6.0f} s] {v.line()}", flush=True)

    summary = {}
    for name, rows in trials.items():
        runs = np.array([r["runs"] for r in rows])
        summary[name] = {
            "trials": len(rows),
            "passed": sum(r["exit_code"] == 0 for r in rows),
            "failed": sum(r["exit_code"] == 1 for r in rows),
            "failed_after_inconclusive": sum(r["exit_code"] == 1 and r["raw"] == "inconclusive" for r in rows),
            "measurement_errors": sum(r["exit_code"] == 3 for r in rows),
            "failed_decisively": sum(r["exit_code"] == 1 and r["raw"] == "fail" for r in rows),
            "runs_median": float(np.median(runs)),
            "runs_mean": float(runs.mean()),
            "runs_max": int(runs.max()),
            "seconds_mean": float(np.mean([r["seconds"] for r in rows])),
            "load_average_1min": [float(min(r["load_average_1min"] for r in rows)), float(np.median([r["load_average_1min"] for r in rows])),
                                  float(max(r["load_average_1min"] for r in rows))],
            "unpaired_one_run": {s: sum(r["unpaired_one_run"]["raw"] == s for r in rows) for s in ("pass", "fail", "inconclusive")},
        }
    out = {
        "model": {"width": WIDTH, "hidden_layers": [LAYERS, LAYERS + 1], "batch": BATCH,
                  "macs": [macs(LAYERS), macs(LAYERS + 1)], "flop_ratio": macs(LAYERS + 1) / macs(LAYERS)},
        "protocol": protocol.to_dict(),
        "measured_slowdown": slowdown,
        "paired_log_ratio_sd": pair_sd,
        "in_process_slowdown": in_process_slowdown,
        "in_process_log_ratio_sd": in_process_sd,
        "in_process_ratios": in_process,
        "unchanged_run_medians_ms": a_meds.tolist(),
        "slower_run_medians_ms": b_meds.tolist(),
        "policy": spec.policy.model_dump(),
        "budget": "latency_p50 on x86-cpu batch 16, max_regression 5%",
        "baseline_seconds": baseline_s,
        "summary": summary,
        "trials": trials,
        "total_seconds": time.perf_counter() - started,
    }  # fmt: skip
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps({"measured_slowdown": slowdown, "in_process_slowdown": in_process_slowdown, "summary": summary, "total_seconds": out["total_seconds"]}, indent=1))


if __name__ == "__main__":
    main()
