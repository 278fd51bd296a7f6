"""What ONNX Runtime will really execute: the graph after its optimizations, op by op and MAC by MAC.

"Quantized but not faster" usually means the Q/DQ nodes are there but the compute still runs in float.
`integer_kernel_report` counts the compute ops ORT actually kept, integer vs float, and the share of the
model's multiply-accumulates (MACs) that run in integer kernels:

1. MACs per compute node (Conv, Gemm, MatMul and their integer forms) come from the file as written: it
   is run once in ONNX Runtime with optimizations off and every compute node's inputs and outputs
   exposed, so the shapes are exact for the chosen input sizes (symbolic dims: batch 1, others
   `default_dim`) whatever the graph does with Shape/Reshape.
2. ONNX Runtime's optimized graph (`extended` level, the portable Q/DQ fusions) keeps the node name of a
   node it fuses into an integer kernel (Conv → QLinearConv, MatMul → MatMulIntegerToFloat, ...), so each
   original node is looked up by name there: integer op → integer MACs, float op → float MACs, absent
   (fused into something else, e.g. an attention kernel) → "unmapped", counted as not integer.

`compare_latency` times a quantized file against its float export on a target, interleaved.
"""

from __future__ import annotations

import collections
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

INTEGER_COMPUTE_OPS = {
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "QAttention", "DynamicQuantizeLSTM", "QLinearAdd", "QLinearMul",
    "QLinearGlobalAveragePool", "QLinearAveragePool",
}
FLOAT_COMPUTE_OPS = {"Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm", "Attention", "MultiHeadAttention", "ConvTranspose", "Einsum"}


def optimized_op_counts(onnx_path: Path, level: str = "extended") -> collections.Counter:
    """Op types of the graph ORT builds for the CPU provider (`extended`: portable fusions incl. Q/DQ)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    return collections.Counter(node.op_type for node in graph.node)


def integer_kernel_report(onnx_path: Path, dims: Mapping[str, int] | None = None) -> dict:
    """Compute ops after ORT's optimizations (integer vs float) and the integer share of the MACs."""
    counts = optimized_op_counts(onnx_path)
    integer = {op: n for op, n in counts.items() if op in INTEGER_COMPUTE_OPS}
    floating = {op: n for op, n in counts.items() if op in FLOAT_COMPUTE_OPS}
    total = sum(integer.values()) + sum(floating.values())
    report = {
        "integer_ops": integer,
        "float_ops": floating,
        "integer_op_fraction": (sum(integer.values()) / total) if total else 0.0,
    }
    report.update(mac_report(onnx_path, dims))
    return report


# Which inputs of each compute op hold the left operand and the weight/right operand.
_OPERANDS = {
    "Conv": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3),
    "MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3), "MatMulIntegerToFloat": (0, 1),
    "Gemm": (0, 1), "QGemm": (0, 3), "FusedMatMul": (0, 1), "DynamicQuantizeMatMul": (0, 1),
}  # fmt: skip


def node_macs(op_type: str, attrs: Mapping[str, Any], shapes: list[tuple[int, ...] | None], out: tuple[int, ...]) -> int:
    """Multiply-accumulates of one compute node from its operand and output shapes."""
    left, right = _OPERANDS[op_type]
    a = shapes[left] if left < len(shapes) else None
    w = shapes[right] if right < len(shapes) else None
    if op_type in ("Conv", "ConvInteger", "QLinearConv"):
        # every output element sums over Cin/group × kernel window; w = [Cout, Cin/group, k...]
        return math.prod(out) * math.prod(w[1:]) if w else 0
    if op_type in ("Gemm", "QGemm"):
        if not a:
            return 0
        k = a[0] if attrs.get("transA", 0) else a[-1]
        return math.prod(out) * k
    return math.prod(out) * a[-1] if a else 0  # matmuls: [..., M, K] × [..., K, N] -> [..., M, N]


