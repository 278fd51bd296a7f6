"""Transformer attention losses (TinyBERT attention, MiniLM, BiBERT DMD) against loop-computed values."""

import math

import pytest
import torch

from compressor.distill.losses import Features, build_loss
from compressor.errors import RecipeError


def feats(taps, mask=None):
    b = next(iter(taps.values())).shape[0]
    return Features(output=torch.zeros(b, 1, dtype=torch.float64), taps=taps, attention_mask=mask)


def probs(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def row_softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


# --- TinyBERT attention ----------------------------------------------------------------------------------


def test_tinybert_attention_averages_over_real_query_key_entries():
    a_s, a_t = probs(1, 2, 3, 3, seed=1), probs(1, 2, 3, 3, seed=2)
    mask = torch.tensor([[1, 1, 0]])
    total, count = 0.0, 0
    for h in range(2):
        for q in range(2):
            for k in range(2):
                total += (a_s[0, h, q, k].item() - a_t[0, h, q, k].item()) ** 2
                count += 1
    loss = build_loss("tinybert_attention", {"pairs": [["s", "t"]]})
    assert loss(feats({"s": a_s}, mask), feats({"t": a_t})).item() == pytest.approx(total / count, rel=1e-12)
    unmasked = ((a_s - a_t) ** 2).mean().item()
    assert loss(feats({"s": a_s}), feats({"t": a_t})).item() == pytest.approx(unmasked, rel=1e-12)


def test_tinybert_attention_needs_equal_heads():
    loss = build_loss("tinybert_attention", {"pairs": [["s", "t"]]})
    with pytest.raises(RecipeError, match="equal heads"):
        loss(feats({"s": probs(1, 2, 3, 3, seed=0)}), feats({"t": probs(1, 4, 3, 3, seed=0)}))


# --- MiniLM ------------------------------------------------------------------------------------------------


def test_minilm_attention_kl_matches_hand_computation():
    a_s, a_t = probs(2, 2, 3, 3, seed=3), probs(2, 2, 3, 3, seed=4)
    total = 0.0
    for n in range(2):
        for h in range(2):
            for q in range(3):
                total += kl(a_t[n, h, q].tolist(), a_s[n, h, q].tolist())
    loss = build_loss("minilm", {"attention_pairs": [["s", "t"]]})
    assert loss(feats({"s": a_s}), feats({"t": a_t})).item() == pytest.approx(total / 12, rel=1e-12)


def test_minilm_value_relation_with_different_hidden_sizes():
    g = torch.Generator().manual_seed(5)
    v_s = torch.randn(1, 3, 4, generator=g, dtype=torch.float64)
    v_t = torch.randn(1, 3, 6, generator=g, dtype=torch.float64)

    def relations(v, heads):
        d = v.shape[-1] // heads
        out = []
        for r in range(heads):
            for q in range(3):
                scores = [
                    sum(v[0, q, r * d + i].item() * v[0, k, r * d + i].item() for i in range(d))
                    / math.sqrt(d)
                    for k in range(3)
                ]
                out.append(row_softmax(scores))
        return out

    rs, rt = relations(v_s, 2), relations(v_t, 2)
    expected = sum(kl(t, s) for s, t in zip(rs, rt)) / len(rs)
    loss = build_loss("minilm", {"value_pairs": [["v", "v"]], "relation_heads": 2})
    assert loss(feats({"v": v_s}), feats({"v": v_t})).item() == pytest.approx(expected, rel=1e-12)


def test_minilm_mask_equals_dropping_trailing_padding():
    g = torch.Generator().manual_seed(6)
    v_s, v_t = (
        torch.randn(1, 4, 4, generator=g, dtype=torch.float64),
        torch.randn(1, 4, 8, generator=g, dtype=torch.float64),
    )
    loss = build_loss(
        "minilm", {"value_pairs": [["v", "v"]], "query_pairs": [["v", "v"]], "relation_heads": 2}
    )
    masked = loss(feats({"v": v_s}, torch.tensor([[1, 1, 1, 0]])), feats({"v": v_t})).item()
    cropped = loss(feats({"v": v_s[:, :3]}), feats({"v": v_t[:, :3]})).item()
    assert masked == pytest.approx(cropped, rel=1e-10)


def test_minilm_is_zero_at_equality_and_needs_relation_heads():
    v = torch.randn(2, 3, 4, dtype=torch.float64)
    a = probs(2, 2, 3, 3, seed=7)
    loss = build_loss(
        "minilm", {"attention_pairs": [["a", "a"]], "value_pairs": [["v", "v"]], "relation_heads": 2}
    )
    assert loss(feats({"a": a, "v": v}), feats({"a": a, "v": v})).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(RecipeError, match="relation_heads"):
        build_loss("minilm", {"value_pairs": [["v", "v"]]})
    with pytest.raises(RecipeError, match="not divisible"):
        bad = build_loss("minilm", {"value_pairs": [["v", "v"]], "relation_heads": 3})
        bad(feats({"v": v}), feats({"v": v}))


# --- DMD -----------------------------------------------------------------------------------------------------


def dmd_patterns(x, heads):
    """P[n][h][i][j] = Σ_d x[n, i, h·dh + d]·x[n, j, h·dh + d]."""
    b, length, hidden = x.shape
    dh = hidden // heads
    return [
        [
            [
                [
                    sum(x[n, i, h * dh + d].item() * x[n, j, h * dh + d].item() for d in range(dh))
                    for j in range(length)
                ]
                for i in range(length)
            ]
            for h in range(heads)
        ]
        for n in range(b)
    ]


def flat(p):
    return [v for sample in p for head in sample for row in head for v in row]


def test_dmd_matches_hand_computation_with_batch_normalisation():
    g = torch.Generator().manual_seed(8)
    q_s, q_t = (
        torch.randn(2, 3, 4, generator=g, dtype=torch.float64),
        torch.randn(2, 3, 6, generator=g, dtype=torch.float64),
    )
    ps, pt = flat(dmd_patterns(q_s, 2)), flat(dmd_patterns(q_t, 2))
    ns, nt = math.sqrt(sum(v * v for v in ps)), math.sqrt(sum(v * v for v in pt))
    expected = math.sqrt(sum((a / ns - b / nt) ** 2 for a, b in zip(ps, pt)))
    loss = build_loss("dmd", {"pairs": [["q", "q"]], "heads": 2})
    assert loss(feats({"q": q_s}), feats({"q": q_t})).item() == pytest.approx(expected, rel=1e-12)


def test_dmd_sample_normalisation_and_mse_distance():
    g = torch.Generator().manual_seed(9)
    k_s, k_t = (
        torch.randn(2, 3, 2, generator=g, dtype=torch.float64),
        torch.randn(2, 3, 2, generator=g, dtype=torch.float64),
    )
    ps, pt = dmd_patterns(k_s, 1), dmd_patterns(k_t, 1)
    per_sample, sq = [], []
    for n in range(2):
        a, b = flat([ps[n]]), flat([pt[n]])
        na, nb = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in b))
        diffs = [x / na - y / nb for x, y in zip(a, b)]
        per_sample.append(math.sqrt(sum(d * d for d in diffs)))
        sq.extend(d * d for d in diffs)
    sample = build_loss("dmd", {"pairs": [["k", "k"]], "normalize": "sample"})
    assert sample(feats({"k": k_s}), feats({"k": k_t})).item() == pytest.approx(
        sum(per_sample) / 2, rel=1e-12
    )
    mse = build_loss("dmd", {"pairs": [["k", "k"]], "normalize": "sample", "distance": "mse"})
    assert mse(feats({"k": k_s}), feats({"k": k_t})).item() == pytest.approx(sum(sq) / len(sq), rel=1e-12)


