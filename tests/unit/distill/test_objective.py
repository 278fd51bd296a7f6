"""The objective wired to real models: tap aliases, feature losses, learned regressors, bad input before training."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressor.distill.objective import build_objective
from compressor.errors import RecipeError
from compressor.models.builtin import DigitsCNN
from compressor.recipe import LossSpec


def losses(*items):
    return [LossSpec(name=name, weight=weight, params=params) for name, weight, params in items]


@pytest.fixture
def models():
    torch.manual_seed(0)
    teacher = DigitsCNN(widths=(8, 12, 12, 16)).eval()  # features.{0,3,7,10}: convs; 12/16 channels
    student = DigitsCNN(widths=(4, 6))
    x = torch.rand(6, 1, 8, 8)
    y = torch.arange(6) % 10
    return teacher, student, (x, y)


# Student features.6: max-pool after block 2 (6 channels, 4×4); teacher features.9: ReLU of block 3 (12, 4×4).
TAPS = {"student": {"mid": "features.6"}, "teacher": {"mid": "features.9"}}


def test_hinton_through_the_objective_equals_the_formula_on_the_outputs(models):
    teacher, student, (x, y) = models
    objective = build_objective(losses(("hinton", 1.0, {"temperature": 2.0, "alpha": 0.5})), teacher, student=student, batch=(x, y))
    student.train()
    value = objective.compute(student, x, y)
    s, t = student(x), teacher(x).detach()
    soft = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), reduction="batchmean", log_target=True) * 4
    expected = 0.5 * F.cross_entropy(s, y) + 0.5 * soft
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)


def test_fitnets_regressor_is_learned_checkpointed_and_not_part_of_the_student(models):
    teacher, student, batch = models
    spec = losses(("hinton", 1.0, {}), ("fitnets", 0.5, {"pairs": [["mid", "mid"]]}))
    objective = build_objective(spec, teacher, student=student, batch=batch, taps=TAPS)
    regressor = objective.losses[1].regressors["0"]
    assert isinstance(regressor, nn.Conv2d) and (regressor.in_channels, regressor.out_channels) == (6, 12)
    assert any(k.endswith("regressors.0.weight") for k in objective.state_dict())  # checkpointed with the objective
    assert not any("regressor" in k for k in student.state_dict())  # never exported with the student
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training

    params = list(student.parameters()) + list(objective.parameters())
    before = regressor.weight.detach().clone()
    optimizer = torch.optim.SGD(params, lr=0.1)
    loss = objective.compute(student, *batch)
    loss.backward()
    assert regressor.weight.grad is not None and torch.isfinite(regressor.weight.grad).all()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher never gets gradients
    optimizer.step()
    assert not torch.equal(before, regressor.weight)


def test_attention_transfer_with_globs_and_uniform_layer_map(models):
    teacher, student, batch = models
    # 2 student ReLUs (8×8) against 4 teacher taps (8×8): uniform g(m) = m·4/2 picks teacher taps 1 and 3.
    taps = {"student": {"blocks": "features.[25]"}, "teacher": {"blocks": "features.[0125]"}}
    spec = losses(("at", 1.0, {"pairs": [["blocks", "blocks"]], "layer_map": "uniform"}))
    objective = build_objective(spec, teacher, student=student, batch=batch, taps=taps)
    assert objective.losses[0].pairs() == [("features.2", "features.1"), ("features.5", "features.5")]
    assert [t.key for t in objective.plan.teacher] == ["features.1", "features.5"]  # only what is paired is captured
    assert torch.isfinite(objective.compute(student, *batch))


def test_ce_alone_needs_no_teacher(models):
    _, student, batch = models
    objective = build_objective(losses(("ce", 1.0, {})), None, student=student, batch=batch)
    torch.testing.assert_close(objective.compute(student, *batch), F.cross_entropy(student(batch[0]), batch[1]))


# --- bad input: one line, before training -------------------------------------------------------------------


def _error(models, spec, taps=None, teacher=None, student=None):
    t, s, batch = models
    with pytest.raises(RecipeError) as info:
        build_objective(spec, teacher if teacher is not None else t, student=student or s, batch=batch, taps=taps)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_tap_matching_nothing_lists_the_closest_module_names(models):
    message = _error(models, losses(("fitnets", 1.0, {"pairs": [["mid", "mid"]]})), {"student": {"mid": "feature.6"}, "teacher": {"mid": "features.9"}})
    assert "distillation.taps.student.mid" in message and "features.6" in message


def test_a_loss_reading_an_undefined_alias_says_which_aliases_exist(models):
    message = _error(models, losses(("fitnets", 1.0, {"pairs": [["hint", "mid"]]})), TAPS)
    assert "loss 'fitnets' reads student tap 'hint'" in message and "defined: mid" in message


def test_mismatched_layer_counts_without_a_map(models):
    taps = {"student": {"convs": "features.[03]"}, "teacher": {"convs": "features.[0369]"}}
    message = _error(models, losses(("at", 1.0, {"pairs": [["convs", "convs"]]})), taps)
    assert "2 student taps" in message and "4 teacher taps" in message and "layer_map" in message


def test_a_feature_loss_without_taps(models):
    message = _error(models, losses(("fitnets", 1.0, {})))
    assert "needs tapped features" in message


def test_teacher_output_not_comparable(models):
    teacher = DigitsCNN(widths=(8, 8), num_classes=5).eval()
    message = _error(models, losses(("hinton", 1.0, {})), teacher=teacher)
    assert "(6, 10)" in message and "(6, 5)" in message


def test_a_distribution_loss_without_a_teacher():
    student = DigitsCNN(widths=(4, 6))
    with pytest.raises(RecipeError, match="needs a teacher"):
        build_objective(losses(("hinton", 1.0, {})), None, student=student, batch=(torch.rand(2, 1, 8, 8), None))


def test_a_loss_name_used_twice_is_told_apart(models):
    taps = {"student": {"a": "features.2", "b": "features.5"}, "teacher": {"a": "features.5", "b": "features.[0369]"}}
    spec = losses(("at", 1.0, {"pairs": [["a", "a"]]}), ("at", 1.0, {"pairs": [["b", "b"]]}))
    message = _error(models, spec, taps)
    assert "loss 'at#2'" in message
