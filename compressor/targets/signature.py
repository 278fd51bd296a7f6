"""Input shapes of an ONNX model, with dynamic axes resolved the way device_bench.py resolves them.

Native tools need the shapes on their command line (trtexec --shapes, onnxruntime_perf_test -f), so the
host reads the signature once. Rule, shared by every runner: a named dynamic axis takes its size from
`dims` (profile `shapes` plus per-call overrides); an unnamed or unknown leading axis is the batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from compressor.errors import MeasurementError

Dim = int | str | None


def model_inputs(model_path: Path) -> list[tuple[str, list[Dim]]]:
    """(name, dims) of the graph inputs that are not initializers; a dim is int, a name, or None."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    inputs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims: list[Dim] = []
        for d in value.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or None)
        inputs.append((value.name, dims))
    return inputs


def resolve(inputs: list[tuple[str, list[Dim]]], batch: int, dims: Mapping[str, int]) -> dict[str, list[int]]:
    """Concrete shapes for every input. Raises MeasurementError naming an axis nobody sized."""
    shapes = {}
    for name, shape in inputs:
        resolved = []
        for axis, dim in enumerate(shape):
            if isinstance(dim, int):
                resolved.append(dim)
            elif dim is not None and dim in dims:
                resolved.append(int(dims[dim]))
            elif axis == 0:
                resolved.append(batch)
            else:
                label = dim or "unnamed"
                raise MeasurementError(
                    f"input '{name}' has dynamic axis {axis} ('{label}'): give its size in the target profile "
                    f"(shapes: {{{dim or 'NAME'}: N}}) or the bench call's dims"
                )
        shapes[name] = resolved
    return shapes


def is_dynamic(inputs: list[tuple[str, list[Dim]]]) -> bool:
    return any(not isinstance(d, int) for _, shape in inputs for d in shape)


def free_dimension_values(
    inputs: list[tuple[str, list[Dim]]], batch: int, dims: Mapping[str, int]
) -> dict[str, int]:
    """Named dynamic axes and their sizes (onnxruntime_perf_test -f NAME:SIZE); unnamed ones must be 1."""
    values: dict[str, int] = {}
    shapes = resolve(inputs, batch, dims)
    for name, shape in inputs:
        for axis, dim in enumerate(shape):
            if isinstance(dim, int):
                continue
            size = shapes[name][axis]
            if dim is None:
                if size != 1:
                    raise MeasurementError(
                        f"input '{name}' axis {axis} is dynamic without a name, so onnxruntime_perf_test can only "
                        f"run it at size 1 (asked: {size}); export the model with named dynamic axes"
                    )
                continue
            values[dim] = size
    return values
