"""Unstructured and 2:4 sparsity: masks through training, permanence, and the exported pattern check."""

import numpy as np
import pytest
import torch
from torch import nn

from compressor.prune.sparsity import (
    Sparsifier,
    check_2_4,
    magnitude_mask,
    make_permanent,
    nm_mask,
    satisfies_nm,
    sparsify,
    zero_fraction,
)
from compressor.prune.structure import save_pruned
from compressor.prune.structured import PruningError


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 4))


def test_nm_mask_keeps_the_two_largest_of_every_four():
    weight = torch.tensor([[1.0, -5.0, 3.0, 0.5, 2.0, 2.5, -0.1, 4.0]])
    expected = torch.tensor([[0, 1, 1, 0, 0, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(nm_mask(weight), expected)


def test_nm_mask_groups_conv_weights_along_input_channels():
    weight = torch.zeros(1, 4, 1, 2)  # (K, C, R, S): groups run over C for each tap
    weight[0, :, 0, 0] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    weight[0, :, 0, 1] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mask = nm_mask(weight)
    assert mask[0, :, 0, 0].tolist() == [True, True, False, False]
    assert mask[0, :, 0, 1].tolist() == [False, False, True, True]
    assert satisfies_nm(weight * mask, axis=1)


def test_magnitude_mask_zeroes_the_smallest():
    weight = torch.tensor([0.3, -0.1, 0.5, -0.7, 0.2])
    assert magnitude_mask(weight, 0.4).tolist() == [True, False, True, True, False]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_masks_survive_optimizer_steps(optimizer):
    model = mlp()
    sparsifier = Sparsifier(model, "2:4", layers=["0", "2"])
    # The optimizer is built before masking on purpose: the masked parameter object is kept.
    params = list(model.parameters())
    opt = (
        torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)
        if optimizer == "sgd"
        else torch.optim.AdamW(params, lr=0.01)
    )
    sparsifier.step()
    masks = {name: module.weight_mask.clone() for name, module in sparsifier.layers.items()}
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
    model(torch.randn(1, 16))  # the forward pre-hook recomputes weight = weight_orig * mask
    for name, module in sparsifier.layers.items():
        assert torch.equal(module.weight_mask, masks[name])
        assert (module.weight[masks[name] == 0] == 0).all()
        assert satisfies_nm(module.weight.detach())
    assert model[4].weight.count_nonzero() == model[4].weight.numel()  # not chosen, stays dense


def test_agp_schedule_raises_unstructured_sparsity_monotonically():
    model = mlp()
    sparsifier = Sparsifier(model, "unstructured", 0.8, steps=3, layers=["0", "2"])
    previous = torch.ones_like(model[0].weight, dtype=torch.bool)
    for expected in [0.8 * (1 - (2 / 3) ** 3), 0.8 * (1 - (1 / 3) ** 3), 0.8]:
        assert sparsifier.step() == pytest.approx(expected)
        zeros = zero_fraction(model)
        assert zeros["0"] == pytest.approx(expected, abs=1 / 512)
        assert zeros["2"] == pytest.approx(expected, abs=1 / 256)
        kept = model[0].weight != 0
        assert not (kept & ~previous).any()  # nothing masked earlier comes back
        previous = kept


def test_global_ranking_uses_one_threshold():
    model = mlp()
    with torch.no_grad():
        # |w| of layer 0 is at most 1/sqrt(16) at init; layer 2's are all >= 1, so one global threshold
        # removes only layer-0 weights (per-layer ranking would take half of each).
        model[2].weight.copy_(model[2].weight.sign() * (1 + model[2].weight.abs()))
    sparsify(model, "unstructured", 0.5, layers=["0", "2"], global_ranking=True)
    zeros = zero_fraction(model)
    total = (zeros["0"] * 512 + zeros["2"] * 256) / 768
    assert total == pytest.approx(0.5, abs=1 / 768)
    assert zeros["0"] == 384 / 512 and zeros["2"] == 0


def test_finalize_makes_masks_permanent_and_records_the_tensorrt_flag():
    model = mlp()
    sparsifier = Sparsifier(model, "2:4", layers=["0"])
    sparsifier.step()
    extras = sparsifier.finalize()
    assert "weight_orig" not in dict(model[0].named_parameters())
    assert not any(key.endswith("_mask") for key in model.state_dict())
    assert zero_fraction(model)["0"] == 0.5
    assert extras["tensorrt_sparse_kernels"] is True
    assert extras["trtexec_flags"] == ["--sparsity=enable"]
    assert extras["onnxruntime_cpu_speedup"] is False
    assert extras["measured"] == {"0": 0.5}
    with pytest.raises(PruningError, match="finalize"):
        sparsifier.step()


def test_exported_weights_satisfy_2_4_and_dense_ones_do_not(tmp_path, onnx_roundtrip):
    model = mlp()
    sparsify(model, "2:4", layers=["0", "2"])
    x = torch.randn(3, 16)
    got, expected = onnx_roundtrip(model, (x,), tmp_path / "sparse.onnx")
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert check_2_4(tmp_path / "sparse.onnx") == {"0.weight": True, "2.weight": True, "4.weight": False}

    with torch.no_grad():
        group = model[2].weight[0, :4]
        group[group == 0] = 1.0  # break one group of four
    onnx_roundtrip(model, (x,), tmp_path / "broken.onnx", dynamo=False)
    assert check_2_4(tmp_path / "broken.onnx")["2.weight"] is False


def test_check_2_4_reads_int8_qdq_and_conv_weights(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8, 4))
    sparsify(model, "2:4", layers=["0", "2"])
    x = torch.randn(1, 4, 3, 3)
    torch.onnx.export(model.eval(), (x,), str(tmp_path / "fp32.onnx"), dynamo=False, input_names=["x"])

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": torch.randn(1, 4, 3, 3).numpy()} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(
        str(tmp_path / "fp32.onnx"),
        str(tmp_path / "int8.onnx"),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    result = check_2_4(tmp_path / "int8.onnx")
    assert sorted(result.values()) == [False, True, True]  # two sparse convs, one dense Linear
    assert len(result) == 3


def test_saving_with_masks_attached_is_an_error(tmp_path):
    model = mlp()
    sparsifier = Sparsifier(model, "unstructured", 0.5)
    sparsifier.step()
    with pytest.raises(PruningError, match="finalize"):
        save_pruned(model, [], tmp_path)
    assert sorted(make_permanent(model)) == ["0", "2", "4"]
    save_pruned(model, [], tmp_path)


def test_bad_sparsity_input_is_explained():
    with pytest.raises(PruningError, match="multiple of 4"):
        Sparsifier(nn.Sequential(nn.Linear(6, 4)), "2:4")
    with pytest.raises(PruningError, match="needs a target"):
        Sparsifier(mlp(), "unstructured")
    with pytest.raises(PruningError, match=r"outside \[0, 1\)"):
        Sparsifier(mlp(), "unstructured", 1.0)
    with pytest.raises(PruningError, match="unknown sparsity pattern '4:8'"):
        Sparsifier(mlp(), "4:8")
    with pytest.raises(PruningError, match="matches no module"):
        Sparsifier(mlp(), "2:4", layers=["fc*"])
    with pytest.raises(PruningError, match="no Linear/Conv2d"):
        Sparsifier(mlp(), "2:4", layers=["1"])  # a ReLU
