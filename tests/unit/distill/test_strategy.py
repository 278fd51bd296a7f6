"""Teacher strategies from the recipe, on tiny digits models: cache, ensemble, assistants, PS-KD, candidates."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from compressor.data.digits import digits_tensors
from compressor.data.loaders import DataBundle
from compressor.distill.strategy import build_teacher, check_recipe
from compressor.distill.teachers import MultiTeacher
from compressor.errors import RecipeError
from compressor.models.builtin import DigitsCNN
from compressor.models.load import build_model
from compressor.recipe import parse_recipe
from compressor.state import RunContext
from compressor.train.stage import train_module

TEACHER = {"model": "digits_cnn", "kwargs": {"widths": [8, 16]}}
STUDENT = {"model": "digits_cnn", "kwargs": {"widths": [4, 4]}}


@pytest.fixture(scope="module")
def data():
    x_tr, y_tr, x_val, y_val = digits_tensors(0.25, 0)
    generator = torch.Generator().manual_seed(0)
    train = DataLoader(TensorDataset(x_tr[:96], y_tr[:96]), batch_size=32, shuffle=True, generator=generator)
    return DataBundle(train=train, val=DataLoader(TensorDataset(x_val[:64], y_val[:64]), batch_size=64), num_classes=10)


def context(tmp_path, data, monkeypatch, **recipe):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    raw = {"student": STUDENT, "teacher": {**TEACHER, "pretrain": {"epochs": 1}}, "train": {"epochs": 1}, **recipe}
    raw = {k: v for k, v in raw.items() if v is not None}
    messages = []
    ctx = RunContext(recipe=parse_recipe(raw), data=data, teacher=None, work_dir=tmp_path / "work", log=messages.append, show_progress=False)
    return ctx, messages


def count_calls(module):
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_cache_runs_the_teacher_once_per_sample_and_gives_the_same_loss(tmp_path, data, monkeypatch):
    ctx, messages = context(tmp_path, data, monkeypatch, distillation={"cache": {"location": "work"}, "losses": [{"name": "hinton"}]})
    student = build_model(ctx.recipe.student, "student")
    teacher = build_teacher(ctx.recipe, ctx, student)
    calls = count_calls(teacher)
    train = ctx.recipe.train.model_copy(update={"epochs": 3})
    result = train_module(student, teacher, ctx.recipe.distillation.losses, {}, train, ctx, "cached", evaluate=lambda: {})
    # One dry-run batch checks the losses, 96 samples in batches of 64 fill the cache, then 3 epochs of
    # training (9 steps) run no teacher forward at all.
    assert len(calls) == 1 + 2 and len(result.history) == 3
    files = list((tmp_path / "work" / "teacher-cache").glob("teacher-*.pt"))
    assert len(files) == 1 and any("teacher cache: 96 teacher answers computed" in m for m in messages)

    # A second run reuses the file: only the dry run.
    again = build_model(ctx.recipe.student, "student")
    train_module(again, teacher, ctx.recipe.distillation.losses, {}, train.model_copy(update={"epochs": 1}), ctx, "again", evaluate=lambda: {})
    assert len(calls) == 3 + 1 and any("teacher cache: reusing" in m for m in messages)

    # A corrupted file fails its sha256: it is recomputed (with a warning), never trusted.
    data_bytes = bytearray(files[0].read_bytes())
    data_bytes[-100] ^= 0xFF
    files[0].write_bytes(bytes(data_bytes))
    with pytest.warns(UserWarning, match="corrupt"):
        train_module(build_model(ctx.recipe.student, "student"), teacher, ctx.recipe.distillation.losses, {}, train.model_copy(update={"epochs": 1}), ctx, "third", evaluate=lambda: {})
    assert len(calls) == 4 + 1 + 2 and sum("answers computed" in m for m in messages) == 2


def test_cached_and_live_teacher_give_identical_losses(tmp_path, data, monkeypatch):
    from compressor.distill.objective import build_objective
    from compressor.distill.strategy import first_batch, open_cache

    ctx, _ = context(tmp_path, data, monkeypatch, distillation={"cache": {"location": "work"}})
    student = build_model(ctx.recipe.student, "student")
    teacher = build_teacher(ctx.recipe, ctx, student)
    taps = {"student": {"f": "features.2"}, "teacher": {"f": "features.2"}}
    spec = parse_recipe({"student": STUDENT, "distillation": {"losses": [{"name": "hinton"}, {"name": "at", "params": {"pairs": [["f", "f"]]}}]}}).distillation.losses
    objective = build_objective(spec, teacher, student=student, batch=first_batch(data.train), taps=taps)
    index = torch.tensor([3, 50, 7])
    x, y = data.train.dataset[index]
    live = objective.compute(student, x, y)
    objective.use_cache(open_cache(objective, data.train, ctx.recipe.distillation.cache, ctx))
    assert objective.indexed
    torch.testing.assert_close(objective.compute(student, x, y, index), live, rtol=0, atol=0)


def test_ensemble_combines_the_teachers_with_normalised_weights(tmp_path, data, monkeypatch):
    ensemble = {"teachers": [{"model": "digits_cnn", "kwargs": {"widths": [8, 8]}, "pretrain": {"epochs": 1}, "weight": 3.0}], "teacher_weight": 1.0}
    ctx, _ = context(tmp_path, data, monkeypatch, distillation={"ensemble": ensemble})
    teacher = build_teacher(ctx.recipe, ctx, build_model(ctx.recipe.student, "student"))
    assert isinstance(teacher, MultiTeacher) and teacher.weights == [0.25, 0.75]
    x = data.val.dataset.tensors[0][:5]
    first, second = teacher.teachers
    torch.testing.assert_close(teacher(x), 0.25 * first(x) + 0.75 * second(x))
    assert all(not p.requires_grad for p in teacher.parameters())


def test_teacher_assistant_is_trained_from_the_teacher_and_becomes_the_teacher(tmp_path, data, monkeypatch):
    assistant = {"model": "digits_cnn", "kwargs": {"widths": [6, 8]}, "epochs": 2, "lr": 0.01}
    ctx, messages = context(tmp_path, data, monkeypatch, distillation={"teacher_assistants": [assistant]})
    student = build_model(ctx.recipe.student, "student")
    teacher = build_teacher(ctx.recipe, ctx, student)
    assert isinstance(teacher, DigitsCNN) and teacher.features[0].out_channels == 6
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    saved = torch.load(tmp_path / "work" / "checkpoints" / "assistant-1.pt", weights_only=True)
    assert saved["epoch"] == 2 and torch.equal(saved["model"]["features.0.weight"], teacher.features[0].weight)
    assert any("assistant-1: distilling digits_cnn from the teacher" in m for m in messages)


def test_pskd_state_is_checkpointed_and_restored(tmp_path, data, monkeypatch):
    ctx, _ = context(tmp_path, data, monkeypatch, teacher=None, distillation={"pskd": {"alpha_T": 0.5}, "losses": [{"name": "soft_ce"}]})
    assert build_teacher(ctx.recipe, ctx, build_model(ctx.recipe.student, "student")) is None
    student = build_model(ctx.recipe.student, "student")
    train = ctx.recipe.train.model_copy(update={"epochs": 2})
    result = train_module(student, None, ctx.recipe.distillation.losses, {}, train, ctx, "pskd", evaluate=lambda: {})
    assert len(result.history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    saved = torch.load(tmp_path / "work" / "checkpoints" / "pskd.pt", weights_only=True)["extra"]["_extra_state"]
    assert bool(saved["pskd_seen"].all())  # every training sample has a prediction after an epoch
    rows = saved["pskd_predictions"].sum(1)
    torch.testing.assert_close(rows, torch.ones_like(rows))  # stored as probabilities


def test_teacher_candidate_with_the_lowest_validation_kl_is_chosen(tmp_path, data, monkeypatch):
    torch.manual_seed(1)
    student = DigitsCNN(widths=(8, 16))
    far = DigitsCNN(widths=(8, 16))
    torch.save(far.state_dict(), tmp_path / "far.pt")
    torch.save(student.state_dict(), tmp_path / "same.pt")  # KL 0 to the student
    ctx, messages = context(tmp_path, data, monkeypatch, teacher={"model": "digits_cnn", "kwargs": {"widths": [8, 16]}},
                            distillation={"teacher_candidates": [str(tmp_path / "far.pt"), str(tmp_path / "same.pt")]})  # fmt: skip
    teacher = build_teacher(ctx.recipe, ctx, student)
    assert torch.equal(teacher.classifier.weight, student.classifier.weight)
    assert any("chose" in m and "same.pt" in m for m in messages)


# --- bad combinations fail before anything trains ----------------------------------------------------------


def test_pskd_with_a_teacher_is_refused(tmp_path, data, monkeypatch):
    ctx, _ = context(tmp_path, data, monkeypatch, distillation={"pskd": True})
    with pytest.raises(RecipeError, match="pskd makes the student its own teacher"):
        build_teacher(ctx.recipe, ctx, build_model(ctx.recipe.student, "student"))


def test_assistant_tap_error_names_the_step_and_nothing_trains(tmp_path, data, monkeypatch):
    losses = [{"name": "at", "params": {"pairs": [["f", "f"]]}}]
    taps = {"student": {"f": "features.5"}, "teacher": {"f": "features.5"}}
    assistant = {"model": "digits_cnn", "kwargs": {"widths": [6]}, "epochs": 1}  # has no features.5
    ctx, _ = context(tmp_path, data, monkeypatch, distillation={"teacher_assistants": [assistant], "losses": losses, "taps": taps})
    with pytest.raises(RecipeError, match=r"teacher_assistants\[0\].*features.5") as info:
        check_recipe(ctx.recipe)
    assert "closest module names" in str(info.value)
    with pytest.raises(RecipeError, match=r"teacher_assistants\[0\]"):
        build_teacher(ctx.recipe, ctx, build_model(ctx.recipe.student, "student"))
    assert not (tmp_path / "cache").exists() and not (tmp_path / "work" / "checkpoints").exists()  # no pretraining ran
