"""QAT options: quantizer choice per spec field, keep-float resolution, bad input, quantization delay."""

import pytest
import torch
from torch import nn

from compressor.data.loaders import DataBundle
from compressor.errors import RecipeError
from compressor.models.builtin import DigitsCNN
from compressor.quant.qat import (
    QATSpec,
    bit_width_census,
    compute_layers_in_order,
    quantize_module,
    resolve_keep_float,
    run_qat,
    set_quantization,
    target_notes,
)
from compressor.recipe import parse_recipe
from compressor.state import ModelState, RunContext

X = (torch.rand(1, 1, 8, 8),)


def quant_layers(model):
    return {n: m for n, m in model.named_modules() if type(m).__module__.startswith("brevitas.nn.quant_")}


def zero_point_kind(layer) -> str:
    return type(layer.input_quant.fused_activation_quant_proxy.tensor_quant.zero_point_impl).__name__


def test_unsigned_symmetric_activations_have_zero_point_zero():
    model = quantize_module(DigitsCNN(widths=(8, 16)), QATSpec(act_symmetric=True), X)
    assert zero_point_kind(model.get_submodule("features.0")) == "ZeroZeroPoint"


def bits(proxy) -> int:
    return int(proxy.bit_width().item())


def test_default_quantizes_every_layer_with_reduced_range_weights_and_asymmetric_uint8_inputs():
    model = quantize_module(DigitsCNN(widths=(8, 16)), QATSpec(), X)
    layers = quant_layers(model)
    assert set(layers) == {"features.0", "features.3", "classifier"}
    conv = layers["features.0"]
    assert bits(conv.weight_quant) == 7  # reduce_range
    assert conv.input_quant.is_signed is False
    assert zero_point_kind(conv) == "ParameterFromRuntimeZeroPoint"  # learned zero point: signed inputs survive
    scale = conv.quant_weight().scale
    assert scale.numel() == 8  # per output channel
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # folded


@pytest.mark.parametrize(("weight_bits", "expected"), [(8, 7), (4, 4), (2, 2)])
def test_weight_bits(weight_bits, expected):
    model = quantize_module(DigitsCNN(widths=(8, 16)), QATSpec(weight_bits=weight_bits), X)
    assert {bits(m.weight_quant) for m in quant_layers(model).values()} == {expected}
    ints = model.classifier.quant_weight().int()
    assert int(ints.abs().max()) <= 2 ** (expected - 1) - 1  # narrow range: ±(2^(b-1) - 1)


def test_per_tensor_signed_and_4_bit_activations():
    model = quantize_module(DigitsCNN(widths=(8, 16)), QATSpec(per_channel=False, act_signed=True, act_bits=4), X)
    conv = model.get_submodule("features.0")
    assert conv.quant_weight().scale.numel() == 1
    assert conv.input_quant.is_signed is True
    assert bits(conv.input_quant) == 4


