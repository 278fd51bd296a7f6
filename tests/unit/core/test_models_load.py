import pytest
import torch

from compressor.errors import ModelLoadError
from compressor.models.load import build_model
from compressor.recipe import ModelSpec


def test_builtin_and_entry_point_models():
    assert isinstance(build_model(ModelSpec(model="digits_student"), "student"), torch.nn.Module)
    model = build_model(ModelSpec(model="torch.nn:Linear", kwargs={"in_features": 3, "out_features": 2}), "student")
    assert isinstance(model, torch.nn.Linear)


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("no_such_pkg.mod:fn", "cannot import 'no_such_pkg.mod'"),
        ("torch.nn:NoSuchThing", "has no attribute 'NoSuchThing'"),
        ("torch:float32", "is not callable"),
        ("math:sqrt", "rejected its kwargs"),
        ("unknown_builtin", "neither a built-in model"),
        ("collections:OrderedDict", "not a torch.nn.Module"),
    ],
)
def test_bad_model_references(ref, message):
    with pytest.raises(ModelLoadError, match=message):
        build_model(ModelSpec(model=ref), "teacher")


def test_weights_are_loaded_safely_and_checked(tmp_path):
    good = tmp_path / "good.pt"
    reference = build_model(ModelSpec(model="digits_student"), "student")
    torch.save(reference.state_dict(), good)
    loaded = build_model(ModelSpec(model="digits_student", weights=good), "teacher")
    assert torch.equal(loaded.classifier.weight, reference.classifier.weight)

    wrong = tmp_path / "wrong.pt"
    torch.save(build_model(ModelSpec(model="digits_teacher"), "t").state_dict(), wrong)
    with pytest.raises(ModelLoadError, match=r"do not match teacher.model \(features.0.weight: file \(64, 1, 3, 3\)"):
        build_model(ModelSpec(model="digits_student", weights=wrong), "teacher")

    pickled = tmp_path / "code.pt"
    torch.save({"model": object()}, pickled)  # arbitrary objects must never be unpickled
    with pytest.raises(ModelLoadError, match="not a loadable state dict"):
        build_model(ModelSpec(model="digits_student", weights=pickled), "teacher")

    with pytest.raises(ModelLoadError, match="does not exist"):
        build_model(ModelSpec(model="digits_student", weights=tmp_path / "missing.pt"), "teacher")
