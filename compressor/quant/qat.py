"""The `qat` stage: quantization-aware training with Brevitas, driven by the distillation loss.

Conv/Linear layers become Brevitas quant layers (per-channel int8 weights, 8-bit activations at each
layer input, int32 bias) after BatchNorm is folded into the preceding conv, then the student trains
against the float teacher. In Hugging Face BERT-like encoders the two attention matmuls (Q·Kᵀ, P·V)
are quantized as well (`compressor.quant.attention`).

Quantizers (Brevitas 0.13), chosen for ONNX Runtime on x86 CPUs, whose fast integer kernels are u8×s8
(s8×s8 falls back to a slow generic kernel, see ENVIRONMENT.md):
- weights: signed, narrow range, symmetric, per output channel or per tensor. `weight_scale: max` is
  `Int8Weight{PerChannel,PerTensor}Float` (scale = max|W|, recomputed every step, gradients flow through
  the max); `learned` is the same with `scaling_impl_type=PARAMETER_FROM_STATS` (a trained nn.Parameter
  initialised from max|W|, as in LSQ).
- activations: `ShiftedUint8ActPerTensorFloat` by default (asymmetric uint8: learned scale and zero
  point, so LayerNorm outputs and other signed inputs survive); `act_symmetric: true` gives
  `Uint8ActPerTensorFloat` (zero point 0: negatives clip to 0, only for inputs ≥ 0 such as ReLU outputs);
  `act_signed: true` gives `Int8ActPerTensorFloat`. All collect statistics for `act_stats_steps`
  training steps and then learn the scale (`act_scale: learned`, Brevitas' PARAMETER_FROM_STATS), or
  keep a running statistic (`act_scale: running`, STATS).
- bias: `Int32Bias` (scale = input scale × weight scale, what QLinearConv/QGemm expect).
"""

from __future__ import annotations

import fnmatch
import warnings
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from compressor.errors import RecipeError
from compressor.models.call import primary_output
from compressor.stages import register_stage
from compressor.state import LineageEntry, ModelState, RunContext
from compressor.train.stage import TrainingStageSpec, stage_train_spec, train_student

# Modules with MACs that this stage cannot turn into layers ONNX Runtime runs in integer kernels.
UNQUANTIZABLE = (
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Conv3d, nn.RNNBase, nn.MultiheadAttention, nn.Bilinear,
)  # fmt: skip
# Keywords in keep_float that stand for the first / last quantizable layer in forward order.
POSITIONAL_KEYWORDS = ("first", "last")


class QATSpec(TrainingStageSpec):
    kind: str = "qat"
    weight_bits: int = Field(8, ge=2, le=8)
    act_bits: int = Field(8, ge=4, le=8)
    per_channel: bool = True
    act_signed: bool = False  # unsigned activations: the u8×s8 kernels ONNX Runtime runs fast
    act_symmetric: bool = False  # unsigned + symmetric = zero point 0 (only for inputs >= 0)
    weight_scale: Literal["max", "learned"] = "max"
    act_scale: Literal["learned", "running"] = "learned"
    act_stats_steps: int = Field(100, ge=1)  # steps of statistics before the activation scale is learned
    # Module-name globs left in float; `first` and `last` name the first/last Conv/Linear in forward order.
    keep_float: list[str] = Field(default_factory=list)
    quantize_attention: bool = True  # Q·Kᵀ and P·V in Hugging Face BERT-like self-attention
    # Quantize every layer's output too. ONNX Runtime fuses a conv into QLinearConv only when its output is
    # quantized; in residual nets the convs feeding an Add have no quantizer after them otherwise.
    output_quant: bool = False
    delay_steps: int = Field(0, ge=0)  # train in float for this many optimizer steps, then quantize
    fold_batchnorm: bool = True
    # x86 CPUs without VNNI compute u8×s8 with VPMADDUBSW, whose int16 pair sums saturate for full-range
    # int8 weights (255·127·2 > 32767): measured here, 20% output error vs exact parity with 7-bit weights.
    # ONNX Runtime's own quantizer calls this `reduce_range`. Turn it off for ARM/GPU/VNNI targets.
    reduce_range: bool = True


