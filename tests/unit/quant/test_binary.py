"""1-bit primitives: straight-through estimators, scales, drop-in modules, W-E-A parsing, glob swapping."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressor.errors import RecipeError
from compressor.quant.binary import (
    ActQuant,
    BinarizeConfig,
    BinaryConv2d,
    BinaryEmbedding,
    BinaryLinear,
    binarize_,
    binarize_weight,
    bool_ste,
    parse_wea,
    sign_ste,
    weight_scale,
)

X = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0])
UPSTREAM = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])


def test_sign_ste_values_and_clipped_gradient():
    x = X.clone().requires_grad_()
    y = sign_ste(x)
    (y * UPSTREAM).sum().backward()
    assert torch.equal(y, torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0]))  # sign(0) = +1
    # passed where |x| <= 1 (boundary included), zero outside
    assert torch.equal(x.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0]))


def test_bool_ste_values_and_clipped_gradient():
    x = X.clone().requires_grad_()
    y = bool_ste(x)
    (y * UPSTREAM).sum().backward()
    assert torch.equal(y, torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]))  # bool(0) = 1
    assert torch.equal(x.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0]))


def test_weight_scale_is_mean_abs_per_output_row():
    w = torch.tensor([[0.5, -2.0, 0.25, 1.25], [-1.0, 1.0, -1.0, 3.0]])
    assert torch.equal(weight_scale(w), torch.tensor([1.0, 1.5]))
    conv = torch.tensor([[[[1.0, -3.0], [0.0, 2.0]]], [[[-0.5, 0.5], [0.5, -0.5]]]])  # [2, 1, 2, 2]
    assert torch.equal(weight_scale(conv), torch.tensor([1.5, 0.5]))


def test_binarize_weight_centers_rows_before_sign():
    w = torch.tensor([[0.1, 0.2, 0.3, 0.4]])  # all positive: centering decides the signs
    signs, alpha = binarize_weight(w, center=True)
    assert torch.equal(signs, torch.tensor([[-1.0, -1.0, 1.0, 1.0]]))
    assert torch.allclose(alpha, torch.tensor([0.25]), atol=0, rtol=1e-7)  # from the uncentered W
    assert torch.equal(binarize_weight(w, center=False)[0], torch.ones(1, 4))


def _hand_linear(center: bool) -> BinaryLinear:
    layer = BinaryLinear(2, 2, bias=True, act_bits=1, center=center)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -2.0], [1.5, -0.5]]))
        layer.bias.zero_()
    return layer


def test_binary_linear_forward_and_ste_gradients_by_hand():
    layer = _hand_linear(center=False)
    x = torch.tensor([[0.5, -3.0]], requires_grad=True)
    y = layer(x)
    # sign(x) = [1, -1]; signs(W) = [[1, -1], [1, -1]]; α = [1.25, 1.0] → y = 2·α
    assert torch.equal(y, torch.tensor([[2.5, 2.0]]))
    (y * torch.tensor([[1.0, 2.0]])).sum().backward()
    # ∂L/∂(αS) = gᵀ·sign(x) = [[1, -1], [2, -2]], kept where |W| <= 1
    assert torch.allclose(layer.weight.grad, torch.tensor([[1.0, 0.0], [0.0, -2.0]]), atol=1e-7, rtol=0)
    # ∂L/∂sign(x) = g·αS = [3.25, -3.25], kept where |x| <= 1
    assert torch.allclose(x.grad, torch.tensor([[3.25, 0.0]]), atol=1e-6, rtol=0)


def test_binary_linear_centered_gradient_flows_through_the_mean():
    layer = BinaryLinear(3, 1, bias=False, act_bits=1, center=True)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.3, -0.9, 2.4]]))  # μ = 0.6 → W − μ = [-0.3, -1.5, 1.8]
    y = layer(torch.tensor([[0.5, 0.5, -0.5]]))
    # signs [-1, -1, 1], α = mean|W| = 1.2, sign(x) = [1, 1, -1] → y = 1.2·(-3)
    assert torch.allclose(y, torch.tensor([[-3.6]]), atol=1e-6, rtol=0)
    y.sum().backward()
    # ∂L/∂(αS) = sign(x) = [1, 1, -1], kept where |W − μ| <= 1 → [1, 0, 0]; through μ: minus its mean
    assert torch.allclose(layer.weight.grad, torch.tensor([[2 / 3, -1 / 3, -1 / 3]]), atol=1e-6, rtol=0)


def test_binary_linear_matches_the_explicit_formula():
    linear = nn.Linear(16, 8)
    layer = BinaryLinear.from_linear(linear)
    x = torch.randn(3, 5, 16)
    w = linear.weight - linear.weight.mean(1, keepdim=True)
    w_b = torch.where(w >= 0, 1.0, -1.0) * linear.weight.abs().mean(1, keepdim=True)
    expected = F.linear(torch.where(x >= 0, 1.0, -1.0), w_b, linear.bias)
    assert torch.allclose(layer(x), expected, atol=1e-6, rtol=0)
    assert layer.weight is not linear.weight and torch.equal(layer.weight, linear.weight)  # latent kept


def test_kbit_activation_levels_and_gradient():
    quant = ActQuant(bits=3)  # n = 3, s = max|clip(x, ±2.5)| / 3 = 2.5 / 3
    x = torch.tensor([-3.0, -1.0, -0.2, 0.0, 0.3, 1.2], requires_grad=True)
    y = quant(x)
    s = 2.5 / 3
    assert torch.allclose(y, torch.tensor([-3.0, -1.0, 0.0, 0.0, 0.0, 1.0]) * s, atol=1e-6, rtol=0)
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 1.0]))  # zero outside the clip


def test_binary_conv_and_embedding_match_explicit_formulas():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    bconv = BinaryConv2d.from_conv(conv)
    x = torch.randn(2, 3, 6, 6)
    signs, alpha = binarize_weight(conv.weight)
    expected = F.conv2d(torch.where(x >= 0, 1.0, -1.0), signs * alpha.reshape(-1, 1, 1, 1), conv.bias, padding=1)
    assert torch.allclose(bconv(x), expected, atol=1e-5, rtol=0)

    emb = nn.Embedding(10, 6)
    bemb = BinaryEmbedding.from_embedding(emb)
    ids = torch.tensor([[1, 7, 7, 0]])
    out = bemb(ids)
    signs, alpha = binarize_weight(emb.weight)
    assert torch.equal(out, (signs * alpha[:, None])[ids])
    assert torch.equal(out.abs(), alpha[ids].unsqueeze(-1).expand_as(out))  # each row is exactly ±α


def test_sign_convention_matches_brevitas_but_brevitas_ste_is_unclipped():
    # why we write our own: same forward convention, but Brevitas' STE passes gradient at |x| > 1
    from brevitas.function.ops import binary_sign
    from brevitas.function.ops_ste import binary_sign_ste

    assert torch.equal(sign_ste(X), binary_sign(X))
    x = X.clone().requires_grad_()
    binary_sign_ste(x).sum().backward()
    assert x.grad[0] == 1.0 and x.grad[-1] == 1.0


@pytest.mark.parametrize("spec, expected", [("1-1-1", (1, 1, 1)), ("1-1-2", (1, 1, 2)), ("1-32-1", (1, 32, 1)),
                                            ("1-1-32", (1, 1, 32))])
def test_parse_wea(spec, expected):
    assert parse_wea(spec) == expected


@pytest.mark.parametrize("spec, fragment", [("2-1-1", "weight bits must be 1"), ("1-8-1", "embedding bits"),
                                            ("1-1-9", "activation bits"), ("one-one", "W-E-A notation")])
def test_parse_wea_rejects_with_a_fix(spec, fragment):
    with pytest.raises(RecipeError, match=fragment):
        parse_wea(spec)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)) for _ in range(2)])
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.emb(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def test_binarize_swaps_by_glob_and_keeps_the_rest():
    net = _Net()
    head_weight = net.head.weight.clone()
    binarize_(net, BinarizeConfig(modules=("blocks.*.0",), embeddings=("emb",), act_bits=2))
    assert all(isinstance(b[0], BinaryLinear) and b[0].act_bits == 2 for b in net.blocks)
    assert all(type(b[2]) is nn.Linear for b in net.blocks)  # '*' does not reach other indices
    assert isinstance(net.emb, BinaryEmbedding) and type(net.head) is nn.Linear
    assert torch.equal(net.head.weight, head_weight)
    assert net(torch.tensor([[1, 2, 3]])).shape == (1, 3, 3)


def test_binarize_double_star_crosses_segments():
    net = binarize_(_Net(), BinarizeConfig(modules=("blocks.**",)))
    assert sum(isinstance(m, BinaryLinear) for m in net.modules()) == 4


def test_binarize_names_unmatched_globs():
    with pytest.raises(RecipeError, match=r"'blocks\.\*\.1'.*'nope'") as info:
        binarize_(_Net(), BinarizeConfig(modules=("blocks.*.1", "nope", "head")))  # .1 is a ReLU
    assert "'head'" not in str(info.value).split("match no")[0]


@pytest.mark.parametrize("kwargs, fragment", [({"act_bits": 0}, "act_bits"), ({"modules": "head"}, "list of"),
                                              ({"act_bits": 9}, "1..8")])
def test_binarize_config_validation(kwargs, fragment):
    with pytest.raises(RecipeError, match=fragment):
        BinarizeConfig(**kwargs)
