"""Build a TensorRT engine with the Python API, where `import tensorrt` works (an NVIDIA GPU and driver).

NOT RUN on the project's machines: they have no GPU, and PyPI's `tensorrt` is a stub that downloads the real
libraries from NVIDIA's index, which is unreachable there. Everywhere else in the toolchain the engine is
built by trtexec on the device (see trtexec.py), which is also the path that is tested. The API calls
below follow TensorRT 10's documented Python API (Builder, OnnxParser, BuilderConfig.set_flag,
build_serialized_network); an engine only runs on the GPU model and TensorRT version that built it, so both
are returned for the record.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from compressor.errors import MeasurementError, require

_FLAGS = {
    "fp32": [],
    "fp16": ["FP16"],
    "int8": ["INT8"],  # explicit quantization: the Q/DQ nodes in the ONNX file carry the scales
    "int8-fp16": ["INT8", "FP16"],
    "best": ["INT8", "FP16"],
}


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    *,
    precision: str = "fp32",
    sparsity: bool = False,
    workspace_mb: int = 1024,
) -> dict[str, Any]:
    """Parse the ONNX file and write a serialized engine; return the TensorRT version and GPU it is tied to.

    Raises:
        MissingExtraError: tensorrt is not importable (pip install 'compressor[tensorrt]' on a GPU machine).
        MeasurementError: the parser or the builder failed.
    """
    trt = require("tensorrt", "tensorrt", "Building a TensorRT engine with the Python API")
    if precision not in _FLAGS:
        raise MeasurementError(f"precision '{precision}' is not one of {sorted(_FLAGS)}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise MeasurementError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    for flag in _FLAGS[precision]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if sparsity:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise MeasurementError(f"TensorRT could not build an engine for {onnx_path.name} (see its log above)")
    engine_path.write_bytes(bytes(serialized))
    return {
        "tensorrt_version": trt.__version__,
        "gpu": _gpu_name(),
        "precision": precision,
        "sparsity": sparsity,
    }


def _gpu_name() -> str | None:
    """The GPU the engine was built for: nvidia-smi on discrete GPUs, the board model on Jetsons."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    model = Path("/proc/device-tree/model")
    return model.read_text(errors="replace").strip("\x00\n ") if model.exists() else None
