"""PTQ through ONNX Runtime's quantizer: static (each calibration) for a CNN, dynamic for a tiny BERT."""

import numpy as np
import pytest
import torch
from torch import nn

from compressor.data.digits import digits_tensors
from compressor.data.loaders import DataBundle
from compressor.errors import RecipeError
from compressor.export.inspect import initializer_census, integer_kernel_report
from compressor.export.keywords import export_plan
from compressor.export.onnx import export_onnx
from compressor.export.parity import check_parity, ort_session
from compressor.models.builtin import DigitsCNN
from compressor.quant.ptq import EXTRAS_KEY, LoaderReader, PTQSpec, quantize_exported, run_ptq
from compressor.quant.qat import QATSpec, quantize_module
from compressor.recipe import parse_recipe
from compressor.state import ModelState, RunContext


@pytest.fixture(scope="module")
def digits():
    x_tr, y_tr, x_val, y_val = digits_tensors()
    train = [(x_tr[i : i + 64], y_tr[i : i + 64]) for i in range(0, 256, 64)]
    val = [(x_val[i : i + 128], y_val[i : i + 128]) for i in range(0, 256, 128)]
    return train, val


@pytest.fixture(scope="module")
def trained_cnn(digits):
    torch.manual_seed(0)
    model = DigitsCNN(widths=(8, 16))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x_tr, y_tr, _, _ = digits_tensors()
    for _ in range(3):
        for i in range(0, len(x_tr), 64):
            loss = nn.functional.cross_entropy(model(x_tr[i : i + 64]), y_tr[i : i + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def details(**overrides):
    base = {"mode": "static", "calibration": "minmax", "calibration_samples": 256, "percentile": 99.99, "per_channel": True, "reduce_range": True, "op_types": None}
    return {**base, **overrides}


@pytest.mark.parametrize("calibration", ["minmax", "percentile"])  # entropy: see the test below
def test_static_ptq_runs_integer_kernels_and_agrees_with_the_float_model(tmp_path, digits, trained_cnn, calibration):
    train, val = digits
    float_path = export_onnx(trained_cnn, (torch.rand(1, 1, 8, 8),), tmp_path / "float.onnx")
    path = quantize_exported(float_path, tmp_path / "int8.onnx", details(calibration=calibration), train)
    kernels = integer_kernel_report(path)
    assert kernels["integer_mac_fraction"] == 1.0
    stored = initializer_census(path)
    # every weight as one int8 byte, plus one int8 zero point per output channel
    assert stored["int8"]["elements"] == (8 * 9 + 16 * 8 * 9 + 10 * 256) + (8 + 16 + 10)
    assert stored["float"]["elements"] < 100  # scales only (BN folded by ORT's pre-processing)
    result = check_parity(trained_cnn, path, val, PTQSpec().parity)
    assert result.passed, result.failures
    assert result.top1_agreement >= 0.95 and result.max_abs > 0  # changed numerics, same decisions


def test_calibration_reader_yields_exactly_the_requested_samples(digits):
    train, _ = digits
    reader = LoaderReader(train, ["input"], 100)
    sizes = []
    while (feed := reader.get_next()) is not None:
        sizes.append(len(feed["input"]))
    assert sizes == [64, 36]
    reader.rewind()
    assert len(reader.get_next()["input"]) == 64


def context(tmp_path, train, val):
    recipe = parse_recipe({"student": {"model": "digits_student"}})
    return RunContext(recipe=recipe, data=DataBundle(train=train, val=val), teacher=None, work_dir=tmp_path, log=lambda _m: None)


def test_stage_records_post_export_quantization(tmp_path, digits):
    train, val = digits
    state = run_ptq(ModelState(module=DigitsCNN(), example_inputs=(torch.rand(1, 1, 8, 8),)), PTQSpec(calibration="entropy"), context(tmp_path, train, val))
    record = state.extras[EXTRAS_KEY]
    assert record["mode"] == "static" and record["calibration"] == "entropy"
    assert record["parity"]["min_top1_agreement"] == 0.95
    assert state.lineage[-1].kind == "ptq"


def test_too_little_calibration_data_is_a_clear_error(tmp_path, digits):
    _, val = digits
    small = [(torch.rand(10, 1, 8, 8), None)]
    with pytest.raises(RecipeError, match="calibration needs at least 32 samples, the training split has 10"):
        run_ptq(ModelState(module=DigitsCNN(), example_inputs=(torch.rand(1, 1, 8, 8),)), PTQSpec(), context(tmp_path, small, val))
    with pytest.raises(RecipeError, match="calibration data is missing"):
        run_ptq(ModelState(module=DigitsCNN(), example_inputs=(torch.rand(1, 1, 8, 8),)), PTQSpec(), context(tmp_path, [], val))


def test_ptq_of_a_qat_model_is_refused(tmp_path, digits):
    train, val = digits
    model = quantize_module(DigitsCNN(widths=(8, 16)), QATSpec())
    with pytest.raises(RecipeError, match="already quantized by a qat stage"):
        run_ptq(ModelState(module=model, example_inputs=(torch.rand(1, 1, 8, 8),)), PTQSpec(), context(tmp_path, train, val))


def test_dynamic_ptq_of_a_tiny_bert(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    model = transformers.BertModel(config).eval()
    example = {"input_ids": torch.randint(1, 64, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    exported, inputs, io = export_plan(model, example)
    float_path = export_onnx(exported, inputs, tmp_path / "float.onnx", **io)
    path = quantize_exported(float_path, tmp_path / "int8.onnx", details(mode="dynamic"), None)
    kernels = integer_kernel_report(path, {"sequence": 16})
    assert kernels["integer_mac_fraction"] > 0.5  # the Linear layers; attention matmuls stay float in dynamic PTQ
    feed = {"input_ids": torch.randint(1, 64, (3, 13)), "attention_mask": torch.ones(3, 13, dtype=torch.long)}
    ours = exported(**feed).detach().numpy()
    theirs = ort_session(path).run(None, {k: v.numpy() for k, v in feed.items()})[0]
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cosine.min() > 0.95


def activation_scales(path):
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    return {i.name: float(numpy_helper.to_array(i)) for i in graph.initializer if i.name.endswith("_scale") and not i.dims}


def test_entropy_calibration_searches_thresholds_instead_of_copying_minmax(tmp_path, digits, trained_cnn):
    # quantize_static's own Entropy (128 bins, 128 levels) has a single candidate and equals MinMax.
    train, val = digits
    float_path = export_onnx(trained_cnn, (torch.rand(1, 1, 8, 8),), tmp_path / "float.onnx")
    paths = {c: quantize_exported(float_path, tmp_path / f"{c}.onnx", details(calibration=c), train) for c in ("minmax", "entropy")}
    result = check_parity(trained_cnn, paths["entropy"], val, PTQSpec().parity)
    assert result.passed, result.failures
    assert integer_kernel_report(paths["entropy"])["integer_mac_fraction"] == 1.0
    scales = {c: activation_scales(path) for c, path in paths.items()}
    assert scales["minmax"].keys() == scales["entropy"].keys()
    clipped = [k for k in scales["minmax"] if scales["entropy"][k] < 0.99 * scales["minmax"][k]]
    assert clipped  # at least one activation range is clipped below its observed extreme


def ptq_recipe(tmp_path, parity):
    from compressor.recipe import parse_recipe

    return parse_recipe(
        {
            "name": "ptq-digits",
            "student": {"model": "digits_cnn", "kwargs": {"widths": [8, 16]}},
            "data": {"source": "digits", "batch_size": 64},
            "stages": [{"kind": "ptq", "calibration": "minmax", "calibration_samples": 128, "parity": parity}],
            "export": {"parity": {"samples": 64}},
        }
    )


def test_pipeline_exports_quantizes_and_reports_a_ptq_artifact(tmp_path):
    from compressor.pipeline import compress

    # An untrained student has near-tied logits, so top-1 is a weak criterion here; cosine still gates.
    recipe = ptq_recipe(tmp_path, {"max_abs": 1e9, "min_top1_agreement": 0.5, "min_cosine": 0.9})
    report = compress(recipe, tmp_path / "out", log=lambda _m: None)
    assert (tmp_path / "out" / "model.onnx").is_file()
    assert report["quant"]["method"] == "ptq" and report["quant"]["mode"] == "static"
    assert report["kernels"]["integer_mac_fraction"] == 1.0
    size = report["size"]
    assert size["model_bytes"] == (tmp_path / "out" / "model.onnx").stat().st_size
    assert size["float_export_bytes"] > size["model_bytes"]
    assert size["stored"]["int8"]["elements"] >= 8 * 9 + 16 * 8 * 9 + 10 * 256


def test_pipeline_parity_failure_names_where_it_broke(tmp_path):
    from compressor.errors import ParityError
    from compressor.pipeline import compress

    impossible = {"max_abs": 1e-9, "min_top1_agreement": 1.0, "min_cosine": 1.0}
    with pytest.raises(ParityError, match=r"export parity failed on \d+ held-out samples: max \|torch - onnx\| = [0-9.e-]+ > allowed 1e-09.*(first diverging layer|no single layer diverges)"):
        compress(ptq_recipe(tmp_path, impossible), tmp_path / "out", log=lambda _m: None)
    assert not (tmp_path / "out").exists()