def test_dmd_sums_over_query_key_value_pairs_and_is_zero_for_scaled_copies():
    x = {n: torch.randn(2, 4, 8, dtype=torch.float64) for n in ("q", "k", "v")}
    loss = build_loss("dmd", {"pairs": [["q", "q"], ["k", "k"], ["v", "v"]], "heads": 2})
    assert loss(feats(x), feats({n: 2.5 * t for n, t in x.items()})).item() == pytest.approx(0.0, abs=1e-12)
    y = {n: torch.randn(2, 4, 8, dtype=torch.float64) for n in ("q", "k", "v")}
    parts = sum(
        build_loss("dmd", {"pairs": [[n, n]], "heads": 2})(feats({n: x[n]}), feats({n: y[n]})).item()
        for n in x
    )
    assert loss(feats(x), feats(y)).item() == pytest.approx(parts, rel=1e-12)


def test_dmd_mask_zeroes_padded_rows_and_columns():
    x, y = torch.randn(2, 4, 4, dtype=torch.float64), torch.randn(2, 4, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    loss = build_loss("dmd", {"pairs": [["q", "q"]]})
    masked = loss(feats({"q": x}, mask), feats({"q": y})).item()
    m = mask[..., None].to(x.dtype)
    zeroed = loss(feats({"q": x * m}), feats({"q": y * m})).item()
    assert masked == pytest.approx(zeroed, rel=1e-12)


def test_dmd_gradients_are_finite_even_at_equality():
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    loss = build_loss("dmd", {"pairs": [["q", "q"]], "heads": 2})
    loss(feats({"q": x}), feats({"q": x.detach().clone()})).backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    ("name", "params", "s_shape", "t_shape"),
    [
        ("tinybert_attention", {"pairs": [["s", "t"]]}, (2, 2, 3, 3), (2, 2, 3, 3)),
        ("minilm", {"attention_pairs": [["s", "t"]]}, (2, 2, 3, 3), (2, 2, 3, 3)),
        ("minilm", {"value_pairs": [["s", "t"]], "relation_heads": 2}, (2, 3, 4), (2, 3, 6)),
        ("dmd", {"pairs": [["s", "t"]], "heads": 2}, (2, 3, 4), (2, 3, 6)),
    ],
)
def test_attention_losses_have_finite_gradients(name, params, s_shape, t_shape):
    raw = torch.randn(*s_shape, dtype=torch.float64, requires_grad=True)
    s_val = torch.softmax(raw, -1) if len(s_shape) == 4 else raw
    t_val = probs(*t_shape, seed=10) if len(t_shape) == 4 else torch.randn(*t_shape, dtype=torch.float64)
    out = build_loss(name, params)(
        feats({"s": s_val}, torch.tensor([[1, 1, 0], [1, 1, 1]])), feats({"t": t_val})
    )
    out.backward()
    assert torch.isfinite(out) and out.item() > 0
    assert torch.isfinite(raw.grad).all() and raw.grad.abs().sum() > 0
