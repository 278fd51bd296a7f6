"""The `prune` and `sparsity` stages on real digits data: schedules, records, resume, checks, exported sparsity."""

import json
import warnings

import pytest
import torch

from compressor.data.loaders import build_data
from compressor.errors import ParityError, RecipeError
from compressor.export.onnx import export_onnx
from compressor.models.builtin import DigitsCNN
from compressor.models.call import example_from_batch
from compressor.prune.sparsity import check_2_4
from compressor.prune.stage import PRUNED_DIR, exported_sparsity, run_prune, run_sparsity
from compressor.prune.structure import load_pruned
from compressor.prune.structured import PruningError, count_params
from compressor.recipe import parse_recipe
from compressor.stages import check_stages, load_stage_modules
from compressor.state import ModelState, RunContext

WIDTHS = [16, 32]


class Interrupted(Exception):
    """Stands in for a kill: raised from the log at a chosen line."""


@pytest.fixture(scope="module")
def data():
    return build_data("digits", 64, 0.25, 0, {})


def recipe(stages, **train):
    return parse_recipe(
        {
            "student": {"model": "digits_cnn", "kwargs": {"widths": WIDTHS}},
            "train": {"epochs": 1, "max_steps_per_epoch": 2, **train},
            "stages": stages,
        }
    )


def context(tmp_path, stages, data, *, resume=False, log=None, teacher=True):
    torch.manual_seed(1)
    teacher_model = DigitsCNN(widths=[8, 16]).eval() if teacher else None
    lines = []
    ctx = RunContext(
        recipe=recipe(stages), data=data, teacher=teacher_model, work_dir=tmp_path, resume=resume,
        log=log or lines.append, show_progress=False,
    )  # fmt: skip
    ctx.lines = lines
    return ctx


def student(data, seed=0):
    torch.manual_seed(seed)
    module = DigitsCNN(widths=WIDTHS)
    return ModelState(module=module, example_inputs=example_from_batch(next(iter(data.val))[0]))


def run(ctx, state, kind_run, index=0):
    spec = ctx.recipe.stages[index].model_copy(update={"name": ctx.recipe.stage_names()[index]})
    torch.manual_seed(2)  # what the pipeline's earlier stages leave in the RNG, the same on every run
    return kind_run(state, spec, ctx)


PRUNE = {"kind": "prune", "ratio": 0.5, "steps": 2, "importance": "random"}


def test_registry_has_prune_and_sparsity():
    assert {"prune", "sparsity"} <= set(load_stage_modules().names())


def test_prune_stage_removes_channels_in_steps_and_records_them(tmp_path, data):
    ctx = context(tmp_path, [PRUNE], data)
    state = run(ctx, student(data), run_prune)

    assert count_params(state.module) == count_params(DigitsCNN(widths=[8, 16]))
    entry = state.lineage[-1]
    assert entry.kind == "prune" and entry.details["ratios"] == [pytest.approx(0.4375), 0.5]
    assert entry.details["params_before"] == count_params(DigitsCNN(widths=WIDTHS)) > entry.details["params_after"]
    assert entry.details["macs_after"] < entry.details["macs_before"] / 3  # both convs lose half their channels
    assert entry.details["shapes_changed"] == {"features.0": [16, 8], "features.3": [32, 16]}
    saved = json.loads((tmp_path / "checkpoints" / "0-prune.pruning.json").read_text())
    assert saved["steps_total"] == 2 and len(saved["steps"]) == 2
    assert {p.name for p in (tmp_path / "checkpoints").glob("*.pt")} == {"0-prune.step1.pt", "0-prune.step2.pt"}
    # The snapshot rebuilds from the original constructor, tensors loaded with weights_only=True.
    rebuilt = load_pruned(lambda: DigitsCNN(widths=WIDTHS), tmp_path / PRUNED_DIR).eval()
    x = example_from_batch(next(iter(data.val))[0], 8)[0]
    torch.testing.assert_close(rebuilt(x), state.module.eval()(x), atol=0, rtol=0)


@pytest.mark.parametrize("killed_at", [1, 2])
def test_resume_after_a_pruning_step_replays_it_instead_of_ranking_again(tmp_path, data, killed_at):
    straight = run(context(tmp_path / "straight", [PRUNE], data), student(data), run_prune)

    def kill(line):
        if f"step {killed_at}/2:" in line:  # logged after the step's records are written, before fine-tuning
            raise Interrupted(line)

    with pytest.raises(Interrupted):
        run(context(tmp_path / "run", [PRUNE], data, log=kill), student(data), run_prune)
    ctx = context(tmp_path / "run", [PRUNE], data, resume=True)
    torch.manual_seed(123)  # a different RNG state: random importance would now choose other channels
    resumed = run_prune(student(data), ctx.recipe.stages[0].model_copy(update={"name": "0-prune"}), ctx)

    assert sum("replayed the recorded pruning" in line for line in ctx.lines) == killed_at
    # After the replay, step 2 (killed at 1) prunes live on from where the replayed schedule left off.
    assert count_params(resumed.module) == count_params(DigitsCNN(widths=[8, 16]))
    if killed_at == 2:
        assert any("[0-prune.step1] resuming after epoch 1/1" in line for line in ctx.lines)
    for key, value in straight.module.state_dict().items():
        torch.testing.assert_close(resumed.module.state_dict()[key], value, atol=0, rtol=0, msg=key)


