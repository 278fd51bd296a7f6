"""Deployable 1-bit models: ONNX that ONNX Runtime runs with integer kernels, plus bit-packed weights.

Standard ONNX has no 1-bit type, so each binarized layer is written as an int8 Q/DQ pattern:

    x ─ act ─ QuantizeLinear(scale s, zp n, uint8) ─ DequantizeLinear(1, n) ─┐
                                     int8 ±1 weights ─ DequantizeLinear(α per row) ─ MatMul ─ (·s) ─ + b

`act` is the model's own activation quantizer (sign: ±1, s = 1, n = 1; k bits: levels −n..n, dynamic s),
so the quantized activations are exact small integers stored as uint8 = level + n: uint8 activations ×
int8 weights is the combination ORT's CPU kernels run fast (ENVIRONMENT.md: s8×s8 runs slower than
float). ORT fuses DQ → MatMul into `MatMulIntegerToFloat` (an exact int32 dot product, then ·α), which
`integer_ops` checks; measured for every encoder linear of BERT (3-D inputs). Measured limits: a linear
on 2-D inputs with a bias gets fused into a float Gemm by ORT first, and DQ → Conv stays a float Conv
(no integer conv without a quantized output) — both still store int8 weights. Layers with float inputs
(W1A32) store float ±α weights (see `_ExportBinaryLayer`). Bi-Attention is plain ONNX: GreaterOrEqual +
Cast; the two attention products stay float MatMuls of small integers, exact.

Bit-packed storage, `weights.1bit`: a safetensors file (a JSON header + raw little-endian tensors; no
pickle) holding, for each 1-bit weight `<name>.weight` of shape [rows, ...]:
    `<name>.weight.signs`  uint8 [rows, ceil(cols/8)]: np.packbits(sign ≥ 0, axis=1, bitorder="little"),
                           cols = the product of the other dims; bit 1 = +1, bit 0 = −1
    `<name>.weight.alpha`  float32 [rows]: the per-row scale α
and every other state-dict tensor (biases, LayerNorm, float embeddings, buffers) unchanged. The header
metadata has one key, `compressor-1bit`: JSON {"version": 1, "binary": {name: shape}}. (One key, because
safetensors writes several in no fixed order, and identical content should give identical bytes.)
`load_1bit` rebuilds a binarized model (same architecture) from it; its latent weights become ±α, which
binarize back to exactly the stored signs and α.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from compressor.errors import ModelLoadError, ParityError
from compressor.quant.binary import (
    ActQuant,
    BinaryConv2d,
    BinaryEmbedding,
    BinaryLinear,
    BoolBinarize,
    act_levels,
    binarize_weight,
    binarized_modules,
    set_submodule,
)

FORMAT = "compressor-1bit"
FORMAT_VERSION = 1
DEFAULT_OPSET = 17


# --- ONNX export -------------------------------------------------------------------------------------


def _act_qdq(g, x, scale, zp_value: int):
    zp = g.op("Constant", value_t=torch.tensor(zp_value, dtype=torch.uint8))
    one = g.op("Constant", value_t=torch.tensor(1.0))
    if scale is None:
        scale = one
    return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zp), one, zp)


def _weight_dq(g, w_int8, alpha, axis: int, rows: int):
    zp = g.op("Constant", value_t=torch.zeros(rows, dtype=torch.int8))
    return g.op("DequantizeLinear", w_int8, alpha, zp, axis_i=axis)


def _levels(x_q: Tensor, scale: Tensor | None, n: int) -> Tensor:
    return x_q if scale is None else torch.round(x_q / scale).clamp(-n, n)


class _QDQMatMul(torch.autograd.Function):
    """levels(x_q) @ (w_int8 · α): traced as one op, exported as Q/DQ + MatMul."""

    @staticmethod
    def forward(ctx, x_q, scale, w_t, alpha, n: int):
        return (_levels(x_q, scale, n) @ w_t.to(x_q.dtype)) * alpha  # the order ORT's integer kernel uses

    @staticmethod
    def symbolic(g, x_q, scale, w_t, alpha, n: int):
        rows = w_t.type().sizes()[1]
        return g.op("MatMul", _act_qdq(g, x_q, scale, n), _weight_dq(g, w_t, alpha, axis=1, rows=rows))


class _QDQConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_q, scale, w, alpha, n: int, stride, padding, dilation, groups: int):
        y = torch.nn.functional.conv2d(_levels(x_q, scale, n), w.to(x_q.dtype), None, stride, padding,
                                       dilation, groups)
        return y * alpha.reshape(1, -1, 1, 1)

    @staticmethod
    def symbolic(g, x_q, scale, w, alpha, n: int, stride, padding, dilation, groups: int):
        rows, _, kh, kw = w.type().sizes()
        return g.op("Conv", _act_qdq(g, x_q, scale, n), _weight_dq(g, w, alpha, axis=0, rows=rows),
                    kernel_shape_i=[kh, kw], strides_i=list(stride), pads_i=list(padding) * 2,
                    dilations_i=list(dilation), group_i=groups)


class _ExportBinaryLayer(nn.Module):
    """Inference-only stand-in for a 1-bit layer while exporting.

    Quantized inputs: int8 ±1 weights + α, emitted as Q/DQ. Float inputs (W1A32): float ±α weights,
    because ORT fuses DQ(int8) → MatMul with a float input into MatMulNBits, which quantizes the input
    to 8 bits and so changes the model (measured: 1.6e-3 on Q of a tiny BERT, flipping Bi-Attention bits).
    """

    def __init__(self, source: BinaryLinear | BinaryConv2d, transpose: bool):
        super().__init__()
        signs, alpha = binarize_weight(source.weight.detach(), source.center)
        signs = signs.t() if transpose else signs
        self.act = source.act
        self.quantized_input = isinstance(source.act, ActQuant)
        if self.quantized_input:
            self.register_buffer("weight_int8", signs.to(torch.int8).contiguous())
            self.register_buffer("alpha", alpha.clone())
            self.levels = act_levels(source.act.bits)
        else:
            shape = (1, -1) if transpose else (-1, 1, 1, 1)
            self.register_buffer("weight", (signs * alpha.reshape(shape)).contiguous())
        self.bias = None if source.bias is None else nn.Parameter(source.bias.detach().clone())

    def _scale(self, x: Tensor) -> Tensor | None:
        return None if self.act.bits == 1 else self.act.scale(x)


class ExportBinaryLinear(_ExportBinaryLayer):
    def __init__(self, source: BinaryLinear):
        super().__init__(source, transpose=True)

    def forward(self, x: Tensor) -> Tensor:
        x_q = self.act(x)
        if not self.quantized_input:
            y = x_q @ self.weight
        else:
            scale = self._scale(x)
            y = _QDQMatMul.apply(x_q, scale, self.weight_int8, self.alpha, self.levels)
            y = y if scale is None else y * scale
        return y + self.bias if self.bias is not None else y


class ExportBinaryConv2d(_ExportBinaryLayer):
    def __init__(self, source: BinaryConv2d):
        super().__init__(source, transpose=False)
        self.conv_args = (source.stride, source.padding, source.dilation, source.groups)

    def forward(self, x: Tensor) -> Tensor:
        x_q = self.act(x)
        if not self.quantized_input:
            y = torch.nn.functional.conv2d(x_q, self.weight, None, *self.conv_args)
        else:
            scale = self._scale(x)
            y = _QDQConv.apply(x_q, scale, self.weight_int8, self.alpha, self.levels, *self.conv_args)
            y = y if scale is None else y * scale
        return y + self.bias.reshape(1, -1, 1, 1) if self.bias is not None else y


class ExportBinaryEmbedding(nn.Module):
    """Gather from the int8 ±1 table, then scale by the gathered α (no float table in the file)."""

    def __init__(self, source: BinaryEmbedding):
        super().__init__()
        signs, alpha = binarize_weight(source.weight.detach(), source.center)
        self.register_buffer("weight_int8", signs.to(torch.int8))
        self.register_buffer("alpha", alpha.clone())

    def forward(self, ids: Tensor) -> Tensor:
        return self.weight_int8[ids].to(self.alpha.dtype) * self.alpha[ids].unsqueeze(-1)


_EXPORT_TYPES = {BinaryLinear: ExportBinaryLinear, BinaryConv2d: ExportBinaryConv2d,
                 BinaryEmbedding: ExportBinaryEmbedding}


def to_export_model(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with every 1-bit module replaced by its int8 export form.

    A copy, because a failed export must not leave anything attached to the caller's model.
    """
    exported = copy.deepcopy(model).eval()
    for name, module in binarized_modules(exported).items():
        new = _EXPORT_TYPES[type(module)](module)
        if name:
            set_submodule(exported, name, new)
        else:
            exported = new
    return exported


