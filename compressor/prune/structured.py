"""Structured (channel/filter) pruning of CNNs through Torch-Pruning's DependencyGraph.

Channels are removed for real: convolutions, BatchNorms and the layers they feed shrink, and coupled
layers (residual adds, concatenations, depthwise convs) are pruned together by Torch-Pruning, so the
pruned model is physically smaller and faster. This module is the adapter: importance criteria by name,
layer globs, schedules, bad-input checks, and a JSON-able record of what was removed
(see `compressor.prune.structure` to save and rebuild it).

The model is pruned in place. A stage calls `ChannelPruner.step()` between fine-tuning epochs for an
iterative schedule (cubic AGP by default); `prune_channels()` is the one-shot form.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from difflib import get_close_matches
from typing import Any

import torch
from torch import nn

from compressor.errors import CompressorError
from compressor.registry import Registry

Inputs = torch.Tensor | tuple[torch.Tensor, ...]
LossFn = Callable[[nn.Module, Any], torch.Tensor]


class PruningError(CompressorError):
    """A pruning request cannot be carried out as asked (bad ratio, glob, or an untraceable model)."""


# --- importance criteria -------------------------------------------------------------------------------


def _tp():
    import torch_pruning

    return torch_pruning


IMPORTANCES: Registry[Callable[[], Any]] = Registry("importance criterion")
IMPORTANCES.add("l1", lambda: _tp().importance.MagnitudeImportance(p=1))
IMPORTANCES.add("l2", lambda: _tp().importance.MagnitudeImportance(p=2))
# Network Slimming (Liu et al. 2017): |gamma| of the BatchNorm after each conv.
IMPORTANCES.add("bn_scale", lambda: _tp().importance.BNScaleImportance())
# First-order Taylor (Molchanov et al. 2019): |w * dL/dw|, needs gradients from calibration batches.
IMPORTANCES.add("taylor", lambda: _tp().importance.TaylorImportance())
IMPORTANCES.add("random", lambda: _tp().importance.RandomImportance())

NEEDS_GRADIENTS = frozenset({"taylor"})


# --- schedules -----------------------------------------------------------------------------------------


def agp_ratio(step: int, total_steps: int, final_ratio: float, initial_ratio: float = 0.0) -> float:
    """Cubic gradual-pruning ratio after `step` of `total_steps` (Zhu & Gupta 2017, "To prune, or not to
    prune", arXiv:1710.01878): r_k = r_f + (r_i - r_f) * (1 - k/n)^3.

    Prunes fast while the network has redundancy and slowly near the target. Step 0 gives
    `initial_ratio`; step `total_steps` (or later) gives `final_ratio`.
    """
    if total_steps < 1:
        raise PruningError(f"total_steps={total_steps}: an AGP schedule needs at least 1 step")
    if step < 0:
        raise PruningError(f"step={step}: steps count from 0")
    progress = min(step, total_steps) / total_steps
    return final_ratio + (initial_ratio - final_ratio) * (1.0 - progress) ** 3


def schedule_ratios(final_ratio: float, steps: int, schedule: str = "agp") -> list[float]:
    """Cumulative ratio after each of `steps` steps, starting with 0.0 (length steps + 1).

    "agp" is cubic (`agp_ratio`), "linear" grows evenly; with steps=1 both are one-shot.
    """
    if steps < 1:
        raise PruningError(f"steps={steps}: need at least 1 pruning step")
    if schedule == "agp":
        return [agp_ratio(k, steps, final_ratio) for k in range(steps + 1)]
    if schedule == "linear":
        return [final_ratio * k / steps for k in range(steps + 1)]
    raise PruningError(f"unknown schedule '{schedule}'; known: agp, linear")


def check_ratio(ratio: float, what: str = "pruning ratio") -> float:
    """Raise unless 0 <= ratio < 1 (1 would remove everything)."""
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0.0 <= float(ratio) < 1.0:
        raise PruningError(f"{what} {ratio!r} is outside [0, 1); e.g. 0.5 removes half the channels")
    return float(ratio)


# --- module names and globs ----------------------------------------------------------------------------


def match_modules(model: nn.Module, patterns: Sequence[str], what: str) -> dict[str, nn.Module]:
    """Modules whose names match any glob; a glob that matches nothing is an error listing close names."""
    if isinstance(patterns, str):
        patterns = [patterns]
    names = {name: module for name, module in model.named_modules() if name}
    matched: dict[str, nn.Module] = {}
    for pattern in patterns:
        hits = {name: module for name, module in names.items() if fnmatch.fnmatchcase(name, pattern)}
        if not hits:
            close = get_close_matches(pattern.replace("*", ""), list(names), n=3, cutoff=0.4)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise PruningError(f"{what} glob '{pattern}' matches no module of {type(model).__name__}{hint}")
        matched.update(hits)
    return matched


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, list | tuple):
        for item in output:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def call_model(model: nn.Module, inputs: Any, **kwargs: Any) -> Any:
    """Run `model` on a tensor, a tuple of positional inputs, or a dict of keyword inputs."""
    if isinstance(inputs, dict):
        return model(**inputs, **kwargs)
    if isinstance(inputs, list | tuple):
        return model(*inputs, **kwargs)
    return model(inputs, **kwargs)


@contextmanager
def evaluating(model: nn.Module):
    """eval() for the duration, so checks and tracing do not update BatchNorm statistics; every
    module's own training flag is restored afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def find_classifier(model: nn.Module, example_inputs: Inputs) -> str | None:
    """Name of the Linear/Conv layer whose output is the model's output (pruning it would change the
    number of classes); falls back to the last Linear layer."""
    produced: dict[int, str] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.modules.conv._ConvNd):
            hooks.append(
                module.register_forward_hook(
                    lambda _m, _i, out, name=name: produced.__setitem__(id(out), name)
                )
            )
    try:
        with torch.no_grad(), evaluating(model):
            output = _first_tensor(call_model(model, example_inputs))
    finally:
        for hook in hooks:
            hook.remove()
    if output is not None and id(output) in produced:
        return produced[id(output)]
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return linears[-1] if linears else None


