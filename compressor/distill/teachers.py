"""How the teacher is used: frozen, cached on disk, several combined, self-distillation, checkpoint choice.

Teachers never get gradients: `freeze()` puts them in eval mode with requires_grad False, and
`teacher_forward()` runs them under `torch.inference_mode`. Losses copy inference tensors into normal
ones before using them (see `losses.DistillLoss.forward`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from compressor.artifact import sha256_file
from compressor.distill.losses import Features, check_logit_shapes
from compressor.errors import RecipeError
from compressor.models.call import primary_output


def freeze(teacher: nn.Module) -> nn.Module:
    """Eval mode (no dropout, frozen BatchNorm statistics) and no gradients; returns the same module."""
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def call_model(model: nn.Module, inputs: Any, **kwargs: Any) -> Any:
    """Call a model on a batch's inputs: a tensor, a tuple of tensors, or a dict of keyword arguments."""
    if isinstance(inputs, dict):
        return model(**inputs, **kwargs)
    if isinstance(inputs, tuple | list):
        return model(*inputs, **kwargs)
    return model(inputs, **kwargs)


def teacher_forward(teacher: nn.Module, inputs: Any, **kwargs: Any) -> Any:
    """Run a teacher in eval mode under inference_mode (a stray .train() on the teacher is undone)."""
    if teacher.training:
        teacher.eval()
    with torch.inference_mode():
        return call_model(teacher, inputs, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Content hashes
# ---------------------------------------------------------------------------------------------------------


def _update(h: Any, obj: Any) -> None:
    if isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(f"K{k}".encode())
            _update(h, obj[k])
    elif isinstance(obj, list | tuple):
        h.update(f"L{len(obj)}".encode())
        for x in obj:
            _update(h, x)
    elif obj is None or isinstance(obj, str | int | float | bool):
        h.update(f"S{obj!r}".encode())
    else:
        raise TypeError(f"cannot hash a {type(obj).__name__} for the teacher cache key")


def hash_module(module: nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        _update(h, tensor)
    return h.hexdigest()


def hash_data(data: Dataset | Any) -> str:
    """sha256 of a dataset's items (TensorDataset: its tensors), or of any nest of tensors/numbers/strings."""
    h = hashlib.sha256()
    if hasattr(data, "tensors"):
        _update(h, list(data.tensors))
    elif isinstance(data, Dataset) and hasattr(data, "__len__"):
        for i in range(len(data)):
            _update(h, data[i])
    else:
        _update(h, data)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Sparse top-k logits
# ---------------------------------------------------------------------------------------------------------

_RENORMALIZE_MARGIN = 1e4  # logits this far below the top-k get probability exp(-1e4) = 0 in float32


def topk_logits(
    values: Tensor, indices: Tensor, num_classes: int, lse: Tensor | None = None, mode: str = "uniform"
) -> Tensor:
    """Dense logits whose softmax is the distribution reconstructed from top-k teacher logits.

    mode 'uniform': the top-k classes keep their exact probabilities `exp(v − logsumexp(all logits))`
    (`lse` is stored for this) and the remaining mass is spread evenly over the other classes.
    mode 'renormalize': the distribution is the softmax over the top-k logits alone; every other class gets
    probability 0 (reverse-KL-type losses are then infinite: use 'uniform' with them).
    Both are exact at temperature 1; at T≠1 softmax(logits/T) approximates the teacher's tempered softmax.
    """
    k = values.shape[-1]
    if mode == "renormalize":
        rest = values.amin(-1, keepdim=True) - _RENORMALIZE_MARGIN
    elif mode == "uniform":
        if lse is None:
            raise ValueError("top-k mode 'uniform' needs the logsumexp of the full logits")
        lse = lse.unsqueeze(-1)
        kept = (values - lse).exp().sum(-1, keepdim=True)
        if k == num_classes:
            rest = values.amin(-1, keepdim=True)  # nothing to fill
        else:
            per_class = ((1 - kept) / (num_classes - k)).clamp_min(torch.finfo(values.dtype).tiny)
            rest = per_class.log() + lse
    else:
        raise RecipeError(f"top-k mode must be 'uniform' or 'renormalize', got {mode!r}")
    dense = rest.expand(*values.shape[:-1], num_classes).clone()
    return dense.scatter(-1, indices.long(), values)


# ---------------------------------------------------------------------------------------------------------
# The on-disk teacher cache
# ---------------------------------------------------------------------------------------------------------


class TeacherCache:
    """Teacher outputs (and taps) computed once per dataset index, stored on disk, reused every epoch.

    The file name is a content hash of the teacher's weights, the data, and the cache settings, so a
    changed teacher or dataset never reads stale outputs. A sha256 of the file is stored beside it; a file
    that fails the check (or cannot be loaded) is deleted with a warning and recomputed.

    Items must have a fixed shape (pad text to a fixed length), and the inputs must not be randomly
    augmented (the cache keeps the teacher's answer for the first view of each sample).
    With `top_k`, outputs wider than k keep only the top-k logits (+ their logsumexp) and are rebuilt by
    `topk_logits(mode=topk_mode)`. Under DDP give every rank its own directory, or build the cache on one
    rank first: ranks do not coordinate writes.

    Usage: `cache.features(indices, inputs) -> Features` per batch (indices from `compressor.train.distributed.WithIndex`).
    """

    FORMAT = 1

    def __init__(
        self,
        directory: str | Path,
        teacher: nn.Module,
        num_items: int,
        *,
        data_hash: str,
        top_k: int | None = None,
        topk_mode: str = "uniform",
        tap_keys: Sequence[str] = (),
        run: Callable[[Any], Features] | None = None,
    ):
        if top_k is not None and top_k < 1:
            raise RecipeError(f"teacher cache top_k must be >= 1, got {top_k}")
        if topk_mode not in ("uniform", "renormalize"):
            raise RecipeError(
                f"teacher cache topk_mode must be 'uniform' or 'renormalize', got {topk_mode!r}"
            )
        self.teacher = freeze(teacher)
        self.num_items = num_items
        self.top_k, self.topk_mode = top_k, topk_mode
        self.tap_keys = list(tap_keys)
        self.run = run or (lambda inputs: Features(primary_output(teacher_forward(self.teacher, inputs))))
        settings = (
            f"{self.FORMAT}|{hash_module(teacher)}|{data_hash}|{num_items}|{top_k}|{sorted(self.tap_keys)}"
        )
        self.key = hashlib.sha256(settings.encode()).hexdigest()[:24]
        self.directory = Path(directory)
        self.path = self.directory / f"teacher-{self.key}.pt"
        self.meta_path = self.directory / f"teacher-{self.key}.json"
        self.calls = 0  # teacher forward passes made by this cache
        self.filled = torch.zeros(num_items, dtype=torch.bool)
        self.store: dict[str, Tensor] = {}
        self.num_classes: int | None = None
        self._load()

    @property
    def complete(self) -> bool:
        return bool(self.filled.all())

    # --- lookup --------------------------------------------------------------------------------------------
    def features(
        self, indices: Tensor | Sequence[int], inputs: Any, device: torch.device | str | None = None
    ) -> Features:
        """Teacher features for a batch (on `device`, default CPU): cached, or computed for the whole batch."""
        idx = torch.as_tensor(indices).long().cpu().reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_items):
            raise RecipeError(
                f"teacher cache: index out of range for {self.num_items} items (got {idx.tolist()[:5]}...)"
            )
        if not bool(self.filled[idx].all()):
            self.calls += 1
            self._put(idx, self.run(inputs))
            if self.complete:
                self.save()
        feats = self._get(idx)
        if device is None:
            return feats
        return Features(feats.output.to(device), {k: v.to(device) for k, v in feats.taps.items()})

    def _put(self, idx: Tensor, feats: Features) -> None:
        entries: dict[str, Tensor] = {}
        out = feats.output
        if self.top_k is not None and out.shape[-1] > self.top_k:
            values, indices = out.float().topk(self.top_k, dim=-1)
            entries["topk_values"] = values.to(out.dtype)
            entries["topk_indices"] = indices.to(torch.int32 if out.shape[-1] < 2**31 else torch.int64)
            entries["topk_lse"] = out.float().logsumexp(-1)
        else:
            entries["output"] = out
        for key in self.tap_keys:
            if key not in feats.taps:
                raise RecipeError(f"teacher cache: the teacher run did not capture tap '{key}'")
            entries[f"tap.{key}"] = feats.taps[key]
        self.num_classes = out.shape[-1]
        for name, value in entries.items():
            value = value.detach().cpu()
            if value.shape[0] != idx.shape[0]:
                raise RecipeError(
                    f"teacher cache: '{name}' has batch {value.shape[0]} for {idx.shape[0]} indices"
                )
            if name not in self.store:
                self.store[name] = torch.zeros((self.num_items, *value.shape[1:]), dtype=value.dtype)
            elif self.store[name].shape[1:] != value.shape[1:]:
                raise RecipeError(
                    f"teacher cache: '{name}' changed shape from {tuple(self.store[name].shape[1:])} to "
                    f"{tuple(value.shape[1:])} per item; the cache needs fixed-size items (pad to a fixed length)"
                )
            self.store[name][idx] = value
        self.filled[idx] = True

    def _get(self, idx: Tensor) -> Features:
        if "output" in self.store:
            output = self.store["output"][idx]
        else:
            lse = self.store["topk_lse"][idx]
            values = self.store["topk_values"][idx]
            assert self.num_classes is not None
            output = topk_logits(
                values.float(), self.store["topk_indices"][idx], self.num_classes, lse, self.topk_mode
            )
            output = output.to(values.dtype)
        taps = {key: self.store[f"tap.{key}"][idx] for key in self.tap_keys}
        return Features(output=output, taps=taps)

    # --- disk ----------------------------------------------------------------------------------------------
    def save(self) -> None:
        """Write the cache atomically (also a partial one); the sha256 goes to the .json beside it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        payload = {"key": self.key, "filled": self.filled, "num_classes": torch.tensor(self.num_classes or 0)}
        payload.update({f"data.{k}": v for k, v in self.store.items()})
        tmp = self.path.with_suffix(".pt.tmp")
        torch.save(payload, tmp)
        meta = {
            "key": self.key,
            "sha256": sha256_file(tmp),
            "num_items": self.num_items,
            "format": self.FORMAT,
        }
        os.replace(tmp, self.path)
        tmp_meta = self.meta_path.with_suffix(".json.tmp")
        tmp_meta.write_text(json.dumps(meta, indent=1))
        os.replace(tmp_meta, self.meta_path)

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            meta = json.loads(self.meta_path.read_text())
            if meta.get("sha256") != sha256_file(self.path):
                raise ValueError("sha256 mismatch")
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
            if payload.get("key") != self.key or payload["filled"].shape != (self.num_items,):
                raise ValueError("written for another teacher or dataset")
        except Exception as exc:  # any unreadable cache is recomputed, never trusted
            warnings.warn(f"teacher cache {self.path} is corrupt ({exc}); recomputing it", stacklevel=3)
            self.path.unlink(missing_ok=True)
            self.meta_path.unlink(missing_ok=True)
            return
        self.filled = payload["filled"]
        self.num_classes = int(payload["num_classes"]) or None
        self.store = {k[len("data.") :]: v for k, v in payload.items() if k.startswith("data.")}


# ---------------------------------------------------------------------------------------------------------
# Several teachers
# ---------------------------------------------------------------------------------------------------------


def _normalized_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise RecipeError(f"teacher weights has {len(weights)} entries for {n} teachers")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise RecipeError(f"teacher weights must be >= 0 with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    return [w / total for w in weights]


def combine_logits(
    logits: Sequence[Tensor], weights: Sequence[float] | None = None, space: str = "logits"
) -> Tensor:
    """Weighted combination of teacher outputs (weights are normalised to sum to 1).

    space 'logits': Σ w_i·z_i. space 'probs': log Σ w_i·softmax(z_i) — the mixture of the teachers'
    distributions, returned as log-probabilities (valid logits for every loss).
    """
    if not logits:
        raise RecipeError("combine_logits needs at least one teacher output")
    for z in logits[1:]:
        check_logit_shapes("multi-teacher", logits[0], z)
    w = _normalized_weights(weights, len(logits))
    if space == "logits":
        return sum(wi * z for wi, z in zip(w, logits))  # type: ignore[return-value]
    if space == "probs":
        stacked = torch.stack(
            [
                F.log_softmax(z, dim=-1) + math.log(wi) if wi > 0 else torch.full_like(z, -math.inf)
                for wi, z in zip(w, logits)
            ]
        )
        return torch.logsumexp(stacked, dim=0)
    raise RecipeError(f"multi-teacher space must be 'logits' or 'probs', got {space!r}")


class MultiTeacher(nn.Module):
    """Several frozen teachers answering as one: their outputs combined by `combine_logits`."""

    def __init__(
        self, teachers: Sequence[nn.Module], weights: Sequence[float] | None = None, space: str = "logits"
    ):
        super().__init__()
        self.teachers = nn.ModuleList(freeze(t) for t in teachers)
        self.weights = _normalized_weights(weights, len(self.teachers))
        if space not in ("logits", "probs"):
            raise RecipeError(f"multi-teacher space must be 'logits' or 'probs', got {space!r}")
        self.space = space

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        outs = [primary_output(t(*args, **kwargs)) for t in self.teachers]
        return combine_logits(outs, self.weights, self.space)


# ---------------------------------------------------------------------------------------------------------
# Self-distillation: PS-KD
# ---------------------------------------------------------------------------------------------------------


def pskd_alpha(epoch: int, epochs: int, alpha_T: float = 0.8) -> float:
    """PS-KD's `α_t = α_T·t/T` with t = epoch + 1 (epoch counted from 0), as in the reference code."""
    if epochs < 1 or not 0 <= epoch < epochs:
        raise RecipeError(f"PS-KD epoch {epoch} is outside 0..{epochs - 1}")
    return alpha_T * (epoch + 1) / epochs


def pskd_targets(labels: Tensor, previous: Tensor, alpha: float) -> Tensor:
    """`(1 − α)·y + α·p_{t−1}(x)`: one-hot labels softened by the student's own last-epoch predictions."""
    onehot = F.one_hot(labels.long(), previous.shape[-1]).to(previous.dtype)
    return (1 - alpha) * onehot + alpha * previous


class ProgressiveTargets:
    """Progressive self-knowledge distillation (Kim et al., ICCV 2021): the student is its own teacher.

    Each epoch, a sample's target mixes its label with the student's prediction for it from the previous
    epoch (the label itself before the first prediction). Per step:
    `teacher = targets.teacher_features(idx, y, epoch)`, train with loss 'soft_ce' (T=1), then
    `targets.update(idx, student_logits)`.
    """

    def __init__(self, num_items: int, num_classes: int, epochs: int, alpha_T: float = 0.8):
        if not 0 <= alpha_T <= 1:
            raise RecipeError(f"PS-KD alpha_T must be in [0, 1], got {alpha_T}")
        self.epochs, self.alpha_T = epochs, alpha_T
        self.predictions = torch.zeros(num_items, num_classes)
        self.seen = torch.zeros(num_items, dtype=torch.bool)

    def targets(self, indices: Tensor, labels: Tensor, epoch: int) -> Tensor:
        idx = indices.long().cpu()
        onehot = F.one_hot(labels.long().cpu(), self.predictions.shape[1]).to(self.predictions.dtype)
        previous = torch.where(self.seen[idx, None], self.predictions[idx], onehot)
        return pskd_targets(labels.cpu(), previous, pskd_alpha(epoch, self.epochs, self.alpha_T)).to(
            labels.device
        )

    def teacher_features(self, indices: Tensor, labels: Tensor, epoch: int) -> Features:
        """The targets as teacher 'logits' (their log) for loss 'soft_ce' at temperature 1."""
        return Features(output=self.targets(indices, labels, epoch).clamp_min(1e-30).log())

    def update(self, indices: Tensor, student_logits: Tensor) -> None:
        idx = indices.long().cpu()
        self.predictions[idx] = F.softmax(student_logits.detach().float(), dim=-1).cpu()
        self.seen[idx] = True


# ---------------------------------------------------------------------------------------------------------
# Choosing among teacher checkpoints
# ---------------------------------------------------------------------------------------------------------


def _batch_inputs(batch: Any) -> Any:
    """Loaders yield (inputs, target); anything else is taken as the inputs."""
    return batch[0] if isinstance(batch, tuple | list) else batch


def validation_kl(
    teacher: nn.Module,
    student: nn.Module,
    loader: Iterable,
    temperature: float = 1.0,
    max_batches: int | None = None,
) -> float:
    """Mean KL(p_T ‖ q_S) over validation positions at temperature T (no T² factor)."""
    was_training = student.training
    student.eval()
    total, count = 0.0, 0
    try:
        with torch.inference_mode():
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                inputs = _batch_inputs(batch)
                t_out = primary_output(teacher_forward(teacher, inputs))
                s_out = primary_output(call_model(student, inputs))
                check_logit_shapes("teacher selection", s_out, t_out)
                log_p = F.log_softmax(t_out.float() / temperature, dim=-1)
                log_q = F.log_softmax(s_out.float() / temperature, dim=-1)
                kl = (log_p.exp() * (log_p - log_q)).sum(-1)
                total += float(kl.sum())
                count += kl.numel()
    finally:
        student.train(was_training)
    if count == 0:
        raise RecipeError("teacher selection: the validation loader yielded no batches")
    return total / count


def select_teacher_by_kl(
    candidates: Sequence[nn.Module], student: nn.Module, loader: Iterable, temperature: float = 1.0
) -> int:
    """Index of the candidate teacher (e.g. checkpoints along its training) closest to the student.

    Lowest validation KL(p_T ‖ q_S): the checkpoint the student can follow best — the idea behind
    route-constrained optimisation (Jin et al., ICCV 2019) and checkpoint teachers (Wang et al., 2022).
    Ties go to the earlier candidate.
    """
    if not candidates:
        raise RecipeError("teacher selection needs at least one candidate teacher")
    kls = [validation_kl(freeze(c), student, loader, temperature) for c in candidates]
    return min(range(len(kls)), key=lambda i: (kls[i], i))


__all__ = [
    "freeze",
    "call_model",
    "teacher_forward",
    "hash_module",
    "hash_data",
    "topk_logits",
    "TeacherCache",
    "combine_logits",
    "MultiTeacher",
    "pskd_alpha",
    "pskd_targets",
    "ProgressiveTargets",
    "validation_kl",
    "select_teacher_by_kl",
]
