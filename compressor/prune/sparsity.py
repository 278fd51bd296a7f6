"""Unstructured magnitude sparsity and 2:4 semi-structured sparsity, with masks kept through training.

Masks are torch.nn.utils.prune reparametrizations: the layer's parameter becomes `weight_orig`, a
`weight_mask` buffer is registered, and a forward pre-hook computes `weight = weight_orig * mask` before
every forward. Gradients of masked entries are therefore zero and optimizer steps cannot revive them
(the parameter object is kept, so an optimizer built before masking still holds it). `finalize()` makes
the masks permanent (plain `weight` with zeros) — do that before export or `save_pruned`.

Speed: **ONNX Runtime on CPU gains no speed from unstructured or 2:4 sparsity** — its kernels are dense,
so zeros cost the same as any other value; only the file compresses better. 2:4 is a format for sparse
tensor cores (NVIDIA Ampere and later): TensorRT uses it when the engine is built with
`trtexec --sparsity=enable`, which `extras()` records for ModelState.extras["sparsity"]. Report a
speedup only where one was measured on such a target. Structured pruning (`structured.py`,
`transformer.py`) is what makes CPU inference faster.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from compressor.prune.structured import PruningError, check_ratio, match_modules, schedule_ratios

SPARSE_TYPES = (nn.Linear, nn.Conv2d)
PATTERNS = ("unstructured", "2:4")
TRTEXEC_FLAG = "--sparsity=enable"


# --- masks ---------------------------------------------------------------------------------------------


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean keep-mask zeroing the round(sparsity * numel) smallest |w| of one tensor."""
    drop = round(sparsity * weight.numel())
    mask = torch.ones_like(weight, dtype=torch.bool)
    if drop:
        mask.view(-1)[torch.argsort(weight.abs().flatten())[:drop]] = False
    return mask


def _to_groups_last(weight: torch.Tensor) -> torch.Tensor:
    """Move the input (reduction) dim last: Linear (out, in) as is; Conv (K, C, R, S) -> (K, R, S, C),
    the layout sparse tensor cores group by (NVIDIA ASP / TensorRT convention)."""
    return weight.permute(0, 2, 3, 1) if weight.dim() == 4 else weight


def _from_groups_last(weight: torch.Tensor) -> torch.Tensor:
    return weight.permute(0, 3, 1, 2) if weight.dim() == 4 else weight


