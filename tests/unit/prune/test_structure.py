"""Save a pruned model as structure JSON + tensors, and rebuild it from the original constructor."""

import json

import pytest
import torch

from compressor.errors import CompressorError
from compressor.models.cnn_zoo import ResCatNet
from compressor.prune.sparsity import sparsify
from compressor.prune.structure import STRUCTURE_FILE, WEIGHTS_FILE, load_pruned, rebuild, save_pruned
from compressor.prune.structured import ChannelPruner, PruningError, count_params, prune_channels

X = torch.randn(2, 3, 16, 16)


def test_iteratively_pruned_cnn_round_trips_exactly(tmp_path):
    model = ResCatNet(width=16).eval()
    pruner = ChannelPruner(model, X, 0.6, steps=2, importance="l1")
    while not pruner.done:
        pruner.step()
    with torch.no_grad():
        model.mix[1].running_mean.uniform_()  # buffers travel too, not just parameters

    save_pruned(model, [pruner.record()], tmp_path)
    rebuilt = load_pruned(ResCatNet, tmp_path).eval()

    assert count_params(rebuilt) == count_params(model) < count_params(ResCatNet())
    torch.testing.assert_close(rebuilt(X), model(X), atol=0, rtol=0)


def test_saved_files_are_data_only(tmp_path):
    model = ResCatNet(width=16).eval()
    result = prune_channels(model, X, 0.5)
    save_pruned(model, [result.record], tmp_path)
    structure = json.loads((tmp_path / STRUCTURE_FILE).read_text())
    assert structure["records"][0]["kind"] == "channels"
    assert structure["records"][0]["inputs"] == [{"shape": [2, 3, 16, 16], "dtype": "float32"}]
    assert structure["shapes"]["stem.0.weight"] == [8, 3, 3, 3]
    state = torch.load(tmp_path / WEIGHTS_FILE, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_pruned_and_sparsified_model_round_trips(tmp_path):
    model = ResCatNet(width=16).eval()
    result = prune_channels(model, X, 0.5, round_to=4)
    sparsify(model, "2:4", layers=["block.*", "mix.0"])
    save_pruned(model, [result.record], tmp_path)
    rebuilt = load_pruned(ResCatNet, tmp_path).eval()
    assert (rebuilt.mix[0].weight == 0).float().mean() == 0.5
    torch.testing.assert_close(rebuilt(X), model(X), atol=0, rtol=0)


def test_wrong_constructor_is_an_error(tmp_path):
    model = ResCatNet(width=16).eval()
    save_pruned(model, [prune_channels(model, X, 0.5).record], tmp_path)
    with pytest.raises(PruningError, match="does not match the saved structure.*original, unpruned"):
        rebuild(lambda: ResCatNet(width=32), tmp_path)


def test_missing_or_foreign_structure_is_an_error(tmp_path):
    with pytest.raises(PruningError, match="no pruned structure"):
        load_pruned(ResCatNet, tmp_path)
    (tmp_path / STRUCTURE_FILE).write_text(json.dumps({"format": "other"}))
    with pytest.raises(PruningError, match="is not a compressor.pruned-structure v1 file"):
        rebuild(ResCatNet, tmp_path)


def test_unknown_record_kind_lists_known_kinds(tmp_path):
    model = ResCatNet()
    save_pruned(model, [{"kind": "filters"}], tmp_path)
    with pytest.raises(
        CompressorError, match="unknown pruning record kind 'filters'; known: channels, ffn, heads"
    ):
        rebuild(ResCatNet, tmp_path)