@contextmanager
def _module_tracker():
    """Record which module was running, and which last finished, so failures can name a module."""
    state: dict[str, Any] = {"stack": [], "last_done": None}

    def enter(name):
        return lambda _m, _i: state["stack"].append(name)

    def leave(name):
        def hook(_m, _i, _o):
            state["stack"].pop()
            state["last_done"] = name

        return hook

    hooks = []

    def attach(model: nn.Module) -> None:
        for name, module in model.named_modules():
            if name:
                hooks.append(module.register_forward_pre_hook(enter(name)))
                hooks.append(module.register_forward_hook(leave(name)))

    state["attach"] = attach
    try:
        yield state
    finally:
        for hook in hooks:
            hook.remove()


def _describe_failure(exc: Exception, state: dict[str, Any]) -> tuple[str, str | None]:
    running = state["stack"][-1] if state["stack"] else None
    suspect = running or state["last_done"]
    where = (
        f"inside module '{running}'"
        if running
        else (
            f"in the model's own forward, after module '{state['last_done']}'"
            if state["last_done"]
            else "in the model's own forward"
        )
    )
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{where}: {type(exc).__name__}: {message}", suspect


def _run_tracked(model: nn.Module, example_inputs: Inputs) -> tuple[Exception, str, str | None] | None:
    """Run the model once; on failure return (exception, where it failed, module to blame)."""
    with _module_tracker() as state:
        state["attach"](model)
        try:
            with torch.no_grad(), evaluating(model):
                call_model(model, example_inputs)
        except Exception as exc:  # reported to the user as one line by the callers
            return (exc, *_describe_failure(exc, state))
    return None


def check_inputs(model: nn.Module, example_inputs: Inputs) -> None:
    """Fail early, naming the module, when the model cannot run on the example inputs at all."""
    failure = _run_tracked(model, example_inputs)
    if failure is not None:
        exc, where, _ = failure
        raise PruningError(
            f"{type(model).__name__} fails on example_inputs {where}; pass a batch the model accepts"
        ) from exc


def check_runs(model: nn.Module, example_inputs: Inputs, after: str) -> None:
    """Run the pruned model once; on failure name the module/op and suggest ignoring it."""
    failure = _run_tracked(model, example_inputs)
    if failure is not None:
        exc, where, suspect = failure
        fix = f"add ignore=['{suspect}']" if suspect else "ignore the layers feeding that op"
        raise PruningError(
            f"the model no longer runs {after}, {where}. Torch-Pruning could not trace an op there "
            f"(e.g. a reshape with a hard-coded channel count): {fix}, or write the op with -1/x.shape"
        ) from exc


