"""1-bit weights, 1- or k-bit activations: the primitives of a fully binarized student (BiBERT).

Method (Qin et al., "BiBERT: Accurate Fully Binarized BERT", ICLR 2022, eq. 3 and the authors'
reference code): a binarized linear computes

    y = α ⊙ (sign(x) ⊗ sign(W − μ(W)))ᵀ + b,   α = mean|W| per output row (from the latent float W),

with `sign(0) = +1` so every binarized value is exactly ±1. Gradients use a straight-through estimator
clipped outside [-1, 1] (∂sign(x)/∂x := 1 if |x| ≤ 1 else 0); for weights the estimator is applied to
α·sign(W − μ) as a whole, as in the reference code, so α (a statistic of W) carries no gradient.

Why not Brevitas (ENVIRONMENT.md, and checked in tests): Brevitas' 1-bit quantizers use a per-tensor scale
and an *unclipped* straight-through sign, and they do not export through QCDQ ("Binary quant not
supported"); their QONNX `BipolarQuant` nodes do not run in ONNX Runtime. The deployable path is ours
(`compressor/export/binary.py`: int8 Q/DQ with weights ±α, run by ORT's integer kernels). We keep
Brevitas' sign convention (`binary_sign`: 0 → +1).

Module names are addressed by globs: `*` matches within one dotted segment, `**` across segments
(`encoder.layer.*.output.dense` does not match `encoder.layer.0.attention.output.dense`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compressor.errors import RecipeError

FLOAT_BITS = 32  # "32" in W-E-A notation: that tensor stays float
MAX_ACT_BITS = 8  # k-bit activation levels must fit uint8 with a zero point (see export)


def _exporting() -> bool:
    # The legacy ONNX exporter traces; autograd Functions would appear as opaque PythonOps, so the
    # same maths is written with plain ops while exporting.
    return torch.onnx.is_in_onnx_export()


# --- straight-through estimators ---------------------------------------------------------------------


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


class _BoolSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


class _ScaledSignSTE(torch.autograd.Function):
    """sign(w) whose consumer multiplies by α afterwards: the gradient is that of α·sign(w) w.r.t. w
    under the clipped STE, i.e. (∂L/∂(α·sign w))·1{|w|≤1} — hence the division by α."""

    @staticmethod
    def forward(ctx, w: Tensor, alpha: Tensor) -> Tensor:
        ctx.save_for_backward(w, alpha)
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        w, alpha = ctx.saved_tensors
        # a row of zeros has α = 0 and then receives no gradient through the product anyway
        safe = torch.where(alpha > 0, alpha, torch.ones_like(alpha))
        return grad / safe * (w.abs() <= 1).to(grad.dtype), None


def sign_ste(x: Tensor) -> Tensor:
    """±1 (sign(0) = +1); gradient passed where |x| ≤ 1, zero outside."""
    if _exporting():
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
    return _SignSTE.apply(x)


def bool_ste(x: Tensor) -> Tensor:
    """BiBERT's bool(x): 1 where x ≥ 0 else 0; gradient passed where |x| ≤ 1 (paper eq. 5.29)."""
    if _exporting():
        return (x >= 0).to(x.dtype)
    return _BoolSTE.apply(x)


# --- weights -----------------------------------------------------------------------------------------


def weight_scale(weight: Tensor) -> Tensor:
    """α = mean|W| over everything but the output dimension (dim 0), shape [out], detached.

    Accumulated in float64: for a row of ±α (a model loaded from `weights.1bit`) the sum is then exact and
    α comes back bit-identical, so a pack → load roundtrip reproduces the model exactly.
    """
    dims = tuple(range(1, weight.dim()))
    return weight.detach().abs().double().mean(dim=dims).to(weight.dtype)


def centered(weight: Tensor) -> Tensor:
    """W − μ(W) per output row (the reference's zero-mean redistribution before sign)."""
    dims = tuple(range(1, weight.dim()))
    return weight - weight.mean(dim=dims, keepdim=True)


def weight_signs(weight: Tensor, alpha: Tensor, center: bool) -> Tensor:
    """±1 signs of the (optionally centered) latent weight, with BiBERT's weight STE."""
    w = centered(weight) if center else weight
    if _exporting():
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return _ScaledSignSTE.apply(w, alpha.reshape(shape))


def binarize_weight(weight: Tensor, center: bool = True) -> tuple[Tensor, Tensor]:
    """(signs ±1 of the latent weight, α per output row): the deployable content of a 1-bit weight."""
    alpha = weight_scale(weight)
    return weight_signs(weight, alpha, center), alpha


# --- activations -------------------------------------------------------------------------------------


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def act_levels(bits: int) -> int:
    """Largest level n of a symmetric k-bit grid {-n..n}·s (1 bit: the two levels ±1)."""
    return 1 if bits == 1 else 2 ** (bits - 1) - 1


