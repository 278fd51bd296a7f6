"""The shipped sentences: varied, split without overlap, tokenized to a fixed length, no labels."""

import torch

from compressor.data.loaders import build_data
from compressor.data.text import load_sentences, split


def test_sentences_are_many_distinct_and_plain_text():
    texts = load_sentences()
    assert len(texts) >= 300 and len(set(texts)) == len(texts)
    assert all(5 <= len(t.split()) <= 30 for t in texts)
    assert len({t.split()[0].lower() for t in texts}) > 80  # not one template repeated
    assert len({w.lower().strip(".,?!'") for t in texts for w in t.split()}) > 1200


def test_split_is_seeded_disjoint_and_complete():
    train, val = split(320, 0.25, seed=3)
    assert len(val) == 80 and set(train).isdisjoint(val) and sorted(train + val) == list(range(320))
    assert split(320, 0.25, seed=3) == (train, val) and split(320, 0.25, seed=4) != (train, val)


def test_builtin_source_tokenizes_to_a_fixed_length_without_labels():
    data = build_data("sentences", batch_size=16, val_fraction=0.25, seed=0, kwargs={"max_length": 24})
    inputs, target = next(iter(data.train))
    assert target is None and data.num_classes is None
    assert set(inputs) == {"input_ids", "attention_mask"} and inputs["input_ids"].shape == (16, 24)
    assert inputs["input_ids"].dtype == torch.long and bool((inputs["attention_mask"].sum(1) > 2).all())
    assert len(data.train.dataset) == 240 and len(data.val.dataset) == 80
