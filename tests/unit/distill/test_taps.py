"""Taps: resolving module names and globs, layer maps, capturing with hooks, binding losses to real models."""

import pytest
import torch
from torch import nn

from compressor.distill.losses import Features, build_loss
from compressor.distill.taps import (
    TapSpec,
    bind_taps,
    capture,
    pair_taps,
    parse_tap,
    resolve_modules,
    uniform_layer_map,
)
from compressor.errors import RecipeError


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x, scale=1.0, tag=""):
        y = self.fc(x) * scale
        return y, y.sum(-1)  # a tuple, like many Hugging Face modules


class Net(nn.Module):
    def __init__(self, depth=12, width=3):
        super().__init__()
        self.layers = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 2)
        self.unused = nn.Linear(width, width)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x):
        for layer in self.layers:
            x, _ = layer(x, scale=self.scale, tag="block")
        return self.head(x)


def tiny_bert(layers, hidden=8, heads=2, eager=False):
    from transformers import BertConfig, BertModel

    extra = {"attn_implementation": "eager"} if eager else {}
    cfg = BertConfig(
        vocab_size=30,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=16,
        max_position_embeddings=16,
        **extra,
    )
    return BertModel(cfg).eval()


# --- specs and resolution -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parsed", "key"),
    [
        ("layers.0", ("layers.0", "output", 0, False), "layers.0"),
        ("layers.0:output[1]", ("layers.0", "output", 1, False), "layers.0:output[1]"),
        ("layers.0:input", ("layers.0", "input", 0, False), "layers.0:input"),
        ("layers.0:input.scale", ("layers.0", "input", "scale", False), "layers.0:input.scale"),
        ("a.self:attention", ("a.self", "output", 1, True), "a.self:attention"),
        (
            "m:output.last_hidden_state",
            ("m", "output", "last_hidden_state", False),
            "m:output.last_hidden_state",
        ),
    ],
)
def test_parse_tap_and_canonical_key(text, parsed, key):
    assert parse_tap(text) == parsed
    assert TapSpec(*parsed).key == key


def test_parse_tap_rejects_unknown_suffix():
    with pytest.raises(RecipeError, match="unknown suffix ':outputs'"):
        parse_tap("layers.0:outputs")


def test_globs_resolve_in_model_order_not_alphabetical():
    names = resolve_modules(Net(), "layers.*.fc")
    assert names == [f"layers.{i}.fc" for i in range(12)]
    assert resolve_modules(Net(), "head") == ["head"]


def test_glob_star_stays_within_one_name_segment():
    net = Net(depth=3)
    assert resolve_modules(net, "layers.*") == ["layers.0", "layers.1", "layers.2"]
    assert resolve_modules(net, "**.fc") == ["layers.0.fc", "layers.1.fc", "layers.2.fc"]
    assert resolve_modules(net, "layers.[!0].fc") == ["layers.1.fc", "layers.2.fc"]
    assert resolve_modules(net, "layers.[0-1]") == ["layers.0", "layers.1"]


def test_a_name_that_matches_nothing_lists_the_closest_modules():
    with pytest.raises(
        RecipeError, match=r"student tap 'layer.1.fc' matches no module; closest module names: layers\.1\.fc"
    ):
        resolve_modules(Net(), "layer.1.fc", "student")
    with pytest.raises(RecipeError, match="matches no module"):
        resolve_modules(Net(), "encoder.*")


# --- layer maps -------------------------------------------------------------------------------------------


def test_uniform_layer_map_is_tinyberts_g():
    assert uniform_layer_map(4, 12) == [2, 5, 8, 11]  # g(m) = 3m, 1-based 3, 6, 9, 12
    assert uniform_layer_map(3, 6) == [1, 3, 5]
    assert uniform_layer_map(3, 4) == [0, 1, 3]  # floor(m·4/3) = 1, 2, 4
    assert uniform_layer_map(2, 2) == [0, 1]
    with pytest.raises(RecipeError, match="at least as many layers"):
        uniform_layer_map(4, 2)


def test_pair_taps_equal_counts_maps_and_errors():
    s, t = ["s0", "s1"], ["t0", "t1", "t2", "t3"]
    assert pair_taps(s, ["t0", "t1"]) == [("s0", "t0"), ("s1", "t1")]
    assert pair_taps(s, t, "uniform") == [("s0", "t1"), ("s1", "t3")]
    assert pair_taps(s, t, [0, 2]) == [("s0", "t0"), ("s1", "t2")]
    assert pair_taps(s, t, [[-1, -1]]) == [("s1", "t3")]
    with pytest.raises(RecipeError, match="2 student taps .* but 4 teacher taps .*layer_map"):
        pair_taps(s, t, who="loss 'fitnets'")
    with pytest.raises(RecipeError, match="out of range"):
        pair_taps(s, t, [[0, 4]])
    with pytest.raises(RecipeError, match="2 teacher indices for 1 student"):
        pair_taps(["s0"], t, [0, 1])
    with pytest.raises(RecipeError, match="unknown layer_map 'linear'"):
        pair_taps(s, t, "linear")


# --- capture ----------------------------------------------------------------------------------------------