class ActQuant(nn.Module):
    """Quantizes activations: 1 bit → sign (±1, no scale); k bits → symmetric grid {-n..n}·s with a dynamic
    per-tensor s = max|clip(x)|/n (the reference's SymQuantizer), n = 2^(k-1) − 1 (2 bits: ternary).

    A separate module so that a forward hook (distillation taps, export parity) sees the binarized tensor.
    """

    def __init__(self, bits: int, clip: float = 2.5):
        super().__init__()
        check_act_bits(bits, "act_bits")
        self.bits = bits
        self.clip = clip

    def extra_repr(self) -> str:
        return f"bits={self.bits}" + (f", clip={self.clip}" if self.bits > 1 else "")

    def scale(self, x: Tensor) -> Tensor:
        """The dynamic scale s of a k-bit input (1 for 1 bit)."""
        if self.bits == 1:
            return torch.ones((), dtype=x.dtype, device=x.device)
        peak = x.detach().clamp(-self.clip, self.clip).abs().amax()
        return peak.clamp_min(torch.finfo(x.dtype).tiny) / act_levels(self.bits)

    def forward(self, x: Tensor) -> Tensor:
        if self.bits == 1:
            return sign_ste(x)
        n = act_levels(self.bits)
        s = self.scale(x)
        clipped = x.clamp(-self.clip, self.clip)  # gradient is zero outside the clip range
        q = torch.round(clipped / s) if _exporting() else _RoundSTE.apply(clipped / s)
        return q.clamp(-n, n) * s


def split_levels(act: nn.Module, x: Tensor, x_q: Tensor) -> tuple[Tensor, Tensor | None]:
    """`x_q = act(x)` as (integer-valued levels, scale), scale None for 1-bit or float activations.

    Products of levels are exact in float, and the scale is applied once afterwards — the order ONNX
    Runtime's integer kernels use — so a binarized tensor computed downstream (sign, bool) does not depend
    on summation order: a dot product that is exactly 0 stays 0 (→ +1 / 1) in PyTorch and in the export.
    """
    if not isinstance(act, ActQuant) or act.bits == 1:
        return x_q, None
    s = act.scale(x)
    levels = torch.round(x_q / s) if _exporting() else _RoundSTE.apply(x_q / s)
    return levels, s


class BoolBinarize(nn.Module):
    """Bi-Attention's binarized attention weight bool(scores + mask) ∈ {0, 1}; a module so hooks see it."""

    def forward(self, x: Tensor) -> Tensor:
        return bool_ste(x)


def check_act_bits(bits: int, field: str) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= MAX_ACT_BITS:
        raise RecipeError(f"{field} must be an integer in 1..{MAX_ACT_BITS} (or 32 for float), got {bits!r}")


def make_act_quant(bits: int) -> nn.Module:
    """ActQuant for 1..8 bits, Identity for float (32)."""
    return nn.Identity() if bits == FLOAT_BITS else ActQuant(bits)


# --- drop-in modules ---------------------------------------------------------------------------------


