"""Save a pruned model as data (structure JSON + tensor-only state dict) and rebuild it.

A pruned model's architecture differs from what its constructor builds, so pickling the module is the
usual way out (and needs `weights_only=False`, i.e. trusting the file to run code). Instead we keep the
records each pruning step returns (channels removed, heads, FFN neurons, layers dropped, in order) and
replay them on a freshly constructed *original* model, then load the weights with `weights_only=True`.

Files written by `save_pruned(model, records, directory)`:
    structure.json   {"format", "version", "records": [...], "shapes": {state-dict key: shape}}
    weights.pt       torch.save of the state dict (tensors only)
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.prune.structured import PruningError
from compressor.registry import Registry

FORMAT = "compressor.pruned-structure"
VERSION = 1
STRUCTURE_FILE = "structure.json"
WEIGHTS_FILE = "weights.pt"

# record kind -> function(model, record) that applies it to the model in place.
REPLAYS: Registry[Callable[[nn.Module, dict[str, Any]], None]] = Registry("pruning record kind")
_BUILTIN_REPLAY_MODULES = ("compressor.prune.transformer",)


def _load_replays() -> None:
    if "channels" not in REPLAYS:
        from compressor.prune.structured import replay_channels

        REPLAYS.add("channels", replay_channels)
    for module in _BUILTIN_REPLAY_MODULES:
        importlib.import_module(module)


def shapes_of(model: nn.Module) -> dict[str, list[int]]:
    return {key: list(value.shape) for key, value in model.state_dict().items()}


def _check_no_masks(model: nn.Module) -> None:
    masked = sorted({key.rsplit(".", 1)[0] for key in model.state_dict() if key.endswith("_mask")})
    if masked:
        raise PruningError(
            f"sparsity masks are still attached to {', '.join(masked[:3])}{' ...' if len(masked) > 3 else ''}; "
            f"call Sparsifier.finalize() (or compressor.prune.sparsity.make_permanent) before saving"
        )


def structure_of(model: nn.Module, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The JSON-able structure: the records in order plus the resulting tensor shapes (for checking)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": type(model).__name__,
        "records": list(records),
        "shapes": shapes_of(model),
    }


def save_pruned(model: nn.Module, records: Sequence[dict[str, Any]], directory: str | Path) -> Path:
    """Write structure.json and weights.pt into `directory` (created if missing); returns the directory."""
    _check_no_masks(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    structure = structure_of(model, records)
    (directory / STRUCTURE_FILE).write_text(json.dumps(structure, indent=1))
    tensors = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    torch.save(tensors, directory / WEIGHTS_FILE)
    return directory


def read_structure(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / STRUCTURE_FILE
    try:
        structure = json.loads(path.read_text())
    except FileNotFoundError:
        raise PruningError(f"no pruned structure at {path}; save one with save_pruned()") from None
    except json.JSONDecodeError as exc:
        raise PruningError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if structure.get("format") != FORMAT or structure.get("version") != VERSION:
        raise PruningError(
            f"{path} is not a {FORMAT} v{VERSION} file (format={structure.get('format')!r}, "
            f"version={structure.get('version')!r})"
        )
    return structure


def rebuild(build: Callable[[], nn.Module], structure: dict[str, Any] | str | Path) -> nn.Module:
    """Construct the original model with `build()` and replay the pruning records on it.

    The weights are those of a fresh model; `load_pruned` also loads the saved state dict.

    Raises:
        PruningError: unknown record kind, or the result's shapes differ from the saved ones (the
            constructor does not build the original architecture the structure was recorded on).
    """
    if not isinstance(structure, dict):
        structure = read_structure(structure)
    _load_replays()
    model = build()
    for record in structure["records"]:
        REPLAYS.get(record["kind"])(model, record)
    _check_shapes(model, structure["shapes"])
    return model


def _check_shapes(model: nn.Module, expected: dict[str, list[int]]) -> None:
    actual = shapes_of(model)
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    wrong = [key for key in expected if key in actual and actual[key] != expected[key]]
    if missing or extra or wrong:
        if wrong:
            key = wrong[0]
            detail = f"'{key}' is {actual[key]}, the structure says {expected[key]}"
        elif missing:
            detail = f"'{missing[0]}' is missing"
        else:
            detail = f"'{extra[0]}' is not in the structure"
        raise PruningError(
            f"the rebuilt {type(model).__name__} does not match the saved structure ({detail}, "
            f"{len(missing) + len(extra) + len(wrong)} tensors differ); pass the constructor of the original, "
            f"unpruned model"
        )


def load_pruned(build: Callable[[], nn.Module], directory: str | Path) -> nn.Module:
    """Rebuild the pruned architecture from `directory`/structure.json and load `weights.pt` into it with
    `torch.load(..., weights_only=True)` (no code from the file is run)."""
    directory = Path(directory)
    model = rebuild(build, directory / STRUCTURE_FILE)
    state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model
