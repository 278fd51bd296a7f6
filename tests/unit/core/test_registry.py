import pytest

from compressor.errors import CompressorError
from compressor.registry import Registry
from compressor.stages import load_stage_modules


def test_duplicate_registration_is_an_error():
    registry: Registry[int] = Registry("thing")
    registry.add("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        registry.add("a", 2)
    assert registry.get("a") == 1


def test_unknown_name_lists_known_and_suggests():
    registry: Registry[int] = Registry("thing")
    registry.add("hinton", 1)
    registry.add("fitnets", 2)
    with pytest.raises(CompressorError, match="unknown thing 'hintn'; known: fitnets, hinton. Did you mean 'hinton'"):
        registry.get("hintn")


def test_builtin_stages_are_registered():
    stages = load_stage_modules()
    assert {"distill", "qat"} <= set(stages.names())
    spec = stages.get("qat").spec.model_validate({"kind": "qat"})
    assert spec.weight_bits == 8 and spec.reduce_range
