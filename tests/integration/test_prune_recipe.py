"""Prune and sparsity recipes end to end: a smaller artifact whose ONNX file matches the student rebuilt from
structure.json, resume of a prune stage, 2:4 in the exported int8 file, bad input before any training."""

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from support import REPO, run_cli

from compressor.artifact import verify
from compressor.export.inspect import integer_kernel_report
from compressor.models.builtin import DigitsCNN
from compressor.pipeline import compress, work_dir_for
from compressor.prune.sparsity import check_2_4
from compressor.prune.stage import load_student
from compressor.prune.structured import count_params
from compressor.recipe import parse_recipe

EXAMPLE = REPO / "examples" / "digits_prune.yaml"
BASE = {
    "name": "prune-test",
    "teacher": {"model": "digits_cnn", "kwargs": {"widths": [32, 64]}, "pretrain": {"epochs": 1}},
    "student": {"model": "digits_cnn", "kwargs": {"widths": [16, 32]}},
    "train": {"epochs": 1, "max_steps_per_epoch": 4},
    "stages": [{"kind": "prune", "ratio": 0.5, "steps": 2, "final_epochs": 2}],
}
LOOSE_INT8_PARITY = {"parity": {"max_abs": 0.5, "min_top1_agreement": 0.97, "min_cosine": 0.99}}


class Interrupted(Exception):
    """Stands in for a kill at a chosen log line."""


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    previous = os.environ.get("COMPRESSOR_CACHE")
    os.environ["COMPRESSOR_CACHE"] = str(tmp_path_factory.mktemp("cache"))  # never the user's real cache
    yield
    if previous is None:
        del os.environ["COMPRESSOR_CACHE"]
    else:
        os.environ["COMPRESSOR_CACHE"] = previous


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "pruned"
    compress(parse_recipe(BASE), out, log=lambda _: None)
    return out


def val_batch(n: int = 64) -> np.ndarray:
    from sklearn.datasets import load_digits

    images = load_digits().images[:n].astype(np.float32) / 16.0
    return images[:, None]


def run_onnx(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def conv_out_channels(path) -> list[int]:
    graph = onnx.load(str(path)).graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    return [shapes[node.input[1]][0] for node in graph.node if node.op_type == "Conv" and node.input[1] in shapes]


def test_pruned_artifact_is_smaller_and_matches_the_rebuilt_student(pruned):
    assert verify(pruned) == []
    manifest = json.loads((pruned / "manifest.json").read_text())
    report = json.loads((pruned / "report.json").read_text())
    assert [entry["kind"] for entry in manifest["lineage"]] == ["prune"]
    assert conv_out_channels(pruned / "model.onnx") == [8, 16]  # channels removed for real (was 16, 32)
    assert report["size"]["parameters"] == count_params(DigitsCNN(widths=[8, 16])) < count_params(DigitsCNN(widths=[16, 32]))
    assert report["pruning"]["weights_from"] == "final" and manifest["extras"]["pruning"]["structure"] == "structure.json"
    # structure.json + weights.pt (weights_only=True) give back the exported student exactly.
    student = load_student(pruned).eval()
    x = val_batch()
    with torch.no_grad():
        expected = student(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_onnx(pruned / "model.onnx", x), expected, atol=1e-4, rtol=0)


def test_resume_of_an_interrupted_prune_stage_matches_the_uninterrupted_run(pruned, tmp_path):
    out = tmp_path / "resumed"

    def kill_after_step_2(line: str) -> None:
        if line.startswith("[0-prune] step 2/2:"):  # step 2's channels are removed and recorded, not fine-tuned
            raise Interrupted(line)

    with pytest.raises(Interrupted):
        compress(parse_recipe(BASE), out, log=kill_after_step_2)
    assert not out.exists() and (work_dir_for(out) / "checkpoints" / "0-prune.pruning.json").exists()

    lines: list[str] = []
    compress(parse_recipe(BASE), out, resume=True, log=lines.append)
    assert "[0-prune] step 1/2: replayed the recorded pruning (resume)" in lines
    assert "[0-prune] step 2/2: replayed the recorded pruning (resume)" in lines
    assert not any(line.startswith("[0-prune.step1] epoch") for line in lines)  # step 1 came from its checkpoint
    x = val_batch()
    np.testing.assert_array_equal(run_onnx(out / "model.onnx", x), run_onnx(pruned / "model.onnx", x))


@pytest.mark.parametrize("stages", [[{"kind": "qat"}, {"kind": "sparsity"}], [{"kind": "sparsity"}, {"kind": "ptq"}]], ids=["qat-sparsity", "sparsity-ptq"])
def test_two_four_sparsity_is_kept_in_the_int8_file(tmp_path, stages):
    out = tmp_path / "sparse"
    recipe = {**BASE, "stages": stages, "export": LOOSE_INT8_PARITY}
    report = compress(parse_recipe(recipe), out, log=lambda _: None)

    sparsity = report["sparsity"]
    assert sparsity["passed"] and sparsity["sparsified_layers"] == 2 and sparsity["weights_2_4"] >= 2
    assert sparsity["onnxruntime_cpu_speedup"] is False
    assert sum(check_2_4(out / "model.onnx").values()) >= 2  # checked again, independently of the report
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extras"]["sparsity"]["trtexec_flags"] == ["--sparsity=enable"]
    assert manifest["extras"]["sparsity"]["exported"]["passed"]
    assert integer_kernel_report(out / "model.onnx")["integer_ops"].get("QLinearConv", 0) >= 2


def test_bad_prune_glob_fails_before_the_teacher_trains(cli_env, tmp_path):
    result = run_cli(["run", EXAMPLE, "--out", tmp_path / "x", "--set", "stages.1.ignore=[nope]"], cli_env, check_rc=2)
    assert "ignore glob 'nope' matches no module of DigitsCNN" in result.stderr
    assert "[teacher]" not in result.stderr and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_example_recipe_prunes_distills_and_quantizes(cli_env, tmp_path):
    out = tmp_path / "digits-prune"
    quick = [
        "--set", "teacher.pretrain.epochs=1", "--set", "stages.0.epochs=2", "--set", "stages.1.epochs=1",
        "--set", "stages.1.final_epochs=2", "--set", "stages.2.epochs=1", "--set", "targets=[]",
        "--set", "export.parity={max_abs: 0.5, min_top1_agreement: 0.97, min_cosine: 0.99}",
    ]  # fmt: skip
    run_cli(["run", EXAMPLE, "--out", out, *quick], cli_env, check_rc=0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [entry["kind"] for entry in manifest["lineage"]] == ["distill", "prune", "qat"]
    prune = manifest["lineage"][1]["details"]
    assert prune["shapes_changed"] == {"features.0": [32, 16], "features.3": [64, 32], "features.7": [64, 32]}
    assert prune["macs_after"] < 0.3 * prune["macs_before"]
    kernels = integer_kernel_report(out / "model.onnx")
    assert kernels["integer_ops"].get("QLinearConv", 0) == 3 and not kernels["float_ops"]
    assert manifest["extras"]["pruning"]["weights_from"].startswith("after stage '1-prune' (float")
    assert [m.out_channels for m in load_student(out).features if isinstance(m, torch.nn.Conv2d)] == [16, 32, 32]
