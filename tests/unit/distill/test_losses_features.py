"""Feature and relation losses (FitNets, TinyBERT hidden, AT, FSP, RKD, contrastive) against loop-computed values."""

import math

import pytest
import torch
from torch import nn

from compressor.distill.losses import Features, build_loss
from compressor.errors import RecipeError


def t64(x, grad=False):
    return torch.tensor(x, dtype=torch.float64, requires_grad=grad)


def feats(taps, output=None, mask=None):
    out = (
        output if output is not None else torch.zeros(len(next(iter(taps.values()))), 1, dtype=torch.float64)
    )
    return Features(output=out, taps=taps, attention_mask=mask)


def huber(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


# --- FitNets -----------------------------------------------------------------------------------------


def test_fitnets_linear_regressor_matches_hand_computation():
    s_val = [[1.0, 2.0, -1.0], [0.5, 0.0, 2.0]]
    t_val = [[1.0, -1.0], [2.0, 0.5]]
    loss = build_loss("fitnets", {"pairs": [["h", "h"]]})
    s, t = feats({"h": t64(s_val)}), feats({"h": t64(t_val)})
    loss.prepare(s, t)
    reg = loss.regressors["0"]
    assert isinstance(reg, nn.Linear) and (reg.in_features, reg.out_features) == (3, 2)
    w = [[0.5, -1.0, 0.25], [1.0, 0.0, -0.5]]
    b = [0.1, -0.2]
    with torch.no_grad():
        reg.weight.copy_(t64(w))
        reg.bias.copy_(t64(b))
    total = 0.0
    for n in range(2):
        for o in range(2):
            r = sum(w[o][i] * s_val[n][i] for i in range(3)) + b[o]
            total += (t_val[n][o] - r) ** 2
    expected = 0.5 * total / 2  # ½‖·‖² per sample, averaged over the batch
    assert loss(s, t).item() == pytest.approx(expected, rel=1e-12)


def test_fitnets_conv_regressor_for_feature_maps():
    torch.manual_seed(1)
    s_map = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    t_map = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    loss = build_loss("fitnets", {"pairs": [["a", "b"]], "reduction": "mean"})
    s, t = feats({"a": s_map}), feats({"b": t_map})
    loss.prepare(s, t)
    reg = loss.regressors["0"]
    assert isinstance(reg, nn.Conv2d) and reg.kernel_size == (1, 1)
    w, bias = reg.weight.detach(), reg.bias.detach()
    total = 0.0
    for o in range(3):
        for y in range(2):
            for x in range(2):
                r = sum(w[o, i, 0, 0].item() * s_map[0, i, y, x].item() for i in range(2)) + bias[o].item()
                total += (t_map[0, o, y, x].item() - r) ** 2
    assert loss(s, t).item() == pytest.approx(0.5 * total / 12, rel=1e-10)


def test_fitnets_equal_widths_need_no_regressor_and_are_zero_at_equality():
    x = torch.randn(2, 4, dtype=torch.float64)
    loss = build_loss("fitnets", {"student_taps": ["h"], "teacher_taps": ["g"]})
    loss.prepare(feats({"h": x}), feats({"g": x}))
    assert len(loss.regressors) == 0
    assert loss(feats({"h": x}), feats({"g": x.clone()})).item() == 0.0
    y = torch.randn(2, 4, dtype=torch.float64)
    assert loss(feats({"h": x}), feats({"g": y})).item() == pytest.approx(
        0.5 * ((x - y) ** 2).sum().item() / 2
    )


def test_fitnets_must_be_prepared_before_the_optimizer_exists():
    loss = build_loss("fitnets", {"pairs": [["h", "h"]]})
    with pytest.raises(RuntimeError, match="prepare"):
        loss(feats({"h": torch.randn(2, 3)}), feats({"h": torch.randn(2, 5)}))


def test_fitnets_regressor_is_trained_through_loss_parameters():
    loss = build_loss("fitnets", {"pairs": [["h", "h"]]})
    s_x = torch.randn(4, 3, requires_grad=True)
    s, t = feats({"h": s_x}), feats({"h": torch.randn(4, 5)})
    loss.prepare(s, t)
    params = list(loss.parameters())
    assert len(params) == 2  # weight and bias of the regressor
    loss(s, t).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert torch.isfinite(s_x.grad).all() and s_x.grad.abs().sum() > 0


def test_fitnets_spatial_mismatch_names_both_shapes():
    loss = build_loss("fitnets", {"pairs": [["a", "b"]]})
    with pytest.raises(RecipeError, match=r"\(1, 2, 4, 4\).*\(1, 3, 2, 2\)"):
        loss.prepare(feats({"a": torch.zeros(1, 2, 4, 4)}), feats({"b": torch.zeros(1, 3, 2, 2)}))


def test_fitnets_missing_tap_is_named():
    loss = build_loss("fitnets", {"pairs": [["a", "b"]]})
    with pytest.raises(RecipeError, match="student tap 'a'.*captured: x"):
        loss.prepare(feats({"x": torch.zeros(1, 2)}), feats({"b": torch.zeros(1, 2)}))


def test_loss_needing_taps_without_pairs_is_an_error():
    with pytest.raises(RecipeError, match="'fitnets': needs tapped features"):
        build_loss("fitnets")


# --- TinyBERT hidden / embedding ---------------------------------------------------------------------


def test_tinybert_hidden_shares_one_regressor_and_masks_padding():
    torch.manual_seed(2)
    s = {"s0": torch.randn(2, 3, 2, dtype=torch.float64), "s1": torch.randn(2, 3, 2, dtype=torch.float64)}
    t = {"t0": torch.randn(2, 3, 4, dtype=torch.float64), "t1": torch.randn(2, 3, 4, dtype=torch.float64)}
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss = build_loss("tinybert_hidden", {"pairs": [["s0", "t0"], ["s1", "t1"]]})
    sf, tf = feats(s, mask=mask), feats(t)
    loss.prepare(sf, tf)
    assert list(loss.regressors) == ["shared"]
    w, b = loss.regressors["shared"].weight.detach(), loss.regressors["shared"].bias.detach()
    expected = 0.0
    for sk, tk in (("s0", "t0"), ("s1", "t1")):
        total, count = 0.0, 0
        for n in range(2):
            for pos in range(3):
                if not mask[n, pos]:
                    continue
                for o in range(4):
                    r = sum(w[o, i].item() * s[sk][n, pos, i].item() for i in range(2)) + b[o].item()
                    total += (t[tk][n, pos, o].item() - r) ** 2
                count += 4
        expected += total / count
    assert loss(sf, tf).item() == pytest.approx(expected, rel=1e-10)


def test_tinybert_embedding_is_mse_without_half():
    x, y = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    loss = build_loss("tinybert_embedding", {"pairs": [["e", "e"]]})
    loss.prepare(feats({"e": x}), feats({"e": y}))
    assert loss(feats({"e": x}), feats({"e": y})).item() == pytest.approx(
        ((x - y) ** 2).mean().item(), rel=1e-12
    )


# --- Attention transfer ------------------------------------------------------------------------------


def test_attention_transfer_matches_hand_computation():
    torch.manual_seed(3)
    a_s = torch.randn(2, 2, 2, 2, dtype=torch.float64)
    a_t = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    beta = 3.0
    total = 0.0
    for n in range(2):
        qs = [sum(a_s[n, c, y, x].item() ** 2 for c in range(2)) for y in range(2) for x in range(2)]
        qt = [sum(a_t[n, c, y, x].item() ** 2 for c in range(3)) for y in range(2) for x in range(2)]
        ns, nt = math.sqrt(sum(v * v for v in qs)), math.sqrt(sum(v * v for v in qt))
        total += math.sqrt(sum((u / ns - v / nt) ** 2 for u, v in zip(qs, qt)))
    expected = beta / 2 * total / 2
    loss = build_loss("at", {"pairs": [["a", "b"]], "beta": beta})
    assert loss(feats({"a": a_s}), feats({"b": a_t})).item() == pytest.approx(expected, rel=1e-12)


def test_attention_transfer_is_zero_for_proportional_maps_and_rejects_other_resolutions():
    a = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    loss = build_loss("at", {"pairs": [["a", "b"]]})
    assert loss(feats({"a": a}), feats({"b": 2 * a})).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(RecipeError, match="spatial size"):
        build_loss("at", {"pairs": [["a", "b"]]})(feats({"a": a}), feats({"b": torch.zeros(2, 4, 2, 2)}))


# --- FSP -----------------------------------------------------------------------------------------------


def test_fsp_matches_hand_computation():
    torch.manual_seed(4)
    s1, s2 = torch.randn(2, 2, 2, 2, dtype=torch.float64), torch.randn(2, 3, 2, 2, dtype=torch.float64)
    t1, t2 = torch.randn(2, 2, 2, 2, dtype=torch.float64), torch.randn(2, 3, 2, 2, dtype=torch.float64)

    def gram(f1, f2, n):
        return [
            [
                sum(f1[n, i, y, x].item() * f2[n, j, y, x].item() for y in range(2) for x in range(2)) / 4
                for j in range(3)
            ]
            for i in range(2)
        ]

    total = 0.0
    for n in range(2):
        gs, gt = gram(s1, s2, n), gram(t1, t2, n)
        total += sum((gt[i][j] - gs[i][j]) ** 2 for i in range(2) for j in range(3))
    loss = build_loss("fsp", {"student_pairs": [["a", "b"]], "teacher_pairs": [["c", "d"]], "weights": [0.5]})
    got = loss(feats({"a": s1, "b": s2}), feats({"c": t1, "d": t2})).item()
    assert got == pytest.approx(0.5 * total / 2, rel=1e-12)
    same = loss(feats({"a": t1, "b": t2}), feats({"c": t1, "d": t2})).item()
    assert same == 0.0


def test_fsp_needs_equal_spatial_sizes():
    loss = build_loss("fsp", {"student_pairs": [["a", "b"]], "teacher_pairs": [["a", "b"]]})
    x, y = torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 2, 2)
    with pytest.raises(RecipeError, match="same spatial size"):
        loss(feats({"a": x, "b": y}), feats({"a": x, "b": y}))


