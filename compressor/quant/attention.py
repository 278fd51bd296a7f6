"""Quantized attention matmuls (Q·Kᵀ and P·V) for Hugging Face BERT-like self-attention.

Brevitas' own `QuantScaledDotProductAttention` does not export through the TorchScript ONNX exporter
(it uses `aten::isneginf`), so the attention core is written here with Brevitas `QuantIdentity`
quantizers in front of each matmul operand. The operand types are chosen for ONNX Runtime's fast x86
kernels, which are u8×s8: the left operands (scaled queries, attention probabilities) are unsigned,
the right operands (keys, values) signed, with 7-bit range when `reduce_range` is set (the int16
pair-sum saturation of AVX2 kernels, see `compressor.quant.qat`).

The adapter replaces the `forward` of each self-attention module in place and keeps its `query`,
`key`, `value` Linear layers, so the Linear layers are quantized by the usual layer map and module
names (and therefore ONNX node names) stay those of the original model.
"""

from __future__ import annotations

import math
import types

import torch
from torch import nn

# Self-attention classes whose forward the adapter reproduces: encoder self-attention with absolute
# positions, no KV cache. Matched by class name so that transformers is not imported here.
HF_SELF_ATTENTION = {
    "BertSelfAttention", "BertSdpaSelfAttention", "RobertaSelfAttention", "RobertaSdpaSelfAttention",
    "XLMRobertaSelfAttention", "XLMRobertaSdpaSelfAttention", "ElectraSelfAttention", "CamembertSelfAttention",
}  # fmt: skip


def is_hf_self_attention(module: nn.Module) -> bool:
    return type(module).__name__ in HF_SELF_ATTENTION and all(hasattr(module, n) for n in ("query", "key", "value"))


def unsupported_reason(module: nn.Module) -> str | None:
    """Why the adapter cannot reproduce this attention module's forward, or None when it can."""
    if getattr(module, "position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type '{module.position_embedding_type}' (relative positions)"
    if getattr(module, "is_decoder", False):
        return "decoder self-attention (KV cache)"
    return None


def attach_quant_attention(module: nn.Module, left_quant, right_quant, probs_quant, act_bits: int, right_bits: int) -> None:
    """Give `module` quantizers for both attention matmuls and a forward that uses them."""
    import brevitas.nn as qnn

    module.q_scaled_quant = qnn.QuantIdentity(act_quant=left_quant, bit_width=act_bits, return_quant_tensor=False)
    module.k_transposed_quant = qnn.QuantIdentity(act_quant=right_quant, bit_width=right_bits, return_quant_tensor=False)
    module.attn_probs_quant = qnn.QuantIdentity(act_quant=probs_quant, bit_width=act_bits, return_quant_tensor=False)
    module.v_quant = qnn.QuantIdentity(act_quant=right_quant, bit_width=right_bits, return_quant_tensor=False)
    module.forward = types.MethodType(_quant_self_attention_forward, module)


def _quant_self_attention_forward(
    self,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    head_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    *args,
    **kwargs,
):
    if encoder_hidden_states is not None:
        raise NotImplementedError("quantized attention covers self-attention only (no cross-attention)")
    batch, length, _ = hidden_states.shape

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, -1, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    query, key, value = heads(self.query(hidden_states)), heads(self.key(hidden_states)), heads(self.value(hidden_states))
    # The 1/sqrt(d) scale goes before the quantizer so that the integer matmul needs no rescaling.
    scores = self.q_scaled_quant(query * (1.0 / math.sqrt(self.attention_head_size))) @ self.k_transposed_quant(
        key.transpose(-1, -2)
    )
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros_like(attention_mask, dtype=scores.dtype).masked_fill(
                ~attention_mask, torch.finfo(scores.dtype).min
            )
        scores = scores + attention_mask  # additive mask, [batch, 1, 1 or L, S]
    probs = torch.softmax(scores, dim=-1)
    probs = self.dropout(probs)
    if head_mask is not None:
        probs = probs * head_mask
    context = self.attn_probs_quant(probs) @ self.v_quant(value)
    context = context.transpose(1, 2).reshape(batch, length, self.all_head_size)
    return context, None