class EncoderForExport(nn.Module):
    """forward(input_ids, attention_mask) → last_hidden_state of a Hugging Face encoder (tensor in, tensor out)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state


def export_binary_onnx(model: nn.Module, path: str | Path, example_inputs: Mapping[str, Tensor], *,
                       output_names: list[str], dynamic_axes: dict[str, dict[int, str]] | None = None,
                       opset: int = DEFAULT_OPSET) -> Path:
    """Export a binarized model to ONNX with int8 Q/DQ 1-bit layers (see module docstring).

    `model` is called with `example_inputs`' values positionally, in order; their keys become the ONNX
    input names. Uses the TorchScript exporter (`dynamo=False`): custom symbolics are how the Q/DQ
    pattern is emitted, and its node names carry module scopes, which `check_binary_parity` relies on.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    exported = to_export_model(model)
    with torch.no_grad():
        torch.onnx.export(exported, tuple(example_inputs.values()), str(path), dynamo=False,
                          input_names=list(example_inputs), output_names=output_names,
                          dynamic_axes=dynamic_axes or {}, opset_version=opset, do_constant_folding=True)
    return path


def integer_ops(onnx_path: str | Path) -> dict[str, int]:
    """Integer compute ops in the graph ONNX Runtime (CPU) runs after its optimizations."""
    from compressor.export.inspect import INTEGER_COMPUTE_OPS, optimized_op_counts

    return {op: n for op, n in optimized_op_counts(Path(onnx_path), level="all").items() if op in INTEGER_COMPUTE_OPS}


