"""Channel pruning through Torch-Pruning: real pruning, coupled layers, schedules, bad input."""

import numpy as np
import pytest
import torch
from torch import nn

from compressor.errors import CompressorError
from compressor.models.cnn_zoo import ResCatNet, resnet
from compressor.prune.structured import (
    ChannelPruner,
    PruningError,
    agp_ratio,
    count_params,
    find_classifier,
    prune_channels,
    schedule_ratios,
)

X = torch.randn(2, 3, 16, 16)


def test_half_the_channels_gives_the_half_width_architecture():
    # Every coupled group (stem + residual block, two concatenated branches, mix) halves, so the pruned
    # net has exactly the parameter count of the same net built at half width.
    model = ResCatNet(width=16).eval()
    result = prune_channels(model, X, 0.5, importance="l2")
    assert count_params(model) == count_params(ResCatNet(width=8)) == result.summary.params_after
    assert model.mix[0].in_channels == 16  # concat of two 8-channel branches
    assert model.classifier.out_features == 10  # the classifier is never pruned
    assert result.summary.macs_after < 0.3 * result.summary.macs_before
    assert model(X).shape == (2, 10)


def test_round_to_keeps_multiples():
    # 16 * (1 - 0.3) = 11.2 -> 11 channels -> 8 (multiple of 4); the 32-channel mix: 22.4 -> 22 -> 20.
    model = ResCatNet(width=16).eval()
    prune_channels(model, X, 0.3, round_to=4)
    assert {m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)} == {8, 20}
    unrounded = ResCatNet(width=16).eval()
    prune_channels(unrounded, X, 0.3)
    assert unrounded.stem[0].out_channels == 11


def test_pruned_model_exports_and_matches_in_onnxruntime(tmp_path, onnx_roundtrip):
    model = ResCatNet(width=16).eval()
    prune_channels(model, X, 0.5, importance="l1")
    got, expected = onnx_roundtrip(model, (X,), tmp_path / "pruned.onnx")
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_hf_resnet_prunes_and_exports(tmp_path, onnx_roundtrip):
    pytest.importorskip("transformers")
    model = resnet(10, depths=(1, 1), widths=(16, 32)).eval()
    x = torch.randn(1, 3, 32, 32)
    result = prune_channels(model, x, 0.5, round_to=8)
    widths = {m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)}
    assert widths == {8, 16}
    assert result.summary.params_after < 0.35 * result.summary.params_before
    got, expected = onnx_roundtrip(model, (x,), tmp_path / "resnet.onnx")
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_bn_scale_removes_the_channels_with_small_gamma():
    model = ResCatNet(width=16).eval()
    gamma = torch.tensor([1.0 + i for i in range(8)] + [1e-3] * 8)
    model.branch_a[1].weight.data = gamma[torch.randperm(16)]
    prune_channels(model, X, 0.5, importance="bn_scale")
    assert sorted(model.branch_a[1].weight.tolist()) == pytest.approx([1.0 + i for i in range(8)])


@pytest.mark.parametrize("importance", ["l1", "l2", "random"])
def test_importance_by_name(importance):
    model = ResCatNet(width=16).eval()
    result = prune_channels(model, X, 0.25, importance=importance)
    assert model.stem[0].out_channels == 12
    assert result.summary.channels["stem.0"] == (16, 12)


def test_taylor_uses_gradients_from_calibration_batches():
    model = ResCatNet(width=16).eval()
    batches = [(X, torch.tensor([1, 3]))]
    result = prune_channels(model, X, 0.5, importance="taylor", calibration=batches)
    assert result.summary.params_after == count_params(ResCatNet(width=8))
    assert all(p.grad is None for p in model.parameters())  # stale gradients are dropped


def test_taylor_without_calibration_is_an_error():
    with pytest.raises(PruningError, match="calibration"):
        prune_channels(ResCatNet().eval(), X, 0.5, importance="taylor")


def test_unknown_importance_lists_known_names():
    with pytest.raises(CompressorError, match="known: bn_scale, l1, l2, random, taylor"):
        prune_channels(ResCatNet().eval(), X, 0.5, importance="l3")