def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Boolean keep-mask keeping the n largest |w| in every group of m consecutive input elements."""
    grouped = _to_groups_last(weight)
    if grouped.shape[-1] % m:
        raise PruningError(f"input dimension {grouped.shape[-1]} is not a multiple of {m}")
    blocks = grouped.abs().reshape(-1, m)
    keep = torch.zeros_like(blocks, dtype=torch.bool)
    keep.scatter_(1, torch.topk(blocks, n, dim=1).indices, True)
    return _from_groups_last(keep.reshape(grouped.shape)).contiguous()


def satisfies_nm(weight: np.ndarray | torch.Tensor, n: int = 2, m: int = 4, axis: int = -1) -> bool:
    """True if every group of m consecutive elements along `axis` has at most n non-zeros."""
    array = np.moveaxis(np.asarray(weight), axis, -1)
    if array.shape[-1] % m:
        return False
    return bool(((array.reshape(-1, m) != 0).sum(axis=1) <= n).all())


def zero_fraction(model: nn.Module) -> dict[str, float]:
    """Fraction of exact zeros in the (effective) weight of every Linear/Conv2d layer."""
    return {
        name: float((module.weight == 0).float().mean())
        for name, module in model.named_modules()
        if isinstance(module, SPARSE_TYPES)
    }


def make_permanent(model: nn.Module) -> list[str]:
    """Fold every torch.nn.utils.prune mask in `model` into its tensor; returns the layers changed."""
    changed = []
    for name, module in model.named_modules():
        for key in [k for k in list(module._buffers) if k.endswith("_mask")]:
            tensor_name = key[: -len("_mask")]
            if hasattr(module, tensor_name + "_orig"):
                prune.remove(module, tensor_name)
                changed.append(name)
    return changed


def _effective_weight(module: nn.Module) -> torch.Tensor:
    if hasattr(module, "weight_mask"):
        return (module.weight_orig * module.weight_mask).detach()
    return module.weight.detach()


# --- the sparsifier ------------------------------------------------------------------------------------


class Sparsifier:
    """Applies magnitude masks to chosen Linear/Conv2d layers, in one step or gradually.

    The masks make the model smaller when compressed, not faster on ONNX Runtime CPU (dense kernels);
    2:4 pays off only on sparse tensor cores via TensorRT (`extras()["trtexec_flags"]`).

    Args:
        model: masked in place.
        pattern: "unstructured" (per-layer or global magnitude) or "2:4" (2 largest |w| of every 4
            consecutive input elements; for Conv2d along input channels, per output channel and tap).
        sparsity: target fraction of zeros for "unstructured", in [0, 1); fixed at 0.5 for "2:4".
        layers: module globs (default: every Linear/Conv2d). Globs matching no such layer are errors.
        steps, schedule: `step()` calls to reach the target ("agp" cubic or "linear"); "2:4" is one step.
        global_ranking: one magnitude threshold across all chosen layers instead of per layer.
    """

    def __init__(
        self,
        model: nn.Module,
        pattern: str = "unstructured",
        sparsity: float | None = None,
        *,
        layers: Sequence[str] | None = None,
        steps: int = 1,
        schedule: str = "agp",
        global_ranking: bool = False,
    ):
        if pattern not in PATTERNS:
            raise PruningError(f"unknown sparsity pattern '{pattern}'; known: {', '.join(PATTERNS)}")
        if pattern == "2:4":
            if sparsity not in (None, 0.5):
                raise PruningError(f"2:4 sparsity is always 0.5, got sparsity={sparsity}; leave it unset")
            if steps != 1:
                raise PruningError("2:4 sparsity is applied in one step (then fine-tune); use steps=1")
            sparsity = 0.5
        elif sparsity is None:
            raise PruningError("unstructured sparsity needs a target, e.g. sparsity=0.8")
        self.model = model
        self.pattern = pattern
        self.sparsity = check_ratio(sparsity, "sparsity")
        self.global_ranking = global_ranking
        self.ratios = schedule_ratios(self.sparsity, steps, schedule)
        self.steps = steps
        self.step_index = 0
        self.finalized = False
        self.layers = self._select(layers)

    def _select(self, patterns: Sequence[str] | None) -> dict[str, nn.Module]:
        if patterns is None:
            chosen = {n: m for n, m in self.model.named_modules() if isinstance(m, SPARSE_TYPES)}
        else:
            chosen = {}
            for pattern in [patterns] if isinstance(patterns, str) else patterns:
                hits = match_modules(self.model, [pattern], "sparsity layers")
                typed = {n: m for n, m in hits.items() if isinstance(m, SPARSE_TYPES)}
                if not typed:
                    raise PruningError(
                        f"sparsity layers glob '{pattern}' matches {', '.join(list(hits)[:3])}, but no "
                        f"Linear/Conv2d layer; name the layers inside it (e.g. '{pattern}.*')"
                    )
                chosen.update(typed)
        if not chosen:
            raise PruningError(f"{type(self.model).__name__} has no Linear/Conv2d layer to sparsify")
        if self.pattern == "2:4":
            for name, module in chosen.items():
                width = _to_groups_last(module.weight).shape[-1]
                if width % 4:
                    raise PruningError(
                        f"2:4 needs the input dimension of '{name}' ({width}) to be a multiple of 4; "
                        f"leave it out of layers="
                    )
        return chosen

    @property
    def done(self) -> bool:
        return self.step_index >= self.steps

    @property
    def current_sparsity(self) -> float:
        return self.ratios[self.step_index]

    def step(self) -> float:
        """Raise the masks to the next sparsity of the schedule; returns that sparsity."""
        if self.finalized:
            raise PruningError("the masks were made permanent by finalize(); create a new Sparsifier")
        if self.done:
            raise PruningError(f"all {self.steps} sparsity steps are done")
        self.step_index += 1
        target = self.current_sparsity
        with torch.no_grad():
            # Rank the *effective* weights, so entries masked earlier stay masked (monotone schedule).
            weights = {name: _effective_weight(module) for name, module in self.layers.items()}
            if self.pattern == "2:4":
                masks = {name: nm_mask(w) for name, w in weights.items()}
            elif self.global_ranking:
                masks = self._global_masks(weights, target)
            else:
                masks = {name: magnitude_mask(w, target) for name, w in weights.items()}
            for name, module in self.layers.items():
                mask = masks[name].to(module.weight.dtype)
                if hasattr(module, "weight_mask"):
                    module.weight_mask.copy_(mask)
                    # The pre-hook refreshes `weight` only at the next forward; refresh it now.
                    module.weight = module.weight_orig * module.weight_mask
                else:
                    prune.custom_from_mask(module, "weight", mask)
        return target

    @staticmethod
    def _global_masks(weights: dict[str, torch.Tensor], target: float) -> dict[str, torch.Tensor]:
        flat = torch.cat([w.abs().flatten() for w in weights.values()])
        drop = round(target * flat.numel())
        if drop == 0:
            return {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}
        order = torch.argsort(flat)
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep[order[:drop]] = False
        masks, start = {}, 0
        for name, w in weights.items():
            masks[name] = keep[start : start + w.numel()].view_as(w)
            start += w.numel()
        return masks

    def finalize(self) -> dict[str, Any]:
        """Make the masks permanent (plain weights with zeros); returns `extras()`."""
        for module in self.layers.values():
            if hasattr(module, "weight_orig"):
                prune.remove(module, "weight")
        self.finalized = True
        return self.extras()

    def extras(self) -> dict[str, Any]:
        """What ModelState.extras["sparsity"] records for the manifest and the TensorRT path."""
        measured = {
            name: float((_effective_weight(module) == 0).float().mean())
            for name, module in self.layers.items()
        }
        semi = self.pattern == "2:4"
        return {
            "pattern": self.pattern,
            "target": self.current_sparsity,
            "layers": sorted(self.layers),
            "measured": measured,
            # Sparse tensor cores need 2:4; TensorRT uses them only when asked to.
            "tensorrt_sparse_kernels": semi,
            "trtexec_flags": [TRTEXEC_FLAG] if semi else [],
            "onnxruntime_cpu_speedup": False,
        }


def sparsify(
    model: nn.Module, pattern: str = "unstructured", sparsity: float | None = None, **options: Any
) -> dict[str, Any]:
    """One-shot masks made permanent at once (no fine-tuning in between); returns `extras()`."""
    sparsifier = Sparsifier(model, pattern, sparsity, **options)
    sparsifier.step()
    return sparsifier.finalize()


# --- checking exported files ---------------------------------------------------------------------------


def _onnx_weights(path: str | Path) -> list[tuple[str, np.ndarray, int]]:
    """(name, weight array, axis of the input/reduction dim) for every Conv/Gemm/MatMul constant weight;
    weights behind DequantizeLinear (Q/DQ int8) are read as their integer values minus the zero point."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}

    def resolve(name: str) -> tuple[str, np.ndarray] | None:
        if name in initializers:
            return name, initializers[name]
        node = producers.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            return name, numpy_helper.to_array(node.attribute[0].t)
        if node.op_type == "DequantizeLinear":
            source = resolve(node.input[0])
            if source is None:
                return None
            source_name, q = source
            zero = resolve(node.input[2])[1] if len(node.input) > 2 and node.input[2] else np.zeros(1)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if zero.ndim == 1 and zero.size > 1:
                shape = [1] * q.ndim
                shape[axis] = -1
                zero = zero.reshape(shape)
            return source_name, q.astype(np.int64) - zero.astype(np.int64)
        if node.op_type in ("Clip", "Identity"):
            # Brevitas' QCDQ export: int8 weight -> Clip (narrow range) -> DequantizeLinear; zeros stay zeros.
            return resolve(node.input[0])
        if node.op_type == "Transpose":
            source = resolve(node.input[0])
            if source is None:
                return None
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            return source[0], np.transpose(source[1], perm)
        return None

    found = []
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        weight = resolve(node.input[1])
        if weight is None:
            continue
        name, array = weight
        if node.op_type == "Conv":
            axis = 1  # (K, C, R, S): groups along input channels
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis = array.ndim - 1 if trans_b else 0
        else:
            axis = array.ndim - 2  # MatMul B is (..., in, out)
        found.append((name, array, axis))
    return found


def check_2_4(onnx_path: str | Path) -> dict[str, bool]:
    """For each constant Conv/Gemm/MatMul weight in an ONNX file: does it satisfy 2:4 sparsity along
    its input dimension (at most 2 non-zeros in every 4 consecutive elements)? A True here is what
    TensorRT needs for sparse kernels; it says nothing about speed on ONNX Runtime CPU (none).

    Keys are initializer names (the PyTorch parameter name where the exporter kept it, e.g. 'fc.weight';
    MatMul weights of 3-D Linear inputs are stored transposed under generated names). Works on float
    and Q/DQ int8 files.
    """
    return {name: satisfies_nm(array, 2, 4, axis) for name, array, axis in _onnx_weights(onnx_path)}
