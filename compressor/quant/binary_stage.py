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
  `bi` = bool(B_Q·B_Kᵀ/√d) ∈ {0, 1}; `sign` = sign(softmax(B_Q·B_Kᵀ/√d)) (the fully binarized
  baseline: softmax outputs are positive, so every real key gets weight 1 — the "information
  degradation" Bi-Attention fixes; padded keys have probability exactly 0, and sign(0) = 0 keeps them
  out, as `torch.sign` does in the authors' code); `softmax` = float attention weights over binarized
  Q, K, V (not a 1-bit attention; a reference point for training: its export is usually refused, because
  the float weights feed the next sign and ONNX Runtime's Softmax rounds differently from PyTorch's).
- any other model (CNN, MLP): the Linear/Conv2d modules matched by `modules` (globs, default all) and the
  Embeddings matched by `embeddings` when E = 1, by `compressor.quant.binary.binarize_`.

Training uses the recipe's distillation objective, so the ablation is a recipe switch: DMD is the `dmd`
loss on tapped query/key/value linears; attention-score MSE is `tinybert_attention` on `:attention`
taps. `freeze` keeps parameters fixed (globs over parameter names); a frozen 1-bit table is binarized once
instead of at every step (`frozen_tables`). The stage records `extras["binary"]`; the pipeline then exports
through `export_binary_artifact`: int8 Q/DQ ONNX with ±α weights (`compressor.export.binary`), the sign of
every binarized tensor compared per held-out sample (`SignParity`: exact, float ties reported), output
parity, bit-packed `weights.1bit`, both sizes and FLOPs/BOPs in the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from compressor.errors import ParityError, RecipeError
from compressor.quant.binary import (
    FLOAT_BITS,
    ActQuant,
    BinarizeConfig,
    BinaryEmbedding,
    BoolBinarize,
    binarize_,
    binarize_weight,
    binarized_modules,
    match_names,
    parse_wea,
)
from compressor.stages import register_stage
from compressor.state import LineageEntry, ModelState, RunContext
from compressor.train.stage import TrainingStageSpec, train_student

EXTRAS_KEY = "binary"
PACKED_NAME = "weights.1bit"


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
    """requires_grad False for parameters matching any glob ('*' within a dotted segment, '**' across);
    returns the previous flags to restore. A glob matching no parameter is a RecipeError."""
    names = [n for n, _ in module.named_parameters()]
    try:
        chosen = set(match_names(names, patterns, "parameter")) if patterns else set()
    except RecipeError as exc:
        raise RecipeError(f"binarize.freeze: {exc}") from None
    previous = {}
    for name, param in module.named_parameters():
        if name in chosen:
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
    if ctx.data.train is not None:
        refuse_constant_activations(state.module, next(iter(ctx.data.train))[0], label)
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


def refuse_constant_activations(module: nn.Module, inputs: Any, label: str) -> None:
    """RecipeError when a 1-bit activation is +1 for every value of a training batch: its input is never
    negative (it follows a ReLU, or it is an image in [0, 1]), so sign() keeps nothing and the layer's
    output no longer depends on the data. That network cannot learn, whatever the training; say so now
    instead of after the epochs."""
    from compressor.models.call import call

    constant: list[str] = []
    names = {m: n for n, m in module.named_modules()}

    def check(mod: nn.Module, args: tuple) -> None:
        if isinstance(args[0], Tensor) and bool((args[0] >= 0).all()):
            constant.append(names[mod])

    sites = [m for m in module.modules() if isinstance(m, ActQuant) and m.bits == 1]
    handles = [m.register_forward_pre_hook(check) for m in sites]
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        with torch.no_grad():
            call(module, inputs)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
    if constant:
        layers = ", ".join(n.removesuffix(".act") for n in constant)
        raise RecipeError(
            f"{label}: the 1-bit activations of {layers} are +1 for a whole training batch (the input is never "
            "negative: a ReLU or [0, 1] pixels come before it), so those layers would ignore the data; give them "
            "float activations with bits: '1-32-32' (1-bit weights only), leave them out of 'modules', or remove "
            "the ReLU before them (1-bit networks use BatchNorm → sign)"
        )


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


def _take(inputs: Any, index: list[int]) -> Any:
    if isinstance(inputs, dict):
        return {k: v[index] for k, v in inputs.items()}
    return inputs[index]


# --- sign parity, with float ties told apart from errors -----------------------------------------------

TIE = 1e-5  # a value this close to 0 has no sign two runtimes agree on (see SignParity)


@dataclass
class SignParity:
    """Signs of every binarized tensor, PyTorch vs ONNX Runtime, per held-out sample.

    Exact, except for float ties: a binarized value computed by a float op (LayerNorm, GELU) that lands
    within `tie` of 0 (measured: 2e-9) can round to either side in either runtime's kernel, and a 1-bit
    network amplifies one flipped sign into many downstream (measured on MiniLM-L3: one tie → ~2,700 signs,
    output cosine 0.97 for that sentence). So each sample is compared tensor by tensor in execution order:
    the first tensor where its signs differ must differ only at ties; the sample is then "tied" and not
    compared further. Any other difference is an error.
    """

    samples: int
    tensors: int
    values: int  # binarized values compared
    tie: float
    ties: dict[int, dict[str, Any]] = field(default_factory=dict)  # sample → first tensor, count, max |x|
    errors: list[dict[str, Any]] = field(default_factory=list)  # sample, tensor, count, max |x|
    unlocated: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.errors and not self.unlocated and len(self.ties) < self.samples

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "samples": self.samples, "tensors": self.tensors, "values": self.values,
                "mismatches": sum(e["count"] for e in self.errors), "tie_tolerance": self.tie,
                "tied_samples": len(self.ties), "ties": list(self.ties.values())[:5], "errors": self.errors[:5],
                "unlocated": self.unlocated}