def target_notes(spec: QATSpec) -> list[str]:
    """What this configuration means on ONNX Runtime's CPU provider, in words for the report."""
    notes = []
    if spec.weight_bits < 8:
        notes.append(
            f"{spec.weight_bits}-bit weights: ONNX has no {spec.weight_bits}-bit tensor type that ONNX Runtime's CPU "
            f"kernels run; they are stored as int8 (1 byte each, values in ±{2 ** (spec.weight_bits - 1) - 1}) "
            "and run by the int8 kernels: accuracy is that of the low-bit weights, size and speed are int8's"
        )
    if spec.act_bits < 8:
        notes.append(
            f"{spec.act_bits}-bit activations are stored and computed as 8-bit integers (values clipped to "
            f"{2 ** spec.act_bits} levels): no speed-up over int8 on ONNX Runtime CPU"
        )
    if spec.act_signed:
        notes.append(
            "signed int8 activations run on ONNX Runtime's slow s8×s8 x86 kernel (measured 6× slower than fp32); "
            "use act_signed: false for x86 CPU targets"
        )
    if spec.keep_float:
        notes.append(
            "keep_float: a quantized layer whose output feeds a float layer unquantized still runs in float on ONNX "
            "Runtime (QLinearConv/QGemm need a quantized output); kernels.layers in the report shows which"
        )
    return notes


def fold_batchnorm(module: nn.Module, example_inputs: tuple | None = None) -> nn.Module:
    """Fold each BatchNorm into the conv before it (exact in eval mode).

    FX-traceable models go through Brevitas' MergeBatchNorm (an FX graph module comes back). Models FX
    cannot trace (e.g. Hugging Face ResNets) are folded eagerly when `example_inputs` are given: a
    BatchNorm whose input is exactly a conv's output tensor is merged into that conv, and the result is
    kept only if the model's output is unchanged. Otherwise BatchNorms stay float ops in the export,
    which the integer-kernel report will show.
    """
    from brevitas.fx import symbolic_trace
    from brevitas.graph.fixed_point import MergeBatchNorm

    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        return module
    was_training = module.training
    try:
        graph_module = symbolic_trace(module.eval())
    except Exception:  # noqa: BLE001 - tracing failures are many and all mean "cannot trace"
        folded = fold_batchnorm_eager(module, example_inputs) if example_inputs is not None else None
        if folded is None:
            warnings.warn("could not fold BatchNorm (model not traceable); it stays in float", stacklevel=2)
            return module.train(was_training)
        return folded.train(was_training)
    return MergeBatchNorm().apply(graph_module).train(was_training)


def fold_batchnorm_eager(module: nn.Module, example_inputs: tuple) -> nn.Module | None:
    """Merge BatchNorms into the convs that feed them, found by tensor identity in one forward pass.

    Returns the folded copy, or None when nothing was folded or the output changed (a conv output also
    used elsewhere, which identity alone cannot rule out).
    """
    import copy

    folded = copy.deepcopy(module).eval()
    produced: dict[int, nn.Module] = {}
    pairs: list[tuple[str, nn.Module, nn.Module]] = []
    names = {m: n for n, m in folded.named_modules()}

    def conv_hook(conv, _args, output):
        produced[id(output)] = conv

    def bn_hook(bn, args):
        conv = produced.get(id(args[0]))
        if conv is not None and conv.out_channels == bn.num_features:
            pairs.append((names[bn], conv, bn))

    hooks = [m.register_forward_hook(conv_hook) for m in folded.modules() if isinstance(m, nn.Conv1d | nn.Conv2d)]
    hooks += [m.register_forward_pre_hook(bn_hook) for m in folded.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    with torch.no_grad():
        reference = folded(*example_inputs)
    for hook in hooks:
        hook.remove()
    if not pairs:
        return None
    for name, conv, bn in dict.fromkeys(pairs):
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        with torch.no_grad():
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight.mul_(scale.reshape(-1, *([1] * (conv.weight.dim() - 1))))
            conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
        folded.set_submodule(name, nn.Identity())
    with torch.no_grad():
        after = folded(*example_inputs)
    ref, out = primary_output(reference), primary_output(after)
    if not torch.allclose(ref, out, atol=1e-4 * max(1.0, float(ref.abs().max())), rtol=1e-4):
        return None
    return folded


def compute_layers_in_order(module: nn.Module, example_inputs: tuple | None) -> tuple[list[str], set[str]]:
    """Names of Conv/Linear layers in forward order, and those never called in that forward.

    Without example inputs the registration order stands in for the forward order and all count as used.
    """
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear)]
    if example_inputs is None:
        return names, set()
    by_module = {m: n for n, m in module.named_modules() if n in set(names)}
    called: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda m, _a: called.append(by_module[m])) for m in by_module]
    was_training = module.training
    try:
        with torch.no_grad():
            module.eval()(*example_inputs)
    finally:
        for hook in hooks:
            hook.remove()
        module.train(was_training)
    order = list(dict.fromkeys(called))
    return order, set(names) - set(order)


