"""Build the teacher and student a recipe names, and load weights safely."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from compressor.errors import ModelLoadError
from compressor.models.builtin import MODELS
from compressor.models.entrypoints import load_entry_point


def build_model(spec, role: str) -> nn.Module:
    """Instantiate `spec.model` (built-in name or entry point) and load `spec.weights` if given."""
    if ":" in spec.model:
        factory = load_entry_point(spec.model, what=f"{role}.model")
    elif spec.model in MODELS:
        factory = MODELS.get(spec.model)
    else:
        raise ModelLoadError(
            f"{role}.model '{spec.model}' is neither a built-in model ({', '.join(MODELS.names())}) "
            "nor an entry point 'package.module:function'"
        )
    try:
        module = factory(**spec.kwargs)
    except TypeError as exc:
        raise ModelLoadError(f"{role}.model '{spec.model}' rejected its kwargs {spec.kwargs}: {exc}") from None
    if not isinstance(module, nn.Module):
        raise ModelLoadError(f"{role}.model '{spec.model}' returned {type(module).__name__}, not a torch.nn.Module")
    if spec.weights is not None:
        load_weights(module, spec.weights, role)
    return module


def load_weights(module: nn.Module, path: Path, role: str) -> None:
    """Load a state dict with `weights_only=True`: a weights file from a user must not run code."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{role}.weights '{path}' does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise ModelLoadError(f"{role}.weights '{path}' is not a loadable state dict: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # our own checkpoints
    if not isinstance(state, dict):
        raise ModelLoadError(f"{role}.weights '{path}' holds a {type(state).__name__}, expected a state dict")
    state = _strip_prefix(state)
    expected = module.state_dict()
    problems = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and hasattr(v, "shape") and v.shape != expected[k].shape
    ]
    problems += [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    if problems:
        more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
        raise ModelLoadError(
            f"{role}.weights '{path}' do not match {role}.model ({problems[0]}{more}); check the model name and kwargs"
        )
    module.load_state_dict(state)


def _strip_prefix(state: dict) -> dict:
    # DataParallel / DDP checkpoints prefix every key with "module."
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


def cache_dir() -> Path:
    root = os.environ.get("COMPRESSOR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "compressor"
    )
    return Path(root)


def teacher_cache_path(recipe) -> Path:
    """Where a pretrained built-in teacher is cached: keyed by everything that determines its weights."""
    key = json.dumps(
        {
            "model": recipe.teacher.model,
            "kwargs": recipe.teacher.kwargs,
            "pretrain": recipe.teacher.pretrain.model_dump(),
            "data": recipe.data.model_dump(mode="json"),
            "seed": recipe.seed,
            "version": 1,
        },
        sort_keys=True,
    )
    return cache_dir() / "teachers" / f"{recipe.teacher.model.replace(':', '_')}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