# --- results -------------------------------------------------------------------------------------------


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs_params(model: nn.Module, example_inputs: Inputs) -> tuple[int, int]:
    """(MACs, params) for one forward on `example_inputs`, counted by Torch-Pruning."""
    with torch.no_grad():
        macs, params = _tp().utils.count_ops_and_params(model, _as_tp_inputs(example_inputs))
    return int(macs), int(params)


@dataclass
class PruneSummary:
    """What a pruning step did; `channels` maps each pruned layer to (out channels before, after)."""

    ratio: float
    params_before: int
    params_after: int
    macs_before: int | None = None
    macs_after: int | None = None
    channels: dict[str, tuple[int, int]] = field(default_factory=dict)
    untraced: list[str] = field(default_factory=list)

    @property
    def params_kept(self) -> float:
        return self.params_after / self.params_before

    @property
    def macs_kept(self) -> float | None:
        if self.macs_before is None or self.macs_after is None:
            return None
        return self.macs_after / self.macs_before

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PruneResult:
    """The pruned model (same object, pruned in place), what changed, and the record to rebuild it."""

    model: nn.Module
    summary: PruneSummary
    record: dict[str, Any]


# --- the pruner ----------------------------------------------------------------------------------------


def _out_channels(model: nn.Module) -> dict[str, int]:
    channels = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            channels[name] = module.out_channels
        elif isinstance(module, nn.Linear):
            channels[name] = module.out_features
    return channels


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Cross-entropy of the model's output on an (inputs, labels) batch, for Taylor importance."""
    if not (isinstance(batch, list | tuple) and len(batch) == 2):
        raise PruningError(
            "Taylor importance needs a loss: pass loss_fn=(model, batch) -> scalar, or batches of "
            "(inputs, labels) for the default cross-entropy"
        )
    inputs, labels = batch
    return nn.functional.cross_entropy(_first_tensor(call_model(model, inputs)), labels)


