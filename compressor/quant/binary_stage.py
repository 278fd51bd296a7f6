"""The `binarize` stage: make the student 1-bit (BiBERT), then distil it from the float teacher.

    stages:
      - kind: binarize
        bits: "1-1-1"          # W-E-A (weights, embeddings, activations), the paper's notation
        attention: bi          # bi (Bi-Attention) | sign (the paper's baseline) | softmax (float weights)
        epochs: 3              # training as any stage: epochs, lr, losses (default: distillation.losses)

What is binarized depends on the student:
- a Hugging Face BERT-like encoder anywhere inside it (e.g. `compressor.models.hf:load`'s `.model`): every
  encoder linear and the self-attention, by `compressor.quant.bibert.binarize_bert`; the word-embedding
  table too when E = 1. `attention` picks the attention weight (Qin et al., "BiBERT", ICLR 2022):
  `bi` = bool(B_Q·B_Kᵀ/√d) ∈ {0, 1} (eq. 8-9); `sign` = sign(softmax(B_Q·B_Kᵀ/√d)) (the fully binarized
  baseline, eq. 4: softmax outputs are positive, so every real key gets weight 1 — the "information
  degradation" Bi-Attention fixes; padded keys have probability exactly 0, and sign(0) = 0 keeps them
  out, as `torch.sign` does in the authors' code); `softmax` = float attention weights over binarized
  Q, K, V (not a 1-bit attention; kept as a reference point).
- any other model (CNN, MLP): the Linear/Conv2d modules matched by `modules` (globs, default all) and the
  Embeddings matched by `embeddings` when E = 1, by `compressor.quant.binary.binarize_`.

Training uses the recipe's distillation objective, so the ablation is a recipe switch: DMD is the `dmd`
loss on tapped query/key/value linears; attention-score MSE is `tinybert_attention` on `:attention`
taps. The stage records `extras["binary"]`; the pipeline then exports through `export_binary_artifact`:
int8 Q/DQ ONNX with ±α weights (`compressor.export.binary`), exact sign parity of every binarized tensor,
bit-packed `weights.1bit`, both sizes and FLOPs/BOPs in the report.
"""

from __future__ import annotations

import fnmatch
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from compressor.errors import ParityError, RecipeError
from compressor.quant.binary import (
    FLOAT_BITS,
    BinarizeConfig,
    BinaryEmbedding,
    BoolBinarize,
    binarize_,
    binarize_weight,
    binarized_modules,
    parse_wea,
)
from compressor.stages import register_stage
from compressor.state import LineageEntry, ModelState, RunContext
from compressor.train.stage import TrainingStageSpec, train_student

EXTRAS_KEY = "binary"
PACKED_NAME = "weights.1bit"
ATTENTION_CHOICES = ("bi", "sign", "softmax")


class BinarizeSpec(TrainingStageSpec):
    """`binarize` stage fields; training fields (epochs, lr, losses) as for `distill`."""

    kind: str = "binarize"
    bits: str = "1-1-1"
    attention: Literal["bi", "sign", "softmax"] | None = None  # BERT-like students only; default bi
    modules: list[str] | None = None  # other students: Linear/Conv2d globs (default: every one)
    embeddings: list[str] = Field(default_factory=list)  # other students: Embedding globs, used when E = 1
    center: bool = True  # binarize W − mean(W) per row, as BiBERT's reference code
    freeze: list[str] = Field(default_factory=list)  # parameter-name globs kept fixed while training


# --- the paper's baseline attention ------------------------------------------------------------------


class SignSoftmax(BoolBinarize):
    """sign(softmax(x)) with `torch.sign`'s sign(0) = 0: 1 for every key with non-zero probability, 0 for
    masked keys. Straight-through: the gradient is the softmax's (the STE window |p| ≤ 1 always holds).

    A BoolBinarize, so `check_binary_parity` compares its output with the export's exactly.
    """

    def forward(self, x: Tensor) -> Tensor:
        probs = torch.softmax(x, dim=-1)
        hard = (probs > 0).to(probs.dtype)
        if torch.onnx.is_in_onnx_export():
            return hard
        return probs + (hard - probs).detach()


# --- binarizing ---------------------------------------------------------------------------------------


def find_bert(module: nn.Module) -> tuple[str, nn.Module] | None:
    """(name, module) of the first BERT-like encoder in `module` (.embeddings and .encoder.layer[*].attention)."""
    for name, candidate in module.named_modules():
        layers = getattr(getattr(candidate, "encoder", None), "layer", None)
        if (hasattr(candidate, "embeddings") and isinstance(layers, nn.ModuleList) and len(layers) > 0
                and all(hasattr(layer, "attention") for layer in layers)):
            return name, candidate
    return None