def first_divergence(order: list[str], inputs: dict[str, np.ndarray], torch_out: dict[str, np.ndarray],
                     onnx_out: dict[str, np.ndarray], tie: float = TIE) -> tuple[dict, list, int]:
    """Walk the binarized tensors of one batch in execution order, sample by sample (axis 0).

    Returns (ties: sample → details, errors: list of details, values compared). See `SignParity`.
    """
    ties: dict[int, dict[str, Any]] = {}
    errors: list[dict[str, Any]] = []
    compared = 0
    batch = next(iter(torch_out.values())).shape[0] if torch_out else 0
    for sample in range(batch):
        for name in order:
            ref, got = torch_out[name][sample], onnx_out[name][sample]
            compared += ref.size
            differ = np.sign(ref) != np.sign(got)
            if not differ.any():
                continue
            worst = float(np.abs(inputs[name][sample][differ]).max())
            entry = {"sample": sample, "tensor": name, "count": int(differ.sum()), "max_abs_input": worst}
            if worst <= tie:
                ties[sample] = entry
            else:
                errors.append(entry)
            break
    return ties, errors, compared


def check_sign_parity(exported: nn.Module, onnx_path: Path, batches: list[tuple[Any, Any]], names: list[str],
                      tie: float = TIE) -> SignParity:
    """Run `exported` (called positionally, as exported) and the ONNX file on `batches`; compare the sign of
    every binarized tensor (outputs of ActQuant / BoolBinarize modules). The file's binarized tensors are
    found as `compressor.export.binary.check_binary_parity` finds them (module scopes in the graph)."""
    import onnx
    import onnxruntime as ort

    from compressor.export.binary import _quantized_input, _scope, _scope_output

    module_names = {m: n for n, m in exported.named_modules()}
    sites = {m for m in exported.modules() if isinstance(m, ActQuant | BoolBinarize)}
    called: set[str] = set()
    order: list[str] = []
    seen: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def on_output(module: nn.Module, args: tuple, out: Tensor) -> None:
        name = module_names[module]
        if name not in seen:
            order.append(name)
        seen[name] = (args[0].detach().float().cpu().numpy(), out.detach().float().cpu().numpy())

    handles = [m.register_forward_pre_hook(lambda mod, _args: called.add(module_names[mod])) for m in exported.modules()]
    handles += [m.register_forward_hook(on_output) for m in sites]
    modes = {m: m.training for m in exported.modules()}
    session, located, unlocated = None, {}, []
    result = SignParity(samples=0, tensors=0, values=0, tie=tie)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    try:
        exported.eval()
        for inputs, _target in batches:
            tensors = tuple(inputs.values()) if isinstance(inputs, dict) else (inputs,)
            order.clear()
            seen.clear()
            with torch.no_grad():
                exported(*tensors)
            if session is None:  # the graph's names for the binarized tensors, once
                proto = onnx.load(str(onnx_path))
                for name in order:
                    value = _scope_output(proto.graph, _scope(name, called))
                    parent, _, leaf = name.rpartition(".")
                    if value is None and leaf == "act" and parent:
                        value = _quantized_input(proto.graph, _scope(parent, called))
                    if value is None:
                        unlocated.append(name)
                    else:
                        located[name] = value
                outputs = {o.name for o in proto.graph.output}
                for value in dict.fromkeys(located.values()):
                    if value not in outputs:
                        proto.graph.output.append(onnx.helper.make_tensor_value_info(value, onnx.TensorProto.FLOAT, None))
                session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
            feed = {n: t.cpu().numpy() for n, t in zip(names, tensors)}
            got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
            walk = [n for n in order if n in located]
            ties, errors, compared = first_divergence(
                walk, {n: seen[n][0] for n in walk}, {n: seen[n][1] for n in walk}, {n: got[located[n]] for n in walk}, tie
            )  # fmt: skip
            offset = result.samples
            result.ties.update({offset + k: {**v, "sample": offset + k} for k, v in ties.items()})
            result.errors += [{**e, "sample": offset + e["sample"]} for e in errors]
            result.values += compared
            result.samples += tensors[0].shape[0]
            result.tensors = len(walk)
    finally:
        for module, training in modes.items():
            module.training = training
        for handle in handles:
            handle.remove()
    result.unlocated = sorted(set(unlocated))
    return result


