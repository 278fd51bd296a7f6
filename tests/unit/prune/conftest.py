"""Shared helpers for pruning tests: export a model to ONNX and run it in a real ONNX Runtime session."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch


def export_and_run(
    model: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    *,
    dynamo: bool = True,
    input_names: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(ONNX Runtime output, PyTorch output) of the model's first output on `inputs`."""
    import onnxruntime as ort

    model.eval()
    names = input_names or [f"input_{i}" for i in range(len(inputs))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        options = {"external_data": False, "verbose": False} if dynamo else {}
        torch.onnx.export(model, inputs, str(path), dynamo=dynamo, input_names=names, **options)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {name: t.numpy() for name, t in zip(names, inputs)})[0]
    with torch.no_grad():
        expected = model(*inputs)
    return got, expected.numpy()


@pytest.fixture
def onnx_roundtrip():
    return export_and_run
