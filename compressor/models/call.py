"""Calling any model the same way: tensors or Hugging Face keyword inputs in, one primary tensor out."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def primary_output(out: Any) -> Tensor:
    """The tensor compared between teacher and student: logits, an embedding, or the first output."""
    if isinstance(out, Tensor):
        return out
    for name in ("logits", "sentence_embedding", "pooler_output", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is None and isinstance(out, dict):
            value = out.get(name)
        if isinstance(value, Tensor):
            return value
    if isinstance(out, tuple | list) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"cannot find the output tensor in a {type(out).__name__}; return a tensor or logits")


def to_device(inputs: Any, device: torch.device | str) -> Any:
    if isinstance(inputs, Tensor):
        return inputs.to(device)
    if isinstance(inputs, dict):
        return {k: to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(to_device(v, device) for v in inputs)
    return inputs


def example_from_batch(inputs: Any, n: int = 1) -> tuple[Tensor, ...]:
    """The first `n` samples of a batch, as the positional example inputs export uses."""
    if isinstance(inputs, Tensor):
        return (inputs[:n],)
    if isinstance(inputs, dict):
        return tuple(v[:n] for v in inputs.values())
    raise TypeError(f"unsupported batch inputs {type(inputs).__name__}")
