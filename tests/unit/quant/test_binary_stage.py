"""The `binarize` stage: registration, what each recipe switch builds, the baseline's sign attention,
frozen tables, FLOPs/BOPs, and the ablation recipes in examples/bibert staying in sync with base.yaml."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from transformers import BertConfig, BertModel

from compressor.errors import RecipeError
from compressor.models.hf import SentenceEncoder
from compressor.quant.bibert import BiBertSelfAttention
from compressor.quant.binary import BinaryEmbedding, BinaryLinear, BoolBinarize
from compressor.quant.binary_stage import (
    BinarizeSpec,
    SignSoftmax,
    binarize_student,
    count_binary_ops,
    find_bert,
    first_divergence,
    freeze_parameters,
    frozen_tables,
    refuse_constant_activations,
)
from compressor.recipe import parse_recipe
from compressor.stages import load_stage_modules

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "bibert"
ABLATION = {"baseline": ("sign", "tinybert_attention"), "bi_attention": ("bi", "tinybert_attention"),
            "dmd": ("sign", "dmd"), "bibert": ("bi", "dmd")}


def tiny_encoder(layers: int = 2) -> SentenceEncoder:
    config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return SentenceEncoder(BertModel(config).eval())


def batch(n: int = 3, length: int = 7) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 60, (n, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(n, length, dtype=torch.long)
    mask[-1, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_binarize_is_a_registered_stage_with_its_spec():
    registry = load_stage_modules()
    assert registry.get("binarize").spec is BinarizeSpec
    recipe = parse_recipe({"student": {"model": "mlp"}, "stages": [{"kind": "binarize", "bits": "1-1-2", "epochs": 1}]})
    assert isinstance(recipe.stages[0], BinarizeSpec) and recipe.stages[0].bits == "1-1-2"
    with pytest.raises(RecipeError, match="attention"):
        parse_recipe({"student": {"model": "mlp"}, "stages": [{"kind": "binarize", "attention": "sigmoid"}]})


@pytest.mark.parametrize(("attention", "probs"), [("bi", BoolBinarize), ("sign", SignSoftmax), ("softmax", nn.Softmax)])
def test_the_attention_switch_builds_that_attention(attention, probs):
    model = tiny_encoder()
    details = binarize_student(model, BinarizeSpec(attention=attention))
    blocks = [m for m in model.modules() if isinstance(m, BiBertSelfAttention)]
    assert len(blocks) == 2 and all(type(b.probs) is probs for b in blocks)
    assert details["attention"] == attention and details["model"] == "bert" and details["where"] == "model"
    assert isinstance(model.model.embeddings.word_embeddings, BinaryEmbedding)  # E = 1 in 1-1-1
    assert details["parameters"]["1bit"] == sum(m.weight.numel() for m in model.modules()
                                                if isinstance(m, BinaryLinear | BinaryEmbedding))


def test_attention_switch_changes_what_the_model_computes():
    outputs = {}
    for attention in ("bi", "sign", "softmax"):
        torch.manual_seed(0)
        model = tiny_encoder()
        binarize_student(model, BinarizeSpec(attention=attention))
        with torch.no_grad():
            outputs[attention] = model(**batch())
    assert not torch.allclose(outputs["bi"], outputs["sign"]) and not torch.allclose(outputs["bi"], outputs["softmax"])


def test_sign_softmax_is_one_on_real_keys_zero_on_masked_keys_with_the_softmax_gradient():
    scores = torch.tensor([[3.0, -2.0, 0.5, torch.finfo(torch.float32).min]], requires_grad=True)
    out = SignSoftmax()(scores)
    assert torch.equal(out, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))  # sign(softmax) = 1 wherever p > 0
    weights = torch.tensor([[0.3, -1.0, 2.0, 5.0]])
    (out * weights).sum().backward()
    reference = scores.detach().clone().requires_grad_(True)
    (torch.softmax(reference, -1) * weights).sum().backward()
    assert torch.allclose(scores.grad, reference.grad, atol=1e-7, rtol=0)  # straight through |p| ≤ 1


def test_generic_models_binarize_by_glob_and_reject_bert_only_fields():
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    details = binarize_student(mlp, BinarizeSpec(bits="1-32-2", modules=["0"]))
    assert isinstance(mlp[0], BinaryLinear) and type(mlp[2]) is nn.Linear and mlp[0].act_bits == 2
    assert details["model"] == "generic" and details["attention"] is None and details["layers"] == 1
    with pytest.raises(RecipeError, match="needs a BERT-like student"):
        binarize_student(nn.Sequential(nn.Linear(4, 4)), BinarizeSpec(attention="bi"))
    with pytest.raises(RecipeError, match="for non-BERT students"):
        binarize_student(tiny_encoder(), BinarizeSpec(modules=["**"]))
    with pytest.raises(RecipeError, match="already binarized"):
        binarize_student(mlp, BinarizeSpec())
    with pytest.raises(RecipeError, match="W-E-A"):
        binarize_student(tiny_encoder(), BinarizeSpec(bits="1-1"))


def test_a_1bit_activation_that_is_always_plus_one_is_refused_before_training():
    """After a ReLU (or on [0, 1] pixels) sign() is +1 everywhere: the layer would ignore its input."""
    torch.manual_seed(0)
    pixels = torch.rand(16, 8)  # in [0, 1), like the digits images
    relu_net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    binarize_student(relu_net, BinarizeSpec(bits="1-1-1"))
    with pytest.raises(RecipeError, match=r"binarize: the 1-bit activations of 0, 2 are \+1 for a whole training batch.*'1-32-32'"):
        refuse_constant_activations(relu_net, pixels, "binarize")
    # Centred inputs and BatchNorm → sign (no ReLU) carry information: accepted.
    bn_net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4))
    binarize_student(bn_net, BinarizeSpec(bits="1-1-1"))
    refuse_constant_activations(bn_net, pixels - 0.5, "binarize")
    # Weights-only binarization has no 1-bit activation to check.
    weights_only = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    binarize_student(weights_only, BinarizeSpec(bits="1-32-32"))
    refuse_constant_activations(weights_only, pixels, "binarize")


def test_find_bert_finds_the_encoder_inside_a_wrapper():
    model = tiny_encoder()
    assert find_bert(model) == ("model", model.model)
    assert find_bert(nn.Sequential(nn.Linear(2, 2))) is None


def test_freeze_names_unknown_globs_and_returns_the_previous_flags():
    model = tiny_encoder()
    previous = freeze_parameters(model, ["model.embeddings.word_embeddings.*"])
    assert previous == {"model.embeddings.word_embeddings.weight": True}
    assert not model.model.embeddings.word_embeddings.weight.requires_grad
    assert model.model.embeddings.position_embeddings.weight.requires_grad
    with pytest.raises(RecipeError, match="binarize.freeze: .* match no parameter"):
        freeze_parameters(model, ["model.embedding.*"])


def test_a_frozen_table_is_looked_up_bit_identically_and_restored():
    model = tiny_encoder()
    binarize_student(model, BinarizeSpec())
    table = model.model.embeddings.word_embeddings
    with torch.no_grad():
        reference = model(**batch())
    table.weight.requires_grad_(False)
    with frozen_tables(model) as frozen:
        assert frozen.modules == [table] and "forward" in vars(table)
        with torch.no_grad():
            assert torch.equal(model(**batch()), reference)  # exact: same products, gathered earlier
    assert "forward" not in vars(table)
    table.weight.requires_grad_(True)
    with frozen_tables(model) as frozen:
        assert frozen.modules == []  # a trainable table is binarized on every call, as always


def test_ops_count_the_sign_baselines_attention_product_as_binary():
    counts = {}
    for attention in ("bi", "sign", "softmax"):
        model = tiny_encoder()
        binarize_student(model, BinarizeSpec(attention=attention))
        counts[attention] = count_binary_ops(model, batch(1))
    # per layer, each attention product is 2·L²·hidden MACs·2 = 2·7·7·32 = 3136 operations
    assert counts["sign"] == counts["bi"]
    assert counts["softmax"]["flops"] == counts["bi"]["flops"] + 2 * 3136
    assert counts["softmax"]["bops"] == counts["bi"]["bops"] - 2 * 3136
    linear_bops = 2 * 2 * 7 * (3 * 32 * 32 + 32 * 32 + 32 * 64 + 64 * 32)  # 1-bit ⊗ 1-bit linears of 2 layers
    assert counts["bi"]["bops"] == linear_bops + 2 * 2 * 3136
    assert counts["bi"]["flops"] == 2 * 32 * 32  # only HF's pooler, which stays float (binarize_pooler: off)
    assert counts["bi"]["flops_equivalent"] == counts["bi"]["flops"] + counts["bi"]["bops"] / 64


def _without(recipe: dict, *paths: str) -> dict:
    out = yaml.safe_load(yaml.safe_dump(recipe))
    for path in paths:
        node = out
        *parents, last = path.split(".")
        for part in parents:
            node = node[part]
        node.pop(last, None)
    return out


@pytest.mark.parametrize("task", ["embedding", "topics"])
@pytest.mark.parametrize("variant", sorted(ABLATION))
def test_each_ablation_recipe_is_the_base_with_its_two_switches(variant, task):
    folder = EXAMPLES if task == "embedding" else EXAMPLES / "topics"  # both ablations, same rule
    base = yaml.safe_load((folder / "base.yaml").read_text())
    recipe = yaml.safe_load((folder / f"{variant}.yaml").read_text())
    attention, attention_loss = ABLATION[variant]
    assert _without(recipe, "name", "stages", "distillation.losses") == _without(base, "name", "stages", "distillation.losses")
    [stage] = recipe["stages"]
    assert stage["kind"] == "binarize" and stage["attention"] == attention and stage["bits"] == "1-1-1"
    shared = [loss for loss in base["distillation"]["losses"] if loss["name"] != "tinybert_attention"]
    extra = [loss for loss in recipe["distillation"]["losses"] if loss not in shared]
    assert [loss["name"] for loss in extra] == [attention_loss]
    assert all(loss in recipe["distillation"]["losses"] for loss in shared)
    parsed = parse_recipe(recipe, source=variant)  # and it is a valid recipe
    assert parsed.stages[0].attention == attention


def test_sign_parity_tells_a_float_tie_from_an_error_sample_by_sample():
    order = ["a", "b"]  # execution order; axis 0 is the sample
    inputs = {"a": np.array([[0.5, 3e-9, -1.0], [0.5, -2.0, 1.0], [0.2, 0.3, 0.4]]), "b": np.array([[0.7, -0.6]] * 3)}
    torch_out = {k: np.sign(v) for k, v in inputs.items()}
    onnx_out = {k: v.copy() for k, v in torch_out.items()}
    onnx_out["a"][0, 1] = -1.0  # sample 0: |x| = 3e-9 rounds the other way: a tie ...
    onnx_out["b"][0] = [-1.0, 1.0]  # ... whose consequences downstream are not compared
    onnx_out["b"][2, 0] = -1.0  # sample 2: exact in a, then a flip where |x| = 0.7: an error
    ties, errors, compared = first_divergence(order, inputs, torch_out, onnx_out, tie=1e-5)
    assert ties == {0: {"sample": 0, "tensor": "a", "count": 1, "max_abs_input": 3e-9}}
    assert errors == [{"sample": 2, "tensor": "b", "count": 1, "max_abs_input": 0.7}]
    assert compared == 3 + (3 + 2) + (3 + 2)  # sample 0 stops at its tie
    onnx_out["a"][1, 1] = 1.0  # sample 1: |x| = 2 flipped
    _, errors, _ = first_divergence(order, inputs, torch_out, onnx_out, tie=1e-5)
    assert errors[0] == {"sample": 1, "tensor": "a", "count": 1, "max_abs_input": 2.0}


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # HF's mask code, traced by the exporter
def test_sign_parity_of_a_real_export_is_exact_on_every_sample(tmp_path):
    from compressor.export.binary import export_binary_onnx
    from compressor.export.keywords import export_plan
    from compressor.quant.binary_stage import check_sign_parity

    model = tiny_encoder()
    binarize_student(model, BinarizeSpec(attention="sign"))
    exported, example, io = export_plan(model, batch())
    path = export_binary_onnx(exported, tmp_path / "m.onnx", dict(zip(io["input_names"], example)),
                              output_names=["output"], dynamic_axes=io["dynamic_axes"])
    parity = check_sign_parity(exported, path, [(batch(3), None), (batch(2, 5), None)], io["input_names"])
    assert parity.passed and parity.samples == 5 and parity.tensors == 2 * 10
    assert parity.ties == {} and parity.errors == [] and parity.values > 0