def test_taylor_importance_uses_the_distillation_loss(tmp_path, data):
    ctx = context(tmp_path, [{"kind": "prune", "ratio": 0.25, "importance": "taylor", "calibration_batches": 2}], data)
    state = run(ctx, student(data), run_prune)
    assert state.lineage[-1].details["shapes_changed"] == {"features.0": [16, 12], "features.3": [32, 24]}


@pytest.mark.parametrize(
    "stage, message",
    [
        ({"kind": "prune", "ratio": 1.0}, "stages[0] (prune): ratio: must be in [0, 1): 0.5 removes half, 1 would remove everything (got 1.0)"),
        ({"kind": "prune", "ratio": -0.1}, "ratio: must be in [0, 1)"),
        ({"kind": "prune", "heads": 1.5}, "heads: must be in [0, 1)"),
        ({"kind": "prune", "ratio": 0.5, "layer_ratios": {"features.0": 2}}, "layer_ratios.features.0: must be in [0, 1)"),
        ({"kind": "prune", "ratio": 0.5, "importance": "l3"}, "unknown importance 'l3'; known: bn_scale, l1, l2, random, taylor"),
        ({"kind": "prune"}, "say what to prune: ratio (CNN channels) or heads / ffn / layers"),
        ({"kind": "prune", "ratio": 0.5, "heads": 0.5}, "ratio (CNN channels) and heads (BERT-like encoders) cannot be combined"),
        ({"kind": "prune", "heads": 0.5, "ignore": ["x"]}, "layer_ratios, ignore and global_pruning are channel options"),
        ({"kind": "prune", "layers": [1, 1]}, "layers [1, 1] lists a layer twice"),
        ({"kind": "prune", "ratio": 0.5, "steps": 0}, "steps: Input should be greater than or equal to 1"),
        ({"kind": "prune", "ratio": 0.5, "round_to": 0}, "round_to: Input should be greater than or equal to 1"),
        ({"kind": "sparsity", "steps": 2}, "2:4 masks are set in one step and then fine-tuned; use steps: 1"),
        ({"kind": "sparsity", "sparsity": 0.7}, "2:4 keeps 2 of every 4 weights (sparsity 0.5); remove sparsity: 0.7"),
        ({"kind": "sparsity", "pattern": "unstructured"}, "unstructured sparsity needs a target, e.g. sparsity: 0.8"),
        ({"kind": "sparsity", "pattern": "4:8"}, "pattern: Input should be '2:4' or 'unstructured'"),
    ],
)
def test_bad_stage_fields_are_one_line_recipe_errors(stage, message):
    with pytest.raises(RecipeError) as error:
        recipe([stage])
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "stages, error, message",
    [
        ([{"kind": "prune", "ratio": 0.5, "ignore": ["head*"]}], PruningError, "ignore glob 'head*' matches no module of DigitsCNN"),
        ([{"kind": "prune", "ratio": 0.5, "layer_ratios": {"feature.9": 0.3}}], PruningError, "layer_ratios glob 'feature.9' matches no module"),
        ([{"kind": "prune", "ratio": 0.9, "round_to": 8}], PruningError, "would remove all 32 channels of 'features.3' with round_to=8; lower the ratio or round_to"),
        ([{"kind": "prune", "heads": 0.5}], PruningError, "heads / ffn / layers prune Hugging Face BERT-like encoders, and DigitsCNN contains none"),
        ([{"kind": "qat"}, {"kind": "prune", "ratio": 0.5}], RecipeError, "prune after qat: prune the float student first"),
        ([{"kind": "sparsity"}, {"kind": "qat"}], RecipeError, "a 'qat' stage after sparsity would train the zeroed weights back"),
        ([{"kind": "sparsity", "layers": ["features.0"]}], PruningError, "2:4 needs the input dimension of 'features.0' (1) to be a multiple of 4"),
        ([{"kind": "sparsity", "pattern": "unstructured", "sparsity": 0.5, "layers": ["nope"]}], PruningError, "sparsity layers glob 'nope' matches no module"),
    ],
)
def test_model_dependent_errors_surface_before_any_training(data, stages, error, message):
    module = DigitsCNN(widths=WIDTHS)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(error) as raised:
        check_stages(recipe(stages), module, example_from_batch(next(iter(data.val))[0]))
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # checks run on a copy


