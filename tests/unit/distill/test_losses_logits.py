"""Losses on output distributions, each checked against a value computed independently with loops."""

import math

import pytest
import torch

from compressor.distill.losses import LOSSES, Features, build_loss
from compressor.errors import RecipeError

S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
T = [[2.0, 0.0, 1.0], [0.5, 0.5, -0.5]]


def softmax_row(row, temp=1.0):
    m = max(x / temp for x in row)
    e = [math.exp(x / temp - m) for x in row]
    z = sum(e)
    return [x / z for x in e]


def kl_row(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def feats(values, **kw):
    return Features(
        output=torch.tensor(values, dtype=torch.float64, requires_grad=kw.pop("grad", False)), **kw
    )


def value(name, params, s=S, t=T, target=None):
    loss = build_loss(name, params)
    return loss(feats(s), feats(t), target).item()


def test_hinton_matches_hand_computation():
    temp, alpha, y = 2.0, 0.3, [1, 2]
    soft = sum(kl_row(softmax_row(t, temp), softmax_row(s, temp)) for s, t in zip(S, T)) / 2
    ce = sum(-math.log(softmax_row(s)[yi]) for s, yi in zip(S, y)) / 2
    expected = alpha * ce + (1 - alpha) * temp**2 * soft
    got = value("hinton", {"temperature": temp, "alpha": alpha}, target=torch.tensor(y))
    assert got == pytest.approx(expected, rel=1e-12)


def test_reverse_kl_matches_hand_computation():
    expected = sum(kl_row(softmax_row(s), softmax_row(t)) for s, t in zip(S, T)) / 2
    assert value("reverse_kl", {}) == pytest.approx(expected, rel=1e-12)


def test_reverse_kl_temperature_scales_by_t_squared():
    temp = 3.0
    expected = temp**2 * sum(kl_row(softmax_row(s, temp), softmax_row(t, temp)) for s, t in zip(S, T)) / 2
    assert value("reverse_kl", {"temperature": temp}) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("alpha", [0.1, 0.4])
def test_skew_kl_matches_hand_computation(alpha):
    total = 0.0
    for s, t in zip(S, T):
        p, q = softmax_row(t), softmax_row(s)
        m = [alpha * pi + (1 - alpha) * qi for pi, qi in zip(p, q)]
        total += kl_row(p, m)
    assert value("skew_kl", {"alpha": alpha}) == pytest.approx(total / 2, rel=1e-12)


@pytest.mark.parametrize("alpha", [0.1, 0.4])
def test_skew_reverse_kl_matches_hand_computation(alpha):
    total = 0.0
    for s, t in zip(S, T):
        p, q = softmax_row(t), softmax_row(s)
        m = [alpha * qi + (1 - alpha) * pi for pi, qi in zip(p, q)]
        total += kl_row(q, m)
    assert value("skew_reverse_kl", {"alpha": alpha}) == pytest.approx(total / 2, rel=1e-12)


def test_skew_kl_at_alpha_zero_is_forward_kl():
    assert value("skew_kl", {"alpha": 0.0}) == pytest.approx(
        value("hinton", {"temperature": 1.0, "alpha": 0.0})
    )


@pytest.mark.parametrize("beta", [0.5, 0.2])
def test_gjsd_matches_hand_computation(beta):
    total = 0.0
    for s, t in zip(S, T):
        p, q = softmax_row(t), softmax_row(s)
        m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
        total += beta * kl_row(p, m) + (1 - beta) * kl_row(q, m)
    assert value("gjsd", {"beta": beta}) == pytest.approx(total / 2, rel=1e-12)


def test_soft_ce_matches_hand_computation_and_its_minimum_is_teacher_entropy():
    expected = (
        sum(-sum(pi * math.log(qi) for pi, qi in zip(softmax_row(t), softmax_row(s))) for s, t in zip(S, T))
        / 2
    )
    assert value("tinybert_prediction", {}) == pytest.approx(expected, rel=1e-12)
    entropy = sum(-sum(pi * math.log(pi) for pi in softmax_row(t)) for t in T) / 2
    s = feats(T, grad=True)
    loss = build_loss("soft_ce")(s, feats(T))
    loss.backward()
    assert loss.item() == pytest.approx(entropy, rel=1e-12)
    assert s.output.grad.abs().max().item() < 1e-12  # a stationary point: the minimum


def test_nkd_matches_hand_computation():
    gamma, lam, y = 1.5, 2.0, [1, 2]
    total_t, total_n = 0.0, 0.0
    for s, t, yi in zip(S, T, y):
        total_t += -softmax_row(t)[yi] * math.log(softmax_row(s)[yi])
        s_rest = [v for c, v in enumerate(s) if c != yi]
        t_rest = [v for c, v in enumerate(t) if c != yi]
        total_n += sum(a * math.log(b) for a, b in zip(softmax_row(t_rest, lam), softmax_row(s_rest, lam)))
    expected = total_t / 2 - gamma * lam**2 * total_n / 2
    got = value("nkd", {"gamma": gamma, "temperature": lam}, target=torch.tensor(y))
    assert got == pytest.approx(expected, rel=1e-12)


def test_nkd_non_target_part_is_minimal_when_student_equals_teacher():
    # With gamma = 0 only the target part remains; the difference is the non-target part.
    y = torch.tensor([1, 2])
    grads = {}
    for gamma in (0.0, 1.5):
        s = feats(T, grad=True)
        build_loss("nkd", {"gamma": gamma})(s, feats(T), y).backward()
        grads[gamma] = s.output.grad.clone()
    assert (grads[1.5] - grads[0.0]).abs().max().item() < 1e-12


def test_nkd_without_labels_is_an_error():
    with pytest.raises(RecipeError, match="needs labels"):
        build_loss("nkd")(feats(S), feats(T))


def test_nkd_accepts_soft_labels():
    hard = value("nkd", {}, target=torch.tensor([1, 2]))
    soft = value("nkd", {}, target=torch.tensor([[0.1, 0.8, 0.1], [0.0, 0.2, 0.8]]))
    assert soft == pytest.approx(hard, rel=1e-12)


DIVERGENCES = ["hinton", "reverse_kl", "skew_kl", "skew_reverse_kl", "gjsd"]


@pytest.mark.parametrize("name", DIVERGENCES)
def test_divergence_is_zero_when_student_equals_teacher(name):
    assert value(name, {}, s=T, t=T) == pytest.approx(0.0, abs=1e-12)


LOGIT_LOSSES = DIVERGENCES + ["soft_ce", "tinybert_prediction", "nkd"]


def test_logit_losses_are_registered():
    assert set(LOGIT_LOSSES) <= set(LOSSES.names())


@pytest.mark.parametrize("name", LOGIT_LOSSES)
def test_every_logit_loss_has_finite_gradients(name):
    loss = build_loss(name)
    s = Features(torch.randn(4, 5, dtype=torch.float64, requires_grad=True))
    t = Features(torch.randn(4, 5, dtype=torch.float64) * 3)
    out = loss(s, t, torch.tensor([0, 1, 2, 3]))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.output.grad).all() and s.output.grad.abs().sum() > 0


