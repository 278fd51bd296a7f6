"""The `qat` stage: quantization-aware training with Brevitas, driven by the distillation loss.

Conv/Linear layers become Brevitas quant layers (per-channel int8 weights, 8-bit activations at each
layer input, int32 bias) after BatchNorm is folded into the preceding conv, then the student trains
against the float teacher. Activations default to *unsigned* asymmetric 8-bit: ONNX Runtime's fast
CPU integer kernels are u8×s8, while s8×s8 falls back to a slow generic kernel (see ENVIRONMENT.md).
"""

from __future__ import annotations

import fnmatch
import warnings

from pydantic import Field
from torch import nn

from compressor.errors import RecipeError
from compressor.stages import register_stage
from compressor.state import LineageEntry, ModelState, RunContext
from compressor.train.stage import TrainingStageSpec, train_student


class QATSpec(TrainingStageSpec):
    kind: str = "qat"
    weight_bits: int = Field(8, ge=2, le=8)
    act_bits: int = Field(8, ge=4, le=8)
    per_channel: bool = True
    act_signed: bool = False  # unsigned asymmetric activations: the u8×s8 kernels ONNX Runtime runs fast
    keep_float: list[str] = Field(default_factory=list)  # module-name globs left in float
    fold_batchnorm: bool = True
    # x86 CPUs without VNNI compute u8×s8 with VPMADDUBSW, whose int16 pair sums saturate for full-range
    # int8 weights (255·127·2 > 32767): measured here, 20% output error vs exact parity with 7-bit weights.
    # ONNX Runtime's own quantizer calls this `reduce_range`. Turn it off for ARM/GPU/VNNI targets.
    reduce_range: bool = True


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold each BatchNorm into the conv/linear before it (exact in eval mode); returns an FX graph module.

    Models FX cannot trace (e.g. with data-dependent control flow) are returned unchanged: their
    BatchNorms stay float ops in the export, which the integer-kernel report will show.
    """
    from brevitas.fx import symbolic_trace
    from brevitas.graph.fixed_point import MergeBatchNorm

    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        return module
    was_training = module.training
    try:
        graph_module = symbolic_trace(module.eval())
    except Exception:  # noqa: BLE001 - tracing failures are many and all mean "cannot fold"
        warnings.warn("could not trace the model to fold BatchNorm; it stays in float", stacklevel=2)
        return module.train(was_training)
    return MergeBatchNorm().apply(graph_module).train(was_training)


def quantize_module(module: nn.Module, spec: QATSpec) -> nn.Module:
    """Swap Conv/Linear layers for Brevitas quant layers as `spec` says; returns the quantized model."""
    import brevitas.nn as qnn
    from brevitas.graph.quantize import layerwise_quantize
    from brevitas.quant import (
        Int8ActPerTensorFloat,
        Int8WeightPerChannelFloat,
        Int8WeightPerTensorFloat,
        Int32Bias,
        Uint8ActPerTensorFloat,
    )

    names = [name for name, _ in module.named_modules()]
    for pattern in spec.keep_float:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise RecipeError(f"qat.keep_float '{pattern}' matches no module; module names look like: {', '.join(names[1:6])}")
    if spec.fold_batchnorm:
        module = fold_batchnorm(module)
    names = [name for name, _ in module.named_modules()]
    blacklist = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in spec.keep_float)]
    layer_kwargs = {
        "input_quant": Int8ActPerTensorFloat if spec.act_signed else Uint8ActPerTensorFloat,
        "input_bit_width": spec.act_bits,
        "weight_quant": Int8WeightPerChannelFloat if spec.per_channel else Int8WeightPerTensorFloat,
        "weight_bit_width": spec.weight_bits - 1 if spec.reduce_range and spec.weight_bits == 8 else spec.weight_bits,
        "bias_quant": Int32Bias,
        "return_quant_tensor": False,
    }
    layer_map = {
        nn.Conv1d: (qnn.QuantConv1d, layer_kwargs),
        nn.Conv2d: (qnn.QuantConv2d, layer_kwargs),
        nn.Linear: (qnn.QuantLinear, layer_kwargs),
    }
    return layerwise_quantize(module, compute_layer_map=layer_map, name_blacklist=blacklist)


def is_quantized(module: nn.Module) -> bool:
    # Any Brevitas quant layer means the model needs Brevitas' QCDQ exporter (checked by module path so
    # that float models never import Brevitas).
    return any(type(m).__module__.startswith("brevitas.nn") for m in module.modules())


@register_stage("qat", QATSpec)
def run_qat(state: ModelState, spec: QATSpec, ctx: RunContext) -> ModelState:
    label = spec.name or "qat"
    state.module = quantize_module(state.module, spec)
    result = train_student(state, spec, ctx, label)
    metrics = {k: v for k, v in result.final.items() if k != "epoch"}
    state.metrics.update(metrics)
    details = spec.model_dump(include={"weight_bits", "act_bits", "per_channel", "act_signed", "keep_float", "reduce_range"})
    state.extras["quant"] = {"method": "qat", "library": "brevitas", **details}
    state.lineage.append(LineageEntry(stage=label, kind="qat", metrics=metrics, details=details))
    return state
