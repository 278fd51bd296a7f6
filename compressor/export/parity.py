"""Export parity: run the exported file in ONNX Runtime and the PyTorch model on the same held-out data.

When the outputs disagree, `localize_divergence` compares intermediate tensors layer by layer and names
the first layer that diverges. ONNX node names carry the PyTorch module path (the TorchScript exporter
writes scopes such as `/features/features.3/Conv` or `/encoder/layer.0/attention/self/query/MatMul`), so
each module's output is matched to the output of the last ONNX node in its scope; PyTorch's side comes
from forward hooks. The ONNX tensors are exposed by adding them as graph outputs.

What parity means depends on how the file was made:
- QAT (Brevitas fake-quant → Q/DQ): the file computes what the fake-quant model computes; integer kernels
  round differently by about one quantization step, so tolerances are tight.
- PTQ (ONNX Runtime's quantizer on the float export): the file is *meant* to differ from the float
  model, so parity is "top-1 agreement and cosine within an explicit, looser tolerance", never
  bit-exactness (see `PTQ_PARITY` in `compressor.quant.ptq`).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compressor.errors import ParityError
from compressor.models.call import call, primary_output


@dataclass
class ParityResult:
    samples: int
    max_abs: float
    mean_abs: float
    min_cosine: float
    mean_cosine: float
    top1_agreement: float | None
    onnx_accuracy: float | None
    passed: bool
    failures: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def ort_session(onnx_path: Path, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def ort_feed(session, inputs) -> dict[str, np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    if isinstance(inputs, dict):
        return {name: inputs[name].cpu().numpy() for name in names}
    return {names[0]: inputs.cpu().numpy()}


def compare_outputs(reference: np.ndarray, exported: np.ndarray) -> dict[str, float]:
    ref, exp = reference.reshape(len(reference), -1).astype(np.float64), exported.reshape(len(exported), -1).astype(np.float64)
    diff = np.abs(ref - exp)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(exp, axis=1)
    cosine = np.where(norms > 0, (ref * exp).sum(1) / np.maximum(norms, 1e-30), 1.0)
    return {
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "mean_abs": float(diff.mean()) if diff.size else 0.0,
        "min_cosine": float(cosine.min()),
        "mean_cosine": float(cosine.mean()),
    }


@torch.inference_mode()
def check_parity(module: nn.Module, onnx_path: Path, loader, spec, task: str = "classification") -> ParityResult:
    """Compare outputs (max abs, cosine, top-1 agreement) and accuracy of the file against the labels."""
    session = ort_session(onnx_path)
    module = module.eval()
    refs, exps, targets = [], [], []
    seen = 0
    for inputs, target in loader:
        take = min(spec.samples - seen, _batch_len(inputs))
        if take <= 0:
            break
        inputs = _slice(inputs, take)
        refs.append(primary_output(call(module, inputs)).float().cpu().numpy())
        exps.append(session.run(None, ort_feed(session, inputs))[0])
        if target is not None:
            targets.append(target[:take].numpy())
        seen += take
    ref, exp = np.concatenate(refs), np.concatenate(exps)
    if ref.shape != exp.shape:
        raise ParityError(f"exported output shape {exp.shape} differs from PyTorch's {ref.shape}")
    stats = compare_outputs(ref, exp)
    top1 = accuracy = None
    if task == "classification":
        top1 = float((ref.argmax(-1) == exp.argmax(-1)).mean())
        if targets:
            accuracy = float((exp.argmax(-1) == np.concatenate(targets)).mean())
    failures = []
    if stats["max_abs"] > spec.max_abs:
        failures.append(f"max |torch - onnx| = {stats['max_abs']:.3g} > allowed {spec.max_abs:g}")
    if stats["min_cosine"] < spec.min_cosine:
        failures.append(f"min cosine = {stats['min_cosine']:.5f} < allowed {spec.min_cosine:g}")
    if top1 is not None and top1 < spec.min_top1_agreement:
        failures.append(f"top-1 agreement = {top1:.4f} < allowed {spec.min_top1_agreement:g}")
    return ParityResult(
        samples=len(ref), top1_agreement=top1, onnx_accuracy=accuracy, passed=not failures, failures=failures, **stats
    )


def _batch_len(inputs) -> int:
    return len(next(iter(inputs.values()))) if isinstance(inputs, dict) else len(inputs)


def _slice(inputs, n: int):
    return {k: v[:n] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[:n]


# A module is observed when it owns one of these ops (or is an embedding table). Modules that only
# select, reshape or activate (ReLU, MaxPool, Flatten) are left out: a Q/DQ pair moved across them by
# `propagate_qdq` makes their ONNX output legitimately differ from PyTorch's unquantized one.
LAYER_OPS = {
    "Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul",
    "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm", "LayerNormalization", "BatchNormalization",
    "InstanceNormalization", "GroupNormalization", "SkipLayerNormalization", "Einsum",
}  # fmt: skip


@dataclass
class LayerDelta:
    """One module's output, PyTorch vs the ONNX file."""

    module: str
    onnx_node: str
    tensor: str
    max_abs: float
    relative: float  # max |Δ| / max |reference|
    cosine: float  # worst per-sample cosine

    def describe(self) -> str:
        return (
            f"'{self.module}' (ONNX node {self.onnx_node}): cosine {self.cosine:.4f}, max|Δ| {self.max_abs:.3g} "
            f"({self.relative:.1%} of the layer's range)"
        )


