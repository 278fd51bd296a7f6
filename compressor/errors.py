"""Errors a user can act on. The CLI prints them as one line and exits with `exit_code`.

Anything else that escapes is a bug in compressor and keeps its traceback.
"""


class CompressorError(Exception):
    """A problem with the user's input or environment, explained in one line with the fix."""

    exit_code = 2


class RecipeError(CompressorError):
    """The recipe (or an override) is invalid."""


class ModelLoadError(CompressorError):
    """A model entry point or weights file cannot be used."""


class ParityError(CompressorError):
    """The exported file does not compute what the PyTorch model computes."""

    exit_code = 1


class MeasurementError(CompressorError):
    """A benchmark could not be measured (device unreachable, tool missing, garbage output)."""

    exit_code = 3


class MissingExtraError(CompressorError):
    """An optional dependency is not installed."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(f"{purpose} needs the '{package}' package: pip install 'compressor[{extra}]'")


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency, or raise a one-line error naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(module.split(".")[0], extra, purpose) from exc