def test_agp_ratio_matches_the_cubic_formula():
    # r_k = 0.8 * (1 - (1 - k/4)^3)
    assert [agp_ratio(k, 4, 0.8) for k in range(6)] == pytest.approx([0.0, 0.4625, 0.7, 0.7875, 0.8, 0.8])
    assert agp_ratio(0, 10, 0.9, initial_ratio=0.1) == pytest.approx(0.1)
    assert schedule_ratios(0.6, 3, "linear") == pytest.approx([0.0, 0.2, 0.4, 0.6])


def test_iterative_pruner_steps_to_the_target():
    model = ResCatNet(width=16).eval()
    pruner = ChannelPruner(model, X, 0.5, steps=3)
    kept = []
    while not pruner.done:
        summary = pruner.step()
        kept.append(model.stem[0].out_channels)
        assert summary.ratio == pytest.approx(pruner.current_ratio)
    # AGP ratios 0.352, 0.481, 0.5 of 16 channels -> int(16 * (1 - r)) kept
    assert kept == [10, 8, 8]
    assert count_params(model) == count_params(ResCatNet(width=8))
    with pytest.raises(PruningError, match="done"):
        pruner.step()


def test_ignore_glob_keeps_those_layers():
    model = ResCatNet(width=16).eval()
    prune_channels(model, X, 0.5, ignore=["branch_a*"])
    assert model.branch_a[0].out_channels == 16
    assert model.branch_b[0].out_channels == 8


def test_layer_ratios_override_the_default():
    model = ResCatNet(width=16).eval()
    prune_channels(model, X, 0.5, layer_ratios={"branch_b.0": 0.25})
    assert model.branch_b[0].out_channels == 12
    assert model.branch_a[0].out_channels == 8


def test_global_pruning_reaches_the_overall_ratio():
    model = ResCatNet(width=16).eval()
    result = prune_channels(model, X, 0.5, global_pruning=True)
    assert result.summary.params_after < result.summary.params_before
    assert model(X).shape == (2, 10)


def test_tracing_and_checks_leave_training_state_alone():
    model = ResCatNet(width=16).train()
    model.block[0].eval()  # a frozen sub-block keeps its own mode
    stats = model.mix[1].running_mean.clone()
    prune_channels(model, X, 0.0)
    assert model.training and not model.block[0].training
    assert torch.equal(model.mix[1].running_mean, stats)  # no forward ran in training mode


def test_classifier_is_found_by_its_output():
    assert find_classifier(ResCatNet(), X) == "classifier"
    pytest.importorskip("transformers")
    assert find_classifier(resnet(10, depths=(1,), widths=(8,)), torch.randn(1, 3, 16, 16)) == "classifier"


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5, "0.5", True])
def test_ratio_outside_range_is_an_error(ratio):
    with pytest.raises(PruningError, match=r"outside \[0, 1\)"):
        prune_channels(ResCatNet().eval(), X, ratio)


def test_ratio_that_empties_a_layer_is_an_error():
    # 4 (or 8) channels at ratio 0.5 keep 2 (or 4), which round_to=8 rounds down to 0.
    with pytest.raises(PruningError, match=r"would remove all \d channels of '.*' with round_to=8"):
        prune_channels(ResCatNet(width=4).eval(), X, 0.5, round_to=8)


def test_ignore_glob_matching_nothing_lists_close_names():
    with pytest.raises(PruningError, match="'clasifier' matches no module.*close names: classifier"):
        prune_channels(ResCatNet().eval(), X, 0.5, ignore=["clasifier"])


class HardCodedReshape(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(self.conv2(self.conv1(x)).reshape(x.shape[0], 8 * 4 * 4))


def test_untraceable_op_is_named_with_the_module_to_ignore():
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(PruningError, match=r"after module 'conv2'.*RuntimeError.*ignore=\['conv2'\]"):
        prune_channels(HardCodedReshape(), x, 0.5)
    model = HardCodedReshape()
    prune_channels(model, x, 0.5, ignore=["conv2"])  # the suggested fix works
    assert model.conv1.out_channels == 4 and model(x).shape == (1, 10)


class ArgmaxOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.conv(x)).argmax(dim=1)


def test_model_without_autograd_graph_is_an_error():
    with pytest.raises(PruningError, match="traced no layer"):
        prune_channels(ArgmaxOutput(), torch.randn(1, 3, 8, 8), 0.5)


def test_wrong_example_inputs_name_the_failing_module():
    with pytest.raises(PruningError, match="fails on example_inputs inside module 'stem.0'"):
        prune_channels(ResCatNet().eval(), torch.randn(1, 5, 8, 8), 0.5)