@dataclass
class Localization:
    """Layers compared in graph order; `first_divergent` is the first beyond tolerance (or None)."""

    layers: list[LayerDelta] = field(default_factory=list)
    first_divergent: LayerDelta | None = None
    min_cosine: float = 0.99
    max_relative: float = 0.1

    def message(self) -> str:
        if not self.layers:
            return "no layer could be matched between the ONNX graph and the PyTorch modules"
        if self.first_divergent is None:
            worst = min(self.layers, key=lambda d: d.cosine)
            return f"no single layer diverges beyond tolerance (worst: {worst.describe()}); the error builds up gradually"
        index = self.layers.index(self.first_divergent)
        before = self.layers[:index]
        count = f"{len(before)} layer{'s' if len(before) > 1 else ''}"
        tail = f"; the {count} before it agree" if before else "; it is the first layer compared"
        return f"first diverging layer {self.first_divergent.describe()}{tail}"

    def to_dict(self) -> dict:
        return {
            "first_divergent": asdict(self.first_divergent) if self.first_divergent else None,
            "layers": [asdict(d) for d in self.layers],
            "min_cosine": self.min_cosine,
            "max_relative": self.max_relative,
        }


def module_path_for_scope(scope: list[str], module_names: set[str]) -> str | None:
    """The module path an ONNX node scope names, e.g. ['features', 'features.3'] -> 'features.3'.

    Scope segments are either a child's attribute name ('layer.0' = child 'layer', index 0) or the child's
    full path (older exporters and FX-traced models write '/features/features.3/'): both are resolved.
    """
    path = ""
    for segment in scope:
        candidates = [f"{path}.{segment}" if path else segment, segment]
        if path and segment.startswith(path + "."):
            candidates.insert(0, segment)
        resolved = next((c for c in candidates if c in module_names), None)
        if resolved is None:
            return path or None
        path = resolved
    return path or None


def _node_scope(node_name: str) -> list[str]:
    parts = [p for p in node_name.split("/") if p]
    return parts[:-1]  # the last part is the op ("Conv", "MatMul_quant", ...)


def observation_points(onnx_model, module: nn.Module) -> list[tuple[str, str, str]]:
    """(module path, ONNX node name, output tensor) per module that owns computing nodes, in graph order."""
    names = {n for n, _ in module.named_modules() if n}
    owner: dict[str, str] = {}  # node name -> module path
    own_ops: dict[str, set[str]] = {}
    for node in onnx_model.graph.node:
        path = module_path_for_scope(_node_scope(node.name), names)
        if path:
            owner[node.name] = path
            own_ops.setdefault(path, set()).add(node.op_type)
    modules = dict(module.named_modules())
    layers = {
        p for p, ops in own_ops.items()
        if (ops & LAYER_OPS or isinstance(modules[p], nn.Embedding)) and not _is_quantizer_path(p)
    }  # fmt: skip
    last: dict[str, tuple[int, object]] = {}  # module path -> (index, last node in its scope)
    for index, node in enumerate(onnx_model.graph.node):
        path = owner.get(node.name)
        while path:
            if path in layers and node.output:
                last[path] = (index, node)
            path = path.rpartition(".")[0]
    ordered = sorted(last.items(), key=lambda item: item[1][0])
    return [(path, node.name, node.output[0]) for path, (_, node) in ordered]



