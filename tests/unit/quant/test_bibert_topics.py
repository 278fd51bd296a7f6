"""The BiBERT ablation recipes on the topic task (examples/bibert/topics): each variant is base.yaml with
its two switches (tested with the embedding ablation in test_binary_stage.py), all name the
teacher-labelled task consistently, and they parse as recipes."""

from pathlib import Path

import yaml

from compressor.recipe import parse_recipe

TOPICS = Path(__file__).resolve().parents[3] / "examples" / "bibert" / "topics"
ABLATION = {
    "baseline": ("sign", "tinybert_attention"),
    "bi_attention": ("bi", "tinybert_attention"),
    "dmd": ("sign", "dmd"),
    "bibert": ("bi", "dmd"),
}


def test_base_is_the_teacher_labelled_classification_task_with_prediction_distillation():
    base = yaml.safe_load((TOPICS / "base.yaml").read_text())
    assert base["task"] == "classification" and base["data"]["kwargs"]["labels"] == "topics"
    assert base["teacher"]["kwargs"]["head"] == "topics" and base["student"]["kwargs"]["head"] == "topics"
    names = [loss["name"] for loss in base["distillation"]["losses"]]
    assert names == ["tinybert_embedding", "tinybert_hidden", "tinybert_prediction", "tinybert_attention"]
    assert [stage["kind"] for stage in base["stages"]] == ["distill"]
    assert parse_recipe(base, source="base").task == "classification"


def test_all_topic_variants_share_one_binarize_setting_but_the_attention():
    stages = [yaml.safe_load((TOPICS / f"{v}.yaml").read_text())["stages"][0] for v in ABLATION]
    assert len({yaml.safe_dump({k: v for k, v in s.items() if k != "attention"}) for s in stages}) == 1


def test_binarizing_a_student_with_a_topic_head_leaves_the_head_float():
    import torch
    from torch import nn
    from transformers import BertConfig, BertModel

    from compressor.models.hf import CosineHead, SentenceEncoder
    from compressor.quant.binary import binarized_modules
    from compressor.quant.binary_stage import BinarizeSpec, binarize_student

    config = BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    student = SentenceEncoder(BertModel(config), head=CosineHead(torch.randn(3, 32), scale=20.0))
    head_weight = student.head.classifier.weight.detach().clone()
    binarize_student(student, BinarizeSpec(attention="bi"))
    assert not any(name.startswith("head") for name in binarized_modules(student))
    assert type(student.head.classifier) is nn.Linear and torch.equal(
        student.head.classifier.weight, head_weight
    )
    ids = torch.randint(1, 60, (2, 7))
    logits = student(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert logits.shape == (2, 3) and bool((logits.abs() <= 20.0 + 1e-4).all())  # scale · cosine