def mac_report(onnx_path: Path, dims: Mapping[str, int] | None = None, default_dim: int = 128) -> dict:
    """MACs per compute node of the file as written, split by the kernel ORT runs them in."""
    import onnx

    model = onnx.load(str(onnx_path))
    nodes = [n for n in model.graph.node if n.op_type in _OPERANDS]
    if not nodes:
        return {"macs": {"total": 0, "integer": 0, "float": 0, "unmapped": 0}, "integer_mac_fraction": 0.0, "layers": []}
    shapes = _tensor_shapes(model, nodes, dims or {}, default_dim)
    optimized = _optimized_nodes(onnx_path)
    layers = []
    totals = {"integer": 0, "float": 0, "unmapped": 0}
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        out = shapes.get(node.output[0])
        if out is None:
            continue
        macs = node_macs(node.op_type, attrs, [shapes.get(i) for i in node.input], out)
        # ORT's activation fusions (Conv+Relu, Gemm+Tanh) name their node "fused <original name>".
        runs_as = optimized.get(node.name) or optimized.get(f"fused {node.name}")
        kind = "integer" if runs_as in INTEGER_COMPUTE_OPS else "float" if runs_as in FLOAT_COMPUTE_OPS else "unmapped"
        totals[kind] += macs
        layers.append({"node": node.name, "op": node.op_type, "runs_as": runs_as, "macs": macs, "kind": kind})
    total = sum(totals.values())
    return {
        "macs": {"total": total, **totals},
        "integer_mac_fraction": totals["integer"] / total if total else 0.0,
        "mac_shapes": {"batch": 1, "other_symbolic_dims": default_dim, **dict(dims or {})},
        "layers": layers,
    }


def _optimized_nodes(onnx_path: Path) -> dict[str, str]:
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    return {node.name: node.op_type for node in graph.node}


def dummy_feed(inputs, dims: Mapping[str, int], default_dim: int = 128) -> dict[str, np.ndarray]:
    """Inputs for a session: symbolic dims from `dims` (the first axis defaults to 1, others to
    `default_dim`); integer inputs are ones (valid token ids and attention masks), float inputs random."""
    rng = np.random.default_rng(0)
    feed = {}
    for value in inputs:
        shape = []
        for axis, dim in enumerate(value.shape):
            if isinstance(dim, int) and dim > 0:
                shape.append(dim)
            else:
                shape.append(int(dims.get(dim, 1 if axis == 0 else default_dim)) if isinstance(dim, str) else (1 if axis == 0 else default_dim))
        dtype = _ORT_TYPES.get(value.type, np.float32)
        feed[value.name] = np.ones(shape, dtype) if np.issubdtype(dtype, np.integer) else rng.random(shape, dtype=np.float32).astype(dtype)
    return feed


_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8,
    "tensor(bool)": np.bool_,
}  # fmt: skip


