"""QAT students exported to ONNX Q/DQ and run in ONNX Runtime: a CNN and a tiny BERT."""

import numpy as np
import pytest
import torch

from compressor.export.inspect import integer_kernel_report
from compressor.export.keywords import export_plan
from compressor.export.onnx import export_onnx
from compressor.export.parity import check_parity, ort_session
from compressor.models.builtin import DigitsCNN
from compressor.models.call import primary_output
from compressor.quant.qat import QATSpec, quantize_module
from compressor.recipe import ParitySpec

transformers = pytest.importorskip("transformers")


def calibrate(model, batches):
    model.train()
    with torch.no_grad():
        for inputs in batches:
            model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return model.eval()


@pytest.mark.parametrize("weight_bits", [8, 4])
def test_cnn_qat_export_parity_in_onnx_runtime(tmp_path, weight_bits):
    x = torch.rand(1, 1, 8, 8)
    model = quantize_module(DigitsCNN(widths=(8, 16)), QATSpec(weight_bits=weight_bits, act_stats_steps=3), (x,))
    calibrate(model, [torch.rand(32, 1, 8, 8) for _ in range(4)])
    path = export_onnx(model, (x,), tmp_path / "q.onnx")
    loader = [(torch.rand(64, 1, 8, 8), None) for _ in range(2)]
    # One integer rounding step of the output at most; never a different class.
    result = check_parity(model, path, loader, ParitySpec(max_abs=0.05, min_cosine=0.999, min_top1_agreement=0.97))
    assert result.passed, result.failures
    kernels = integer_kernel_report(path)
    assert kernels["integer_mac_fraction"] == 1.0
    assert kernels["macs"]["total"] == 8 * 9 * 64 + 16 * 8 * 9 * 64 + 10 * 256


def tiny_bert():
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertModel(config).eval()


def batch(n, length, padded=True):
    ids = torch.randint(1, 64, (n, length))
    mask = torch.ones(n, length, dtype=torch.long)
    if padded and n > 1:
        mask[1, length // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_bert_qat_quantizes_linears_and_attention_matmuls_and_exports_with_dynamic_batch_and_sequence(tmp_path):
    torch.manual_seed(0)
    example = batch(2, 9)
    model = quantize_module(tiny_bert(), QATSpec(act_stats_steps=3), tuple(example.values()))
    assert type(model.encoder.layer[0].attention.self.query).__name__ == "QuantLinear"
    assert hasattr(model.encoder.layer[0].attention.self, "k_transposed_quant")
    calibrate(model, [batch(4, 9) for _ in range(5)])
    exported, inputs, io = export_plan(model, example)
    path = export_onnx(exported, inputs, tmp_path / "bert.onnx", **io)

    session = ort_session(path)
    assert [i.shape for i in session.get_inputs()] == [["batch", "sequence"], ["batch", "sequence"]]
    for n, length in [(1, 5), (3, 17)]:
        feed = batch(n, length)
        ours = primary_output(model(**feed)).detach().numpy()  # BertModel: the pooled output
        theirs = session.run(None, {k: v.numpy() for k, v in feed.items()})[0]
        assert theirs.shape == ours.shape == (n, 32)
        # Integer kernels requantize with their own rounding: well under one percent of the output range.
        assert np.abs(theirs - ours).max() < 0.01 * np.abs(ours).max()

    kernels = integer_kernel_report(path, {"sequence": 16})
    attention = [layer for layer in kernels["layers"] if layer["node"].endswith(("self/MatMul", "self/MatMul_1"))]
    assert len(attention) == 4 and all(layer["kind"] == "integer" for layer in attention)
    assert kernels["integer_mac_fraction"] == 1.0
    # Hand count at sequence 16: per layer QKV 3·16·32·32, out 16·32·32, FFN 2·16·32·64, QKᵀ and PV 2·4·16·16·8.
    per_layer = 3 * 16 * 32 * 32 + 16 * 32 * 32 + 2 * 16 * 32 * 64 + 2 * 4 * 16 * 16 * 8
    assert kernels["macs"]["total"] == 2 * per_layer + 32 * 32  # + the pooler


def test_bert_without_attention_quantization_keeps_float_matmuls(tmp_path):
    example = batch(2, 9)
    model = quantize_module(tiny_bert(), QATSpec(act_stats_steps=3, quantize_attention=False), tuple(example.values()))
    calibrate(model, [batch(4, 9) for _ in range(4)])
    exported, inputs, io = export_plan(model, example)
    path = export_onnx(exported, inputs, tmp_path / "bert.onnx", **io)
    kernels = integer_kernel_report(path, {"sequence": 16})
    assert 0.8 < kernels["integer_mac_fraction"] < 1.0  # only the attention matmuls stay float


class Untraceable(torch.nn.Module):
    """Data-dependent control flow: FX cannot trace it, so BatchNorm is folded eagerly."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4 * 64, 10)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > -1e9:  # data-dependent branch
            y = torch.relu(y)
        return self.head(y.flatten(1))


def test_untraceable_model_gets_batchnorm_folded_eagerly():
    from compressor.quant.qat import fold_batchnorm

    torch.manual_seed(0)
    model = Untraceable()
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2)
    model.bn.weight.data.uniform_(0.5, 2)
    model.eval()
    x = torch.rand(8, 1, 8, 8)
    folded = fold_batchnorm(model, (x[:1],))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("output_quant", "all_integer"), [(False, False), (True, True)])
def test_output_quant_lets_residual_convs_run_in_integer_kernels(tmp_path, output_quant, all_integer):
    from compressor.models.cnn_zoo import ResCatNet

    x = torch.rand(1, 3, 8, 8)
    model = quantize_module(ResCatNet(width=8), QATSpec(output_quant=output_quant, act_stats_steps=2), (x,))
    calibrate(model, [torch.rand(16, 3, 8, 8) for _ in range(3)])
    path = export_onnx(model, (x,), tmp_path / "q.onnx")
    kernels = integer_kernel_report(path)
    assert (kernels["integer_mac_fraction"] == 1.0) is all_integer
    loader = [(torch.rand(32, 3, 8, 8), None)]
    result = check_parity(model, path, loader, ParitySpec(max_abs=0.05, min_cosine=0.999, min_top1_agreement=0.9))
    assert result.passed, result.failures