# --- parity ------------------------------------------------------------------------------------------


def _unqualified(name: str) -> str:
    # the TorchScript exporter names a module's scope from its last non-numeric atom on ("layer.0")
    atoms = name.split(".")
    for i in range(len(atoms) - 1, -1, -1):
        if not atoms[i].isnumeric():
            return ".".join(atoms[i:])
    return name


def _scope(name: str, called: set[str]) -> str:
    atoms = name.split(".")
    chain = [".".join(atoms[: i + 1]) for i in range(len(atoms))]
    return "/" + "/".join(_unqualified(a) for a in chain if a in called) + "/"


def _scope_output(graph, prefix: str) -> str | None:
    """A module's output in the graph: the last value (in graph order) produced inside its scope and
    used outside it. Not necessarily the only one: the exporter merges identical subexpressions (the
    k-bit scale computed in the module and again by its consumer) and may hand one to the outside."""
    inside = [n for n in graph.node if n.name.startswith(prefix)]
    used_outside = {i for n in graph.node if not n.name.startswith(prefix) for i in n.input}
    used_outside |= {o.name for o in graph.output}
    leaving = [o for n in inside for o in n.output if o in used_outside]
    return leaving[-1] if leaving else None


def _quantized_input(graph, prefix: str) -> str | None:
    """The activation entering a 1-bit layer's QuantizeLinear. Used when the exporter merged this layer's
    activation quantizer with an identical one (Q, K and V binarize the same hidden states)."""
    inputs = [n.input[0] for n in graph.node if n.name.startswith(prefix) and n.op_type == "QuantizeLinear"]
    return inputs[0] if len(inputs) == 1 else None


@dataclass
class BinaryParity:
    """PyTorch vs ONNX Runtime on the same inputs: every binarized tensor, and the outputs."""

    atol: float
    max_abs_diff: dict[str, float]  # per model output
    sign_mismatches: dict[str, int]  # per binarized tensor (module name): elements whose sign differs
    elements: dict[str, int]
    unlocated: list[str] = field(default_factory=list)  # binarized tensors not found in the graph

    @property
    def passed(self) -> bool:
        return (not self.unlocated and not any(self.sign_mismatches.values())
                and all(d <= self.atol for d in self.max_abs_diff.values()))

    def raise_if_failed(self) -> None:
        if self.passed:
            return
        bad = {k: v for k, v in self.sign_mismatches.items() if v}
        raise ParityError(
            f"binarized ONNX export differs from PyTorch: sign mismatches {bad or 'none'}, "
            f"max |Δ| {self.max_abs_diff} (tolerance {self.atol}), unlocated {self.unlocated or 'none'}"
        )

    def to_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed}