def _tensor_shapes(model, nodes, dims: Mapping[str, int], default_dim: int) -> dict[str, tuple[int, ...]]:
    """Exact shapes of the compute nodes' inputs and outputs: run the file once, everything exposed."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    wanted = {name for node in nodes for name in (*node.input, node.output[0]) if name and name not in shapes}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    graph_inputs = {i.name for i in probe.graph.input}
    for name in sorted(wanted - present - graph_inputs):
        probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = dummy_feed(session.get_inputs(), dims, default_dim)
    shapes.update({name: tuple(array.shape) for name, array in feed.items()})
    names = [o.name for o in session.get_outputs()]
    for name, value in zip(names, session.run(None, feed)):
        shapes[name] = tuple(np.shape(value))
    return shapes


def measure_interleaved(
    paths: Mapping[str, Path],
    *,
    target: str = "x86-cpu",
    batch: int = 1,
    protocol=None,
    rounds: int = 3,
    dims: Mapping[str, int] | None = None,
) -> dict[str, list[float]]:
    """p50 latency (ms) of every file per round on `target`: each round measures all files, one after the
    other, each in a fresh process (the target runner), in a rotated order, so drift of a shared machine
    hits all files alike. Compare files by ratios of their medians over rounds."""
    from compressor.bench.measure import Protocol
    from compressor.targets.profile import load_profile
    from compressor.targets.runner import get_runner

    runner = get_runner(load_profile(target))
    protocol = protocol or Protocol(warmup=20, iterations=200)
    names = list(paths)
    p50: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:  # rotate who goes first
            p50[name].append(runner.measure(Path(paths[name]), protocol, batch, dims=dims).stats.p50)
    return p50


def compare_latency(
    quantized: Path,
    reference: Path,
    *,
    target: str = "x86-cpu",
    batch: int = 1,
    protocol=None,
    rounds: int = 3,
    dims: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Time `quantized` against `reference` (its float export) on `target`, side by side in one process per round.

    Returns the median p50s, per-round ratios, `speedup` (reference / quantized, > 1 = quantized is faster)
    and `faster` (speed-up above 1.05, i.e. beyond the ~5% noise of one round).
    """
    from compressor.bench.measure import Protocol
    from compressor.targets.profile import load_profile
    from compressor.targets.runner import get_runner

    runner = get_runner(load_profile(target))
    protocol = protocol or Protocol(warmup=20, iterations=200)
    p50: dict[str, list[float]] = {"quantized": [], "reference": []}
    for index in range(rounds):
        # One process per round, both files in alternating blocks (the runner's side-by-side measurement,
        # as the gate uses); which one loads and runs first alternates between rounds.
        order = ["quantized", "reference"] if index % 2 == 0 else ["reference", "quantized"]
        paths = {"quantized": Path(quantized), "reference": Path(reference)}
        first, second = runner.measure_pair(paths[order[0]], paths[order[1]], protocol, batch, dims=dims)
        p50[order[0]].append(first.stats.p50)
        p50[order[1]].append(second.stats.p50)
    q, r = float(np.median(p50["quantized"])), float(np.median(p50["reference"]))
    speedup = r / q if q > 0 else float("inf")
    return {
        "target": target, "batch": batch, "rounds": rounds,
        "quantized_p50_ms": q, "float_p50_ms": r,
        "round_speedups": [b / a for a, b in zip(p50["quantized"], p50["reference"])],
        "speedup": speedup, "faster": is_faster(speedup),
    }  # fmt: skip


# A quantized file counts as faster only beyond the ~5% that one side-by-side round drifts on a shared machine.
FASTER_THAN_FLOAT = 1.05


def is_faster(speedup: float) -> bool:
    return speedup > FASTER_THAN_FLOAT


def not_faster_warning(comparison: Mapping[str, Any], integer_mac_fraction: float | None = None) -> str | None:
    """A one-line warning when a quantized artifact is not faster than its float export (compare_latency's
    result, as report.json `latency_vs_float` holds it), with the likely cause."""
    if is_faster(comparison["speedup"]):
        return None
    cause = ""
    if integer_mac_fraction is not None and integer_mac_fraction < 0.9:
        cause = f"; only {integer_mac_fraction:.0%} of its MACs run in integer kernels (see kernels.layers)"
    elif integer_mac_fraction is not None:
        cause = "; its MACs do run in integer kernels, so per-call overhead (Q/DQ, small layers) dominates at this size"
    return (
        f"quantized but not faster: {comparison['quantized_p50_ms']:.4f} ms vs float {comparison['float_p50_ms']:.4f} ms "
        f"p50 on {comparison['target']} at batch {comparison['batch']} (speed-up {comparison['speedup']:.2f}×){cause}"
    )


def initializer_census(onnx_path: Path) -> dict[str, dict[str, int]]:
    """Stored constants of the file by element type: tensors, elements and bytes (what is on disk)."""
    import onnx

    census: dict[str, dict[str, int]] = {}
    for init in onnx.load(str(onnx_path)).graph.initializer:
        kind = onnx.TensorProto.DataType.Name(init.data_type).lower()
        entry = census.setdefault(kind, {"tensors": 0, "elements": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["elements"] += math.prod(init.dims)
        entry["bytes"] += len(init.raw_data) if init.raw_data else math.prod(init.dims) * _ELEMENT_BYTES.get(kind, 4)
    return census


_ELEMENT_BYTES = {"float": 4, "int8": 1, "uint8": 1, "int32": 4, "int64": 8, "float16": 2, "double": 8, "bool": 1}
