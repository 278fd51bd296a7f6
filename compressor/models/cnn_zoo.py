"""Reference CNNs without torchvision: a ResNet built from transformers' ResNetModel, and a tiny net with
both a residual add and a channel concatenation (the two couplings structured pruning must respect).

Both return plain logits tensors, so they trace, prune and export to ONNX without output wrappers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from compressor.errors import require

RESNET18_DEPTHS = (2, 2, 2, 2)
RESNET18_WIDTHS = (64, 128, 256, 512)


class ResNetClassifier(nn.Module):
    """transformers ResNetModel (conv stem, basic or bottleneck stages) + global pool + Linear head."""

    def __init__(self, body: nn.Module, features: int, num_classes: int):
        super().__init__()
        self.body = body
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.body(pixel_values, return_dict=False)[1]
        return self.classifier(torch.flatten(pooled, 1))


def resnet(
    num_classes: int = 1000,
    *,
    depths: Sequence[int] = RESNET18_DEPTHS,
    widths: Sequence[int] = RESNET18_WIDTHS,
    stem: int | None = None,
    layer_type: str = "basic",
) -> ResNetClassifier:
    """A randomly initialised ResNet; the defaults are ResNet-18's depths and widths (11.7M params at
    1000 classes). Uses transformers (the 'hf' extra), imported here so the package imports fast."""
    transformers = require("transformers", "hf", "the transformers-based ResNet")
    config = transformers.ResNetConfig(
        embedding_size=stem or widths[0],
        hidden_sizes=list(widths),
        depths=list(depths),
        layer_type=layer_type,
        hidden_act="relu",
        downsample_in_first_stage=False,
    )
    return ResNetClassifier(transformers.ResNetModel(config), widths[-1], num_classes)


def resnet18(num_classes: int = 1000) -> ResNetClassifier:
    return resnet(num_classes)


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class ResCatNet(nn.Module):
    """Tiny CNN with a residual add (stem + block must keep equal channels) and a concat of two branches
    (the head's input channels come from both). For fast tests of coupled-layer pruning."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = _conv_bn(3, width)
        self.block = nn.Sequential(_conv_bn(width, width), _conv_bn(width, width))
        self.branch_a = _conv_bn(width, width, stride=2)
        self.branch_b = _conv_bn(width, width, stride=2)
        self.mix = _conv_bn(2 * width, 2 * width)
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.block(x)
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        x = self.mix(x)
        return self.classifier(x.mean(dim=(2, 3)))
