"""Does channel pruning make a ResNet-18 faster in ONNX Runtime, as fast as it removes MACs?

ResNet-18-shaped CNN (transformers ResNetConfig, ResNet-18 depths and widths, random init, 1000 classes),
channels pruned by Torch-Pruning (L2 magnitude, per layer, round_to=8) at ratios 0, 0.25, 0.5, 0.75.
Each model is exported to ONNX (fp32) and quantized with ONNX Runtime's quantize_static (Q/DQ,
per-channel int8 weights, uint8 activations, random calibration data). All 8 sessions are timed
interleaved in this one process (2 intra-op threads, batch 1, session.force_spinning_stop=1 so an idle
session's threads do not steal cores from the next), after warm-up; medians are reported.

Target (issue 6): latency falls at least 0.8x as fast as MACs, i.e. speedup >= 0.8 * (MACs_0 / MACs_r).

    python benchmarks/prune.py                    # full run, ~2-3 min on 2 cores
    python benchmarks/prune.py --rounds 10        # quick look

Writes benchmarks/_work/prune/results.json (git-ignored) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

RATIOS = (0.0, 0.25, 0.5, 0.75)
EFFICIENCY_TARGET = 0.8


def build_model(ratio: float, size: int, seed: int) -> tuple[torch.nn.Module, dict]:
    from compressor.models.cnn_zoo import resnet18
    from compressor.prune.structured import count_macs_params, prune_channels

    torch.manual_seed(seed)
    model = resnet18(1000).eval()
    x = torch.randn(1, 3, size, size)
    if ratio > 0:
        summary = prune_channels(model, x, ratio, importance="l2", round_to=8).summary
        macs, params = summary.macs_after, summary.params_after
    else:
        macs, params = count_macs_params(model, x)
    return model, {"ratio": ratio, "params": params, "macs": macs}


def export(model: torch.nn.Module, size: int, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript exporter is 5-10x faster to run here than dynamo and gives the same graph
        # once ONNX Runtime has fused Conv+BN; opset 17 is what both quantizer and runtime know well.
        torch.onnx.export(
            model,
            (torch.randn(1, 3, size, size),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["pixel_values"],
            output_names=["logits"],
        )


def quantize(fp32: Path, int8: Path, size: int, batches: int, seed: int) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # Pre-processing matters: the TorchScript exporter shares identical (here all-zero, BN-folded)
    # conv biases through Identity nodes; quantize_static then cannot quantize those biases, ORT cannot
    # fuse DQ-Conv-Q into an integer conv, and the "int8" model ran 1.4x *slower* than fp32 here.
    prepared = int8.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(prepared))

    rng = np.random.default_rng(seed)

    class RandomImages(CalibrationDataReader):
        def __init__(self) -> None:
            self.left = batches

        def get_next(self) -> dict | None:
            if self.left == 0:
                return None
            self.left -= 1
            return {"pixel_values": rng.standard_normal((1, 3, size, size), dtype=np.float32)}

    quantize_static(
        str(prepared),
        str(int8),
        RandomImages(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,  # u8 x s8 is the fast integer path on x86 (see ENVIRONMENT.md)
        weight_type=QuantType.QInt8,
    )


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_interleaved(sessions: dict[str, object], feed: dict, warmup: int, rounds: int, seed: int):
    """One timed run of every session per round, in a shuffled order each round, so drifting load on
    the shared machine hits all variants alike."""
    for sess in sessions.values():
        for _ in range(warmup):
            sess.run(None, feed)
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    order = list(sessions)
    shuffle = random.Random(seed)
    for _ in range(rounds):
        shuffle.shuffle(order)
        for name in order:
            start = time.perf_counter()
            sessions[name].run(None, feed)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def machine() -> dict:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
    }


def table(rows: list[dict], stat: str = "ms") -> str:
    """Markdown table; `stat` "ms" uses medians, "p10_ms" the fastest-10% latency (less load noise)."""
    base = rows[0]
    lines = [
        "| ratio | params | MACs | MACs ↓ | fp32 ms | fp32 speedup | fp32 eff. | int8 ms | int8 speedup "
        "| int8 eff. | int8 vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        mac_factor = base["macs"] / row["macs"]
        cells = [
            f"{row['ratio']:.2f}",
            f"{row['params'] / 1e6:.2f} M",
            f"{row['macs'] / 1e9:.3f} G",
            f"{mac_factor:.2f}×",
        ]
        for precision in ("fp32", "int8"):
            speedup = base[f"{precision}_{stat}"] / row[f"{precision}_{stat}"]
            cells += [f"{row[f'{precision}_{stat}']:.2f}", f"{speedup:.2f}×", f"{speedup / mac_factor:.2f}"]
        cells.append(f"{row[f'fp32_{stat}'] / row[f'int8_{stat}']:.2f}×")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224, help="input height/width")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=120, help="timed runs per model, interleaved")
    parser.add_argument("--calibration", type=int, default=16, help="random calibration batches for int8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "_work" / "prune")
    args = parser.parse_args()

    torch.set_num_threads(1)  # building/pruning/exporting must not compete with other users' jobs
    logging.getLogger().setLevel(logging.ERROR)  # the ORT quantizer logs advice on the root logger
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    info = {"machine_start": machine()}

    rows, sessions = [], {}
    for ratio in RATIOS:
        model, row = build_model(ratio, args.size, args.seed)
        fp32 = args.out / f"resnet18_r{ratio:.2f}.onnx"
        int8 = args.out / f"resnet18_r{ratio:.2f}.int8.onnx"
        export(model, args.size, fp32)
        quantize(fp32, int8, args.size, args.calibration, args.seed)
        row["fp32_file_mb"] = fp32.stat().st_size / 1e6
        row["int8_file_mb"] = int8.stat().st_size / 1e6
        sessions[f"{ratio}/fp32"] = session(fp32, args.threads)
        # The exported file must compute what the pruned PyTorch model computes.
        probe = torch.randn(1, 3, args.size, args.size)
        with torch.no_grad():
            expected = model(probe).numpy()
        got = sessions[f"{ratio}/fp32"].run(None, {"pixel_values": probe.numpy()})[0]
        row["fp32_parity_max_abs"] = float(np.abs(got - expected).max())
        sessions[f"{ratio}/int8"] = session(int8, args.threads)
        rows.append(row)
        print(
            f"built ratio {ratio}: {row['params'] / 1e6:.2f} M params, {row['macs'] / 1e9:.3f} GMACs",
            flush=True,
        )

    feed = {
        "pixel_values": np.random.default_rng(args.seed).standard_normal(
            (1, 3, args.size, args.size), dtype=np.float32
        )
    }
    timing_started = time.time()
    samples = time_interleaved(sessions, feed, args.warmup, args.rounds, args.seed)
    for row in rows:
        for precision in ("fp32", "int8"):
            values = samples[f"{row['ratio']}/{precision}"]
            row[f"{precision}_ms"] = statistics.median(values)
            row[f"{precision}_p10_ms"] = float(np.percentile(values, 10))
            row[f"{precision}_p90_ms"] = float(np.percentile(values, 90))
            # Same-round ratio to the unpruned model: the 8 runs of a round take well under a second,
            # so slow load drift on the shared machine cancels.
            reference = samples[f"0.0/{precision}"]
            row[f"{precision}_paired_speedup"] = statistics.median(r / v for r, v in zip(reference, values))

    base = rows[0]
    for row in rows:
        mac_factor = base["macs"] / row["macs"]
        for precision in ("fp32", "int8"):
            speedup = base[f"{precision}_ms"] / row[f"{precision}_ms"]
            row[f"{precision}_speedup"] = speedup
            row[f"{precision}_efficiency"] = speedup / mac_factor
            row[f"{precision}_meets_target"] = row["ratio"] == 0 or speedup / mac_factor >= EFFICIENCY_TARGET

    info.update(
        {
            "machine_end": machine(),
            "args": {k: str(v) for k, v in vars(args).items()},
            "timing_seconds": time.time() - timing_started,
            "total_seconds": time.time() - started,
            "rows": rows,
            "samples_ms": samples,
        }
    )
    (args.out / "results.json").write_text(json.dumps(info, indent=1))
    print("medians:\n" + table(rows))
    print("\nfastest 10% (p10):\n" + table(rows, "p10_ms"))
    print(
        "\npaired speedups (median of same-round ratios), fp32 / int8: "
        + ", ".join(
            f"{r['ratio']}: {r['fp32_paired_speedup']:.2f}× / {r['int8_paired_speedup']:.2f}×" for r in rows
        )
    )
    print(
        f"\n{info['machine_start']['cpu']}, {args.threads} threads, batch 1, {args.size}x{args.size}, "
        f"{args.rounds} interleaved rounds; load average {info['machine_start']['load_average'][0]:.2f} at "
        f"start, {info['machine_end']['load_average'][0]:.2f} at end; {info['total_seconds']:.0f} s total"
    )


if __name__ == "__main__":
    main()
