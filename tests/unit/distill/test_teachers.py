"""Teachers: freezing, the on-disk cache, top-k logits, several teachers, PS-KD, checkpoint choice by KL."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compressor.distill.losses import Features, build_loss
from compressor.distill.teachers import (
    MultiTeacher,
    ProgressiveTargets,
    TeacherCache,
    combine_logits,
    freeze,
    hash_data,
    pskd_alpha,
    pskd_targets,
    select_teacher_by_kl,
    teacher_forward,
    topk_logits,
    validation_kl,
)
from compressor.errors import RecipeError
from compressor.train.distributed import WithIndex


class Counted(nn.Module):
    def __init__(self, d_in=4, d_out=10):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(x)


def data(n=10, d=4):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, d, generator=g), torch.randint(0, 3, (n,), generator=g))


def run_epoch(cache, dataset, batch_size=4, shuffle=False):
    outputs = {}
    loader = DataLoader(WithIndex(dataset), batch_size=batch_size, shuffle=shuffle)
    for idx, (x, _) in loader:
        feats = cache.features(idx, x)
        for i, row in zip(idx.tolist(), feats.output):
            outputs[i] = row
    return outputs


def test_freeze_and_teacher_forward():
    teacher = Counted()
    teacher.train()
    assert freeze(teacher) is teacher and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()  # a stray train() elsewhere is undone by teacher_forward
    out = teacher_forward(teacher, torch.randn(2, 4))
    assert not teacher.training and out.is_inference() and not out.requires_grad


def test_cache_hit_avoids_recomputation_within_and_across_runs(tmp_path):
    dataset, teacher = data(), Counted()
    cache = TeacherCache(tmp_path, teacher, len(dataset), data_hash=hash_data(dataset))
    first = run_epoch(cache, dataset, shuffle=True)
    assert teacher.calls == 3 and cache.complete and cache.path.exists() and cache.meta_path.exists()
    second = run_epoch(cache, dataset, shuffle=True)
    assert teacher.calls == 3  # no teacher forward in the second epoch
    reloaded = TeacherCache(tmp_path, teacher, len(dataset), data_hash=hash_data(dataset))
    third = run_epoch(reloaded, dataset)
    assert teacher.calls == 3 and reloaded.calls == 0
    expected = teacher.fc(dataset.tensors[0]).detach()
    for i in range(len(dataset)):
        torch.testing.assert_close(first[i], expected[i], rtol=0, atol=1e-6)
        torch.testing.assert_close(second[i], first[i], rtol=0, atol=0)
        torch.testing.assert_close(third[i], first[i], rtol=0, atol=0)


def test_corrupt_cache_is_detected_and_recomputed(tmp_path):
    dataset, teacher = data(), Counted()
    cache = TeacherCache(tmp_path, teacher, len(dataset), data_hash=hash_data(dataset))
    good = run_epoch(cache, dataset)
    raw = bytearray(cache.path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    cache.path.write_bytes(bytes(raw))
    calls = teacher.calls
    with pytest.warns(UserWarning, match="corrupt .*sha256 mismatch.*recomputing"):
        again = TeacherCache(tmp_path, teacher, len(dataset), data_hash=hash_data(dataset))
    assert not again.filled.any()
    recomputed = run_epoch(again, dataset)
    assert teacher.calls == calls + 3
    for i in range(len(dataset)):
        torch.testing.assert_close(recomputed[i], good[i], rtol=0, atol=0)
    TeacherCache(tmp_path, teacher, len(dataset), data_hash=hash_data(dataset))  # loads cleanly, no warning


def test_cache_key_changes_with_teacher_weights_and_data(tmp_path):
    dataset, teacher = data(), Counted()
    a = TeacherCache(tmp_path, teacher, len(dataset), data_hash=hash_data(dataset))
    changed = copy.deepcopy(teacher)
    with torch.no_grad():
        changed.fc.bias[0] += 1
    b = TeacherCache(tmp_path, changed, len(dataset), data_hash=hash_data(dataset))
    other = data()
    other.tensors[0][3, 1] += 1e-3
    c = TeacherCache(tmp_path, teacher, len(dataset), data_hash=hash_data(other))
    assert len({a.key, b.key, c.key}) == 3
    assert hash_data(dataset) == hash_data(data())


def test_cache_rejects_out_of_range_indices(tmp_path):
    dataset = data()
    cache = TeacherCache(tmp_path, Counted(), len(dataset), data_hash="x")
    with pytest.raises(RecipeError, match="out of range"):
        cache.features(torch.tensor([10]), dataset.tensors[0][:1])


def np_softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def test_topk_uniform_keeps_exact_probabilities_and_spreads_the_rest():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0, -2.0]], dtype=torch.float64)
    values, indices = logits.topk(2, dim=-1)
    dense = topk_logits(values, indices, 6, logits.logsumexp(-1), "uniform")
    got = torch.softmax(dense, -1)[0].tolist()
    p = np_softmax(logits[0].tolist())
    rest = (1 - p[3] - p[0]) / 4
    expected = [p[0], rest, rest, p[3], rest, rest]
    assert got == pytest.approx(expected, rel=1e-12)


def test_topk_renormalize_is_softmax_over_the_top_k_only():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0, -2.0]])
    values, indices = logits.topk(3, dim=-1)
    got = torch.softmax(topk_logits(values, indices, 6, mode="renormalize"), -1)[0].tolist()
    top = np_softmax([2.0, 0.5, 3.0])
    assert got == pytest.approx([top[0], 0.0, top[1], top[2], 0.0, 0.0], abs=1e-7)


def test_cache_stores_only_top_k_and_rebuilds_a_distribution(tmp_path):
    dataset, teacher = data(), Counted(d_out=10)
    cache = TeacherCache(tmp_path, teacher, len(dataset), data_hash=hash_data(dataset), top_k=3)
    out = run_epoch(cache, dataset)
    assert "output" not in cache.store and cache.store["topk_values"].shape == (10, 3)
    reloaded = TeacherCache(tmp_path, teacher, len(dataset), data_hash=hash_data(dataset), top_k=3)
    full = teacher.fc(dataset.tensors[0]).detach()
    for i in range(len(dataset)):
        p_exact, p_cached = torch.softmax(full[i], -1), torch.softmax(out[i], -1)
        top = p_exact.topk(3).indices
        torch.testing.assert_close(p_cached[top], p_exact[top], rtol=1e-5, atol=1e-6)
        assert p_cached.sum().item() == pytest.approx(1.0, abs=1e-6)
        torch.testing.assert_close(reloaded.features([i], dataset.tensors[0][i : i + 1]).output[0], out[i])


def test_cache_stores_taps_and_needs_fixed_size_items(tmp_path):
    teacher = Counted()

    def run(x):
        with torch.inference_mode():
            hidden = x * 2
            return Features(teacher.fc(x[:, :4]), {"h": hidden})

    cache = TeacherCache(tmp_path, teacher, 4, data_hash="d", tap_keys=["h"], run=run)
    feats = cache.features(torch.tensor([0, 1]), torch.ones(2, 4))
    assert torch.equal(feats.taps["h"], torch.full((2, 4), 2.0))
    with pytest.raises(RecipeError, match="fixed-size items"):
        cache.features(torch.tensor([2, 3]), torch.ones(2, 5))  # a longer item than the first batch


def test_combine_logits_average_weighted_and_mixture():
    a = torch.tensor([[1.0, 2.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, -1.0, 3.0]], dtype=torch.float64)
    assert combine_logits([a, b]).tolist() == [[0.5, 0.5, 1.5]]
    assert combine_logits([a, b], [3, 1]).tolist() == [[0.75, 1.25, 0.75]]
    mixture = combine_logits([a, b], [3, 1], space="probs").exp()[0].tolist()
    pa, pb = np_softmax([1.0, 2.0, 0.0]), np_softmax([0.0, -1.0, 3.0])
    assert mixture == pytest.approx([0.75 * x + 0.25 * y for x, y in zip(pa, pb)], rel=1e-12)
    with pytest.raises(RecipeError, match="weights has 1 entries for 2 teachers"):
        combine_logits([a, b], [1])
    with pytest.raises(RecipeError, match=r"\(1, 3\).*\(1, 4\)"):
        combine_logits([a, torch.zeros(1, 4, dtype=torch.float64)])


def test_multi_teacher_is_frozen_and_combines():
    t1, t2 = Counted(), Counted()
    multi = MultiTeacher([t1, t2], weights=[1, 1])
    x = torch.randn(3, 4)
    torch.testing.assert_close(multi(x), (t1.fc(x) + t2.fc(x)) / 2)
    assert not any(p.requires_grad for p in multi.parameters())


def test_pskd_alpha_and_targets_by_hand():
    assert pskd_alpha(0, 4, 0.8) == pytest.approx(0.2)
    assert pskd_alpha(3, 4, 0.8) == pytest.approx(0.8)
    targets = pskd_targets(torch.tensor([1]), torch.tensor([[0.2, 0.5, 0.3]]), 0.4)
    assert targets[0].tolist() == pytest.approx([0.08, 0.8, 0.12])
    with pytest.raises(RecipeError, match="outside"):
        pskd_alpha(4, 4)


def test_progressive_targets_use_last_epoch_predictions():
    pskd = ProgressiveTargets(num_items=3, num_classes=3, epochs=2, alpha_T=0.5)
    idx, labels = torch.tensor([0, 2]), torch.tensor([1, 0])
    assert pskd.targets(idx, labels, epoch=0).tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    logits = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    pskd.update(idx, logits)
    got = pskd.targets(idx, labels, epoch=1)  # alpha = 0.5 · 2/2
    p0 = np_softmax([0.0, 1.0, 2.0])
    assert got[0].tolist() == pytest.approx([0.5 * p0[0], 0.5 + 0.5 * p0[1], 0.5 * p0[2]], rel=1e-6)
    assert got[1].tolist() == pytest.approx([0.5 + 0.5 / 3, 0.5 / 3, 0.5 / 3], rel=1e-6)
    # as a teacher for soft_ce: −Σ targets·log q
    student = torch.tensor([[0.3, -0.2, 0.1], [0.0, 2.0, -1.0]], dtype=torch.float64)
    loss = build_loss("soft_ce")(
        Features(student), Features(pskd.teacher_features(idx, labels, 1).output.double())
    )
    expected = (
        sum(
            -sum(t * math.log(q) for t, q in zip(got[n].tolist(), np_softmax(student[n].tolist())))
            for n in range(2)
        )
        / 2
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_select_teacher_by_validation_kl():
    torch.manual_seed(0)
    student = Counted()
    far, near = Counted(), copy.deepcopy(student)
    with torch.no_grad():
        near.fc.weight.add_(0.01)
    loader = DataLoader(data(12), batch_size=5)
    x = data(12).tensors[0]
    p = torch.log_softmax(far.fc(x).detach(), -1)
    q = torch.log_softmax(student.fc(x).detach(), -1)
    expected = (p.exp() * (p - q)).sum(-1).mean().item()
    assert validation_kl(far, student, loader) == pytest.approx(expected, rel=1e-5)
    student.train()
    assert select_teacher_by_kl([far, near], student, loader) == 1
    assert student.training  # restored
