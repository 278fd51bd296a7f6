"""Exporting models that take keyword inputs (Hugging Face `input_ids`, `attention_mask`, ...).

The ONNX exporters pass inputs positionally, and a tokenizer's dict order (`input_ids`,
`token_type_ids`, `attention_mask`) is not the order of `BertModel.forward`'s parameters. `KeywordInputs`
takes the tensors positionally in the data's order and calls the model by keyword, returning the one
tensor compared in parity (logits, embedding or last hidden state): the exported file's inputs are
named like the data's keys and have dynamic batch and sequence axes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compressor.models.call import call, primary_output


class KeywordInputs(nn.Module):
    """`module(**dict(zip(names, tensors)))` → its primary output tensor. The wrapped model is `.module`."""

    def __init__(self, module: nn.Module, names: list[str]):
        super().__init__()
        self.module = module
        self.names = list(names)

    def forward(self, *tensors: torch.Tensor, **named: torch.Tensor) -> torch.Tensor:
        # Positional for the exporter; by keyword when parity code calls it with a batch dict.
        return primary_output(self.module(**(named or dict(zip(self.names, tensors)))))


def export_plan(module: nn.Module, batch_inputs: Any) -> tuple[nn.Module, tuple[torch.Tensor, ...], dict[str, Any]]:
    """(module to export, positional example inputs, export_onnx keyword arguments) for one batch.

    Tensor inputs export as they are. Dict inputs export through `KeywordInputs` with their keys as input
    names; axis 0 is the batch and axis 1 the sequence for every input, and for the output when its
    second axis has the sequence length (a last hidden state rather than pooled logits).
    """
    if not isinstance(batch_inputs, dict):
        return module, (batch_inputs[:1],), {}
    names = list(batch_inputs)
    example = {k: v[:1] for k, v in batch_inputs.items()}
    wrapper = KeywordInputs(module, names)
    axes: dict[str, dict[int, str]] = {n: {0: "batch", 1: "sequence"} if example[n].dim() > 1 else {0: "batch"} for n in names}
    was_training = module.training
    with torch.no_grad():
        out = primary_output(call(module.eval(), example))
    module.train(was_training)
    length = example[names[0]].shape[1] if example[names[0]].dim() > 1 else None
    axes["output"] = {0: "batch", 1: "sequence"} if out.dim() > 2 and out.shape[1] == length else {0: "batch"}
    return wrapper, tuple(example.values()), {"input_names": names, "dynamic_axes": axes}