def check_binary_parity(model: nn.Module, onnx_path: str | Path, inputs: Mapping[str, Tensor], *,
                        atol: float = 1e-4) -> BinaryParity:
    """Run `model` (as exported: called with `inputs`' values in order) and the ONNX file; compare the
    sign of every binarized tensor (outputs of ActQuant / BoolBinarize modules) exactly and the outputs
    within `atol`. The file itself is run for the outputs; a copy with the binarized tensors added as
    outputs is run for the comparison of signs."""
    import onnx
    import onnxruntime as ort

    sites = {n: m for n, m in model.named_modules() if isinstance(m, (ActQuant, BoolBinarize))}
    captured: dict[str, Tensor] = {}
    called: set[str] = set()
    names = {m: n for n, m in model.named_modules()}
    handles = [m.register_forward_pre_hook(lambda mod, _inp: called.add(names[mod])) for m in model.modules()]
    for name, module in sites.items():
        handles.append(module.register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, out.detach().clone())))
    modes = {m: m.training for m in model.modules()}  # restored one by one: a wrapper's flag says nothing
    try:
        model.eval()
        with torch.no_grad():
            reference = model(*inputs.values())
    finally:
        for module, training in modes.items():
            module.training = training
        for handle in handles:
            handle.remove()
    reference = reference if isinstance(reference, tuple | list) else (reference,)

    feed = {k: v.cpu().numpy() for k, v in inputs.items()}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    outputs = session.run(None, feed)
    max_abs = {o.name: float(np.abs(np.asarray(out, np.float64) - ref.cpu().numpy()).max())
               for o, out, ref in zip(session.get_outputs(), outputs, reference)}

    proto = onnx.load(str(onnx_path))
    located: dict[str, str] = {}
    for name in captured:
        value = _scope_output(proto.graph, _scope(name, called))
        parent, _, leaf = name.rpartition(".")
        if value is None and leaf == "act" and parent:
            value = _quantized_input(proto.graph, _scope(parent, called))
        if value is not None:
            located[name] = value
    existing = {o.name for o in proto.graph.output}
    for value in located.values():
        if value not in existing:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(value, onnx.TensorProto.FLOAT, None))
            existing.add(value)
    probe = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = dict(zip([o.name for o in probe.get_outputs()], probe.run(None, feed)))
    mismatches = {name: int((np.sign(values[v]) != np.sign(captured[name].cpu().numpy())).sum())
                  for name, v in located.items()}
    return BinaryParity(atol=atol, max_abs_diff=max_abs, sign_mismatches=mismatches,
                        elements={n: captured[n].numel() for n in located},
                        unlocated=sorted(set(captured) - set(located)))


# --- bit-packed weights ------------------------------------------------------------------------------


def _pack(signs: Tensor) -> np.ndarray:
    rows = signs.shape[0]
    bits = (signs.reshape(rows, -1) >= 0).cpu().numpy()
    return np.packbits(bits, axis=1, bitorder="little")


def _unpack(packed: np.ndarray, shape: list[int]) -> Tensor:
    cols = math.prod(shape[1:])
    bits = np.unpackbits(packed, axis=1, count=cols, bitorder="little")
    return torch.from_numpy(bits.astype(np.float32) * 2 - 1).reshape(shape)


