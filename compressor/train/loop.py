"""The one training loop every training stage shares.

Epochs, optimizer and scheduler from the recipe, a progress bar, evaluation on the validation split after
each epoch, and a checkpoint after each epoch. With `resume`, a stage continues after its last checkpoint,
and a stage that already finished loads its final weights without training again: rerunning an
interrupted recipe with `--resume` redoes nothing that was saved.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from compressor.errors import CompressorError
from compressor.models.call import to_device


@dataclass
class FitResult:
    epochs_run: int
    resumed_from: int
    history: list[dict[str, float]] = field(default_factory=list)

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


def fit(
    module: nn.Module,
    loss_fn: Callable[[object, Tensor | None], Tensor],
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
) -> FitResult:
    """Train `module` to minimise `loss_fn(inputs, target)` for `epochs` epochs.

    `extra_modules` holds trainable parts of the objective (e.g. FitNets regressors) that are optimised and
    checkpointed with the student but are not part of it. `on_step(global_step)` runs after each optimiser
    step (pruning schedules and sparsity masks use it).
    """
    params = list(module.parameters()) + (list(extra_modules.parameters()) if extra_modules is not None else [])
    optimizer = build_optimizer(params, train_spec.optimizer)
    scheduler = build_scheduler(optimizer, train_spec.scheduler, epochs)
    start_epoch, history = 0, []
    if resume and checkpoint.exists():
        start_epoch, history = _restore(checkpoint, module, extra_modules, optimizer, scheduler)
        log(f"[{label}] resuming after epoch {start_epoch}/{epochs} from {checkpoint}")
    steps_per_epoch = len(train_loader)
    if train_spec.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, train_spec.max_steps_per_epoch)
    for epoch in range(start_epoch, epochs):
        _reseed(train_loader, seed, epoch)  # the same batches whether or not the run was interrupted
        module.train()
        total, count = 0.0, 0
        with _progress(show_progress, f"{label} epoch {epoch + 1}/{epochs}", steps_per_epoch) as advance:
            for step, (inputs, target) in enumerate(train_loader):
                if step >= steps_per_epoch:
                    break
                inputs = to_device(inputs, train_spec.device)
                target = target.to(train_spec.device) if isinstance(target, Tensor) else None
                loss = loss_fn(inputs, target)
                if not torch.isfinite(loss):
                    raise CompressorError(
                        f"[{label}] loss became {loss.item()} at epoch {epoch + 1}, step {step}; lower the learning rate"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if train_spec.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, train_spec.grad_clip)
                optimizer.step()
                if on_step is not None:
                    on_step(epoch * steps_per_epoch + step + 1)
                total += loss.item()
                count += 1
                advance()
        if scheduler is not None:
            scheduler.step()
        metrics = {"epoch": epoch + 1, "loss": total / max(count, 1)}
        if evaluate is not None:
            metrics.update(evaluate())
        history.append(metrics)
        log(f"[{label}] epoch {epoch + 1}/{epochs} " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "epoch"))
        _atomic_save(
            {
                "model": module.state_dict(),
                "extra": extra_modules.state_dict() if extra_modules is not None else {},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else {},
                "epoch": epoch + 1,
                "history": history,
            },
            checkpoint,
        )
    return FitResult(epochs_run=epochs - start_epoch, resumed_from=start_epoch, history=history)


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
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)  # DistributedSampler
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