def test_capture_outputs_inputs_tuple_elements_and_keywords():
    torch.manual_seed(0)
    net = Net(depth=2)
    x = torch.randn(4, 3, requires_grad=True)
    taps = ["layers.0", "layers.0:output[1]", "layers.1:input", "layers.1:input.scale", "head:input"]
    with capture(net, taps) as feats:
        out = net(x)
    y0 = net.layers[0].fc(x) * 0.5
    torch.testing.assert_close(feats["layers.0"], y0, rtol=0, atol=0)
    torch.testing.assert_close(feats["layers.0:output[1]"], y0.sum(-1), rtol=0, atol=0)
    torch.testing.assert_close(feats["layers.1:input"], y0, rtol=0, atol=0)
    assert feats["layers.1:input.scale"].item() == 0.5
    torch.testing.assert_close(net.head(feats["head:input"]), out, rtol=0, atol=0)
    # hooks are gone and the captured student tensor still carries the graph
    assert all(not m._forward_hooks for m in net.modules())
    feats["layers.0"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_capture_of_a_non_tensor_keyword_is_an_error():
    net = Net(depth=1)
    with pytest.raises(RecipeError, match="is a str, not a tensor"), capture(net, ["layers.0:input.tag"]):
        net(torch.randn(1, 3))
    assert all(not m._forward_hooks for m in net.modules())


def test_capture_errors_for_a_module_that_did_not_run_or_ran_twice():
    net = Net(depth=1)
    with pytest.raises(RecipeError, match="'unused': the module did not run"), capture(net, ["unused"]):
        net(torch.randn(1, 3))
    with pytest.raises(RecipeError, match="ran more than once"), capture(net, ["head"]):
        net(torch.randn(1, 3))
        net(torch.randn(1, 3))


# --- Hugging Face ---------------------------------------------------------------------------------------------


def test_hf_attention_probabilities_are_captured_when_requested():
    bert = tiny_bert(layers=2)
    ids = torch.randint(0, 30, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    taps = ["encoder.layer.*.attention.self:attention", "encoder.layer.*.attention.self.query"]
    with capture(bert, taps) as feats:
        out = bert(ids, attention_mask=mask, output_attentions=True)
    for i in range(2):
        torch.testing.assert_close(
            feats[f"encoder.layer.{i}.attention.self:attention"], out.attentions[i], rtol=0, atol=0
        )
        assert feats[f"encoder.layer.{i}.attention.self.query"].shape == (2, 5, 8)
    assert feats["encoder.layer.0.attention.self:attention"][1, :, :, 3:].abs().max() == 0  # padded keys
    with pytest.raises(RecipeError, match="output_attentions=True"), capture(bert, taps[:1]):
        bert(ids, attention_mask=mask)


def test_bind_taps_pairs_layers_uniformly_and_the_loss_trains_the_student():
    teacher, student = tiny_bert(layers=4, eager=True), tiny_bert(layers=2, hidden=4, eager=True)
    for p in teacher.parameters():
        p.requires_grad_(False)
    losses = {
        "hidden": build_loss("tinybert_hidden", {"pairs": [["hs", "hs"]], "layer_map": "uniform"}),
        "attn": build_loss("tinybert_attention", {"pairs": [["att", "att"]], "layer_map": "uniform"}),
        "dmd": build_loss(
            "dmd", {"pairs": [["encoder.layer.*.attention.self.query"] * 2], "layer_map": "uniform"}
        ),
        "kd": build_loss("hinton"),
    }
    aliases = {
        "student": {"hs": "encoder.layer.*", "att": "encoder.layer.*.attention.self:attention"},
        "teacher": {"hs": "encoder.layer.*", "att": "encoder.layer.*.attention.self:attention"},
    }
    plan = bind_taps(losses, student, teacher, aliases)
    assert losses["hidden"].pairs() == [
        ("encoder.layer.0", "encoder.layer.1"),
        ("encoder.layer.1", "encoder.layer.3"),
    ]
    assert [t.key for t in plan.teacher if not t.attention and "query" not in t.key] == [
        "encoder.layer.1",
        "encoder.layer.3",
    ]
    assert plan.model_kwargs("student") == {"output_attentions": True}

    ids = torch.randint(0, 30, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    with capture(student, plan.student) as s_taps:
        s_out = student(ids, attention_mask=mask, **plan.model_kwargs("student"))
    with torch.inference_mode(), capture(teacher, plan.teacher) as t_taps:
        t_out = teacher(ids, attention_mask=mask, **plan.model_kwargs("teacher"))
    s = Features(s_out.pooler_output, s_taps, attention_mask=mask)
    t = Features(t_out.pooler_output[:, :4], t_taps, attention_mask=mask)
    for loss in losses.values():
        loss.prepare(s, t)
    total = sum(loss(s, t) for loss in losses.values())
    total.backward()
    grad = student.encoder.layer[0].attention.self.query.weight.grad
    assert torch.isfinite(total) and grad is not None and grad.abs().sum() > 0
    assert losses["hidden"].regressors["shared"].weight.grad.abs().sum() > 0


def test_bind_taps_errors_name_the_problem():
    student, teacher = Net(depth=2), Net(depth=4)
    loss = build_loss("fitnets", {"pairs": [["layers.*.fc", "layers.*.fc"]]})
    with pytest.raises(RecipeError, match="loss 'hint': 2 student taps .* 4 teacher taps"):
        bind_taps({"hint": loss}, student, teacher)
    with pytest.raises(RecipeError, match="teacher tap 'layer.*' matches no module"):
        bind_taps({"hint": loss}, student, teacher, {"teacher": {"typo": "layer.*"}})
    with pytest.raises(RecipeError, match="only 'student' and 'teacher'"):
        bind_taps({"hint": loss}, student, teacher, {"students": {}})


def test_bound_loss_reports_a_tap_the_objective_did_not_capture():
    student, teacher = Net(depth=2), Net(depth=2)
    loss = build_loss("fitnets", {"pairs": [["layers.*.fc", "layers.*.fc"]]})
    bind_taps([loss], student, teacher)
    x = torch.randn(2, 3)
    with pytest.raises(RecipeError, match="student tap 'layers.0.fc', which was not captured"):
        loss.prepare(Features(x, {}), Features(x, {"layers.0.fc": x, "layers.1.fc": x}))