def binarize_student(module: nn.Module, spec: BinarizeSpec) -> dict[str, Any]:
    """Binarize `module` in place as `spec` says; returns what extras["binary"] records."""
    from compressor.quant.bibert import BiBertConfig, BiBertSelfAttention, binarize_bert

    _, embedding_bits, act_bits = parse_wea(spec.bits)
    if binarized_modules(module):
        raise RecipeError("binarize: the student is already binarized (two binarize stages?); keep one")
    found = find_bert(module)
    if found is not None:
        if spec.modules is not None or spec.embeddings:
            raise RecipeError(
                "binarize: 'modules' and 'embeddings' are for non-BERT students; a BERT-like student is binarized "
                "whole (every encoder linear, the attention, and the word embeddings when bits has E = 1)"
            )
        name, bert = found
        attention = spec.attention or "bi"
        binarize_bert(bert, BiBertConfig(bits=spec.bits, attention="softmax" if attention == "sign" else attention,
                                         center=spec.center))
        if attention == "sign":
            for attn in bert.modules():
                if isinstance(attn, BiBertSelfAttention):
                    attn.probs = SignSoftmax()
                    attn.dropout = nn.Dropout(0.0)  # would rescale the {0, 1} weights, as for Bi-Attention
                    attn.attention = "sign"
        kind, where = "bert", name or "(root)"
    else:
        if spec.attention is not None:
            raise RecipeError(
                f"binarize: attention: {spec.attention} needs a BERT-like student (with .embeddings and "
                f".encoder.layer); this {type(module).__name__} has none; remove 'attention'"
            )
        embeddings = tuple(spec.embeddings) if embedding_bits == 1 else ()
        binarize_(module, BinarizeConfig(modules=tuple(spec.modules or ["**"]), embeddings=embeddings,
                                         act_bits=act_bits, center=spec.center))
        attention, kind, where = None, "generic", "(root)"
    binary = binarized_modules(module)
    one_bit = sum(m.weight.numel() for m in binary.values())
    total = sum(p.numel() for p in module.parameters())
    return {
        "bits": spec.bits, "weight_bits": 1, "embedding_bits": embedding_bits, "act_bits": act_bits,
        "attention": attention, "center": spec.center, "model": kind, "where": where,
        "layers": len(binary), "parameters": {"1bit": one_bit, "float": total - one_bit},
    }  # fmt: skip


def freeze_parameters(module: nn.Module, patterns: list[str]) -> dict[str, bool]:
    """requires_grad False for parameters matching any glob; returns the previous flags to restore."""
    names = [n for n, _ in module.named_parameters()]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            sample = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise RecipeError(f"binarize.freeze: '{pattern}' matches no parameter; names look like: {sample}")
    previous = {}
    for name, param in module.named_parameters():
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            previous[name] = param.requires_grad
            param.requires_grad_(False)
    return previous


class frozen_tables:
    """Within the block, a 1-bit Embedding whose weight is frozen looks up a table binarized once.

    BinaryEmbedding re-binarizes its whole table on every call (BERT's 30522×384: 0.6 s per step here,
    more than the rest of a 3-layer student). A frozen table's signs and α cannot change, and the lookup
    of sign·α is bit-identical to the module's own (lookup of signs) · (lookup of α), so nothing but the
    time differs. The modules are restored on leaving.
    """

    def __init__(self, module: nn.Module):
        self.modules = [m for m in binarized_modules(module).values()
                        if isinstance(m, BinaryEmbedding) and not m.weight.requires_grad]

    def __enter__(self) -> frozen_tables:
        for m in self.modules:
            with torch.no_grad():
                signs, alpha = binarize_weight(m.weight, m.center)
                table = signs * alpha[:, None]
            m.forward = partial(F.embedding, weight=table, padding_idx=m.padding_idx)
        return self

    def __exit__(self, *exc) -> None:
        for m in self.modules:
            del m.forward


@register_stage("binarize", BinarizeSpec)
def run_binarize(state: ModelState, spec: BinarizeSpec, ctx: RunContext) -> ModelState:
    label = spec.name or "binarize"
    if state.extras.get("quant") or state.extras.get("post_export_quant"):
        raise RecipeError(f"{label}: the student is already quantized (qat/ptq); binarize a float student")
    details = binarize_student(state.module, spec)
    ctx.log(
        f"[{label}] {details['model']} student binarized ({details['bits']} W-E-A"
        + (f", attention {details['attention']}" if details["attention"] else "")
        + f"): {details['layers']} 1-bit modules, {details['parameters']['1bit']:,} 1-bit weights"
    )
    frozen = freeze_parameters(state.module, spec.freeze)
    try:
        with frozen_tables(state.module):
            result = train_student(state, spec, ctx, label)
    finally:
        params = dict(state.module.named_parameters())
        for name, flag in frozen.items():
            params[name].requires_grad_(flag)
    metrics = {k: v for k, v in result.final.items() if k != "epoch"}
    state.metrics.update(metrics)
    losses = spec.losses or ctx.recipe.distillation.losses
    details["losses"] = [loss.name for loss in losses]
    details["frozen"] = list(spec.freeze)
    state.extras[EXTRAS_KEY] = details
    state.lineage.append(LineageEntry(stage=label, kind="binarize", metrics=metrics,
                                      details={**details, "epochs": len(result.history)}))
    return state


