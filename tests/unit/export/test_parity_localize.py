"""Layer-by-layer parity: a deliberately corrupted layer in an exported file is found and named."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from compressor.export.keywords import export_plan
from compressor.export.onnx import export_onnx
from compressor.export.parity import localize_divergence, module_path_for_scope, observation_points
from compressor.models.builtin import DigitsCNN
from compressor.quant.qat import QATSpec, quantize_module


def weight_initializer(model: onnx.ModelProto, node_name: str) -> onnx.TensorProto:
    """The stored weight of a conv/matmul node, through its DequantizeLinear (and Clip) if quantized."""
    producers = {out: node for node in model.graph.node for out in node.output}
    initializers = {init.name: init for init in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == node_name)
    tensor = node.input[1]
    while tensor not in initializers:
        tensor = producers[tensor].input[0]
    return initializers[tensor]


def corrupt(path, node_name, out_path):
    model = onnx.load(str(path))
    init = weight_initializer(model, node_name)
    values = numpy_helper.to_array(init).copy()
    np.random.default_rng(0).shuffle(values.reshape(-1))  # same values and dtype, wrong places
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save(model, str(out_path))
    return out_path


def test_scopes_resolve_both_naming_styles():
    names = {"features", "features.3", "encoder", "encoder.layer", "encoder.layer.0", "encoder.layer.0.output", "encoder.layer.0.output.dense"}
    assert module_path_for_scope(["features", "features.3"], names) == "features.3"  # full paths
    assert module_path_for_scope(["features.3"], names) == "features.3"
    assert module_path_for_scope(["encoder", "layer.0", "output", "dense"], names) == "encoder.layer.0.output.dense"
    assert module_path_for_scope([], names) is None


def trained_like_qat_cnn():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 8, 8)
    model = quantize_module(DigitsCNN(widths=(8, 16, 16)), QATSpec(act_stats_steps=3), (x,))
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.rand(32, 1, 8, 8))
    return model.eval(), x


@pytest.mark.parametrize("broken", ["features.3", "features.7"])
def test_corrupted_conv_in_a_qat_export_is_named(tmp_path, broken):
    model, x = trained_like_qat_cnn()
    path = export_onnx(model, (x,), tmp_path / "q.onnx")
    inputs = torch.rand(16, 1, 8, 8)
    healthy = localize_divergence(model, path, inputs)
    assert healthy.first_divergent is None
    assert [d.module for d in healthy.layers] == ["features.0", "features.3", "features.7", "classifier"]

    bad = corrupt(path, f"/{broken}/Conv", tmp_path / "bad.onnx")
    found = localize_divergence(model, bad, inputs)
    assert found.first_divergent is not None and found.first_divergent.module == broken
    assert f"first diverging layer '{broken}'" in found.message()


def test_corrupted_float_export_with_nested_scope_names(tmp_path):
    torch.manual_seed(0)
    model = DigitsCNN(widths=(8, 16)).eval()  # not FX-traced: node names are '/features/features.3/Conv'
    path = export_onnx(model, (torch.rand(1, 1, 8, 8),), tmp_path / "f.onnx")
    nodes = [name for _, name, _ in observation_points(onnx.load(str(path)), model)]
    assert "/features/features.3/Conv" in nodes
    bad = corrupt(path, "/classifier/Gemm", tmp_path / "bad.onnx")
    found = localize_divergence(model, bad, torch.rand(8, 1, 8, 8))
    assert found.first_divergent.module == "classifier"
    assert all(d.cosine > 0.9999 for d in found.layers[: found.layers.index(found.first_divergent)])


def test_corrupted_linear_in_a_bert_qat_export_is_named(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    example = {"input_ids": torch.randint(1, 64, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    model = quantize_module(transformers.BertModel(config).eval(), QATSpec(act_stats_steps=2), tuple(example.values()))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(input_ids=torch.randint(1, 64, (4, 9)))
    model.eval()
    exported, inputs, io = export_plan(model, example)
    path = export_onnx(exported, inputs, tmp_path / "bert.onnx", **io)
    bad = corrupt(path, "/module/encoder/layer.1/intermediate/dense/MatMul", tmp_path / "bad.onnx")
    found = localize_divergence(exported, bad, example)
    assert found.first_divergent.module == "module.encoder.layer.1.intermediate.dense"
    assert len(found.layers) > 20  # embeddings, every Linear, LayerNorm and attention core compared
