"""Reading the user's YAML files (budgets, sweep variants, profiles, recipes) into validated models, with
one-line errors that name the file, the field and what is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from compressor.errors import CompressorError

Model = TypeVar("Model", bound=BaseModel)


def validation_line(exc: ValidationError) -> str:
    """The first problem of a validation error as `field.path: message (got value)`."""
    err = exc.errors()[0]
    path = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after")) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"unknown field '{path}'"
    given = err.get("input")
    scalar = err["type"] != "missing" and given is not None and not isinstance(given, dict | list)
    return f"{path}: {err['msg'].removeprefix('Value error, ')}" + (f" (got {given!r})" if scalar else "")


def load_yaml_model(path: Path, model: type[Model], error: type[CompressorError], what: str) -> Model:
    """`model` validated from the YAML file at `path` (safe_load only); `error` with one line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(f"{path}: {validation_line(exc)}") from None