@pytest.mark.parametrize("name", DIVERGENCES + ["soft_ce"])
def test_sequence_logits_average_only_over_real_tokens(name):
    s = torch.randn(2, 3, 4, dtype=torch.float64)
    t = torch.randn(2, 3, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss = build_loss(name, {"alpha": 0.0} if name == "hinton" else {})
    masked = loss(Features(s, attention_mask=mask), Features(t)).item()
    # The same positions as a flat batch of 3 rows give the same mean.
    keep = mask.bool()
    flat = loss(Features(s[keep]), Features(t[keep])).item()
    assert masked == pytest.approx(flat, rel=1e-12)


def test_teacher_outputs_from_inference_mode_are_usable():
    with torch.inference_mode():
        t = Features(torch.tensor(T, dtype=torch.float64))
    s = feats(S, grad=True)
    build_loss("skew_kl")(s, t).backward()
    assert torch.isfinite(s.output.grad).all()


def test_logit_shapes_that_differ_name_both_shapes():
    with pytest.raises(RecipeError, match=r"\(2, 3\).*\(2, 4\)"):
        build_loss("reverse_kl")(feats(S), Features(torch.zeros(2, 4, dtype=torch.float64)))


def test_unknown_parameter_lists_accepted_ones():
    with pytest.raises(RecipeError, match="no parameter 'temp'.*temperature"):
        build_loss("hinton", {"temp": 2})


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("skew_kl", {"alpha": 1.0}, "alpha"),
        ("gjsd", {"beta": 0.0}, "beta"),
        ("reverse_kl", {"temperature": 0}, "temperature"),
        ("hinton", {"alpha": 2}, "alpha"),
    ],
)
def test_bad_parameter_values_are_recipe_errors(name, params, match):
    with pytest.raises(RecipeError, match=match):
        build_loss(name, params)


def test_ce_is_the_label_only_baseline():
    y = [1, 2]
    expected = sum(-math.log(softmax_row(s)[yi]) for s, yi in zip(S, y)) / 2
    loss = build_loss("ce")
    assert not loss.uses_teacher
    assert loss(feats(S), feats(T), torch.tensor(y)).item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(RecipeError, match="needs labels"):
        loss(feats(S), feats(T))
