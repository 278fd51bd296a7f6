"""The binarized BERT encoder: Bi-Attention by hand, masking, HF API, hookable Q/K/V, configuration errors."""

import math

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel

from compressor.errors import ModelLoadError, RecipeError
from compressor.quant.bibert import BiBertConfig, BiBertSelfAttention, TailCutActivation, binarize_bert
from compressor.quant.binary import ActQuant, BinaryEmbedding, BinaryLinear, BoolBinarize


def tiny_config(**overrides) -> BertConfig:
    values = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=32)
    return BertConfig(**(values | overrides))


def _hand_attention() -> BiBertSelfAttention:
    attention = BiBertSelfAttention(hidden_size=2, num_heads=1, act_bits=1, attention="bi", center=False)
    weights = {"query": [[2.0, -2.0], [2.0, 2.0]], "key": [[1.0, 1.0], [-1.0, 1.0]], "value": [[3.0, 3.0], [3.0, -3.0]]}
    with torch.no_grad():
        for name, w in weights.items():
            getattr(attention, name).weight.copy_(torch.tensor(w))
            getattr(attention, name).bias.zero_()
    return attention.eval()


HIDDEN = torch.tensor([[[1.0, 0.5], [-1.0, 2.0], [0.3, -0.2]]])  # sign → [1, 1], [-1, 1], [1, -1]


def test_bi_attention_matches_a_hand_computed_example():
    # Q = 2·(sign(h) Sqᵀ) = [0, 4], [-4, 0], [4, 0] → B_Q = [1, 1], [-1, 1], [1, 1]   (sign(0) = +1)
    # K = [2, 0], [0, 2], [0, -2]                   → B_K = [1, 1], [1, 1], [1, -1]
    # B_Q B_Kᵀ = [[2, 2, 0], [0, 0, -2], [2, 2, 0]] → bool: [[1, 1, 1], [1, 1, 0], [1, 1, 1]] (bool(0) = 1)
    # V = [6, 0], [0, -6], [0, 6]                   → B_V = [1, 1], [1, -1], [1, 1]
    attention = _hand_attention()
    captured = {}
    attention.scores.register_forward_hook(lambda _m, _i, out: captured.__setitem__("scores", out))
    context, probs = attention(HIDDEN, output_attentions=True)
    expected_scores = torch.tensor([[2.0, 2.0, 0.0], [0.0, 0.0, -2.0], [2.0, 2.0, 0.0]]) / math.sqrt(2)
    assert torch.allclose(captured["scores"][0, 0], expected_scores, atol=1e-6, rtol=0)
    assert torch.equal(probs[0, 0], torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]))
    assert torch.equal(context[0], torch.tensor([[3.0, 1.0], [2.0, 0.0], [3.0, 1.0]]))


def test_bi_attention_ignores_masked_keys():
    attention = _hand_attention()
    mask = torch.tensor([0.0, 0.0, torch.finfo(torch.float32).min]).view(1, 1, 1, 3)  # HF's additive mask
    context, probs = attention(HIDDEN, attention_mask=mask, output_attentions=True)
    assert torch.equal(probs[0, 0, :, 2], torch.zeros(3))
    assert torch.equal(context[0], torch.tensor([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0]]))
    bool_mask = torch.tensor([True, True, False]).view(1, 1, 1, 3)  # True = attend
    assert torch.equal(attention(HIDDEN, attention_mask=bool_mask)[0], context)


def test_binarized_bert_structure_and_hf_api():
    model = binarize_bert(BertModel(tiny_config()).eval())
    layer = model.encoder.layer[0]
    assert isinstance(layer.attention.self, BiBertSelfAttention)
    for linear in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value,
                   layer.attention.output.dense, layer.intermediate.dense, layer.output.dense):
        assert isinstance(linear, BinaryLinear) and isinstance(linear.act, ActQuant) and linear.act.bits == 1
    assert isinstance(model.embeddings.word_embeddings, BinaryEmbedding)
    assert type(model.embeddings.position_embeddings) is torch.nn.Embedding  # as in the paper
    assert type(model.pooler.dense) is torch.nn.Linear
    ids = torch.randint(0, 50, (2, 7))
    out = model(input_ids=ids, attention_mask=torch.ones(2, 7, dtype=torch.long), output_attentions=True)
    assert out.last_hidden_state.shape == (2, 7, 32) and out.pooler_output.shape == (2, 32)
    for probs in out.attentions:  # exactly binary
        assert set(probs.unique().tolist()) <= {0.0, 1.0}