def save_1bit(model: nn.Module, path: str | Path) -> Path:
    """Write `model`'s deployable state to `path` (format in the module docstring); returns the path."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    binary = binarized_modules(model)
    tensors: dict[str, np.ndarray] = {}
    shapes: dict[str, list[int]] = {}
    with torch.no_grad():
        for name, module in binary.items():
            key = f"{name}.weight" if name else "weight"
            signs, alpha = binarize_weight(module.weight, module.center)
            tensors[f"{key}.signs"] = _pack(signs)
            tensors[f"{key}.alpha"] = alpha.float().cpu().numpy()
            shapes[key] = list(module.weight.shape)
        for key, value in model.state_dict().items():
            if key not in shapes:
                tensors[key] = value.detach().cpu().contiguous().numpy().copy()
    header = {"version": FORMAT_VERSION, "binary": shapes}
    save_file(tensors, str(path), metadata={FORMAT: json.dumps(header, sort_keys=True)})
    return path


def load_1bit(model: nn.Module, path: str | Path) -> nn.Module:
    """Load `weights.1bit` into an already-binarized model of the same architecture (in place).

    Raises ModelLoadError when the file is not a 1-bit file or does not match the model.
    """
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type (not OSError) on a bad header
        raise ModelLoadError(f"cannot read 1-bit weights '{path}': {exc}") from None
    if FORMAT not in metadata:
        raise ModelLoadError(f"'{path}' is not a {FORMAT} file (no '{FORMAT}' entry in its metadata)")
    header = json.loads(metadata[FORMAT])
    if header.get("version") != FORMAT_VERSION:
        raise ModelLoadError(f"'{path}' is {FORMAT} version {header.get('version')}; this loader reads {FORMAT_VERSION}")
    shapes: dict[str, list[int]] = header["binary"]
    binary = {f"{n}.weight" if n else "weight": m for n, m in binarized_modules(model).items()}
    if set(binary) != set(shapes):
        missing, extra = sorted(set(binary) - set(shapes)), sorted(set(shapes) - set(binary))
        raise ModelLoadError(
            f"'{path}' does not match the model's 1-bit layers (missing in file: {missing[:3]}, "
            f"not in model: {extra[:3]}); binarize the model with the same config before loading"
        )
    state = {}
    for key, module in binary.items():
        if list(module.weight.shape) != shapes[key]:
            raise ModelLoadError(f"'{path}': {key} has shape {shapes[key]}, the model has {list(module.weight.shape)}")
        signs = _unpack(tensors[f"{key}.signs"], shapes[key])
        alpha = torch.from_numpy(tensors[f"{key}.alpha"]).reshape((-1,) + (1,) * (signs.dim() - 1))
        state[key] = (signs * alpha).to(module.weight.dtype)
    for key, value in tensors.items():
        if not (key.endswith(".signs") or key.endswith(".alpha")) or key.rsplit(".", 1)[0] not in shapes:
            state[key] = torch.from_numpy(value)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            f"'{path}' does not match the model: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    return model


# --- one call for a binarized Hugging Face encoder ---------------------------------------------------


@dataclass
class BinaryExportResult:
    onnx_path: Path
    packed_path: Path
    onnx_bytes: int  # bytes on disk of model.onnx (int8 weights)
    packed_bytes: int  # bytes on disk of weights.1bit (1 bit per binarized weight + α + float params)
    integer_ops: dict[str, int]
    parity: BinaryParity


def export_binary_encoder(model: nn.Module, out_dir: str | Path, *, batch: int = 2, seq_len: int = 16,
                          atol: float = 1e-4, seed: int = 0, opset: int = DEFAULT_OPSET) -> BinaryExportResult:
    """Export a binarized Hugging Face encoder: `model.onnx` (dynamic batch and sequence) and
    `weights.1bit` in `out_dir`, then check parity on random token ids with one padded sequence.

    Raises ParityError when a binarized tensor's sign differs or outputs differ by more than `atol`.
    """
    out_dir = Path(out_dir)
    wrapper = EncoderForExport(model)
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    mask[-1, seq_len // 2:] = 0  # one padded row, so masking is part of what parity checks
    inputs = {"input_ids": ids, "attention_mask": mask}
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "last_hidden_state": {0: "batch", 1: "sequence"}}
    onnx_path = export_binary_onnx(wrapper, out_dir / "model.onnx", inputs, output_names=["last_hidden_state"],
                                   dynamic_axes=axes, opset=opset)
    packed_path = save_1bit(model, out_dir / "weights.1bit")
    parity = check_binary_parity(wrapper, onnx_path, inputs, atol=atol)
    parity.raise_if_failed()
    return BinaryExportResult(onnx_path, packed_path, onnx_path.stat().st_size, packed_path.stat().st_size,
                              integer_ops(onnx_path), parity)