class ChannelPruner:
    """Prunes channels of `model` in place, in one step or several (iterative/AGP schedules).

    Args:
        model: the network; pruned in place. Its final classifier is never pruned.
        example_inputs: a batch the model accepts (a tensor or a tuple of tensors), used for tracing.
        ratio: target fraction of channels removed per layer (or overall with global_pruning), in [0, 1).
        importance: "l1", "l2", "bn_scale", "taylor" (needs calibration + loss per step) or "random".
        global_pruning: rank channels across all layers instead of per layer.
        layer_ratios: {module glob: ratio} overriding `ratio` for matching layers.
        ignore: module globs never pruned (their inputs may still shrink when coupled).
        round_to: keep channel counts a multiple of this (e.g. 8 for vector units/tensor cores).
        steps: number of `step()` calls to reach `ratio`; schedule "agp" (cubic) or "linear".

    Raises:
        PruningError: bad ratio or glob, a ratio that empties a layer (checked up front for per-layer
            ratios; with global_pruning Torch-Pruning instead leaves such a layer unpruned), a model
            that cannot be traced, or a pruned model that no longer runs (it is then left pruned:
            rebuild it and pass the suggested `ignore`).
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Inputs,
        ratio: float,
        *,
        importance: str = "l2",
        global_pruning: bool = False,
        layer_ratios: dict[str, float] | None = None,
        ignore: Sequence[str] = (),
        round_to: int | None = None,
        steps: int = 1,
        schedule: str = "agp",
        output_transform: Callable[[Any], torch.Tensor] | None = None,
    ):
        tp = _tp()
        self.model = model
        self.example_inputs = example_inputs
        self.ratio = check_ratio(ratio)
        self.importance_name = importance
        self.global_pruning = global_pruning
        self.round_to = round_to
        if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
            raise PruningError(f"round_to={round_to!r} must be a positive integer such as 8")
        self.ratios = schedule_ratios(self.ratio, steps, schedule)
        self.steps = steps
        self.step_index = 0
        importance_obj = IMPORTANCES.get(importance)()

        ignored = match_modules(model, list(ignore), "ignore") if ignore else {}
        check_inputs(model, example_inputs)
        self.classifier = find_classifier(model, example_inputs)
        if self.classifier is not None:
            ignored[self.classifier] = model.get_submodule(self.classifier)
        self.ignored = sorted(ignored)

        per_module: dict[nn.Module, float] = {}
        self.layer_ratios: dict[str, float] = {}
        for pattern, layer_ratio in (layer_ratios or {}).items():
            check_ratio(layer_ratio, f"layer_ratios['{pattern}']")
            for name, module in match_modules(model, [pattern], "layer_ratios").items():
                per_module[module] = float(layer_ratio)
                self.layer_ratios[name] = float(layer_ratio)

        def scheduler(final: float, n: int) -> list[float]:
            return schedule_ratios(final, n, schedule)

        with _module_tracker() as state, evaluating(model):
            state["attach"](model)
            try:
                # Fresh dicts: MetaPruner's defaults for these are shared mutable dicts that it mutates.
                self._pruner = tp.pruner.MetaPruner(
                    model,
                    example_inputs=_as_tp_inputs(example_inputs),
                    importance=importance_obj,
                    global_pruning=global_pruning,
                    pruning_ratio=self.ratio,
                    pruning_ratio_dict=per_module or None,
                    iterative_steps=steps,
                    iterative_pruning_ratio_scheduler=scheduler,
                    ignored_layers=list(ignored.values()),
                    round_to=round_to,
                    in_channel_groups={},
                    out_channel_groups={},
                    num_heads={},
                    output_transform=output_transform,
                )
            except Exception as exc:  # TP raises many kinds while tracing; report the place
                where, suspect = _describe_failure(exc, state)
                hint = f"ignore=['{suspect}'] or " if suspect else ""
                raise PruningError(
                    f"Torch-Pruning could not trace {type(model).__name__} {where}; try {hint}check that "
                    f"example_inputs is a batch the model accepts"
                ) from exc

        graph = self._pruner.DG
        prunable = [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear | nn.modules.conv._ConvNd) and name not in ignored
        ]
        self.untraced = [name for name in prunable if model.get_submodule(name) not in graph.module2node]
        if prunable and len(self.untraced) == len(prunable):
            raise PruningError(
                f"Torch-Pruning traced no layer of {type(model).__name__}: its output has no autograd graph "
                f"(detach, argmax or integer ops at the end?); pass output_transform= to pick a float output"
            )
        if self.untraced:
            warnings.warn(
                f"layers not reached by the dependency graph are left unpruned: {', '.join(self.untraced)}",
                stacklevel=2,
            )
        if not global_pruning:
            self._check_no_layer_emptied()

        self.params_initial = count_params(model)
        self.macs_initial, _ = count_macs_params(model, example_inputs)
        self._channels_initial = _out_channels(model)

    def _check_no_layer_emptied(self) -> None:
        """With per-layer ratios the kept count is known up front: refuse a ratio that keeps nothing."""
        graph = self._pruner.DG
        for group in graph.get_all_groups(
            ignored_layers=self._pruner.ignored_layers, root_module_types=self._pruner.root_module_types
        ):
            root = group[0].dep.target.module
            name = graph._module2name.get(root, type(root).__name__)
            channels = graph.get_out_channels(root)
            if channels is None:
                continue
            ratio = self.ratio
            for dep, _ in group:
                target = dep.target.module
                if target in self._pruner.pruning_ratio_dict:
                    ratio = self._pruner.pruning_ratio_dict[target][-1]
                    break
            if ratio > 0 and kept_count(channels, ratio, self.round_to) <= 0:
                rounding = f" with round_to={self.round_to}" if self.round_to else ""
                raise PruningError(
                    f"ratio {ratio} would remove all {channels} channels of '{name}'{rounding}; lower the "
                    f"ratio{' or round_to' if self.round_to else ''}, or add ignore=['{name}']"
                )

    @property
    def done(self) -> bool:
        return self.step_index >= self.steps

    @property
    def current_ratio(self) -> float:
        """The cumulative ratio reached so far (0.0 before the first step)."""
        return self.ratios[self.step_index]

    def step(self, calibration: Iterable[Any] | None = None, loss_fn: LossFn | None = None) -> PruneSummary:
        """Prune up to the next ratio of the schedule; returns the summary relative to the unpruned model.

        Taylor importance needs `calibration` batches: the loss (default: cross-entropy on
        (inputs, labels)) is back-propagated on each before ranking.
        """
        if self.done:
            raise PruningError(f"all {self.steps} pruning steps are done; create a new ChannelPruner")
        if self.importance_name in NEEDS_GRADIENTS:
            self._accumulate_gradients(calibration, loss_fn or default_loss)
        self._pruner.step()
        self.step_index += 1
        self.model.zero_grad(set_to_none=True)  # gradients of removed channels are stale
        check_runs(self.model, self.example_inputs, after=f"pruning step {self.step_index}")
        return self.summary()

    def _accumulate_gradients(self, calibration: Iterable[Any] | None, loss_fn: LossFn) -> None:
        if calibration is None:
            raise PruningError(
                f"importance '{self.importance_name}' needs calibration batches: pass step(calibration=...)"
            )
        self.model.zero_grad(set_to_none=True)
        seen = 0
        for batch in calibration:
            loss_fn(self.model, batch).backward()
            seen += 1
        if seen == 0:
            raise PruningError("calibration is empty: Taylor importance needs at least one batch")

    def summary(self) -> PruneSummary:
        macs, params = count_macs_params(self.model, self.example_inputs)
        now = _out_channels(self.model)
        channels = {
            name: (before, now[name])
            for name, before in self._channels_initial.items()
            if name in now and now[name] != before
        }
        return PruneSummary(
            ratio=self.current_ratio,
            params_before=self.params_initial,
            params_after=params,
            macs_before=self.macs_initial,
            macs_after=macs,
            channels=channels,
            untraced=list(self.untraced),
        )

    def record(self) -> dict[str, Any]:
        """JSON-able record of every channel removed so far, replayable on a fresh model."""
        history = [
            [name, bool(is_out), [int(i) for i in idxs]]
            for name, is_out, idxs in self._pruner.pruning_history()
        ]
        return {
            "kind": "channels",
            "inputs": tensor_specs(self.example_inputs),
            "history": history,
        }


def tensor_specs(inputs: Inputs) -> list[dict[str, Any]]:
    """Shapes and dtypes of example inputs, enough to re-trace the model when rebuilding it."""
    tensors = inputs if isinstance(inputs, tuple | list) else (inputs,)
    return [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for t in tensors]


def inputs_from_specs(specs: list[dict[str, Any]]) -> Inputs:
    tensors = tuple(torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"])) for spec in specs)
    return tensors[0] if len(tensors) == 1 else tensors


def replay_channels(model: nn.Module, record: dict[str, Any]) -> None:
    """Remove the recorded channels from a freshly built, unpruned model."""
    tp = _tp()
    graph = tp.DependencyGraph().build_dependency(
        model, example_inputs=_as_tp_inputs(inputs_from_specs(record["inputs"])), verbose=False
    )
    names = {name for name, _ in model.named_modules()}
    for name, _, _ in record["history"]:
        if name not in names:
            raise PruningError(
                f"the structure removes channels of '{name}', which the rebuilt {type(model).__name__} lacks; "
                f"build the original, unpruned architecture"
            )
    graph.load_pruning_history([tuple(entry) for entry in record["history"]])


def _as_tp_inputs(inputs: Inputs) -> Any:
    return list(inputs) if isinstance(inputs, tuple) else inputs


def prune_channels(
    model: nn.Module,
    example_inputs: Inputs,
    ratio: float,
    *,
    calibration: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    **options: Any,
) -> PruneResult:
    """One-shot channel pruning; `options` are those of `ChannelPruner` (importance, ignore, ...)."""
    pruner = ChannelPruner(model, example_inputs, ratio, **options)
    summary = pruner.step(calibration=calibration, loss_fn=loss_fn)
    return PruneResult(model=model, summary=summary, record=pruner.record())


def kept_count(total: int, ratio: float, round_to: int | None = None) -> int:
    """How many of `total` units survive `ratio` (same rounding as Torch-Pruning's per-layer mode)."""
    kept = int(total * (1 - ratio))
    if round_to:
        kept -= kept % round_to
    return kept


__all__ = [
    "IMPORTANCES",
    "ChannelPruner",
    "PruneResult",
    "PruneSummary",
    "PruningError",
    "agp_ratio",
    "check_ratio",
    "count_macs_params",
    "count_params",
    "find_classifier",
    "kept_count",
    "match_modules",
    "prune_channels",
    "replay_channels",
    "schedule_ratios",
]
