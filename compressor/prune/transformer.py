"""Structured pruning of Hugging Face BERT-family encoders: attention heads, FFN width and depth.

Importance follows Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and
Knowledge Distillation", arXiv:2407.14679): activation-based scores measured on a few calibration
batches (no labels needed) — a head's output norm, an FFN neuron's mean |activation|, and for depth
the cosine distance of the final hidden state when the block is skipped.

Heads are removed with Hugging Face's own `prune_heads` (it shrinks Q/K/V and the output projection and
keeps `num_attention_heads`/`all_head_size` per layer and `config.pruned_heads` right). FFN neurons are
removed with Torch-Pruning's linear pruning functions; layers are dropped from the ModuleList and
`config.num_hidden_layers` follows. Each function prunes in place and returns a `PruneResult` whose
`record` replays the change on a fresh model (`compressor.prune.structure`). The model gets its own
copy of its config first, so the caller's config object (and constructor) still builds the original.

Supported layout: `model.base_model.encoder.layer[i]` with `.attention.self`/`.attention.output.dense`,
`.intermediate.dense` and `.output.dense` (BERT, RoBERTa, ... in transformers 4.x).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from compressor.prune.structure import REPLAYS
from compressor.prune.structured import (
    PruneResult,
    PruneSummary,
    PruningError,
    call_model,
    check_ratio,
    count_params,
    evaluating,
    kept_count,
)

Batches = Iterable[Any]  # each: input_ids tensor, a tuple of positional inputs, or a dict of kwargs

HEAD_IMPORTANCES = ("activation", "l2", "random")
NEURON_IMPORTANCES = ("activation", "l2", "random")


# --- model access --------------------------------------------------------------------------------------


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks, or a one-line error saying which layout is expected."""
    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(model, "config") or not len(layers):
        raise PruningError(
            f"{type(model).__name__} is not a Hugging Face BERT-family model (expected "
            f"base_model.encoder.layer[i] and .config); use compressor.prune.structured for other models"
        )
    first = layers[0]
    for path in ("attention.self", "attention.output.dense", "intermediate.dense", "output.dense"):
        try:
            first.get_submodule(path)
        except AttributeError:
            raise PruningError(
                f"{type(model).__name__}'s encoder layers have no '{path}'; only BERT-style blocks are supported"
            ) from None
    return layers


def _own_config(model: nn.Module) -> None:
    """Give the model (and every submodule sharing it) a private copy of its config before editing it."""
    old = model.config
    new = copy.deepcopy(old)
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = new


def _heads_of(layer: nn.Module) -> int:
    return layer.attention.self.num_attention_heads


def _batch_mask(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, dict) and batch.get("attention_mask") is not None:
        return batch["attention_mask"].float()
    return None


def _require_batches(calibration: Batches | None, what: str) -> list[Any]:
    batches = list(calibration) if calibration is not None else []
    if not batches:
        raise PruningError(
            f"{what} needs calibration batches (a few tokenized batches of typical inputs); pass calibration=[...]"
        )
    return batches