# --- RKD ---------------------------------------------------------------------------------------------------

E_S = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]
E_T = [[1.0, 1.0, 0.0], [0.0, 1.0, 3.0], [2.0, -1.0, 1.0]]


def test_rkd_distance_matches_hand_computation():
    def psi(points):
        d = {(i, j): math.dist(points[i], points[j]) for i in range(3) for j in range(3) if i != j}
        mu = sum(d.values()) / len(d)
        return {k: v / mu for k, v in d.items()}

    ps, pt = psi(E_S), psi(E_T)
    expected = sum(huber(ps[k] - pt[k]) for k in ps) / len(ps)
    got = build_loss("rkd_distance")(Features(t64(E_S)), Features(t64(E_T))).item()
    assert got == pytest.approx(expected, rel=1e-12)


def test_rkd_angle_matches_hand_computation():
    def cosines(p):
        out = {}
        for i in range(3):
            for j in range(3):
                for k in range(3):
                    if len({i, j, k}) < 3:
                        continue
                    a = [x - y for x, y in zip(p[i], p[j])]
                    b = [x - y for x, y in zip(p[k], p[j])]
                    out[i, j, k] = sum(x * y for x, y in zip(a, b)) / (math.hypot(*a) * math.hypot(*b))
        return out

    cs, ct = cosines(E_S), cosines(E_T)
    expected = sum(huber(cs[k] - ct[k]) for k in cs) / len(cs)
    got = build_loss("rkd_angle")(Features(t64(E_S)), Features(t64(E_T))).item()
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", ["rkd_distance", "rkd_angle"])
def test_rkd_is_zero_for_a_scaled_copy_and_reads_taps_when_paired(name):
    x = torch.randn(4, 5, dtype=torch.float64)
    assert build_loss(name)(Features(x), Features(3 * x)).item() == pytest.approx(0.0, abs=1e-12)
    loss = build_loss(name, {"pair": ["emb", "emb"]})
    assert loss.needs == ("taps",)
    assert loss(feats({"emb": x}), feats({"emb": 3 * x})).item() == pytest.approx(0.0, abs=1e-12)


