"""Data for a run: a train and a held-out validation loader, from a built-in set or an entry point.

A batch is `(inputs, target)`: `inputs` is a tensor or a dict of tensors (Hugging Face style keyword
arguments), `target` a tensor of labels or None when the teacher's outputs are the only labels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader

from compressor.errors import RecipeError
from compressor.models.entrypoints import load_entry_point
from compressor.registry import Registry


@dataclass
class DataBundle:
    train: DataLoader
    val: DataLoader
    num_classes: int | None = None
    description: str = ""


DATASETS: Registry[Callable[..., DataBundle]] = Registry("built-in dataset")


def build_data(source: str, batch_size: int, val_fraction: float, seed: int, kwargs: dict[str, Any]) -> DataBundle:
    if ":" in source:
        factory = load_entry_point(source, what="data.source")
        result = factory(batch_size=batch_size, **kwargs)
        if isinstance(result, DataBundle):
            return result
        if isinstance(result, tuple) and len(result) == 2 and all(isinstance(x, DataLoader) for x in result):
            return DataBundle(train=result[0], val=result[1], description=source)
        raise RecipeError(
            f"data.source '{source}' must return (train_loader, val_loader) or a DataBundle, "
            f"got {type(result).__name__}"
        )
    import compressor.data.digits  # noqa: F401  (registers the built-in sets)
    import compressor.data.text  # noqa: F401

    if source not in DATASETS:
        raise RecipeError(
            f"data.source '{source}' is neither a built-in dataset ({', '.join(DATASETS.names())}) "
            "nor an entry point 'package.module:function'"
        )
    return DATASETS.get(source)(batch_size=batch_size, val_fraction=val_fraction, seed=seed, **kwargs)
