"""A fully binarized BERT from a Hugging Face BertModel (Qin et al., "BiBERT", ICLR 2022).

Every encoder linear (query, key, value, attention output, intermediate, output) becomes a `BinaryLinear`
and the self-attention becomes `BiBertSelfAttention`:

    B_Q, B_K, B_V = act(Q), act(K), act(V)               (sign for 1-bit activations)
    scores = B_Q B_Kᵀ / √d
    "bi":      probs = bool(scores + mask) ∈ {0, 1}       (Bi-Attention, paper eq. 5.30-5.31)
    "softmax": probs = softmax(scores + mask)            (float attention weights: the ablation's baseline)
    context = probs B_V

The additive mask is 0 for real tokens and the dtype's minimum for padding, so bool() gives 0 there:
masked positions contribute nothing, and lie outside the STE window so they get no gradient.
Attention dropout is not applied in "bi" mode: it would rescale the {0, 1} weights.

The model keeps HF's API (forward(input_ids, attention_mask, ...) → BaseModelOutput...) and its module
names, so distillation taps read, per layer N (prefix `encoder.layer.N.attention.self.`):
`query` / `key` / `value` (real-valued Q, K, V: what DMD compares), `scores` (B_Q B_Kᵀ/√d before the
mask), `probs` (the attention weights), `q_act` / `k_act` / `v_act` (the binarized Q, K, V).

HF 4.57 dispatches `attention.self` to BertSelfAttention ("eager") or BertSdpaSelfAttention ("sdpa", the
default, which calls F.scaled_dot_product_attention and so has no place to binarize the weights); both are
replaced whole. BertModel builds the additive 4D mask in either case (sdpa: None when nothing is padded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from compressor.errors import ModelLoadError, RecipeError
from compressor.quant.binary import (
    BinarizeConfig,
    BinaryLinear,
    BoolBinarize,
    binarize_,
    make_act_quant,
    parse_wea,
    split_levels,
)

ATTENTION_KINDS = ("bi", "softmax")


@dataclass(frozen=True)
class BiBertConfig:
    """How to binarize a BERT encoder. `bits` is the paper's W-E-A notation ('1-1-1', '1-1-2', '1-32-1').

    attention: "bi" (Bi-Attention) or "softmax" (float attention weights over binarized Q, K, V).
    center: binarize W − mean(W) per row, as BiBERT's reference code does.
    binarize_pooler: also binarize the pooler's dense layer (outside the encoder; off by default).
    """

    bits: str = "1-1-1"
    attention: Literal["bi", "softmax"] = "bi"
    center: bool = True
    binarize_pooler: bool = False

    def __post_init__(self):
        parse_wea(self.bits)
        if self.attention not in ATTENTION_KINDS:
            raise RecipeError(f"attention must be one of {', '.join(ATTENTION_KINDS)}, got {self.attention!r}")

    @property
    def embedding_bits(self) -> int:
        return parse_wea(self.bits)[1]

    @property
    def act_bits(self) -> int:
        return parse_wea(self.bits)[2]


class BiBertSelfAttention(nn.Module):
    """Drop-in for HF's BertSelfAttention / BertSdpaSelfAttention with binarized Q, K, V and attention."""

    def __init__(self, hidden_size: int, num_heads: int, act_bits: int, attention: str,
                 dropout: float = 0.0, center: bool = True):
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise RecipeError(f"attention must be one of {', '.join(ATTENTION_KINDS)}, got {attention!r}")
        self.num_attention_heads = num_heads
        self.attention_head_size = hidden_size // num_heads
        self.all_head_size = num_heads * self.attention_head_size
        self.attention = attention
        self.act_bits = act_bits
        self.query = BinaryLinear(hidden_size, self.all_head_size, act_bits=act_bits, center=center)
        self.key = BinaryLinear(hidden_size, self.all_head_size, act_bits=act_bits, center=center)
        self.value = BinaryLinear(hidden_size, self.all_head_size, act_bits=act_bits, center=center)
        self.q_act = make_act_quant(act_bits)
        self.k_act = make_act_quant(act_bits)
        self.v_act = make_act_quant(act_bits)
        self.scores = nn.Identity()  # tap point only
        self.probs: nn.Module = BoolBinarize() if attention == "bi" else nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(0.0 if attention == "bi" else dropout)

    @classmethod
    def from_hf(cls, hf_self: nn.Module, config: BiBertConfig, dropout: float) -> BiBertSelfAttention:
        kind = getattr(hf_self, "position_embedding_type", "absolute")
        if kind != "absolute":
            raise ModelLoadError(f"BiBERT supports absolute position embeddings only, the model uses '{kind}'")
        if getattr(hf_self, "is_decoder", False):
            raise ModelLoadError("BiBERT binarizes encoders only; this BERT is configured as a decoder")
        new = cls(hf_self.query.in_features, hf_self.num_attention_heads, config.act_bits, config.attention,
                  dropout=dropout, center=config.center)
        for part in ("query", "key", "value"):
            getattr(new, part).load_state_dict(getattr(hf_self, part).state_dict())
        return new.to(hf_self.query.weight.device, hf_self.query.weight.dtype).train(hf_self.training)

    def _heads(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def _quantized(self, act: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
        levels, scale = split_levels(act, x, act(x))
        return self._heads(levels), scale

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                head_mask: Tensor | None = None, encoder_hidden_states: Tensor | None = None,
                past_key_values=None, output_attentions: bool = False, cache_position=None,
                **kwargs) -> tuple[Tensor, Tensor | None]:
        if encoder_hidden_states is not None or past_key_values is not None:
            raise ModelLoadError("BiBertSelfAttention is encoder self-attention: no cross-attention or KV cache")
        q, q_scale = self._quantized(self.q_act, self.query(hidden_states))
        k, k_scale = self._quantized(self.k_act, self.key(hidden_states))
        v, v_scale = self._quantized(self.v_act, self.value(hidden_states))
        # products of integer levels first, scales after: exact, so bool() sees the same zeros everywhere
        scale = 1.0 / math.sqrt(self.attention_head_size)
        if q_scale is not None:
            scale = scale * q_scale * k_scale
        scores = self.scores(torch.matmul(q, k.transpose(-1, -2)) * scale)
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:  # True = attend
                attention_mask = torch.zeros_like(attention_mask, dtype=scores.dtype).masked_fill(
                    ~attention_mask, torch.finfo(scores.dtype).min)
            scores = scores + attention_mask
        probs = self.dropout(self.probs(scores))
        if head_mask is not None:
            probs = probs * head_mask
        context = torch.matmul(probs, v)
        if v_scale is not None:
            context = context * v_scale
        context = context.transpose(1, 2).contiguous()
        context = context.view(context.shape[0], context.shape[1], self.all_head_size)
        return context, (probs if output_attentions else None)


class TailCutActivation(nn.Module):
    """GELU-like activation with its far negative tail set to exactly 0 (changes it by < 1.5e-6).

    The next layer binarizes this output by sign. GELU's tail is a vanishing negative number that each
    implementation rounds to 0 at a different point (PyTorch returns +0.0 from about -5.6, ONNX Runtime's
    Gelu from about -5.8), so sign() of the tail differs between PyTorch and the export. Cut at -5, where
    both still agree on the value, the input decides: it is the same in both (an exact integer dot product
    times α, plus the bias).
    """

    def __init__(self, fn: nn.Module | None, threshold: float = -5.0):
        super().__init__()
        self.fn = fn
        self.threshold = threshold

    def forward(self, x: Tensor) -> Tensor:
        return torch.where(x < self.threshold, torch.zeros_like(x), self.fn(x))


def bert_base(model: nn.Module) -> nn.Module:
    """The BertModel inside `model` (itself, or the base model of a BertFor... head)."""
    for candidate in (model, getattr(model, "base_model", None), getattr(model, "bert", None)):
        if candidate is not None and hasattr(candidate, "encoder") and hasattr(candidate, "embeddings"):
            layers = getattr(candidate.encoder, "layer", None)
            if isinstance(layers, nn.ModuleList) and all(hasattr(layer, "attention") for layer in layers):
                return candidate
    raise ModelLoadError(
        f"{type(model).__name__} is not a BERT-like Hugging Face model (needs .embeddings and .encoder.layer[*].attention)"
    )


def binarize_bert(model: nn.Module, config: BiBertConfig | None = None) -> nn.Module:
    """Binarize a Hugging Face BERT encoder in place (weights, activations, attention; embeddings if E=1)
    and return `model`. Heads on top (classifier, pooler unless asked) stay float."""
    config = config or BiBertConfig()
    base = bert_base(model)
    dropout = getattr(base.config, "attention_probs_dropout_prob", 0.0)
    gelu_like = "gelu" in str(getattr(base.config, "hidden_act", ""))
    for layer in base.encoder.layer:
        if getattr(layer, "crossattention", None) is not None:
            raise ModelLoadError("BiBERT binarizes encoders only; this BERT has cross-attention layers")
        layer.attention.self = BiBertSelfAttention.from_hf(layer.attention.self, config, dropout)
        if gelu_like and config.act_bits == 1 and not isinstance(layer.intermediate.intermediate_act_fn,
                                                                 TailCutActivation):
            layer.intermediate.intermediate_act_fn = TailCutActivation(layer.intermediate.intermediate_act_fn)
    modules = ["encoder.layer.*.attention.output.dense", "encoder.layer.*.intermediate.dense",
               "encoder.layer.*.output.dense"]
    if config.binarize_pooler:
        if getattr(base, "pooler", None) is None:
            raise RecipeError("binarize_pooler is set but the model has no pooler")
        modules.append("pooler.dense")
    embeddings = ("embeddings.word_embeddings",) if config.embedding_bits == 1 else ()
    binarize_(base, BinarizeConfig(modules=tuple(modules), embeddings=embeddings,
                                   act_bits=config.act_bits, center=config.center))
    return model

