"""The one training loop every training stage shares.

Epochs, optimizer and scheduler from the recipe, a progress bar, evaluation on the validation split after
each epoch, and a checkpoint after each epoch. With `resume`, a stage continues after its last checkpoint,
and a stage that already finished loads its final weights without training again: rerunning an
interrupted recipe with `--resume` redoes nothing that was saved.

Under torchrun the same loop runs in every process with DistributedDataParallel (see `distributed.py`):
each rank trains on its slice of every global batch, metrics are combined over ranks, rank 0 alone writes
checkpoints, and a checkpoint resumes with any number of processes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from compressor.errors import CompressorError
from compressor.models.call import to_device
from compressor.train.distributed import (
    GlobalBatchSampler,
    all_sum,
    barrier,
    is_main,
    training_loader,
    world_size,
)


@dataclass
class FitResult:
    epochs_run: int
    resumed_from: int
    history: list[dict[str, float]] = field(default_factory=list)
    timings: list[dict[str, float]] = field(default_factory=list)  # per epoch run: seconds, samples (global)

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


def build_optimizer(params: Iterable[nn.Parameter], spec) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, spec, epochs: int):
    if spec.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    if spec.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=spec.step_size, gamma=spec.gamma)
    return None


def _atomic_save(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a kill mid-save leaves the previous checkpoint intact


class _Step(nn.Module):
    """One training step's loss as a module, so DistributedDataParallel sees the student and the
    objective's learned parts (regressors, projections) together and averages all of their gradients."""

    def __init__(self, module: nn.Module, extra_modules: nn.Module | None, loss_fn: Callable[..., Tensor]):
        super().__init__()
        self.student = module
        self.extra = extra_modules if extra_modules is not None else nn.ModuleList()
        self.loss_fn = loss_fn

    def forward(self, inputs: Any, target: Tensor | None, index: Tensor | None) -> Tensor:
        return self.loss_fn(inputs, target) if index is None else self.loss_fn(inputs, target, index)