def test_rkd_angle_needs_three_samples():
    with pytest.raises(RecipeError, match="at least 3"):
        build_loss("rkd_angle")(Features(torch.randn(2, 3)), Features(torch.randn(2, 3)))


# --- Contrastive -----------------------------------------------------------------------------------------


def test_contrastive_without_projection_matches_hand_computation():
    s_val = [[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]]
    t_val = [[0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]
    tau = 0.5
    total = 0.0
    for i in range(3):
        logits = [
            sum(a * b for a, b in zip(s_val[i], t_val[j])) / tau for j in range(3)
        ]  # already unit vectors
        total += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    loss = build_loss("contrastive", {"proj_dim": None, "temperature": tau})
    loss.prepare(Features(t64(s_val)), Features(t64(t_val)))
    assert loss(Features(t64(s_val)), Features(t64(t_val))).item() == pytest.approx(total / 3, rel=1e-12)


def test_contrastive_prefers_matching_pairs():
    x = torch.randn(6, 8, dtype=torch.float64)
    loss = build_loss("contrastive", {"proj_dim": None})
    loss.prepare(Features(x), Features(x))
    matched = loss(Features(x), Features(x.clone())).item()
    shuffled = loss(Features(x), Features(x[torch.tensor([1, 2, 3, 4, 5, 0])])).item()
    assert matched < shuffled


def test_contrastive_projections_are_created_by_prepare_and_trained():
    loss = build_loss("contrastive", {"proj_dim": 4, "symmetric": True})
    s_x = torch.randn(5, 3, requires_grad=True)
    s, t = Features(s_x), Features(torch.randn(5, 7))
    loss.prepare(s, t)
    loss(s, t).backward()
    assert loss.student_proj.weight.grad.abs().sum() > 0 and loss.teacher_proj.weight.grad.abs().sum() > 0
    assert torch.isfinite(s_x.grad).all()


# --- common -------------------------------------------------------------------------------------------------

CASES = {
    "fitnets": ({"pairs": [["a", "b"]]}, (3, 4, 2, 2), (3, 6, 2, 2)),
    "tinybert_hidden": ({"pairs": [["a", "b"]]}, (3, 5, 4), (3, 5, 6)),
    "tinybert_embedding": ({"pairs": [["a", "b"]]}, (3, 5, 4), (3, 5, 4)),
    "at": ({"pairs": [["a", "b"]]}, (3, 4, 2, 2), (3, 6, 2, 2)),
    "rkd_distance": ({"pair": ["a", "b"]}, (4, 3), (4, 5)),
    "rkd_angle": ({"pair": ["a", "b"]}, (4, 3), (4, 5)),
    "contrastive": ({"pair": ["a", "b"]}, (4, 3), (4, 5)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_feature_losses_have_finite_gradients(name):
    params, s_shape, t_shape = CASES[name]
    s_x = torch.randn(*s_shape, dtype=torch.float64, requires_grad=True)
    s, t = feats({"a": s_x}), feats({"b": torch.randn(*t_shape, dtype=torch.float64)})
    loss = build_loss(name, params).double()
    loss.prepare(s, t)
    loss = loss.double()
    out = loss(s, t)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s_x.grad).all() and s_x.grad.abs().sum() > 0


def test_fsp_has_finite_gradients():
    a = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    loss = build_loss("fsp", {"student_pairs": [["a", "b"]], "teacher_pairs": [["a", "b"]]})
    loss(
        feats({"a": a, "b": b}), feats({"a": torch.randn(2, 2, 3, 3, dtype=torch.float64), "b": b})
    ).backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["at", "fitnets", "tinybert_hidden", "tinybert_attention", "dmd"])
def test_tap_pair_losses_take_the_shared_tap_parameters_and_name_them_when_one_is_unknown(name):
    loss = build_loss(name, {"student_taps": ["s1", "s2"], "teacher_taps": ["t1", "t2"]})
    assert loss.pairs("pairs") == [("s1", "t1"), ("s2", "t2")]
    with pytest.raises(RecipeError, match=rf"loss '{name}' has no parameter 'bogus'; accepted: .*pairs, student_taps, teacher_taps, layer_map"):
        build_loss(name, {"pairs": [["s", "t"]], "bogus": 1})
