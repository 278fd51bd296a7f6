"""`package.module:function` references from recipes, imported explicitly (never from YAML tags)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from compressor.errors import ModelLoadError


def load_entry_point(ref: str, what: str) -> Callable[..., Any]:
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ModelLoadError(f"{what} '{ref}': expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(f"{what} '{ref}': cannot import '{module_name}' ({exc}); is it installed or on PYTHONPATH?") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(f"{what} '{ref}': module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelLoadError(f"{what} '{ref}' is not callable")
    return obj
