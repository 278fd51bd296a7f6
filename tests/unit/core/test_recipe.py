from pathlib import Path

import pytest

from compressor.errors import RecipeError
from compressor.recipe import apply_overrides, dump_recipe, load_recipe, parse_recipe

MINIMAL = {"student": {"model": "digits_student"}, "stages": [{"kind": "distill", "epochs": 2}]}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_minimal_recipe_gets_defaults_and_typed_stages():
    recipe = parse_recipe(MINIMAL)
    assert recipe.stages[0].kind == "distill"
    assert recipe.stages[0].epochs == 2
    assert recipe.distillation.losses[0].name == "hinton"
    assert recipe.stage_names() == ["0-distill"]


def test_stage_fields_survive_dump_and_reload():
    recipe = parse_recipe({**MINIMAL, "stages": [{"kind": "qat", "weight_bits": 4}]})
    dumped = dump_recipe(recipe)
    assert "weight_bits: 4" in dumped


def test_example_recipe_is_valid():
    recipe = load_recipe(Path(__file__).parents[3] / "examples" / "digits.yaml")
    assert [s.kind for s in recipe.stages] == ["distill", "qat"]
    assert recipe.budgets is not None and recipe.budgets.is_absolute()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({**MINIMAL, "trian": {}}, "unknown field 'trian'"),
        ({**MINIMAL, "train": {"epochz": 3}}, "unknown field 'train.epochz'; allowed here: device, epochs"),
        ({**MINIMAL, "stages": [{"kind": "quantize"}]}, "stages[0].kind 'quantize' is unknown; allowed: "),
        ({**MINIMAL, "stages": [{"epochs": 1}]}, "stages[0] needs a 'kind'"),
        ({**MINIMAL, "stages": [{"kind": "qat", "weight_bits": 1}]}, "stages[0] (qat): weight_bits"),
        ({**MINIMAL, "stages": [{"kind": "distill", "foo": 1}]}, "stages[0] (distill): unknown field 'foo'"),
        ({**MINIMAL, "train": {"epochs": "many"}}, "train.epochs"),
        ({**MINIMAL, "task": "detection"}, "task"),
        ({"stages": []}, "student"),
    ],
)
def test_bad_recipes_name_the_field(data, expected):
    with pytest.raises(RecipeError) as err:
        parse_recipe(data, source="r.yaml")
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="not valid YAML at line 3"):
        load_recipe(write(tmp_path, "student:\n  model: [unclosed\n"))
    with pytest.raises(RecipeError, match="expected a mapping"):
        load_recipe(write(tmp_path, "- just\n- a list\n"))


def test_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, "student: {model: digits_student}\nstages: [{kind: distill}]\n")
    recipe = load_recipe(path, ["train.epochs=3", "stages.0.lr=0.01", "bench.batches=[1, 8]"])
    assert recipe.train.epochs == 3 and recipe.stages[0].lr == 0.01 and recipe.bench.batches == [1, 8]
    with pytest.raises(RecipeError, match="train.epochs"):
        load_recipe(path, ["train.epochs=abc"])
    with pytest.raises(RecipeError, match="unknown field 'train.nope'"):
        load_recipe(path, ["train.nope=1"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(path, ["train.epochs"])


def test_relative_paths_resolve_against_the_recipe_file(tmp_path):
    path = write(tmp_path, "student: {model: digits_student, weights: w.pt}\nbudgets: b.yaml\n")
    recipe = load_recipe(path)
    assert recipe.student.weights == tmp_path / "w.pt"
    assert recipe.budgets == tmp_path / "b.yaml"


def test_apply_overrides_into_lists():
    data = {"stages": [{"kind": "distill"}]}
    assert apply_overrides(data, ["stages.0.epochs=5"])["stages"][0]["epochs"] == 5