class BinaryLinear(nn.Linear):
    """nn.Linear with 1-bit weights (±α per output row) and quantized inputs; keeps the latent float weight.

    Computed as (levels @ signsᵀ)·α·s + b (see `split_levels`): the integer dot products are exact in
    float, so the result rounds like the integer kernel ONNX Runtime runs on the export, and an exactly-zero
    dot product (common: even widths, zero-initialized biases) stays exactly zero on both sides.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act_bits: int = 1,
                 center: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.act = make_act_quant(act_bits)
        self.act_bits = act_bits
        self.center = center

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_bits: int = 1, center: bool = True) -> BinaryLinear:
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, act_bits, center,
                  device=linear.weight.device, dtype=linear.weight.dtype)
        new.load_state_dict(linear.state_dict())
        return new

    def forward(self, x: Tensor) -> Tensor:
        signs, alpha = binarize_weight(self.weight, self.center)
        levels, scale = split_levels(self.act, x, self.act(x))
        y = F.linear(levels, signs) * alpha
        if scale is not None:
            y = y * scale
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act_bits={self.act_bits}, center={self.center}"


class BinaryConv2d(nn.Conv2d):
    """nn.Conv2d with 1-bit weights (±α per output channel) and quantized inputs (zero padding stays 0)."""

    def __init__(self, *args, act_bits: int = 1, center: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.act = make_act_quant(act_bits)
        self.act_bits = act_bits
        self.center = center

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, act_bits: int = 1, center: bool = True) -> BinaryConv2d:
        if conv.padding_mode != "zeros":
            raise RecipeError(f"binarizing Conv2d needs padding_mode='zeros', got '{conv.padding_mode}'")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                  padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                  act_bits=act_bits, center=center, device=conv.weight.device, dtype=conv.weight.dtype)
        new.load_state_dict(conv.state_dict())
        return new

    def forward(self, x: Tensor) -> Tensor:
        signs, alpha = binarize_weight(self.weight, self.center)
        levels, scale = split_levels(self.act, x, self.act(x))
        y = self._conv_forward(levels, signs, None) * alpha.reshape(1, -1, 1, 1)
        if scale is not None:
            y = y * scale
        return y + self.bias.reshape(1, -1, 1, 1) if self.bias is not None else y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act_bits={self.act_bits}, center={self.center}"


class BinaryEmbedding(nn.Embedding):
    """nn.Embedding whose table is 1-bit: each row ±α_row (the E of W-E-A)."""

    def __init__(self, *args, center: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.center = center

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, center: bool = True) -> BinaryEmbedding:
        if emb.max_norm is not None or emb.sparse:
            raise RecipeError("binarizing an Embedding with max_norm or sparse=True is not supported")
        new = cls(emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx, center=center,
                  device=emb.weight.device, dtype=emb.weight.dtype)
        new.load_state_dict(emb.state_dict())
        return new

    def forward(self, ids: Tensor) -> Tensor:
        signs, alpha = binarize_weight(self.weight, self.center)
        return F.embedding(ids, signs, self.padding_idx) * F.embedding(ids, alpha[:, None])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", center={self.center}"


BINARY_MODULES = (BinaryLinear, BinaryConv2d, BinaryEmbedding)


def binarized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name → module for every 1-bit weight module in `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, BINARY_MODULES)}


# --- W-E-A notation ----------------------------------------------------------------------------------


def parse_wea(spec: str) -> tuple[int, int, int]:
    """'1-1-1' → (weight bits, embedding bits, activation bits). Weights must be 1; E is 1 or 32;
    A is 1..8 or 32."""
    parts = str(spec).split("-")
    try:
        w, e, a = (int(p) for p in parts)
    except ValueError:
        raise RecipeError(f"bits '{spec}' is not W-E-A notation; write e.g. '1-1-1' or '1-1-2'") from None
    if w != 1:
        raise RecipeError(f"bits '{spec}': weight bits must be 1 for binarization (use QAT for {w}-bit weights)")
    if e not in (1, FLOAT_BITS):
        raise RecipeError(f"bits '{spec}': embedding bits must be 1 or {FLOAT_BITS}, got {e}")
    if a != FLOAT_BITS:
        check_act_bits(a, f"bits '{spec}': activation bits")
    return w, e, a


# --- module swapping ---------------------------------------------------------------------------------


def glob_regex(pattern: str) -> re.Pattern[str]:
    """`*` → within one dotted segment, `**` → across segments, `?` → one character."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append(r"[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append(r"[^.]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def match_names(names: Iterable[str], patterns: Iterable[str], what: str) -> list[str]:
    """Names matched by any pattern, in order; a pattern matching nothing is an error naming it."""
    names = list(names)
    compiled = {p: glob_regex(p) for p in patterns}
    unmatched = [p for p, rx in compiled.items() if not any(rx.match(n) for n in names)]
    if unmatched:
        sample = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise RecipeError(
            f"{what} pattern(s) {', '.join(repr(p) for p in unmatched)} match no {what}; "
            f"candidates: {sample or 'none'} ('*' stays within one dotted name segment, '**' crosses them)"
        )
    return [n for n in names if any(rx.match(n) for rx in compiled.values())]


@dataclass(frozen=True)
class BinarizeConfig:
    """What `binarize_` swaps.

    modules: globs over module names; every matched nn.Linear / nn.Conv2d becomes 1-bit.
    embeddings: globs over nn.Embedding names made 1-bit (the E of W-E-A); empty keeps them float.
    act_bits: bits of the inputs of those layers: 1 (sign), 2..8 (symmetric k-bit), 32 (float).
    center: binarize W − mean(W) per row (BiBERT's reference) instead of W.
    """

    modules: tuple[str, ...] = ("**",)
    embeddings: tuple[str, ...] = ()
    act_bits: int = 1
    center: bool = True

    def __post_init__(self):
        for field in ("modules", "embeddings"):
            value = getattr(self, field)
            if isinstance(value, str) or not all(isinstance(p, str) and p for p in value):
                raise RecipeError(f"binarize.{field} must be a list of module-name globs, got {value!r}")
            object.__setattr__(self, field, tuple(value))
        if self.act_bits != FLOAT_BITS:
            check_act_bits(self.act_bits, "binarize.act_bits")


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def binarize_(model: nn.Module, config: BinarizeConfig | None = None) -> nn.Module:
    """Swap matched Linear/Conv2d (and Embedding) modules of `model` for 1-bit ones, in place.

    Raises RecipeError naming every glob that matches no eligible module.
    """
    config = config or BinarizeConfig()
    layers = {n: m for n, m in model.named_modules()
              if type(m) in (nn.Linear, nn.Conv2d)}  # exact types: already-binary subclasses are skipped
    for name in match_names(layers, config.modules, "Linear/Conv2d module"):
        old = layers[name]
        new = (BinaryLinear.from_linear(old, config.act_bits, config.center) if isinstance(old, nn.Linear)
               else BinaryConv2d.from_conv(old, config.act_bits, config.center))
        new.train(old.training)
        set_submodule(model, name, new)
    if config.embeddings:
        tables = {n: m for n, m in model.named_modules() if type(m) is nn.Embedding}
        for name in match_names(tables, config.embeddings, "Embedding module"):
            new = BinaryEmbedding.from_embedding(tables[name], config.center)
            new.train(tables[name].training)
            set_submodule(model, name, new)
    return model