def _masked_sum(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Sum over batch and sequence of values (b, s, ...), counting only real (unpadded) tokens."""
    if mask is not None:
        values = values * mask.view(*mask.shape, *([1] * (values.dim() - 2)))
    return values.sum(dim=(0, 1))


# --- heads ---------------------------------------------------------------------------------------------


def head_importance(
    model: nn.Module, calibration: Batches | None = None, importance: str = "activation"
) -> list[torch.Tensor]:
    """Importance of each remaining head, one tensor per layer.

    "activation": L2 norm of each head's attention output (input of the output projection) summed over
    calibration tokens (Minitron). "l2": L2 norm of the head's Q/K/V rows and output-projection columns.
    "random": uniform noise (a baseline).
    """
    layers = encoder_layers(model)
    if importance == "random":
        return [torch.rand(_heads_of(layer)) for layer in layers]
    if importance == "l2":
        scores = []
        for layer in layers:
            attn = layer.attention.self
            heads, size = attn.num_attention_heads, attn.attention_head_size
            rows = [
                m.weight.view(heads, size, -1).pow(2).sum(dim=(1, 2))
                for m in (attn.query, attn.key, attn.value)
            ]
            out = layer.attention.output.dense.weight.view(-1, heads, size).pow(2).sum(dim=(0, 2))
            scores.append((sum(rows) + out).sqrt().detach())
        return scores
    if importance != "activation":
        raise PruningError(f"unknown head importance '{importance}'; known: {', '.join(HEAD_IMPORTANCES)}")

    batches = _require_batches(calibration, "activation-based head importance")
    totals = [torch.zeros(_heads_of(layer)) for layer in layers]
    mask: dict[str, torch.Tensor | None] = {"value": None}

    def hook(index: int, layer: nn.Module):
        def pre(_module, args):
            context = args[0]
            heads = _heads_of(layer)
            per_head = context.view(*context.shape[:2], heads, -1).norm(dim=-1)
            totals[index] += _masked_sum(per_head, mask["value"]).float()

        return pre

    handles = [
        layer.attention.output.dense.register_forward_pre_hook(hook(i, layer))
        for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad(), evaluating(model):
            for batch in batches:
                mask["value"] = _batch_mask(batch)
                call_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return totals


def apply_heads(model: nn.Module, heads: dict[int, list[int]]) -> None:
    """Remove heads given by their *original* indices per layer (Hugging Face's convention)."""
    layers = encoder_layers(model)
    for index, original in heads.items():
        layer = layers[int(index)]
        remaining = _heads_of(layer) - len(set(original) - layer.attention.pruned_heads)
        if remaining <= 0:
            raise PruningError(
                f"pruning heads {sorted(original)} would leave layer {index} with no attention head; keep at least one"
            )
        layer.attention.prune_heads(set(original))
        pruned = model.config.pruned_heads
        pruned[int(index)] = sorted(set(pruned.get(int(index), [])) | set(original))


def _original_head_ids(layer: nn.Module) -> list[int]:
    """Original index of each current head (Hugging Face keys pruned heads by original index)."""
    total = _heads_of(layer) + len(layer.attention.pruned_heads)
    return sorted(set(range(total)) - layer.attention.pruned_heads)


def prune_heads(
    model: nn.Module,
    ratio: float | None = None,
    *,
    heads: dict[int, list[int]] | None = None,
    calibration: Batches | None = None,
    importance: str = "activation",
    global_ranking: bool = False,
) -> PruneResult:
    """Remove the least important attention heads (a fraction `ratio` per layer, or across all layers
    with `global_ranking`), or exactly `heads` = {layer: [current head index, ...]}.

    Raises:
        PruningError: ratio outside [0, 1), a layer left with no head, or a non-BERT model.
    """
    layers = encoder_layers(model)
    if (ratio is None) == (heads is None):
        raise PruningError(
            "prune_heads takes either ratio=... or heads={layer: [head, ...]}, not both/neither"
        )
    before = [_heads_of(layer) for layer in layers]
    params_before = count_params(model)

    if heads is None:
        ratio = check_ratio(ratio, "head pruning ratio")
        scores = head_importance(model, calibration, importance)
        heads = _select(scores, ratio, global_ranking, unit="attention head", where="layer")
    else:
        for index, current in heads.items():
            if not 0 <= int(index) < len(layers):
                raise PruningError(f"heads: layer {index} does not exist; the model has {len(layers)} layers")
            bad = [h for h in current if not 0 <= h < before[int(index)]]
            if bad:
                raise PruningError(f"heads: layer {index} has {before[int(index)]} heads, no head {bad[0]}")

    original = {
        int(index): [_original_head_ids(layers[int(index)])[h] for h in sorted(set(current))]
        for index, current in heads.items()
        if current
    }
    for index, ids in original.items():
        if len(ids) >= before[index]:
            raise PruningError(
                f"this would remove all {before[index]} heads of layer {index}; lower the ratio or keep one head"
            )
    _own_config(model)
    apply_heads(model, original)
    after = [_heads_of(layer) for layer in layers]
    summary = PruneSummary(
        ratio=ratio if ratio is not None else 1 - sum(after) / sum(before),
        params_before=params_before,
        params_after=count_params(model),
        channels={f"layer.{i}.attention": (b, a) for i, (b, a) in enumerate(zip(before, after)) if a != b},
    )
    record = {"kind": "heads", "heads": {str(i): ids for i, ids in original.items()}}
    return PruneResult(model=model, summary=summary, record=record)


def _select(
    scores: list[torch.Tensor],
    ratio: float,
    global_ranking: bool,
    unit: str,
    where: str,
    round_to: int | None = None,
) -> dict[int, list[int]]:
    """Indices to remove per layer: the lowest-scoring fraction `ratio` per layer, or overall."""
    chosen: dict[int, list[int]] = {}
    if not global_ranking:
        for index, score in enumerate(scores):
            keep = kept_count(len(score), ratio, round_to)
            if keep <= 0 and ratio > 0:
                rounding = f" with round_to={round_to}" if round_to else ""
                raise PruningError(
                    f"ratio {ratio} would remove every {unit} of {where} {index} ({len(score)}){rounding}; "
                    f"lower the ratio"
                )
            chosen[index] = torch.argsort(score)[: len(score) - keep].tolist()
        return chosen
    flat = torch.cat(scores)
    remove = len(flat) - int(len(flat) * (1 - ratio))
    owner = torch.cat([torch.full((len(s),), i) for i, s in enumerate(scores)])
    offset = torch.cat([torch.arange(len(s)) for s in scores])
    for position in torch.argsort(flat)[:remove].tolist():
        chosen.setdefault(int(owner[position]), []).append(int(offset[position]))
    for index, ids in chosen.items():
        if len(ids) >= len(scores[index]):
            raise PruningError(
                f"global ranking at ratio {ratio} would remove every {unit} of {where} {index}; lower the ratio "
                f"or use per-layer ranking (global_ranking=False)"
            )
    return chosen


# --- FFN width -----------------------------------------------------------------------------------------


def neuron_importance(
    model: nn.Module, calibration: Batches | None = None, importance: str = "activation"
) -> list[torch.Tensor]:
    """Importance of each FFN intermediate neuron, one tensor per layer.

    "activation": mean |activation| after the FFN non-linearity over calibration tokens (Minitron).
    "l2": L2 norm of the neuron's input row and output column. "random": uniform noise.
    """
    layers = encoder_layers(model)
    if importance == "random":
        return [torch.rand(layer.intermediate.dense.out_features) for layer in layers]
    if importance == "l2":
        return [
            (layer.intermediate.dense.weight.pow(2).sum(1) + layer.output.dense.weight.pow(2).sum(0))
            .sqrt()
            .detach()
            for layer in layers
        ]
    if importance != "activation":
        raise PruningError(
            f"unknown neuron importance '{importance}'; known: {', '.join(NEURON_IMPORTANCES)}"
        )

    batches = _require_batches(calibration, "activation-based FFN importance")
    totals = [torch.zeros(layer.intermediate.dense.out_features) for layer in layers]
    mask: dict[str, torch.Tensor | None] = {"value": None}

    def hook(index: int):
        def post(_module, _args, output):
            totals[index] += _masked_sum(output.abs(), mask["value"]).float()

        return post

    handles = [layer.intermediate.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad(), evaluating(model):
            for batch in batches:
                mask["value"] = _batch_mask(batch)
                call_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return totals


def apply_ffn(model: nn.Module, pruned: dict[int, list[int]]) -> None:
    """Remove intermediate neurons (current indices per layer) from each FFN's two linear layers."""
    import torch_pruning as tp

    layers = encoder_layers(model)
    for index, ids in pruned.items():
        layer = layers[int(index)]
        if len(ids) >= layer.intermediate.dense.out_features:
            raise PruningError(f"this would remove every FFN neuron of layer {index}; keep at least one")
        if ids:
            tp.prune_linear_out_channels(layer.intermediate.dense, list(ids))
            tp.prune_linear_in_channels(layer.output.dense, list(ids))
    widths = {layer.intermediate.dense.out_features for layer in layers}
    if len(widths) == 1:
        # Keeps `BertModel(config)` shape-compatible when every layer has the same width.
        model.config.intermediate_size = widths.pop()


def prune_ffn(
    model: nn.Module,
    ratio: float,
    *,
    calibration: Batches | None = None,
    importance: str = "activation",
    global_ranking: bool = False,
    round_to: int | None = None,
) -> PruneResult:
    """Remove the least important FFN intermediate neurons: a fraction `ratio` per layer (rounded down
    to a multiple of `round_to` kept), or across layers with `global_ranking`."""
    layers = encoder_layers(model)
    ratio = check_ratio(ratio, "FFN pruning ratio")
    before = [layer.intermediate.dense.out_features for layer in layers]
    params_before = count_params(model)
    scores = neuron_importance(model, calibration, importance)
    pruned = _select(scores, ratio, global_ranking, unit="FFN neuron", where="layer", round_to=round_to)
    _own_config(model)
    apply_ffn(model, pruned)
    after = [layer.intermediate.dense.out_features for layer in layers]
    summary = PruneSummary(
        ratio=ratio,
        params_before=params_before,
        params_after=count_params(model),
        channels={
            f"layer.{i}.intermediate.dense": (b, a) for i, (b, a) in enumerate(zip(before, after)) if a != b
        },
    )
    record = {"kind": "ffn", "pruned": {str(i): sorted(ids) for i, ids in pruned.items() if ids}}
    return PruneResult(model=model, summary=summary, record=record)


# --- depth ---------------------------------------------------------------------------------------------


def _final_hidden(model: nn.Module, batch: Any) -> torch.Tensor:
    return call_model(model, batch, output_hidden_states=True).hidden_states[-1]


def layer_importance(model: nn.Module, calibration: Batches | None) -> list[float]:
    """Per block: mean cosine distance between the final hidden state of the full model and of the model
    with that block skipped, over real tokens of the calibration batches (Minitron's depth ranking).
    0 means the block changes nothing."""
    layers = encoder_layers(model)
    batches = _require_batches(calibration, "layer importance")
    encoder = model.base_model.encoder
    scores = [0.0] * len(layers)
    weights = 0.0
    try:
        with torch.no_grad(), evaluating(model):
            for batch in batches:
                encoder.layer = layers
                reference = _final_hidden(model, batch)
                mask = _batch_mask(batch)
                mask = torch.ones(reference.shape[:2]) if mask is None else mask
                for skipped in range(len(layers)):
                    encoder.layer = nn.ModuleList([b for i, b in enumerate(layers) if i != skipped])
                    hidden = _final_hidden(model, batch)
                    distance = 1 - nn.functional.cosine_similarity(hidden, reference, dim=-1)
                    scores[skipped] += float((distance * mask).sum())
                weights += float(mask.sum())
    finally:
        encoder.layer = layers
    return [score / weights for score in scores]


def apply_layers(model: nn.Module, keep: list[int]) -> None:
    """Keep only the blocks at indices `keep` (in order); config and per-layer indices follow."""
    layers = encoder_layers(model)
    if not keep:
        raise PruningError("dropping every encoder layer leaves no model; keep at least one layer")
    bad = [i for i in keep if not 0 <= i < len(layers)]
    if bad:
        raise PruningError(f"layer {bad[0]} does not exist; the model has {len(layers)} layers")
    model.base_model.encoder.layer = nn.ModuleList([layers[i] for i in keep])
    config = model.config
    config.num_hidden_layers = len(keep)
    old_pruned = {int(k): v for k, v in (config.pruned_heads or {}).items()}
    config.pruned_heads = {new: old_pruned[old] for new, old in enumerate(keep) if old in old_pruned}
    for new, block in enumerate(model.base_model.encoder.layer):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new  # cache bookkeeping in decoders indexes blocks by position


def prune_layers(
    model: nn.Module,
    ratio: float | None = None,
    *,
    drop: int | list[int] | None = None,
    calibration: Batches | None = None,
) -> PruneResult:
    """Drop whole encoder blocks: the least important fraction `ratio` (needs calibration), the `drop`
    least important ones when `drop` is a count, or exactly the blocks listed when it is a list."""
    layers = encoder_layers(model)
    total = len(layers)
    if (ratio is None) == (drop is None):
        raise PruningError("prune_layers takes either ratio=... or drop=..., not both/neither")
    params_before = count_params(model)
    if isinstance(drop, list):
        removed = sorted(set(drop))
    else:
        count = total - kept_count(total, check_ratio(ratio, "layer pruning ratio")) if drop is None else drop
        if not isinstance(count, int) or count < 0:
            raise PruningError(f"drop={drop!r} must be a non-negative number of layers or a list of indices")
        if count >= total:
            raise PruningError(
                f"dropping {count} of {total} encoder layers leaves none; lower the ratio or drop fewer layers"
            )
        scores = layer_importance(model, calibration) if count else [0.0] * total
        removed = sorted(torch.argsort(torch.tensor(scores))[:count].tolist())
    keep = [i for i in range(total) if i not in removed]
    _own_config(model)
    apply_layers(model, keep)
    summary = PruneSummary(
        ratio=len(removed) / total,
        params_before=params_before,
        params_after=count_params(model),
        channels={"encoder.layer": (total, len(keep))} if removed else {},
    )
    return PruneResult(model=model, summary=summary, record={"kind": "layers", "keep": keep})


# --- replay on a fresh model (see compressor.prune.structure) ------------------------------------------


def _replay_heads(model: nn.Module, record: dict[str, Any]) -> None:
    _own_config(model)
    apply_heads(model, {int(k): v for k, v in record["heads"].items()})


def _replay_ffn(model: nn.Module, record: dict[str, Any]) -> None:
    _own_config(model)
    apply_ffn(model, {int(k): v for k, v in record["pruned"].items()})


def _replay_layers(model: nn.Module, record: dict[str, Any]) -> None:
    _own_config(model)
    apply_layers(model, list(record["keep"]))


for _kind, _replay in (("heads", _replay_heads), ("ffn", _replay_ffn), ("layers", _replay_layers)):
    if _kind not in REPLAYS:
        REPLAYS.add(_kind, _replay)
