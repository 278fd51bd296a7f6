"""Built-in example models, usable by name in recipes (`compress models` lists them)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from compressor.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("built-in model")


class DigitsCNN(nn.Module):
    """A plain conv-BN-ReLU stack for 8×8 digits: pooling after the 2nd and 4th block, then a linear head.

    Flatten + Linear instead of global pooling keeps every MAC in ops that ONNX Runtime runs as int8.
    """

    def __init__(self, widths: Sequence[int] = (16, 32), num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, 8
        for index, width in enumerate(widths):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            if index in (1, 3) and size > 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            channels = width
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(channels * size * size, num_classes)

    def forward(self, x):
        return self.classifier(self.flatten(self.features(x)))


@MODELS.register("digits_teacher")
def digits_teacher(num_classes: int = 10) -> nn.Module:
    """528K parameters, 11.9M MACs per image."""
    return DigitsCNN(widths=(64, 128, 128, 256), num_classes=num_classes)


@MODELS.register("digits_assistant")
def digits_assistant(num_classes: int = 10) -> nn.Module:
    """A teacher assistant (TAKD) between the digits teacher and student."""
    return DigitsCNN(widths=(32, 64, 64), num_classes=num_classes)


@MODELS.register("digits_student")
def digits_student(num_classes: int = 10) -> nn.Module:
    """10K parameters (9,978), 0.32M MACs per image."""
    return DigitsCNN(widths=(16, 32), num_classes=num_classes)


@MODELS.register("digits_cnn")
def digits_cnn(widths: Sequence[int] = (16, 32), num_classes: int = 10) -> nn.Module:
    return DigitsCNN(widths=widths, num_classes=num_classes)