def resolve_keep_float(names: list[str], patterns: list[str], order: list[str]) -> list[str]:
    """Module names matched by `patterns` (globs; `first`/`last` = the first/last layer in `order`)."""
    kept = []
    for pattern in patterns:
        if pattern in POSITIONAL_KEYWORDS:
            if not order:
                raise RecipeError(f"qat.keep_float '{pattern}': the model has no Conv/Linear layer")
            kept.append(order[0] if pattern == "first" else order[-1])
            continue
        matched = [n for n in names if n and fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise RecipeError(
                f"qat.keep_float '{pattern}' matches no module; module names look like: {', '.join(names[1:6])} "
                "(globs use fnmatch, e.g. 'encoder.layer.*.output.dense'; 'first'/'last' name the first/last layer)"
            )
        kept += matched
    return list(dict.fromkeys(kept))


def _quantizers(spec: QATSpec) -> dict:
    from brevitas.inject.enum import ScalingImplType
    from brevitas.quant import (
        Int8ActPerTensorFloat,
        Int8WeightPerChannelFloat,
        Int8WeightPerTensorFloat,
        Int32Bias,
        Uint8ActPerTensorFloat,
    )
    from brevitas.quant.shifted_scaled_int import ShiftedUint8ActPerTensorFloat

    weight = Int8WeightPerChannelFloat if spec.per_channel else Int8WeightPerTensorFloat
    if spec.weight_scale == "learned":
        weight = weight.let(scaling_impl_type=ScalingImplType.PARAMETER_FROM_STATS)
    if spec.act_signed:
        act = Int8ActPerTensorFloat
    else:
        act = Uint8ActPerTensorFloat if spec.act_symmetric else ShiftedUint8ActPerTensorFloat
    act = act.let(collect_stats_steps=spec.act_stats_steps)
    if spec.act_scale == "running":
        act = act.let(scaling_impl_type=ScalingImplType.STATS)
    steps = spec.act_stats_steps
    return {
        "weight": weight,
        "act": act,
        "bias": Int32Bias,
        "signed_act": Int8ActPerTensorFloat.let(collect_stats_steps=steps),  # keys and values in attention
        "probs": Uint8ActPerTensorFloat.let(collect_stats_steps=steps),  # softmax output, in [0, 1]
    }


def quantize_module(module: nn.Module, spec: QATSpec, example_inputs: tuple | None = None) -> nn.Module:
    """Swap Conv/Linear layers (and BERT attention matmuls) for Brevitas quantized ones as `spec` says.

    `example_inputs` (positional) let `first`/`last` follow the forward order and leave layers the
    forward never calls in float (an unused Brevitas layer breaks the QCDQ export).
    Raises RecipeError for a glob matching nothing or a layer type that cannot be quantized.
    """
    import brevitas.nn as qnn
    from brevitas.graph.quantize import layerwise_quantize

    from compressor.quant import attention

    names = [name for name, _ in module.named_modules()]
    order, unused = compute_layers_in_order(module, example_inputs)
    kept = resolve_keep_float(names, spec.keep_float, order)
    _check_quantizable(module, kept)
    if spec.fold_batchnorm:
        module = fold_batchnorm(module, example_inputs)
    names = [name for name, _ in module.named_modules()]
    blacklist = sorted({n for n in names if any(n == k or n.startswith(k + ".") for k in kept)} | unused)
    quant = _quantizers(spec)
    weight_bits = spec.weight_bits - 1 if spec.reduce_range and spec.weight_bits == 8 else spec.weight_bits
    layer_kwargs = {
        "input_quant": quant["act"],
        "input_bit_width": spec.act_bits,
        "weight_quant": quant["weight"],
        "weight_bit_width": weight_bits,
        "bias_quant": quant["bias"],
        "return_quant_tensor": False,
    }
    if spec.output_quant:
        layer_kwargs.update(output_quant=quant["act"], output_bit_width=spec.act_bits)
    layer_map = {
        nn.Conv1d: (qnn.QuantConv1d, layer_kwargs),
        nn.Conv2d: (qnn.QuantConv2d, layer_kwargs),
        nn.Linear: (qnn.QuantLinear, layer_kwargs),
    }
    module = layerwise_quantize(module, compute_layer_map=layer_map, name_blacklist=blacklist)
    if spec.quantize_attention:
        right_bits = min(spec.act_bits, 7) if spec.reduce_range else spec.act_bits
        for name, sub in module.named_modules():
            if attention.is_hf_self_attention(sub) and not any(name == k or name.startswith(k + ".") for k in kept):
                if attention.unsupported_reason(sub) is None:
                    attention.attach_quant_attention(
                        sub, quant["act"], quant["signed_act"], quant["probs"], spec.act_bits, right_bits
                    )
    return module


def _check_quantizable(module: nn.Module, kept: list[str]) -> None:
    from compressor.quant import attention

    for name, sub in module.named_modules():
        if any(name == k or name.startswith(k + ".") for k in kept):
            continue
        if isinstance(sub, UNQUANTIZABLE):
            raise RecipeError(
                f"qat cannot quantize '{name}' ({type(sub).__module__}.{type(sub).__name__}): Brevitas' QCDQ export "
                f"has no ONNX Runtime integer kernel for it; keep it in float with keep_float: ['{name}']"
            )
        if attention.is_hf_self_attention(sub) and (reason := attention.unsupported_reason(sub)):
            raise RecipeError(
                f"qat cannot quantize the attention matmuls of '{name}' ({type(sub).__name__}: {reason}); "
                f"set quantize_attention: false or keep_float: ['{name}']"
            )


def is_quantized(module: nn.Module) -> bool:
    # Any Brevitas quant layer means the model needs Brevitas' QCDQ exporter (checked by module path so
    # that float models never import Brevitas).
    return any(type(m).__module__.startswith("brevitas.nn") for m in module.modules())


def set_quantization(module: nn.Module, enabled: bool) -> None:
    """Turn every Brevitas quantizer of `module` on or off (off: the layers compute in float)."""
    from brevitas.graph.calibrate import QuantizationStatusManager as status

    training = module.training
    if enabled:
        status.enable_act_quantization(module, training)
        status.enable_param_quantization(module, training)
    else:
        # Bias quantization needs the input's scale, so activations and bias go off together.
        status.disable_act_quantization(module, training)
        status.disable_param_quantization(module, training)


def bit_width_census(module: nn.Module) -> dict[str, int]:
    """Parameters per storage precision, e.g. {"int4 weights (stored int8)": n, "int32 bias": n, "float32": n}."""
    counted: set[int] = set()
    census: dict[str, int] = {}

    def add(key: str, tensor: torch.Tensor) -> None:
        if id(tensor) not in counted:
            counted.add(id(tensor))
            census[key] = census.get(key, 0) + tensor.numel()

    for sub in module.modules():
        weight_quant = getattr(sub, "weight_quant", None)
        if weight_quant is not None and getattr(weight_quant, "is_quant_enabled", False) and isinstance(sub.weight, torch.Tensor):
            bits = int(weight_quant.bit_width().item())
            add(f"int{bits} weights" + (" (stored int8)" if bits < 8 else ""), sub.weight)
            if getattr(sub, "bias", None) is not None and getattr(sub.bias_quant, "is_quant_enabled", False):
                add("int32 bias", sub.bias)
    for name, param in module.named_parameters():
        if id(param) not in counted and not _is_quantizer_parameter(name):
            add(str(param.dtype).removeprefix("torch."), param)
    return census


def _is_quantizer_parameter(name: str) -> bool:
    # Learned scales and zero points live inside the quantizers; they are folded into the exported graph.
    return any(part in name for part in ("_quant.", "quant_proxy", "tensor_quant"))


@register_stage("qat", QATSpec)
def run_qat(state: ModelState, spec: QATSpec, ctx: RunContext) -> ModelState:
    label = spec.name or "qat"
    if state.extras.get("post_export_quant"):
        raise RecipeError("qat after a ptq stage: the ptq stage quantizes the exported file; keep one of the two")
    notes = target_notes(spec)
    for note in notes:
        ctx.log(f"[{label}] note: {note}")
    state.module = quantize_module(state.module, spec, state.example_inputs)
    on_step = None
    if spec.delay_steps:
        train = stage_train_spec(ctx, spec)
        per_epoch = len(ctx.data.train) if not train.max_steps_per_epoch else min(len(ctx.data.train), train.max_steps_per_epoch)
        total = per_epoch * train.epochs
        if spec.delay_steps >= total:
            raise RecipeError(
                f"qat.delay_steps={spec.delay_steps} is not below the stage's {total} training steps: the model would "
                "never train quantized; lower delay_steps or raise epochs"
            )
        set_quantization(state.module, False)
        ctx.log(f"[{label}] training in float for {spec.delay_steps} of {total} steps, then quantized")
        enabled = [False]

        def on_step(step: int) -> None:
            # Idempotent, so a resumed run (whose first step may already be past the delay) enables as well.
            if step >= spec.delay_steps and not enabled[0]:
                set_quantization(state.module, True)
                enabled[0] = True

    result = train_student(state, spec, ctx, label, on_step=on_step)
    if spec.delay_steps:
        set_quantization(state.module, True)  # a stage restored from its final checkpoint ran no step
    metrics = {k: v for k, v in result.final.items() if k != "epoch"}
    state.metrics.update(metrics)
    details = spec.model_dump(
        include={
            "weight_bits", "act_bits", "per_channel", "act_signed", "act_symmetric", "weight_scale", "act_scale",
            "keep_float", "quantize_attention", "output_quant", "delay_steps", "reduce_range",
        }
    )  # fmt: skip
    state.extras["quant"] = {
        "method": "qat", "library": "brevitas", **details, "notes": notes, "parameters": bit_width_census(state.module),
    }  # fmt: skip
    state.lineage.append(LineageEntry(stage=label, kind="qat", metrics=metrics, details=details))
    return state