# --- export (called by the pipeline when extras["binary"] is set) -------------------------------------


def count_binary_ops(module: nn.Module, example: Any) -> dict[str, float]:
    """FLOPs and BOPs of one forward pass on `example` (BiBERT's convention, compressor.quant.binary_ops).

    count_ops counts an attention product as binary only for Bi-Attention; the `sign` baseline's B_A·B_V
    is {0, 1} ⊗ {±1} as well, so it is moved from FLOPs to BOPs here.
    """
    from compressor.quant.bibert import BiBertSelfAttention
    from compressor.quant.binary_ops import BITS_PER_WORD, count_ops

    was_training = module.training
    module.eval()
    try:
        count = count_ops(_Caller(module), example)
    finally:
        module.train(was_training)
    flops, bops = count.flops, count.bops
    for name, attn in module.named_modules():
        if isinstance(attn, BiBertSelfAttention) and attn.attention == "sign" and attn.act_bits != FLOAT_BITS:
            moved, _ = count.by_module.get(f"module.{name}:PV", (0, 0))  # 2·MACs, counted as float
            flops, bops = flops - moved, bops + moved * attn.act_bits  # 2·MACs·1·b
    return {"flops": flops, "bops": bops, "flops_equivalent": flops + bops / BITS_PER_WORD}


class _Caller(nn.Module):
    """Calls the wrapped model with a batch (tensor or keyword dict), for count_ops' single call."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, inputs: Any) -> Any:
        from compressor.models.call import call

        return call(self.module, inputs)


def _first(inputs: Any, n: int) -> Any:
    if isinstance(inputs, dict):
        return {k: v[:n] for k, v in inputs.items()}
    return inputs[:n]


def export_binary_artifact(state: ModelState, ctx: RunContext, staging: Path, exported: nn.Module,
                           example: tuple[Tensor, ...], io: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Write `model.onnx` (int8 Q/DQ, ±α weights) and `weights.1bit` to `staging`; check exact sign parity.

    `exported`, `example` and `io` come from `compressor.export.keywords.export_plan`. Returns the ONNX path
    and the report's "binary" section. Raises ParityError (no artifact) when any binarized tensor's sign
    differs between PyTorch and ONNX Runtime on a held-out batch.
    """
    from compressor.export.binary import check_binary_parity, export_binary_onnx, integer_ops, save_1bit
    from compressor.export.onnx import input_names_for

    recipe = ctx.recipe
    names = input_names_for(example, io.get("input_names"))
    axes = io.get("dynamic_axes")
    if axes is None and recipe.export.dynamic_batch:
        axes = {**{n: {0: "batch"} for n in names}, "output": {0: "batch"}}
    model_path = export_binary_onnx(exported, staging / "model.onnx", dict(zip(names, example)),
                                    output_names=["output"], dynamic_axes=axes, opset=recipe.export.opset)
    packed_path = save_1bit(state.module, staging / PACKED_NAME)

    # Signs are compared on real held-out inputs (with their padding), up to 32 samples.
    batch = _first(next(iter(ctx.data.val))[0], 32)
    tensors = tuple(batch.values()) if isinstance(batch, dict) else (batch,)
    parity = check_binary_parity(exported, model_path, dict(zip(names, tensors)), atol=recipe.export.parity.max_abs)
    mismatched = {k: v for k, v in parity.sign_mismatches.items() if v}
    if mismatched or parity.unlocated:
        raise ParityError(
            f"binarized export: signs differ from PyTorch in {len(mismatched)} binarized tensors "
            f"({', '.join(f'{k}: {v}' for k, v in list(mismatched.items())[:3]) or 'none'}), unlocated "
            f"{parity.unlocated[:3] or 'none'}; no artifact written"
        )
    elements = sum(parity.elements.values())
    ctx.log(f"binary parity: signs equal in all {len(parity.elements)} binarized tensors ({elements:,} values)")
    ops = count_binary_ops(state.module, _first(next(iter(ctx.data.val))[0], 1))
    return model_path, {
        **state.extras[EXTRAS_KEY],
        "size": {"onnx_bytes": model_path.stat().st_size, "packed_bytes": packed_path.stat().st_size,
                 "packed_file": PACKED_NAME},
        "sign_parity": {"passed": True, "tensors": len(parity.elements), "values": elements,
                        "mismatches": 0, "max_abs_output": max(parity.max_abs_diff.values())},
        "ops": {**ops, "batch": 1, "input_shape": {k: list(v.shape) for k, v in zip(names, _shapes(example))}},
        "integer_ops": integer_ops(model_path),
    }  # fmt: skip


def _shapes(example: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(t[:1] for t in example)


__all__ = ["BinarizeSpec", "SignSoftmax", "find_bert", "binarize_student", "freeze_parameters", "run_binarize",
           "count_binary_ops", "export_binary_artifact", "EXTRAS_KEY", "PACKED_NAME"]
