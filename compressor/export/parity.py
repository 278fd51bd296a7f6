"""Export parity: run the exported file in ONNX Runtime and the PyTorch model on the same held-out data."""

from __future__ import annotations

from dataclasses import asdict, dataclass
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
