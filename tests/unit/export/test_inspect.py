"""MACs per compute node, the integer-kernel share after ORT's optimizations, stored bytes, latency ratio."""

import pytest
import torch
from torch import nn

from compressor.bench.measure import Protocol
from compressor.export.inspect import (
    compare_latency,
    initializer_census,
    integer_kernel_report,
    node_macs,
    not_faster_warning,
)
from compressor.export.onnx import export_onnx
from compressor.quant.qat import QATSpec, quantize_module


def test_node_macs_by_hand():
    # Conv 3→8, 3×3, 6×6 output: 8·6·6 outputs × 3·3·3 MACs each
    assert node_macs("Conv", {}, [(1, 3, 8, 8), (8, 3, 3, 3)], (1, 8, 6, 6)) == 8 * 36 * 27
    # depthwise: w = [8, 1, 3, 3] → 9 MACs per output
    assert node_macs("Conv", {"group": 8}, [(1, 8, 8, 8), (8, 1, 3, 3)], (1, 8, 6, 6)) == 8 * 36 * 9
    assert node_macs("QLinearConv", {}, [(1, 3, 8, 8), None, None, (8, 3, 3, 3)], (1, 8, 6, 6)) == 8 * 36 * 27
    assert node_macs("Gemm", {"transB": 1}, [(2, 64), (10, 64)], (2, 10)) == 2 * 10 * 64
    assert node_macs("Gemm", {"transA": 1}, [(64, 2), (64, 10)], (2, 10)) == 2 * 10 * 64
    # batched attention matmul [1, 4, 16, 8] × [1, 4, 8, 16]
    assert node_macs("MatMul", {}, [(1, 4, 16, 8), (1, 4, 8, 16)], (1, 4, 16, 16)) == 4 * 16 * 16 * 8


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x):
        return self.head(self.flatten(torch.relu(self.conv2(torch.relu(self.conv1(x))))))


def test_integer_mac_fraction_of_a_partly_quantized_model(tmp_path):
    x = torch.rand(1, 1, 8, 8)
    model = quantize_module(Mixed(), QATSpec(keep_float=["head"], act_stats_steps=2), (x,))
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 1, 8, 8))
    path = export_onnx(model.eval(), (x,), tmp_path / "m.onnx")
    report = integer_kernel_report(path)
    conv1, conv2, head = 4 * 36 * 9, 4 * 36 * 36, 144 * 10
    # conv2 is quantized, but its output feeds a float layer unquantized, so ORT cannot fuse it into
    # QLinearConv (which needs a quantized output): Q/DQ in the file, float kernel at run time.
    assert report["macs"] == {"total": conv1 + conv2 + head, "integer": conv1, "float": conv2 + head, "unmapped": 0}
    assert report["integer_mac_fraction"] == pytest.approx(conv1 / (conv1 + conv2 + head))
    kinds = {layer["node"]: layer["kind"] for layer in report["layers"]}
    assert kinds == {"/conv1/Conv": "integer", "/conv2/Conv": "float", "/head/Gemm": "float"}


def test_float_model_has_no_integer_macs_and_stores_float32(tmp_path):
    path = export_onnx(Mixed().eval(), (torch.rand(1, 1, 8, 8),), tmp_path / "f.onnx")
    report = integer_kernel_report(path)
    assert report["integer_mac_fraction"] == 0.0
    assert report["macs"]["total"] == 4 * 36 * 9 + 4 * 36 * 36 + 144 * 10
    census = initializer_census(path)
    params = sum(p.numel() for p in Mixed().parameters())
    assert census == {"float": {"tensors": 6, "elements": params, "bytes": 4 * params}}


def test_compare_latency_measures_both_files_on_the_local_target(tmp_path):
    small = export_onnx(nn.Linear(8, 8).eval(), (torch.rand(1, 8),), tmp_path / "small.onnx")
    big = export_onnx(nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)]).eval(), (torch.rand(1, 256),), tmp_path / "big.onnx")
    result = compare_latency(small, big, protocol=Protocol(warmup=5, iterations=30, threads=1), rounds=1)
    assert result["quantized_p50_ms"] > 0 and result["float_p50_ms"] > 0
    assert result["speedup"] == pytest.approx(result["float_p50_ms"] / result["quantized_p50_ms"])
    assert result["faster"]  # 8×256×256 MACs vs 64: the small file must win
    assert not_faster_warning(result) is None


def test_not_faster_warning_names_the_likely_cause():
    slow = {"faster": False, "quantized_p50_ms": 0.2, "float_p50_ms": 0.19, "speedup": 0.95, "target": "x86-cpu", "batch": 1}
    assert "only 40% of its MACs run in integer kernels" in not_faster_warning(slow, 0.4)
    assert "per-call overhead" in not_faster_warning(slow, 1.0)
    assert not_faster_warning(slow).startswith("quantized but not faster: 0.2000 ms vs float 0.1900 ms")
