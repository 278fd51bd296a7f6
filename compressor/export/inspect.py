"""What ONNX Runtime will really execute: the graph after its optimizations, op by op.

"Quantized but not faster" usually means the Q/DQ nodes are there but the compute still runs in float.
This counts the compute ops ORT actually kept, integer vs float.
"""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

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


def integer_kernel_report(onnx_path: Path) -> dict:
    counts = optimized_op_counts(onnx_path)
    integer = {op: n for op, n in counts.items() if op in INTEGER_COMPUTE_OPS}
    floating = {op: n for op, n in counts.items() if op in FLOAT_COMPUTE_OPS}
    total = sum(integer.values()) + sum(floating.values())
    return {
        "integer_ops": integer,
        "float_ops": floating,
        "integer_op_fraction": (sum(integer.values()) / total) if total else 0.0,
    }