def test_qkv_scores_and_binarized_tensors_are_hookable_by_hf_names():
    model = binarize_bert(BertModel(tiny_config()).eval())
    prefix = "encoder.layer.1.attention.self."
    names = ["query", "key", "value", "scores", "probs", "q_act", "k_act", "v_act"]
    seen = {}
    for name in names:
        model.get_submodule(prefix + name).register_forward_hook(
            lambda _m, _i, out, name=name: seen.__setitem__(name, out))
    model(input_ids=torch.randint(0, 50, (2, 5)))
    assert seen["query"].shape == (2, 5, 32)  # real-valued Q (what DMD compares)
    assert seen["scores"].shape == (2, 4, 5, 5)
    assert set(seen["q_act"].unique().tolist()) <= {-1.0, 1.0}
    assert not set(seen["query"].unique().tolist()) <= {-1.0, 1.0}
    assert set(seen["probs"].unique().tolist()) <= {0.0, 1.0}


def test_padding_does_not_change_real_tokens():
    model = binarize_bert(BertModel(tiny_config()).eval())
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    ids_a = torch.tensor([[5, 9, 12, 3, 0, 0]])
    ids_b = torch.tensor([[5, 9, 12, 3, 41, 17]])  # different tokens under the padding
    a = model(input_ids=ids_a, attention_mask=mask, output_attentions=True)
    b = model(input_ids=ids_b, attention_mask=mask)
    assert torch.equal(a.last_hidden_state[:, :4], b.last_hidden_state[:, :4])
    assert torch.equal(a.attentions[0][..., 4:], torch.zeros_like(a.attentions[0][..., 4:]))


def test_softmax_mode_and_kbit_activations():
    model = binarize_bert(BertModel(tiny_config()).eval(), BiBertConfig(bits="1-32-2", attention="softmax"))
    attention = model.encoder.layer[0].attention.self
    assert isinstance(attention.probs, torch.nn.Softmax) and attention.q_act.bits == 2
    assert type(model.embeddings.word_embeddings) is torch.nn.Embedding  # E = 32
    probs = model(input_ids=torch.randint(0, 50, (1, 6)), output_attentions=True).attentions[0]
    assert torch.allclose(probs.sum(-1), torch.ones(1, 4, 6), atol=1e-6, rtol=0)


def test_gradients_reach_latent_weights_in_training():
    model = binarize_bert(BertModel(tiny_config()))
    model.train()
    model(input_ids=torch.randint(0, 50, (2, 6))).last_hidden_state.pow(2).mean().backward()
    layer = model.encoder.layer[0]
    for linear in (layer.attention.self.query, layer.attention.output.dense, layer.output.dense):
        assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0
    assert model.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_head_model_and_pooler_option():
    model = BertForSequenceClassification(tiny_config(num_labels=3)).eval()
    binarize_bert(model, BiBertConfig(binarize_pooler=True))
    assert isinstance(model.bert.pooler.dense, BinaryLinear) and type(model.classifier) is torch.nn.Linear
    assert model(input_ids=torch.randint(0, 50, (2, 5))).logits.shape == (2, 3)


def test_bool_binarize_module_output_is_binary():
    assert torch.equal(BoolBinarize()(torch.tensor([-0.1, 0.0, 3.0])), torch.tensor([0.0, 1.0, 1.0]))


@pytest.mark.parametrize("kwargs, fragment", [({"attention": "sparse"}, "attention must be"),
                                              ({"bits": "1-1"}, "W-E-A")])
def test_config_errors(kwargs, fragment):
    with pytest.raises(RecipeError, match=fragment):
        BiBertConfig(**kwargs)


def test_unsupported_models_are_refused():
    with pytest.raises(ModelLoadError, match="absolute position"):
        binarize_bert(BertModel(tiny_config(position_embedding_type="relative_key")))
    with pytest.raises(ModelLoadError, match="not a BERT-like"):
        binarize_bert(torch.nn.Linear(2, 2))


def test_gelu_tail_is_cut_exactly_for_sign_binarized_inputs():
    model = binarize_bert(BertModel(tiny_config()).eval())
    act = model.encoder.layer[0].intermediate.intermediate_act_fn
    assert isinstance(act, TailCutActivation)
    z = torch.tensor([-9.0, -5.5, -5.0, -1.0, 0.0, 2.0])
    out = act(z)
    assert torch.equal(out[:2], torch.zeros(2)) and not out[:2].signbit().any()  # +0.0: sign → +1 everywhere
    assert torch.equal(out[2:], torch.nn.functional.gelu(z[2:]))
    kbit = binarize_bert(BertModel(tiny_config()).eval(), BiBertConfig(bits="1-1-2"))
    assert not isinstance(kbit.encoder.layer[0].intermediate.intermediate_act_fn, TailCutActivation)
