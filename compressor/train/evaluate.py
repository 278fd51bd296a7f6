"""Metrics on held-out data. Accuracy for classifiers; cosine to the teacher for embedding models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from compressor.models.call import call, primary_output, to_device


@torch.inference_mode()
def evaluate(
    model: nn.Module, loader: DataLoader, task: str, teacher: nn.Module | None = None, device: str = "cpu"
) -> dict[str, float]:
    was_training = model.training
    model.eval()
    correct = total = 0
    cosine_sum = 0.0
    agree = 0
    for inputs, target in loader:
        inputs = to_device(inputs, device)
        out = primary_output(call(model, inputs))
        teacher_out = primary_output(call(teacher, inputs)) if teacher is not None else None
        total += out.shape[0]
        if task == "classification":
            pred = out.argmax(-1)
            if target is not None:
                correct += (pred == target.to(device)).sum().item()
            if teacher_out is not None:
                agree += (pred == teacher_out.argmax(-1)).sum().item()
        elif teacher_out is not None:
            cosine_sum += F.cosine_similarity(out.flatten(1), teacher_out.flatten(1), dim=-1).sum().item()
    model.train(was_training)
    metrics: dict[str, float] = {}
    if task == "classification":
        metrics["accuracy"] = correct / max(total, 1)
        if teacher is not None:
            metrics["teacher_agreement"] = agree / max(total, 1)
    elif teacher is not None:
        metrics["cosine_to_teacher"] = cosine_sum / max(total, 1)
    return metrics
