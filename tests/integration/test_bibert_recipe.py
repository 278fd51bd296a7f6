"""A `binarize` recipe through `compress run`: a tiny random BERT teacher (saved as a local Hugging Face
directory) → a 2-layer 1-bit student → model.onnx + weights.1bit, exact sign parity, both sizes reported;
the recipe's switches change the exported model (Bi-Attention vs sign(softmax)) and the losses (DMD vs MSE)."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from support import run_cli
from transformers import BertConfig, BertModel

from compressor.artifact import verify
from compressor.data.text import sentences
from compressor.export.binary import load_1bit
from compressor.models.hf import load
from compressor.quant.binary_stage import BinarizeSpec, binarize_student

RECIPE = """
name: tiny-bibert
task: embedding
teacher: {{model: "compressor.models.hf:load", kwargs: {{path: "{path}"}}}}
student: {{model: "compressor.models.hf:load", kwargs: {{path: "{path}", every: 2}}}}
data: {{source: sentences, batch_size: 16, kwargs: {{max_length: 12}}}}
train: {{epochs: 1, max_steps_per_epoch: 2, optimizer: {{lr: 0.001}}}}
distillation:
  taps:
    student: &taps
      layers: "model.encoder.layer.*"
      attn: "model.encoder.layer.*.attention.self:attention"
      q: "model.encoder.layer.*.attention.self.query"
      k: "model.encoder.layer.*.attention.self.key"
      v: "model.encoder.layer.*.attention.self.value"
    teacher: *taps
  losses:
    - {{name: tinybert_hidden, params: {{pairs: [[layers, layers]], layer_map: uniform}}}}
    - {{name: dmd, params: {{pairs: [[q, q], [k, k], [v, v]], layer_map: uniform, heads: 4}}}}
stages:
  - {{kind: binarize, bits: "1-1-1", attention: bi, freeze: [model.embeddings.word_embeddings.weight]}}
"""
MSE = "distillation.losses.1={name: tinybert_attention, params: {pairs: [[attn, attn]], layer_map: uniform}}"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    # The shipped sentences are tokenized by all-MiniLM-L6-v2's tokenizer: the vocabulary must cover its ids.
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)  # ≥ the 128 tokens inspect.py feeds
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    return path


def _run(tmp_path, cli_env, tiny_bert, name, overrides=()):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(path=tiny_bert))
    out = tmp_path / name
    sets = [arg for item in overrides for arg in ("--set", item)]
    run_cli(["run", recipe, "--out", out, "--no-progress", *sets], cli_env, check_rc=0)
    return out, json.loads((out / "report.json").read_text())


def _op_count(path, op_type: str) -> int:
    return sum(node.op_type == op_type for node in onnx.load(str(path)).graph.node)


@pytest.mark.slow  # two CLI runs of a tiny model (export, parity and ORT checks included): ~40 s here
def test_binarize_recipe_exports_onnx_and_packed_weights_with_exact_sign_parity(tmp_path, cli_env, tiny_bert):
    out, report = _run(tmp_path, cli_env, tiny_bert, "bi-dmd")
    binary = report["binary"]
    assert binary["attention"] == "bi" and binary["losses"] == ["tinybert_hidden", "dmd"]
    assert binary["sign_parity"]["passed"] and binary["sign_parity"]["mismatches"] == 0
    assert binary["sign_parity"]["tensors"] == 2 * 10  # per layer: 6 linear inputs, q/k/v acts, bool(attention)
    onnx_bytes, packed_bytes = (out / "model.onnx").stat().st_size, (out / "weights.1bit").stat().st_size
    assert binary["size"]["onnx_bytes"] == onnx_bytes and binary["size"]["packed_bytes"] == packed_bytes
    assert report["size"]["packed_bytes"] == packed_bytes and report["size"]["model_bytes"] == onnx_bytes
    assert packed_bytes < onnx_bytes / 3  # 1 bit instead of 8 per binarized weight dominates both files
    assert binary["ops"]["bops"] > 0 and binary["ops"]["flops_equivalent"] < binary["ops"]["bops"]
    assert report["parity"]["passed"] and report["parity"]["max_abs"] < 1e-3
    assert verify(out) == []  # weights.1bit is listed in the manifest with its sha256
    assert _op_count(out / "model.onnx", "Softmax") == 0  # Bi-Attention: bool(scores) = GreaterOrEqual + Cast

    # The packed file alone rebuilds the deployed model: same outputs as the exported ONNX file.
    student = load(str(tiny_bert), every=2)
    binarize_student(student, BinarizeSpec(attention="bi"))
    load_1bit(student, out / "weights.1bit")
    inputs = next(iter(sentences(batch_size=8, max_length=12).val))[0]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        torch_out = student.eval()(**inputs).numpy()
    assert np.abs(torch_out - onnx_out).max() < 1e-4

    # The switches, from the recipe alone: the paper's baseline attention sign(softmax(·)) and attention-map
    # MSE instead of DMD.
    out2, report2 = _run(tmp_path, cli_env, tiny_bert, "sign-mse", ["stages.0.attention=sign", MSE])
    assert report2["binary"]["attention"] == "sign"
    assert report2["binary"]["losses"] == ["tinybert_hidden", "tinybert_attention"]
    assert _op_count(out2 / "model.onnx", "Softmax") == 2  # one per layer, then sign: Greater + Cast
    assert report2["binary"]["ops"] == binary["ops"]  # {0, 1} ⊗ ±1 attention products: binary in both
    assert report2["binary"]["sign_parity"]["mismatches"] == 0 and report2["binary"]["sign_parity"]["tensors"] == 2 * 10