def _is_quantizer_path(path: str) -> bool:
    return any(part.endswith("_quant") or part in ("export_handler", "tensor_quant") for part in path.split("."))


@torch.inference_mode()
def localize_divergence(
    module: nn.Module,
    onnx_path: Path,
    inputs,
    *,
    min_cosine: float = 0.99,
    max_relative: float = 0.1,
    threads: int = 1,
) -> Localization:
    """Compare every matched layer's output on `inputs` (a tensor or a dict of tensors) and find the first
    one beyond tolerance: worst per-sample cosine below `min_cosine` or max |Δ| above `max_relative` of the
    layer's output range.

    The observed tensors become extra graph outputs, which stops ONNX Runtime from fusing the nodes that
    produce them into integer kernels: the comparison checks what the graph computes (export bugs, wrong
    weights or scales), while rounding inside fused kernels is judged by the final outputs.
    """
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_path))
    points = observation_points(model, module)
    graph_outputs = {o.name for o in model.graph.output}
    types = _tensor_types(model)
    points = [p for p in points if types.get(p[2], onnx.TensorProto.FLOAT) in _FLOAT_TYPES]
    for _, _, tensor in points:
        if tensor not in graph_outputs:
            model.graph.output.append(helper.make_tensor_value_info(tensor, types.get(tensor, onnx.TensorProto.FLOAT), None))
            graph_outputs.add(tensor)
    by_module = dict(module.named_modules())
    captured: dict[str, torch.Tensor] = {}

    def hook(name):
        def save(_module, _args, output):
            tensor = _first_tensor(output)
            if tensor is not None:
                captured[name] = tensor.detach().float().cpu()

        return save

    handles = [by_module[path].register_forward_hook(hook(path)) for path, _, _ in points]
    was_training = module.training
    try:
        call(module.eval(), inputs)
    finally:
        for handle in handles:
            handle.remove()
        module.train(was_training)
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.onnx"
        onnx.save(model, str(probe))
        session = ort_session(probe, threads)
        names = [o.name for o in session.get_outputs()]
        values = dict(zip(names, session.run(None, ort_feed(session, inputs))))
    result = Localization(min_cosine=min_cosine, max_relative=max_relative)
    for path, node_name, tensor in points:
        ref, got = captured.get(path), values.get(tensor)
        if ref is None or got is None or tuple(ref.shape) != tuple(got.shape):
            continue  # the module's output is not the last tensor of its scope (or it did not run)
        ref_np = ref.numpy().reshape(len(ref), -1) if ref.dim() else ref.numpy().reshape(1, 1)
        stats = compare_outputs(ref_np, got.reshape(ref_np.shape))
        scale = float(np.abs(ref_np).max()) if ref_np.size else 0.0
        delta = LayerDelta(
            module=path, onnx_node=node_name, tensor=tensor, max_abs=stats["max_abs"],
            relative=stats["max_abs"] / scale if scale > 0 else float(stats["max_abs"] > 0),
            cosine=stats["min_cosine"],
        )  # fmt: skip
        result.layers.append(delta)
        if result.first_divergent is None and (delta.cosine < min_cosine or delta.relative > max_relative):
            result.first_divergent = delta
    return result


_FLOAT_TYPES = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16


def _tensor_types(model) -> dict[str, int]:
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is best effort; unknown types default to float
        inferred = model
    info = list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)
    return {v.name: v.type.tensor_type.elem_type for v in info if v.type.tensor_type.elem_type}


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    try:
        return primary_output(output)
    except TypeError:
        return None


def first_batch(loader, samples: int):
    """The first `samples` inputs of a loader (tensor or dict), for localisation."""
    for inputs, _ in loader:
        return _slice(inputs, min(samples, _batch_len(inputs)))
    raise ParityError("the held-out loader is empty; parity cannot be checked")