def _held_out_batches(loader, limit: int) -> list[tuple[Any, Any]]:
    batches, seen = [], 0
    for inputs, target in loader:
        n = len(next(iter(inputs.values()))) if isinstance(inputs, dict) else len(inputs)
        take = min(n, limit - seen)
        if take <= 0:
            break
        batches.append((_first(inputs, take), target[:take] if isinstance(target, Tensor) else target))
        seen += take
    return batches


def _without_samples(batches: list[tuple[Any, Any]], drop: set[int]) -> list[tuple[Any, Any]]:
    out, offset = [], 0
    for inputs, target in batches:
        n = len(next(iter(inputs.values()))) if isinstance(inputs, dict) else len(inputs)
        keep = [i for i in range(n) if offset + i not in drop]
        if keep:
            out.append((_take(inputs, keep), target[keep] if isinstance(target, Tensor) else target))
        offset += n
    return out


def export_binary_artifact(state: ModelState, ctx: RunContext, staging: Path, exported: nn.Module,
                           example: tuple[Tensor, ...], io: dict[str, Any]) -> tuple[Path, dict[str, Any], Any]:
    """Write `model.onnx` (int8 Q/DQ, ±α weights) and `weights.1bit` to `staging`, and check parity.

    `exported`, `example` and `io` come from `compressor.export.keywords.export_plan`. Parity on up to
    `export.parity.samples` held-out samples: the sign of every binarized tensor exactly (`SignParity`:
    float ties are reported, not hidden), then the outputs of the samples without a tie against
    `export.parity` (max |Δ|, cosine, top-1). Returns (ONNX path, the report's "binary" section, the output
    ParityResult). Raises ParityError (no artifact) when either fails.
    """
    from compressor.export.binary import export_binary_onnx, integer_ops, save_1bit
    from compressor.export.onnx import input_names_for
    from compressor.export.parity import check_parity

    recipe = ctx.recipe
    names = input_names_for(example, io.get("input_names"))
    axes = io.get("dynamic_axes")
    if axes is None and recipe.export.dynamic_batch:
        axes = {**{n: {0: "batch"} for n in names}, "output": {0: "batch"}}
    model_path = export_binary_onnx(exported, staging / "model.onnx", dict(zip(names, example)),
                                    output_names=["output"], dynamic_axes=axes, opset=recipe.export.opset)
    packed_path = save_1bit(state.module, staging / PACKED_NAME)

    batches = _held_out_batches(ctx.data.val, recipe.export.parity.samples)
    signs = check_sign_parity(exported, model_path, batches, names)
    if not signs.passed:
        detail = (f"e.g. sample {signs.errors[0]['sample']}: {signs.errors[0]['count']} signs of "
                  f"{signs.errors[0]['tensor']} (|x| up to {signs.errors[0]['max_abs_input']:.3g})" if signs.errors
                  else f"unlocated in the graph: {signs.unlocated[:3]}" if signs.unlocated
                  else "every sample hit a float tie")
        raise ParityError(f"binarized export: signs differ from PyTorch beyond float ties (|x| ≤ {signs.tie:g}); "
                          f"{detail}; no artifact written")
    ctx.log(f"binary parity: signs equal in all {signs.tensors} binarized tensors of {signs.samples} held-out samples "
            f"({signs.values:,} values)" + (f", except {len(signs.ties)} samples past a float tie (|x| ≤ {signs.tie:g})"
                                            if signs.ties else ""))
    outputs = check_parity(state.module, model_path, _without_samples(batches, set(signs.ties)), recipe.export.parity,
                           recipe.task)
    if not outputs.passed:
        raise ParityError(f"binarized export: outputs of {outputs.samples} held-out samples without float ties differ: "
                          f"{'; '.join(outputs.failures)}; no artifact written")
    ops = count_binary_ops(state.module, _first(batches[0][0], 1))
    return model_path, {
        **state.extras[EXTRAS_KEY],
        "size": {"onnx_bytes": model_path.stat().st_size, "packed_bytes": packed_path.stat().st_size,
                 "packed_file": PACKED_NAME},
        "sign_parity": signs.to_dict(),
        "ops": {**ops, "batch": 1, "input_shape": {n: [1, *t.shape[1:]] for n, t in zip(names, example)}},
        "integer_ops": integer_ops(model_path),
    }, outputs  # fmt: skip


__all__ = ["BinarizeSpec", "SignSoftmax", "find_bert", "binarize_student", "freeze_parameters", "frozen_tables",
           "run_binarize", "count_binary_ops", "SignParity", "first_divergence", "check_sign_parity",
           "export_binary_artifact", "EXTRAS_KEY", "PACKED_NAME", "TIE"]
