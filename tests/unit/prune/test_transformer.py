"""Head, FFN-width and depth pruning on a tiny random Hugging Face BERT."""

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from compressor.prune.structure import load_pruned, save_pruned  # noqa: E402
from compressor.prune.structured import PruningError, count_params  # noqa: E402
from compressor.prune.transformer import (  # noqa: E402
    head_importance,
    layer_importance,
    prune_ffn,
    prune_heads,
    prune_layers,
)

HIDDEN, HEADS, HEAD_DIM, FFN, LAYERS = 32, 4, 8, 64, 3


def tiny_bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=32,
    )
    return transformers.BertModel(config).eval()


def batches(n: int = 2) -> list[dict[str, torch.Tensor]]:
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0  # one padded sequence: padding must not count
    return [{"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": mask} for _ in range(n)]


def hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


def silence_head(model: nn.Module, layer: int, head: int) -> None:
    """Zero the head's value projection: its attention output is exactly 0, so it is unimportant."""
    value = model.encoder.layer[layer].attention.self.value
    rows = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
    value.weight.data[rows] = 0
    value.bias.data[rows] = 0


def test_silent_heads_are_pruned_first_and_outputs_do_not_change():
    model, data = tiny_bert(), batches()
    for layer, head in [(0, 1), (1, 3), (2, 0)]:
        silence_head(model, layer, head)
    reference = hidden(model, data[0])
    params = count_params(model)

    result = prune_heads(model, 0.25, calibration=data)

    assert result.record == {"kind": "heads", "heads": {"0": [1], "1": [3], "2": [0]}}
    assert [layer.attention.self.num_attention_heads for layer in model.encoder.layer] == [3, 3, 3]
    assert model.config.pruned_heads == {0: [1], 1: [3], 2: [0]}
    # Each head: Q, K, V rows (weights + biases) and output-projection columns.
    per_head = 3 * (HEAD_DIM * HIDDEN + HEAD_DIM) + HIDDEN * HEAD_DIM
    assert count_params(model) == params - LAYERS * per_head
    torch.testing.assert_close(hidden(model, data[0]), reference, atol=1e-5, rtol=1e-5)


def test_head_importance_scores_silent_head_zero():
    model = tiny_bert()
    silence_head(model, 1, 2)
    scores = head_importance(model, batches())
    assert scores[1][2] == 0 and (scores[1][[0, 1, 3]] > 0).all()
    assert [len(s) for s in head_importance(model, importance="l2")] == [HEADS] * LAYERS


def test_explicit_heads_after_earlier_pruning_use_current_indices():
    model = tiny_bert()
    prune_heads(model, heads={0: [0]})
    result = prune_heads(model, heads={0: [0]})  # current head 0 is original head 1
    assert result.record["heads"] == {"0": [1]}
    assert model.config.pruned_heads[0] == [0, 1]
    assert model.encoder.layer[0].attention.self.num_attention_heads == 2


def test_pruning_does_not_touch_the_callers_config():
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
    )
    model = transformers.BertModel(config).eval()
    prune_heads(model, heads={0: [0]})
    prune_layers(model, drop=[1])
    assert config.pruned_heads == {} and config.num_hidden_layers == LAYERS
    assert model.config.num_hidden_layers == 2


def test_silent_ffn_neurons_are_pruned_and_outputs_do_not_change():
    model, data = tiny_bert(), batches()
    dead = torch.arange(0, FFN, 2)  # half the neurons: zero input rows and biases -> GELU(0) = 0
    for layer in model.encoder.layer:
        layer.intermediate.dense.weight.data[dead] = 0
        layer.intermediate.dense.bias.data[dead] = 0
    reference = hidden(model, data[0])

    result = prune_ffn(model, 0.5, calibration=data)

    assert all(ids == dead.tolist() for ids in result.record["pruned"].values())
    assert [layer.intermediate.dense.out_features for layer in model.encoder.layer] == [FFN // 2] * LAYERS
    assert model.config.intermediate_size == FFN // 2
    torch.testing.assert_close(hidden(model, data[0]), reference, atol=1e-5, rtol=1e-5)


def test_ffn_round_to_and_magnitude_importance():
    model = tiny_bert()
    prune_ffn(model, 0.3, importance="l2", round_to=16)  # 64 * 0.7 = 44.8 -> 44 -> 32
    assert model.encoder.layer[0].intermediate.dense.out_features == 32
    assert model.encoder.layer[0].output.dense.in_features == 32


def make_identity(block: nn.Module) -> None:
    """Zero both residual branches: the block then only re-applies LayerNorm to normalised input."""
    for dense in (block.attention.output.dense, block.output.dense):
        dense.weight.data.zero_()
        dense.bias.data.zero_()


def test_layer_that_changes_nothing_is_dropped_first():
    model, data = tiny_bert(), batches()
    make_identity(model.encoder.layer[1])
    reference = hidden(model, data[0])
    scores = layer_importance(model, data)
    assert scores[1] < 1e-6 < min(scores[0], scores[2])

    result = prune_layers(model, drop=1, calibration=data)

    assert result.record == {"kind": "layers", "keep": [0, 2]}
    assert model.config.num_hidden_layers == 2 and len(model.encoder.layer) == 2
    torch.testing.assert_close(hidden(model, data[0]), reference, atol=1e-4, rtol=1e-4)


def test_depth_pruning_rekeys_pruned_heads():
    model = tiny_bert()
    prune_heads(model, heads={2: [3]})
    prune_layers(model, drop=[0])
    assert model.config.pruned_heads == {1: [3]}
    assert model.encoder.layer[1].attention.self.num_attention_heads == 3


def test_heads_ffn_and_depth_pruned_model_exports_and_rebuilds(tmp_path, onnx_roundtrip):
    model, data = tiny_bert(), batches()
    records = [
        prune_heads(model, 0.5, calibration=data).record,
        prune_ffn(model, 0.5, calibration=data).record,
        prune_layers(model, drop=1, calibration=data).record,
    ]

    class LastHidden(nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    inputs = (data[0]["input_ids"], data[0]["attention_mask"])
    got, expected = onnx_roundtrip(LastHidden(model), inputs, tmp_path / "bert.onnx")
    assert got.shape == (2, 8, HIDDEN)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)

    save_pruned(model, records, tmp_path / "pruned")
    rebuilt = load_pruned(tiny_bert, tmp_path / "pruned").eval()
    assert rebuilt.config.num_hidden_layers == 2
    torch.testing.assert_close(hidden(rebuilt, data[0]), hidden(model, data[0]), atol=0, rtol=0)


def test_removing_every_head_is_an_error():
    with pytest.raises(PruningError, match="all 4 heads of layer 0"):
        prune_heads(tiny_bert(), heads={0: [0, 1, 2, 3]})
    with pytest.raises(PruningError, match="every attention head of layer"):
        prune_heads(tiny_bert(), 0.9, importance="l2")  # keeps int(4 * 0.1) = 0 heads


def test_bad_transformer_input_is_explained():
    with pytest.raises(PruningError, match=r"outside \[0, 1\)"):
        prune_ffn(tiny_bert(), 1.0, importance="l2")
    with pytest.raises(PruningError, match="calibration"):
        prune_heads(tiny_bert(), 0.25)
    with pytest.raises(PruningError, match="leaves none"):
        prune_layers(tiny_bert(), drop=LAYERS)
    with pytest.raises(PruningError, match="not a Hugging Face BERT-family model"):
        prune_heads(nn.Linear(2, 2), 0.5, importance="l2")
    with pytest.raises(PruningError, match="unknown head importance 'magic'"):
        prune_heads(tiny_bert(), 0.5, importance="magic")