def test_sparsity_then_ptq_passes_the_checks(data):
    check_stages(recipe([{"kind": "sparsity"}, {"kind": "ptq"}]), DigitsCNN(widths=WIDTHS), example_from_batch(next(iter(data.val))[0]))


def test_two_four_masks_survive_fine_tuning_and_the_export(tmp_path, data):
    ctx = context(tmp_path, [{"kind": "sparsity", "epochs": 2}], data)
    state = run(ctx, student(data), run_sparsity)

    extras = state.extras["sparsity"]
    assert extras["layers"] == ["classifier", "features.3"]  # features.0 has 1 input channel: 2:4 cannot apply
    assert extras["zero_fraction"] == 0.5 and extras["trtexec_flags"] == ["--sparsity=enable"]
    assert extras["onnxruntime_cpu_speedup"] is False
    assert not any(name.endswith("_orig") for name, _ in state.module.named_parameters())  # masks made permanent
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_onnx(state.module.eval(), state.example_inputs, tmp_path / "model.onnx")
    report = exported_sparsity(extras, path)
    assert report["passed"] and report["weights_2_4"] >= 2 and report["sparsified_layers"] == 2
    assert check_2_4(path)["classifier.weight"] is True


def test_unstructured_masks_hold_through_training_steps(tmp_path, data):
    stage = {"kind": "sparsity", "pattern": "unstructured", "sparsity": 0.7, "steps": 2, "layers": ["features.*"]}
    ctx = context(tmp_path, [stage], data)
    state = run(ctx, student(data), run_sparsity)

    for name in ("features.0", "features.3"):
        weight = state.module.get_submodule(name).weight
        assert int((weight == 0).sum()) == round(0.7 * weight.numel()), name  # optimizer steps revived none
    assert state.lineage[-1].details["trtexec_flags"] == []
    assert {p.name for p in (tmp_path / "checkpoints").glob("*.pt")} == {"0-sparsity.step1.pt", "0-sparsity.step2.pt"}


def test_an_export_that_lost_the_pattern_is_refused(tmp_path, data):
    state = run(context(tmp_path, [{"kind": "sparsity", "epochs": 0}], data), student(data), run_sparsity)
    with torch.no_grad():
        state.module.features[3].weight.add_(0.01)  # a later change densifies the weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_onnx(state.module.eval(), state.example_inputs, tmp_path / "model.onnx")
    with pytest.raises(ParityError, match="breaks the 2:4 pattern .* no artifact written"):
        exported_sparsity(state.extras["sparsity"], path)


def test_two_four_after_qat_exports_int8_weights_that_keep_the_pattern(tmp_path, data):
    from compressor.quant.qat import QATSpec, quantize_module

    state = student(data)
    state.module = quantize_module(state.module, QATSpec(), state.example_inputs)
    state.extras["quant"] = {"method": "qat"}
    ctx = context(tmp_path, [{"kind": "qat"}, {"kind": "sparsity"}], data)
    state = run(ctx, state, run_sparsity, index=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_onnx(state.module.eval(), state.example_inputs, tmp_path / "model.onnx")
    pattern = check_2_4(path)  # Brevitas QCDQ: int8 weight -> Clip -> DequantizeLinear
    assert [ok for name, ok in pattern.items() if name.startswith("/features.3/")] == [True]
    assert exported_sparsity(state.extras["sparsity"], path)["passed"]


@pytest.mark.parametrize(
    "options",
    [
        {"ratio": 0.5, "round_to": 4},
        {"ratio": 0.5, "layer_ratios": {"mix.*": 0.25}},
        {"ratio": 0.4, "global_pruning": True},
    ],
)
def test_stepwise_channels_on_coupled_layers_reach_the_one_shot_widths(options):
    """Residual adds and a concat, pruned in 3 AGP steps, end where one-shot pruning does, and the records
    of the steps rebuild the same model."""
    from compressor.models.cnn_zoo import ResCatNet
    from compressor.prune.stage import PruneSpec, _ChannelSteps, _widths
    from compressor.prune.structure import rebuild, structure_of
    from compressor.prune.structured import prune_channels

    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(0)
    one_shot = ResCatNet()
    prune_channels(one_shot, x, **options)
    torch.manual_seed(0)
    state = ModelState(module=ResCatNet(), example_inputs=(x,))
    steps = _ChannelSteps(state, PruneSpec(steps=3, **options), ctx=None)
    records = [record for _ in range(3) for record in steps.step()]

    widths = _widths(state.module)
    if options.get("global_pruning"):  # one ranking over all layers: the same total, give or take rounding
        assert abs(count_params(state.module) - count_params(one_shot)) <= 0.03 * count_params(one_shot)
    else:
        assert widths == _widths(one_shot)
    assert widths["classifier"] == 10
    rebuilt = rebuild(ResCatNet, structure_of(state.module, records))
    assert _widths(rebuilt) == widths