def fit(
    module: nn.Module,
    loss_fn: Callable[..., Tensor],
    train_loader,
    train_spec,
    checkpoint: Path,
    *,
    epochs: int,
    extra_modules: nn.Module | None = None,
    evaluate: Callable[[], dict[str, float]] | None = None,
    resume: bool = False,
    seed: int = 0,
    log: Callable[[str], None] = print,
    show_progress: bool = False,
    label: str = "train",
    on_step: Callable[[int], None] | None = None,
    indexed: bool = False,
    on_epoch_start: Callable[[int], None] | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
) -> FitResult:
    """Train `module` to minimise `loss_fn(inputs, target)` for `epochs` epochs.

    `extra_modules` holds trainable parts of the objective (e.g. FitNets regressors) that are optimised and
    checkpointed with the student but are not part of it. `on_step(global_step)` runs after each optimiser
    step (pruning schedules and sparsity masks use it). With `indexed`, the loss is called as
    `loss_fn(inputs, target, indices)` with each sample's dataset index (teacher cache, PS-KD).
    `on_epoch_start(epoch)` / `on_epoch_end(epoch)` run around each epoch (0-based); the end hook runs
    before the checkpoint is written, so state it synchronises is saved.

    Under torchrun the student and `extra_modules` train in DistributedDataParallel: `data.batch_size` is
    the global batch, split over the processes (see `distributed.GlobalBatchSampler`); rank 0 alone writes
    the checkpoint, which holds the unwrapped state dicts, so any number of processes can resume it.
    """
    loader = training_loader(train_loader, seed, indexed=indexed)
    step_module = _Step(module, extra_modules, loss_fn)
    params = list(step_module.parameters())
    optimizer = build_optimizer(params, train_spec.optimizer)
    scheduler = build_scheduler(optimizer, train_spec.scheduler, epochs)
    start_epoch, history, timings = 0, [], []
    if resume and checkpoint.exists():
        start_epoch, history = _restore(checkpoint, module, extra_modules, optimizer, scheduler)
        log(f"[{label}] resuming after epoch {start_epoch}/{epochs} from {checkpoint}")
    world = world_size()
    runner: nn.Module = step_module
    if world > 1 and start_epoch < epochs:
        from torch.nn.parallel import DistributedDataParallel

        # A QAT stage with delayed quantization leaves the quantizers' scales unused for a while; anything
        # else uses every parameter, and the unused-parameter search would cost a graph traversal per step.
        quantized = any(type(m).__module__.startswith("brevitas") for m in module.modules())
        runner = DistributedDataParallel(step_module, find_unused_parameters=quantized)
    steps_per_epoch = len(loader)
    if train_spec.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, train_spec.max_steps_per_epoch)
    show_progress = show_progress and is_main()
    for epoch in range(start_epoch, epochs):
        _reseed(loader, seed, epoch)  # the same batches whether or not the run was interrupted
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        module.train()
        total, samples = 0.0, 0
        started = time.perf_counter()
        with _progress(show_progress, f"{label} epoch {epoch + 1}/{epochs}", steps_per_epoch) as advance:
            for step, batch in enumerate(loader):
                if step >= steps_per_epoch:
                    break
                inputs, target, index = batch if indexed else (batch[0], batch[1], None)
                inputs = to_device(inputs, train_spec.device)
                target = target.to(train_spec.device) if isinstance(target, Tensor) else None
                local = _batch_len(inputs)
                loss = runner(inputs, target, index)
                finite = bool(torch.isfinite(loss))
                if world > 1:
                    # Ranks decide together: one rank raising alone would leave the others waiting forever.
                    finite = all_sum([0.0 if finite else 1.0])[0] == 0
                if not finite:
                    raise CompressorError(
                        f"[{label}] loss became {loss.item()} at epoch {epoch + 1}, step {step}; lower the learning rate"
                    )
                optimizer.zero_grad(set_to_none=True)
                # DDP averages gradients over ranks; weighting by this rank's share of the global batch makes
                # that average the global batch's mean gradient even when the last batch splits unevenly.
                (loss * _share(loader, step, local, world)).backward()
                if train_spec.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, train_spec.grad_clip)
                optimizer.step()
                if on_step is not None:
                    on_step(epoch * steps_per_epoch + step + 1)
                total += loss.item() * local
                samples += local
                advance()
        if scheduler is not None:
            scheduler.step()
        loss_sum, samples = all_sum([total, float(samples)]) if world > 1 else (total, samples)
        seconds = time.perf_counter() - started
        if on_epoch_end is not None:
            on_epoch_end(epoch)
        metrics = {"epoch": epoch + 1, "loss": loss_sum / max(samples, 1)}
        if evaluate is not None:
            metrics.update(evaluate())
        history.append(metrics)
        throughput = f" ({seconds:.1f} s, {samples / max(seconds, 1e-9):.0f} samples/s)"
        log(f"[{label}] epoch {epoch + 1}/{epochs} " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "epoch") + throughput)
        if is_main():
            _atomic_save(
                {
                    "model": module.state_dict(),
                    "extra": extra_modules.state_dict() if extra_modules is not None else {},
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else {},
                    "epoch": epoch + 1,
                    "history": history,
                    "world_size": world,
                },
                checkpoint,
            )
        barrier()  # nobody starts the next stage (or resumes) before the checkpoint is on disk
        timings.append({"seconds": seconds, "samples": int(samples)})
    return FitResult(epochs_run=epochs - start_epoch, resumed_from=start_epoch, history=history, timings=timings)


def _batch_len(inputs: Any) -> int:
    if isinstance(inputs, dict):
        return len(next(iter(inputs.values())))
    if isinstance(inputs, tuple | list):
        return len(inputs[0])
    return len(inputs)


def _share(loader, step: int, local: int, world: int) -> float:
    sampler = getattr(loader, "batch_sampler", None)
    if world == 1 or not isinstance(sampler, GlobalBatchSampler):
        return 1.0
    return local * world / sampler.global_size(step)


def _restore(checkpoint: Path, module, extra_modules, optimizer, scheduler) -> tuple[int, list]:
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        module.load_state_dict(state["model"])
        if extra_modules is not None and state.get("extra"):
            extra_modules.load_state_dict(state["extra"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CompressorError(
            f"checkpoint '{checkpoint}' does not match this recipe's model ({str(exc).splitlines()[0]}); "
            "rerun without --resume into a new --out directory"
        ) from None
    return int(state["epoch"]), list(state.get("history", []))


def _reseed(loader, seed: int, epoch: int) -> None:
    generator = getattr(loader, "generator", None)
    if generator is not None:
        generator.manual_seed(seed * 100_003 + epoch)
    for sampler in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # GlobalBatchSampler, DistributedSampler
    torch.manual_seed(seed * 100_003 + epoch)


class _progress:
    """A rich progress bar when asked for (interactive runs); a no-op otherwise (tests, CI logs)."""

    def __init__(self, enabled: bool, description: str, total: int):
        self.enabled, self.description, self.total = enabled, description, total

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.progress import Progress

        self._progress = Progress(transient=True)
        self._progress.__enter__()
        task = self._progress.add_task(self.description, total=self.total)
        return lambda: self._progress.advance(task)

    def __exit__(self, *exc):
        if self.enabled:
            self._progress.__exit__(*exc)
        return False