def test_learned_weight_scale_is_a_trained_parameter():
    stats = quantize_module(DigitsCNN(widths=(8, 16)), QATSpec(), X)
    learned = quantize_module(DigitsCNN(widths=(8, 16)), QATSpec(weight_scale="learned"), X)

    def scale_params(model):
        return [n for n, _ in model.named_parameters() if "weight_quant" in n and "scaling" in n]

    assert scale_params(stats) == []
    assert len(scale_params(learned)) == 3  # one per quantized layer
    loss = learned(torch.rand(4, 1, 8, 8)).sum()
    loss.backward()
    grads = [p.grad for n, p in learned.named_parameters() if n in scale_params(learned)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_keep_float_first_last_and_globs():
    model = DigitsCNN(widths=(8, 16))
    order, unused = compute_layers_in_order(model, X)
    assert order == ["features.0", "features.3", "classifier"] and unused == set()
    names = [n for n, _ in model.named_modules()]
    assert resolve_keep_float(names, ["first", "last"], order) == ["features.0", "classifier"]
    assert resolve_keep_float(names, ["features.[03]"], order) == ["features.0", "features.3"]
    quantized = quantize_module(model, QATSpec(keep_float=["first", "last"]), X)
    assert set(quant_layers(quantized)) == {"features.3"}


def test_keep_float_glob_matching_nothing_is_a_recipe_error():
    with pytest.raises(RecipeError, match="keep_float 'encoder.\\*' matches no module"):
        quantize_module(DigitsCNN(), QATSpec(keep_float=["encoder.*"]), X)


class WithUnusedAndLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.rnn = nn.LSTM(4, 4)
        self.spare = nn.Linear(4, 4)  # never called

    def forward(self, x):
        return self.conv(x)


def test_unquantizable_layer_is_named_with_the_fix():
    with pytest.raises(RecipeError, match=r"cannot quantize 'rnn' \(torch.nn.modules.rnn.LSTM\).*keep_float: \['rnn'\]"):
        quantize_module(WithUnusedAndLSTM(), QATSpec(), X)


def test_unused_layers_stay_float_and_kept_layers_are_not_checked():
    model = quantize_module(WithUnusedAndLSTM(), QATSpec(keep_float=["rnn"]), X)
    assert set(quant_layers(model)) == {"conv"}  # 'spare' never runs: a Brevitas layer there breaks export


def test_disabled_quantization_computes_the_float_model():
    torch.manual_seed(0)
    float_model = DigitsCNN(widths=(8, 16)).eval()
    quantized = quantize_module(float_model, QATSpec(), X).eval()
    x = torch.rand(16, 1, 8, 8)
    set_quantization(quantized, False)
    torch.testing.assert_close(quantized(x), float_model(x), atol=1e-5, rtol=0)  # BN folding is exact
    set_quantization(quantized, True)
    assert (quantized(x) - float_model(x)).abs().max() > 1e-4  # quantized again


def test_notes_explain_low_bit_widths_and_signed_activations():
    notes = " ".join(target_notes(QATSpec(weight_bits=2, act_bits=4, act_signed=True)))
    assert "2-bit weights" in notes and "stored as int8" in notes
    assert "4-bit activations" in notes
    assert "s8×s8" in notes
    assert target_notes(QATSpec(reduce_range=False)) == []


def test_census_counts_parameters_per_precision():
    model = quantize_module(DigitsCNN(widths=(8, 16)), QATSpec(weight_bits=4), X)
    census = bit_width_census(model)
    weights = 8 * 9 + 16 * 8 * 9 + 10 * 16 * 4 * 4
    assert census["int4 weights (stored int8)"] == weights
    assert census["int32 bias"] == 8 + 16 + 10  # folded BN biases and the classifier's


def context(tmp_path, epochs=1, steps=3):
    recipe = parse_recipe({"student": {"model": "digits_student"}, "train": {"epochs": epochs, "max_steps_per_epoch": steps}})
    data = [(torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(4)]
    teacher = DigitsCNN(widths=(8, 16)).eval()
    bundle = DataBundle(train=data, val=data[:1], num_classes=10)
    return RunContext(recipe=recipe, data=bundle, teacher=teacher, work_dir=tmp_path, log=lambda _m: None, show_progress=False)


def test_delay_trains_float_first_then_quantized(tmp_path):
    ctx = context(tmp_path, epochs=2, steps=3)
    state = ModelState(module=DigitsCNN(widths=(8, 16)), example_inputs=X)
    state = run_qat(state, QATSpec(delay_steps=4, act_stats_steps=100), ctx)
    proxies = [m for m in state.module.modules() if hasattr(m, "disable_quant")]
    assert proxies and not any(p.disable_quant for p in proxies)
    # Activation statistics are only collected while quantized: steps 5 and 6 of 6 (one after the
    # enabling step, which runs on_step after its optimizer step, and the last).
    scaling = state.module.get_submodule("features.0").input_quant.fused_activation_quant_proxy.tensor_quant.scaling_impl
    assert int(scaling.counter) == 2
    assert state.extras["quant"]["delay_steps"] == 4
    assert state.extras["quant"]["parameters"]["int7 weights (stored int8)"] > 0


def test_delay_longer_than_training_is_an_error(tmp_path):
    ctx = context(tmp_path, epochs=1, steps=3)
    state = ModelState(module=DigitsCNN(widths=(8, 16)), example_inputs=X)
    with pytest.raises(RecipeError, match="delay_steps=3 is not below the stage's 3 training steps"):
        run_qat(state, QATSpec(delay_steps=3), ctx)


def test_spec_rejects_bit_widths_outside_the_supported_range():
    with pytest.raises(RecipeError, match="weight_bits"):
        parse_recipe({"student": {"model": "digits_student"}, "stages": [{"kind": "qat", "weight_bits": 1}]})
    with pytest.raises(RecipeError, match="act_bits"):
        parse_recipe({"student": {"model": "digits_student"}, "stages": [{"kind": "qat", "act_bits": 2}]})
