"""Prune 50% + KD + int8 QAT vs the unpruned int8 student, on the digits example: accuracy and latency.

Two recipes, same teacher (digits_teacher, pretrained once per seed), same student (digits_cnn with
widths [32, 64, 64]), same distillation loss (Hinton T=4, α=0.3, teacher cache), same data split:
  pruned     examples/digits_prune.yaml as shipped: distill 30 epochs → prune 50% of the channels in 3 cubic
             AGP steps with 4 + 4 + 12 epochs of KD fine-tuning → int8 QAT 8 epochs
  unpruned   the same file without the prune stage, its 20 fine-tuning epochs given to distill (distill 50 →
             int8 QAT 8): both students train for 58 epochs with the same loss
Accuracy: held-out split (450 digits), measured by running the exported int8 model.onnx (report.json
`accuracy.student_onnx`, the pipeline's own measurement). Target: pruned within 1 point of unpruned.
Latency: the x86-cpu target runner (ONNX Runtime, 2 intra-op threads, a fresh process per measurement),
p50 of each measurement, rounds interleaved with the order rotated; speedup = ratio of the medians over
rounds (and the median of the per-round ratios, which cancels slow drift of a shared machine).

    python benchmarks/prune_digits.py                 # ~8 min on 2 shared cores (1 seed)
    python benchmarks/prune_digits.py --seeds 0 1 2   # more seeds for the accuracy comparison

Writes benchmarks/_work/prune_digits/ (artifacts, results.json; git-ignored) and prints the markdown
section that benchmarks/prune.md holds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "_work" / "prune_digits"
EXAMPLE = REPO / "examples" / "digits_prune.yaml"
ACCURACY_TARGET_POINTS = 1.0


def recipes(seed: int):
    """(name, Recipe) for the pruned example and its unpruned twin with the same training budget."""
    import yaml

    from compressor.recipe import parse_recipe

    data = yaml.safe_load(EXAMPLE.read_text())
    data.update(seed=seed, targets=[])  # latency is measured below, side by side
    prune = next(stage for stage in data["stages"] if stage["kind"] == "prune")
    fine_tune = prune["epochs"] * (prune["steps"] - 1) + prune["final_epochs"]
    unpruned = {**data, "stages": [dict(stage) for stage in data["stages"] if stage["kind"] != "prune"]}
    unpruned["stages"][0]["epochs"] += fine_tune
    return [
        ("pruned", parse_recipe(data, source=str(EXAMPLE), base_dir=EXAMPLE.parent)),
        ("unpruned", parse_recipe(unpruned, source="unpruned twin", base_dir=EXAMPLE.parent)),
    ]


def train(seeds: list[int]) -> dict[str, dict]:
    from compressor.pipeline import compress

    runs: dict[str, dict] = {}
    for seed in seeds:
        for name, recipe in recipes(seed):
            out = WORK / f"{name}-seed{seed}"
            started = time.perf_counter()
            report = compress(recipe, out, overwrite=True, log=lambda _: None)
            prune = next((e["details"] for e in report["lineage"] if e["kind"] == "prune"), None)
            runs[f"{name}-seed{seed}"] = {
                "name": name,
                "seed": seed,
                "path": str(out / "model.onnx"),
                "accuracy_onnx": report["accuracy"]["student_onnx"],
                "teacher": report["accuracy"]["teacher"],
                "parameters": report["size"]["parameters"],
                "model_bytes": report["size"]["model_bytes"],
                "macs": {"before": prune["macs_before"], "after": prune["macs_after"]} if prune else None,
                "kernels": report["kernels"]["integer_mac_fraction"],
                "seconds": round(time.perf_counter() - started, 1),
            }
            print(f"{name} seed {seed}: accuracy {runs[f'{name}-seed{seed}']['accuracy_onnx']:.4f}", file=sys.stderr)
    return runs


def latency(paths: dict[str, str], batches: list[int], rounds: int) -> dict[str, dict]:
    from compressor.bench.measure import Protocol
    from compressor.export.inspect import measure_interleaved

    results: dict[str, dict] = {}
    for batch in batches:
        protocol = Protocol(warmup=50, iterations=300 if batch == 1 else 100)
        p50 = measure_interleaved({k: Path(v) for k, v in paths.items()}, batch=batch, protocol=protocol, rounds=rounds)
        per_round = [u / p for u, p in zip(p50["unpruned"], p50["pruned"])]
        results[f"batch_{batch}"] = {
            "p50_ms": {name: statistics.median(values) for name, values in p50.items()},
            "rounds_ms": p50,
            "speedup": statistics.median(p50["unpruned"]) / statistics.median(p50["pruned"]),
            "speedup_median_of_rounds": statistics.median(per_round),
            "speedup_range": [min(per_round), max(per_round)],
        }
    return results


def markdown(runs: dict[str, dict], times: dict[str, dict], environment: dict) -> str:
    seeds = sorted({run["seed"] for run in runs.values()})
    pruned = [runs[f"pruned-seed{s}"] for s in seeds]
    unpruned = [runs[f"unpruned-seed{s}"] for s in seeds]
    deltas = [(p["accuracy_onnx"] - u["accuracy_onnx"]) * 100 for p, u in zip(pruned, unpruned)]
    macs = pruned[0]["macs"]

    def accuracies(group: list[dict]) -> str:
        return ", ".join(f"{run['accuracy_onnx']:.2%}" for run in group)

    lines = [
        "| student (int8 Q/DQ, exported) | params | MACs / image | model.onnx | held-out accuracy (per seed) |",
        "|---|---|---|---|---|",
        f"| unpruned [32, 64, 64] | {unpruned[0]['parameters']:,} | {macs['before'] / 1e6:.2f} M | "
        f"{unpruned[0]['model_bytes'] / 1e3:.1f} kB | {accuracies(unpruned)} |",
        f"| pruned 50% [16, 32, 32] | {pruned[0]['parameters']:,} | {macs['after'] / 1e6:.2f} M | "
        f"{pruned[0]['model_bytes'] / 1e3:.1f} kB | {accuracies(pruned)} |",
        "",
        f"Accuracy difference pruned − unpruned (points, per seed): {', '.join(f'{d:+.2f}' for d in deltas)} "
        f"(target: ≥ −{ACCURACY_TARGET_POINTS:.0f}: {'met' if min(deltas) >= -ACCURACY_TARGET_POINTS else 'MISSED'}). "
        f"Teacher: {pruned[0]['teacher']:.2%}.",
        "",
        "| batch | unpruned p50 | pruned p50 | speedup (ratio of medians) | median of per-round ratios | per-round range |",
        "|---|---|---|---|---|---|",
    ]
    for key, value in times.items():
        p50 = value["p50_ms"]
        lines.append(
            f"| {key.removeprefix('batch_')} | {p50['unpruned'] * 1000:.1f} µs | {p50['pruned'] * 1000:.1f} µs | "
            f"**{value['speedup']:.2f}×** | {value['speedup_median_of_rounds']:.2f}× | "
            f"{value['speedup_range'][0]:.2f}–{value['speedup_range'][1]:.2f}× |"
        )
    lines += ["", f"MACs ratio: {macs['before'] / macs['after']:.2f}×. Environment: {environment}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()
    os.environ.setdefault("COMPRESSOR_CACHE", str(WORK / "cache"))  # the pretrained teachers, per seed
    import torch

    torch.set_num_threads(1)  # training; the latency runner sets its own threads (profile: 2)
    WORK.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs = train(args.seeds)
    trained = time.perf_counter() - started
    seed = args.seeds[0]
    times = latency({name: runs[f"{name}-seed{seed}"]["path"] for name in ("unpruned", "pruned")}, args.batches, args.rounds)
    environment = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "training_s": round(trained, 1),
        "total_s": round(time.perf_counter() - started, 1),
    }
    (WORK / "results.json").write_text(json.dumps({"runs": runs, "latency": times, "environment": environment}, indent=1))
    print(markdown(runs, times, environment))


if __name__ == "__main__":
    main()
