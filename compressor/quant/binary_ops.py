"""FLOPs and BOPs of a (partly) binarized model, counted the way BiBERT's Table 2 reports them.

Convention (Bi-Real Net / BiBERT): only matrix products are counted (linear, conv, the two attention
products); element-wise ops (LayerNorm, GELU, softmax, residual adds) and embedding lookups are not.
An operation of M multiply-accumulates counts 2·M: as FLOPs when either operand is float, as
BOPs = 2·M·b₁·b₂ when both operands are b₁- and b₂-bit integers (1-bit ⊗ 1-bit: 2·M). The single figure
the paper prints as "FLOPs" is `total = FLOPs + BOPs / 64` (a 64-bit word does 64 binary ops per
instruction). With this, BERT-base at sequence length 128 gives ≈ 22.5 G for full precision, the paper's
number; attention over padded positions is counted (shapes, not masks, decide the count).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.quant.bibert import BiBertSelfAttention
from compressor.quant.binary import FLOAT_BITS, BinaryConv2d, BinaryLinear

BITS_PER_WORD = 64


@dataclass
class OpsCount:
    flops: int = 0  # 2·MACs of products with a float operand
    bops: int = 0  # 2·MACs·b₁·b₂ of integer ⊗ integer products
    by_module: dict[str, tuple[int, int]] = field(default_factory=dict)  # name → (flops, bops)

    @property
    def total(self) -> float:
        """FLOPs as BiBERT reports them: FLOPs + BOPs/64."""
        return self.flops + self.bops / BITS_PER_WORD

    def add(self, name: str, macs: int, bits_a: int, bits_b: int) -> None:
        if bits_a < FLOAT_BITS and bits_b < FLOAT_BITS:
            flops, bops = 0, 2 * macs * bits_a * bits_b
        else:
            flops, bops = 2 * macs, 0
        self.flops += flops
        self.bops += bops
        f, b = self.by_module.get(name, (0, 0))
        self.by_module[name] = (f + flops, b + bops)


def _is_float_attention(module: nn.Module) -> bool:
    # HF's BertSelfAttention / BertSdpaSelfAttention (and look-alikes): Q, K, V linears and head sizes
    return (not isinstance(module, BiBertSelfAttention) and hasattr(module, "attention_head_size")
            and hasattr(module, "num_attention_heads") and hasattr(module, "query"))


def count_ops(model: nn.Module, *args, **kwargs) -> OpsCount:
    """Run `model(*args, **kwargs)` once under no_grad and count its FLOPs and BOPs (see module docstring)."""
    count = OpsCount()
    handles = []

    def on_linear(name: str, module: nn.Linear):
        def hook(_mod, inputs, output):
            macs = output.numel() * module.in_features
            bits = module.act_bits if isinstance(module, BinaryLinear) else FLOAT_BITS
            count.add(name, macs, 1 if isinstance(module, BinaryLinear) else FLOAT_BITS, bits)
        return hook

    def on_conv(name: str, module: nn.Conv2d):
        def hook(_mod, inputs, output):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            binary = isinstance(module, BinaryConv2d)
            count.add(name, output.numel() * k, 1 if binary else FLOAT_BITS,
                      module.act_bits if binary else FLOAT_BITS)
        return hook

    def on_attention(name: str, module: nn.Module):
        def hook(_mod, inputs, output):
            hidden = inputs[0] if inputs else None
            if hidden is None:
                return
            b, s = hidden.shape[0], hidden.shape[1]
            macs = b * s * s * module.num_attention_heads * module.attention_head_size  # per product
            if isinstance(module, BiBertSelfAttention):
                a = module.act_bits
                count.add(f"{name}:QK", macs, a, a)
                count.add(f"{name}:PV", macs, 1 if module.attention == "bi" else FLOAT_BITS, a)
            else:
                count.add(f"{name}:QK", macs, FLOAT_BITS, FLOAT_BITS)
                count.add(f"{name}:PV", macs, FLOAT_BITS, FLOAT_BITS)
        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(on_linear(name, module)))
        elif isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(on_conv(name, module)))
        elif isinstance(module, BiBertSelfAttention) or _is_float_attention(module):
            handles.append(module.register_forward_hook(on_attention(name, module)))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return count
