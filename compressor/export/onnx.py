"""Export a student to one self-contained ONNX file that ONNX Runtime runs with integer kernels.

Brevitas-quantized students go through Brevitas' QCDQ exporter (the legacy TorchScript path: the dynamo
path rejects quantized bias); float students through `torch.onnx.export`. Both are then cleaned by
`propagate_qdq` so ONNX Runtime can fuse every quantized conv/matmul into an integer kernel.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import onnx
import torch
from onnx import helper
from torch import nn

# Ops through which a per-tensor quantizer can move without changing any value: they only select,
# reorder or reshape elements, so quantize(op(x)) == op(quantize(x)) exactly.
SCALE_TRANSPARENT = {"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity"}


def input_names_for(example_inputs: tuple[torch.Tensor, ...], names: list[str] | None = None) -> list[str]:
    if names:
        return list(names)
    return ["input"] if len(example_inputs) == 1 else [f"input_{i}" for i in range(len(example_inputs))]


def export_onnx(
    module: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: Path,
    opset: int = 17,
    dynamic_batch: bool = True,
    input_names: list[str] | None = None,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> Path:
    """Write `module` to `path` as ONNX (weights inside the file) and return the path."""
    from compressor.quant.qat import is_quantized

    path = Path(path)
    names = input_names_for(example_inputs, input_names)
    axes = dynamic_axes if dynamic_axes is not None else (
        {**{n: {0: "batch"} for n in names}, "output": {0: "batch"}} if dynamic_batch else None
    )
    # Export from a copy: a failed export can leave handlers attached to the model (Brevitas).
    model = copy.deepcopy(module).eval()
    args = tuple(example_inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if is_quantized(model):
            from brevitas.export import export_onnx_qcdq

            export_onnx_qcdq(
                model, args=args, export_path=str(path), dynamo=False, opset_version=opset,
                input_names=names, output_names=["output"], dynamic_axes=axes,
            )
        else:
            torch.onnx.export(
                model, args, str(path), dynamo=False, opset_version=opset,
                input_names=names, output_names=["output"], dynamic_axes=axes,
            )
    proto = onnx.load(str(path))
    propagate_qdq(proto)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def propagate_qdq(model: onnx.ModelProto) -> int:
    """Copy each per-tensor QuantizeLinear/DequantizeLinear pair back across scale-transparent ops.

    A quantized conv whose output reaches the next quantizer only through e.g. Relu → MaxPool → Flatten
    is left in float by ONNX Runtime, because its output is not quantized right away. Inserting the same
    Q/DQ directly after the producing node lets ORT fuse it (QLinearConv) without changing any value.
    Returns the number of pairs inserted.
    """
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {init.name: init for init in graph.initializer}
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}

    def is_scalar(name: str) -> bool:
        if name in initializers:
            return len(initializers[name].dims) == 0 or list(initializers[name].dims) == [1]
        node = constants.get(name)
        return node is not None and all(len(a.t.dims) == 0 for a in node.attribute if a.name == "value")

    inserted = 0
    new_nodes: list[tuple[int, list[onnx.NodeProto]]] = []
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        if not all(is_scalar(s) for s in q.input[1:]):
            continue  # per-channel activations: moving them would need an axis change
        tensor = q.input[0]
        chain = []
        producer = producers.get(tensor)
        while producer is not None and producer.op_type in SCALE_TRANSPARENT and len(consumers.get(tensor, [])) == 1:
            chain.append(producer)
            tensor = producer.input[0]
            producer = producers.get(tensor)
        if not chain or producer is None or producer.op_type in ("DequantizeLinear", "QuantizeLinear"):
            continue
        if len(consumers.get(tensor, [])) != 1:
            continue
        suffix = f"_qdq_prop{inserted}"
        q_out, dq_out = tensor + suffix + "_q", tensor + suffix + "_dq"
        new_q = helper.make_node("QuantizeLinear", [tensor, *q.input[1:]], [q_out], name=(q.name or "q") + suffix)
        new_dq = helper.make_node("DequantizeLinear", [q_out, *q.input[1:]], [dq_out], name=(q.name or "q") + suffix + "_dq")
        chain[-1].input[0] = dq_out
        index = list(graph.node).index(producer)
        new_nodes.append((index, [new_q, new_dq]))
        inserted += 1
    for index, nodes in sorted(new_nodes, key=lambda item: -item[0]):
        for offset, node in enumerate(nodes):
            graph.node.insert(index + 1 + offset, node)
    return inserted
