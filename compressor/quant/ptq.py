"""The `ptq` stage: post-training quantization of the exported ONNX file with ONNX Runtime's quantizer.

PTQ works on the exported graph, so the stage itself only validates its inputs (calibration data, a
float student) and records the request as "post-export quantization" in `ModelState.extras`; the
pipeline's export step exports the float student, quantizes that file with `quantize_exported`, and
checks parity of the quantized file against the float PyTorch model.

- static (CNNs): `quantize_static`, Q/DQ format, uint8 activations / int8 weights (the u8×s8 kernels
  ONNX Runtime runs fast on x86), per-channel weights, `reduce_range` (7-bit weights, so AVX2 kernels
  cannot saturate), calibrated on the recipe's *training* split (parity uses the held-out split) with
  MinMax, Entropy or Percentile ranges. The float file is first run through ORT's `quant_pre_process`
  (shape inference and graph optimizations), as ORT recommends.
- dynamic (transformers): `quantize_dynamic`, int8 weights, activations quantized at run time.

Parity for PTQ means agreement within an explicit, looser tolerance (`PTQSpec.parity`: top-1 agreement
and cosine between the float model and the quantized file), never bit-exactness: PTQ changes the
numerics by design.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from compressor.errors import CompressorError, RecipeError
from compressor.recipe import ParitySpec
from compressor.stages import StageSpec, register_stage
from compressor.state import LineageEntry, ModelState, RunContext

EXTRAS_KEY = "post_export_quant"


def _ptq_parity() -> ParitySpec:
    # max_abs is not a meaningful bound when the numerics change on purpose; cosine and top-1 are.
    return ParitySpec(samples=256, max_abs=1e9, min_top1_agreement=0.95, min_cosine=0.95)


class PTQSpec(StageSpec):
    kind: str = "ptq"
    mode: Literal["auto", "static", "dynamic"] = "auto"  # auto: dynamic for keyword (transformer) inputs
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    calibration_samples: int = Field(256, ge=1)
    min_calibration_samples: int = Field(32, ge=1)
    percentile: float = Field(99.999, gt=90, le=100)
    per_channel: bool = True
    reduce_range: bool = True  # 7-bit weights for x86 without VNNI; turn off for ARM/VNNI/GPU targets
    op_types: list[str] | None = None  # None: everything ONNX Runtime can quantize
    parity: ParitySpec = Field(default_factory=_ptq_parity)


def count_samples(loader, limit: int) -> int:
    seen = 0
    for inputs, _ in loader:
        seen += len(next(iter(inputs.values()))) if isinstance(inputs, dict) else len(inputs)
        if seen >= limit:
            break
    return seen


def resolve_mode(spec_mode: str, batch_inputs: Any) -> str:
    if spec_mode != "auto":
        return spec_mode
    return "dynamic" if isinstance(batch_inputs, dict) else "static"


@register_stage("ptq", PTQSpec)
def run_ptq(state: ModelState, spec: PTQSpec, ctx: RunContext) -> ModelState:
    from compressor.quant.qat import is_quantized

    label = spec.name or "ptq"
    if is_quantized(state.module):
        raise RecipeError(f"{label}: the student is already quantized by a qat stage; drop the ptq stage or the qat stage")
    train = ctx.data.train
    if train is None:
        raise RecipeError(f"{label}: static calibration needs data, and data.source gives no training split")
    mode = resolve_mode(spec.mode, next(iter(ctx.data.val))[0])
    if mode == "static":
        available = count_samples(train, spec.calibration_samples)
        if available == 0:
            raise RecipeError(f"{label}: calibration data is missing: the training split of data.source is empty")
        if available < spec.min_calibration_samples:
            raise RecipeError(
                f"{label}: calibration needs at least {spec.min_calibration_samples} samples, the training split has "
                f"{available}; give more data or lower min_calibration_samples"
            )
    details = {
        "method": "ptq", "library": "onnxruntime", "mode": mode, "calibration": spec.calibration if mode == "static" else None,
        "calibration_samples": spec.calibration_samples, "percentile": spec.percentile, "per_channel": spec.per_channel,
        "reduce_range": spec.reduce_range, "op_types": spec.op_types, "parity": spec.parity.model_dump(),
    }  # fmt: skip
    state.extras[EXTRAS_KEY] = details
    state.extras["quant"] = {k: v for k, v in details.items() if k != "parity"}
    state.lineage.append(LineageEntry(stage=label, kind="ptq", metrics={}, details=details))
    ctx.log(f"[{label}] {mode} post-training quantization will be applied to the exported file")
    return state


class LoaderReader:
    """An ONNX Runtime CalibrationDataReader over a loader: up to `samples` inputs, batch by batch."""

    def __init__(self, loader, input_names: list[str], samples: int):
        self.loader, self.input_names, self.samples = loader, input_names, samples
        self._batches = None

    def _generate(self):
        seen = 0
        for inputs, _ in self.loader:
            if seen >= self.samples:
                return
            if isinstance(inputs, dict):
                take = min(self.samples - seen, len(next(iter(inputs.values()))))
                feed = {name: inputs[name][:take].cpu().numpy() for name in self.input_names}
            else:
                take = min(self.samples - seen, len(inputs))
                feed = {self.input_names[0]: inputs[:take].cpu().numpy()}
            seen += take
            yield feed

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._batches is None:
            self._batches = self._generate()
        return next(self._batches, None)

    def rewind(self) -> None:
        self._batches = None


def quantize_exported(float_path: Path, out_path: Path, details: dict[str, Any], calibration_loader) -> Path:
    """Quantize the float ONNX file `float_path` into `out_path` as `details` (the stage's record) says."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    float_path, out_path = Path(float_path), Path(out_path)
    if details["mode"] == "dynamic":
        quantize_dynamic(
            str(float_path), str(out_path), per_channel=details["per_channel"], reduce_range=details["reduce_range"],
            weight_type=QuantType.QInt8, op_types_to_quantize=details["op_types"],
        )  # fmt: skip
        return out_path
    input_names = [i.name for i in onnx.load(str(float_path)).graph.input]
    initializers = {i.name for i in onnx.load(str(float_path)).graph.initializer}
    input_names = [n for n in input_names if n not in initializers]
    reader = LoaderReader(calibration_loader, input_names, details["calibration_samples"])
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(float_path), str(prepared))
        except Exception as exc:  # noqa: BLE001 - pre-processing is an optimisation; quantize the raw export
            warnings.warn(f"ONNX Runtime's quant_pre_process failed ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); quantizing the export as it is", stacklevel=2)
            shutil.copy(float_path, prepared)
        cache = None
        try:
            if details["calibration"] == "entropy":
                cache = _entropy_ranges(prepared, reader, details["op_types"], Path(tmp))
            quantize_static(
                str(prepared), str(out_path), reader, quant_format=QuantFormat.QDQ, per_channel=details["per_channel"],
                reduce_range=details["reduce_range"], activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=method[details["calibration"]], op_types_to_quantize=details["op_types"],
                extra_options={"CalibPercentile": details["percentile"]}, calibration_cache_path=cache,
            )  # fmt: skip
        except (ValueError, RuntimeError) as exc:
            # e.g. Entropy/Percentile histograms over an additive attention mask (-3.4e38) fail in numpy.
            raise CompressorError(
                f"ptq: ONNX Runtime's {details['calibration']} calibration failed on this model ({str(exc).splitlines()[0]}); "
                "restrict op_types (e.g. [MatMul, Gemm] for transformers), use calibration: minmax, or mode: dynamic"
            ) from exc
    return out_path


# TensorRT's entropy calibration: a 2048-bin histogram searched for the 128-level threshold of least KL
# divergence. quantize_static cannot pass bin counts to its calibrator, and with its defaults (128 bins,
# 128 quantized bins) the search has one candidate, the full range: Entropy silently equals MinMax.
ENTROPY_BINS, ENTROPY_QUANTIZED_BINS = 2048, 128


def _entropy_ranges(prepared: Path, reader: LoaderReader, op_types: list[str] | None, tmp: Path) -> Path:
    """Entropy ranges computed with a real threshold search, saved as quantize_static's calibration cache."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    calibrator = create_calibrator(
        prepared, op_types, augmented_model_path=str(tmp / "augmented.onnx"), calibrate_method=CalibrationMethod.Entropy,
        extra_options={"num_bins": ENTROPY_BINS, "num_quantized_bins": ENTROPY_QUANTIZED_BINS},
    )  # fmt: skip
    calibrator.collect_data(reader)
    cache = tmp / "entropy-ranges.json"
    save_tensors_data(calibrator.compute_data(), cache)
    reader.rewind()
    return cache
