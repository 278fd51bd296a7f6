"""Features by module name: resolve tap specs (exact names and globs), pair layers, capture with hooks.

A tap spec is a string:

    "<module>"                      the module's output (element 0 when it returns a tuple/ModelOutput)
    "<module>:output[1]"            element 1 of the output; "<module>:output.last_hidden_state" an attribute
    "<module>:input"                its first positional input; ":input[1]", ":input.hidden_states" (keyword)
    "<module>:attention"            Hugging Face attention probabilities [B, heads, L, L]: element 1 of a
                                    self-attention module's output (e.g. `encoder.layer.*.attention.self`),
                                    present only when the model is called with output_attentions=True —
                                    `TapPlan.model_kwargs(side)` says when to pass it

`<module>` is a name from `model.named_modules()` or a glob over dotted names: `*` matches within one
segment (`encoder.layer.*` is the layers, not their submodules; `encoder.layer.*.attention.self.query`),
`**` across segments, `?` one character, `[0-3]` a class. A glob's matches are kept in model order. The captured tensor is stored under the canonical `TapSpec.key`
(the spec with the module name filled in), which is what losses read from `Features.taps`.

Layers are paired per loss: equal counts pair in order; otherwise `layer_map: uniform` (TinyBERT's
`g(m) = m·N/M`) or an explicit map.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import Any

from torch import Tensor, nn

from compressor.distill.losses import DistillLoss, LayerMap, Pairs
from compressor.errors import RecipeError

_SUFFIX = re.compile(r"^(output|input|attention)(?:\[(\d+)\]|\.([A-Za-z_]\w*))?$")
_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class TapSpec:
    """One captured tensor: which module, its input or output, and which element of it."""

    module: str
    kind: str = "output"  # "output" | "input"
    select: int | str = 0  # tuple index, or attribute / keyword name
    attention: bool = False  # HF attention probabilities (needs output_attentions=True)

    @property
    def key(self) -> str:
        if self.attention:
            return f"{self.module}:attention"
        if self.kind == "output" and self.select == 0:
            return self.module
        suffix = f"[{self.select}]" if isinstance(self.select, int) else f".{self.select}"
        return f"{self.module}:{self.kind}" + ("" if self.select == 0 else suffix)


def parse_tap(text: str) -> tuple[str, str, int | str, bool]:
    """Split a tap spec into (module pattern, kind, select, attention)."""
    pattern, sep, rest = text.partition(":")
    if not pattern:
        raise RecipeError(f"tap '{text}' has no module name; write '<module>' or '<module>:input'")
    if not sep:
        return pattern, "output", 0, False
    match = _SUFFIX.match(rest)
    if match is None:
        raise RecipeError(
            f"tap '{text}': unknown suffix ':{rest}'; use ':output', ':input', ':attention', "
            "optionally with [index] or .name (e.g. ':output[1]')"
        )
    kind, index, name = match.groups()
    if kind == "attention":
        if index is not None or name is not None:
            raise RecipeError(f"tap '{text}': ':attention' takes no index")
        return pattern, "output", 1, True
    select: int | str = int(index) if index is not None else (name if name is not None else 0)
    return pattern, kind, select, False


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Dotted-name glob: `*` and `?` stay within one name segment, `**` spans segments, `[...]` a class."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append(r"[^.]*")
        elif c == "?":
            out.append(r"[^.]")
        elif c == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end].replace("\\", "\\\\")
            if body.startswith("!"):
                out.append("[^" + body[1:] + "]")
            else:
                out.append("[" + ("\\" + body if body.startswith("^") else body) + "]")
            i = end + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


def resolve_modules(model: nn.Module, pattern: str, side: str = "model") -> list[str]:
    """Module names matching an exact name or a glob, in model order; none → error with the closest names."""
    names = [n for n, _ in model.named_modules() if n]
    if pattern in names:
        return [pattern]
    matched = []
    if any(c in pattern for c in _GLOB_CHARS):
        regex = _glob_regex(pattern)
        matched = [n for n in names if regex.fullmatch(n)]
    if matched:
        return matched
    raise RecipeError(
        f"{side} tap '{pattern}' matches no module; closest module names: {closest_modules(model, pattern)}"
    )


def closest_modules(model: nn.Module, pattern: str, n: int = 5) -> str:
    """The module names most like `pattern` (glob characters read as '0'), for error messages."""
    names = [name for name, _ in model.named_modules() if name]
    probe = re.sub(r"[*?]|\[[^\]]*\]", "0", pattern.partition(":")[0])
    close = get_close_matches(probe, names, n=n, cutoff=0.5) or names[:n]
    return ", ".join(close) or "none"


def resolve_taps(model: nn.Module, spec: str, side: str = "model") -> list[TapSpec]:
    pattern, kind, select, attention = parse_tap(spec)
    return [TapSpec(name, kind, select, attention) for name in resolve_modules(model, pattern, side)]


# ---------------------------------------------------------------------------------------------------------
# Layer maps
# ---------------------------------------------------------------------------------------------------------


def uniform_layer_map(n_student: int, n_teacher: int) -> list[int]:
    """TinyBERT's `g(m) = m·N/M`: student layer m (1..M) learns from teacher layer g(m) (rounded down).

    Returns 0-based teacher indices, one per student layer: M=4, N=12 → [2, 5, 8, 11].
    """
    if n_student < 1 or n_teacher < n_student:
        raise RecipeError(
            f"layer_map 'uniform' maps {n_student} student layers onto {n_teacher} teacher layers; "
            "the teacher needs at least as many layers as the student"
        )
    return [m * n_teacher // n_student - 1 for m in range(1, n_student + 1)]


def pair_taps(
    student: Sequence[str], teacher: Sequence[str], layer_map: LayerMap = None, who: str = "loss"
) -> Pairs:
    """Pair student and teacher tap keys: in order when counts match, else by layer_map."""
    m, n = len(student), len(teacher)
    if layer_map is None:
        if m != n:
            raise RecipeError(
                f"{who}: {m} student taps ({_short(student)}) but {n} teacher taps ({_short(teacher)}); "
                "set layer_map: uniform (TinyBERT g(m)=m·N/M) or an explicit [[student, teacher], ...] index map"
            )
        return list(zip(student, teacher))
    if layer_map == "uniform":
        return [(student[i], teacher[j]) for i, j in enumerate(uniform_layer_map(m, n))]
    if isinstance(layer_map, str):
        raise RecipeError(f"{who}: unknown layer_map '{layer_map}'; use 'uniform' or a list of index pairs")
    index_pairs: list[tuple[int, int]] = []
    for i, item in enumerate(layer_map):
        if isinstance(item, int):  # one teacher index per student layer
            index_pairs.append((i, item))
        elif isinstance(item, list | tuple) and len(item) == 2 and all(isinstance(x, int) for x in item):
            index_pairs.append((item[0], item[1]))
        else:
            raise RecipeError(
                f"{who}: layer_map entry {item!r} must be a teacher index or [student, teacher]"
            )
    if layer_map and isinstance(layer_map[0], int) and len(layer_map) != m:
        raise RecipeError(f"{who}: layer_map lists {len(layer_map)} teacher indices for {m} student taps")
    out = []
    for i, j in index_pairs:
        if not (-m <= i < m and -n <= j < n):
            raise RecipeError(
                f"{who}: layer_map pair [{i}, {j}] is out of range for {m} student / {n} teacher taps"
            )
        out.append((student[i], teacher[j]))
    return out


def _short(keys: Sequence[str]) -> str:
    return ", ".join(keys[:2]) + (", ..." if len(keys) > 2 else "") if keys else "none"


# ---------------------------------------------------------------------------------------------------------
# Binding losses to models
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TapPlan:
    """What to capture on each side for a set of losses."""

    student: list[TapSpec] = field(default_factory=list)
    teacher: list[TapSpec] = field(default_factory=list)

    def model_kwargs(self, side: str) -> dict[str, Any]:
        """Extra keyword arguments for the model call: output_attentions=True when attention is tapped."""
        taps = self.student if side == "student" else self.teacher
        return {"output_attentions": True} if any(t.attention for t in taps) else {}


def bind_taps(
    losses: Mapping[str, DistillLoss] | Iterable[DistillLoss],
    student: nn.Module,
    teacher: nn.Module,
    aliases: Mapping[str, Mapping[str, str]] | None = None,
) -> TapPlan:
    """Resolve every loss's tap references on the two models, bind the concrete pairs, list what to capture.

    A reference is an alias from `aliases["student"|"teacher"]` (the recipe's distillation.taps), or a tap
    spec itself. Every alias must resolve, used or not, so a typo fails before training.
    """
    aliases = aliases or {}
    unknown = set(aliases) - {"student", "teacher"}
    if unknown:
        raise RecipeError(
            f"distillation.taps has section '{sorted(unknown)[0]}'; only 'student' and 'teacher' exist"
        )
    models = {"student": student, "teacher": teacher}
    for side, table in aliases.items():
        for name, spec in table.items():
            if not isinstance(spec, str):
                raise RecipeError(
                    f"distillation.taps.{side}.{name} must be a module name or glob, got {spec!r}"
                )
            try:
                resolve_taps(models[side], spec, side)
            except RecipeError as exc:
                raise RecipeError(f"distillation.taps.{side}.{name}: {exc}") from None

    plan = TapPlan()
    seen: dict[str, set[str]] = {"student": set(), "teacher": set()}

    def lookup(side: str, ref: str, label: str) -> list[TapSpec]:
        table = aliases.get(side, {})
        if ref in table:
            return resolve_taps(models[side], table[ref], side)
        pattern = parse_tap(ref)[0]
        try:
            resolve_modules(models[side], pattern, side)
        except RecipeError:
            raise RecipeError(
                f"loss '{label}' reads {side} tap '{ref}', which is neither an alias in distillation.taps.{side} "
                f"(defined: {', '.join(table) or 'none'}) nor a {side} module; closest module names: "
                f"{closest_modules(models[side], ref)}"
            ) from None
        return resolve_taps(models[side], ref, side)

    def use(side: str, taps: list[TapSpec], keys: set[str]) -> None:
        for t in taps:
            if t.key in keys and t.key not in seen[side]:
                seen[side].add(t.key)
                getattr(plan, side).append(t)

    items = losses.items() if isinstance(losses, Mapping) else ((type(x).__name__, x) for x in losses)
    for label, loss in items:
        if not loss.tap_refs:
            continue
        groups: dict[str, Pairs] = {}
        for group, refs in loss.tap_refs.items():
            pairs: Pairs = []
            for s_ref, t_ref in refs:
                s_taps, t_taps = lookup("student", s_ref, label), lookup("teacher", t_ref, label)
                chosen = pair_taps(
                    [t.key for t in s_taps], [t.key for t in t_taps], loss.layer_map, f"loss '{label}'"
                )
                use("student", s_taps, {s for s, _ in chosen})
                use("teacher", t_taps, {t for _, t in chosen})
                pairs.extend(chosen)
            groups[group] = pairs
        loss.bind(groups)
    return plan


# ---------------------------------------------------------------------------------------------------------
# Capture
# ---------------------------------------------------------------------------------------------------------


def _select(value: Any, select: int | str, where: str) -> Any:
    if isinstance(select, str):
        if isinstance(value, Mapping) and select in value:
            return value[select]
        if hasattr(value, select):
            return getattr(value, select)
        raise RecipeError(f"tap '{where}': the {type(value).__name__} has no field '{select}'")
    if isinstance(value, Tensor):
        if select == 0:
            return value
        raise RecipeError(f"tap '{where}': the module returns one tensor, not a tuple; drop the index")
    try:
        return value[select]
    except (IndexError, KeyError, TypeError):
        raise RecipeError(
            f"tap '{where}': element {select} does not exist in the {type(value).__name__}"
        ) from None


class capture:
    """Capture tapped tensors during one forward pass: `with capture(model, taps) as feats: model(x)`.

    `feats` is a dict filled by forward hooks, keyed by `TapSpec.key`. Student tensors keep their graph;
    nothing is detached. On leaving the block every hook is removed; a tap whose module did not run is an
    error, as is a module that ran twice (tap one that runs once per forward).
    """

    def __init__(self, model: nn.Module, taps: Iterable[TapSpec | str]):
        self.model = model
        self.taps: list[TapSpec] = []
        for t in taps:
            self.taps.extend(resolve_taps(model, t) if isinstance(t, str) else [t])
        self.features: dict[str, Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> dict[str, Tensor]:
        self.features.clear()
        modules = dict(self.model.named_modules())
        try:
            for tap in self.taps:
                if tap.module not in modules:
                    resolve_modules(self.model, tap.module)  # raises with the closest names
                self._handles.append(
                    modules[tap.module].register_forward_hook(self._hook(tap), with_kwargs=True)
                )
        except BaseException:
            self._remove()
            raise
        return self.features

    def _hook(self, tap: TapSpec):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if tap.key in self.features:
                raise RecipeError(
                    f"tap '{tap.key}': the module ran more than once in one forward pass; tap a module that "
                    "runs once (shared modules cannot be told apart)"
                )
            if tap.kind == "input":
                source = kwargs if isinstance(tap.select, str) else args
                if isinstance(tap.select, str) and tap.select not in kwargs:
                    raise RecipeError(
                        f"tap '{tap.key}': no keyword input '{tap.select}' (got: {', '.join(kwargs) or 'none'})"
                    )
                if isinstance(tap.select, int) and tap.select >= len(args):
                    raise RecipeError(f"tap '{tap.key}': the module got {len(args)} positional inputs")
                value = source[tap.select]
            else:
                value = _select(output, tap.select, tap.key)
            if value is None and tap.attention:
                raise RecipeError(
                    f"tap '{tap.key}' is empty: call the model with output_attentions=True "
                    "(TapPlan.model_kwargs) or load it with attn_implementation='eager'"
                )
            if not isinstance(value, Tensor):
                raise RecipeError(
                    f"tap '{tap.key}' is a {type(value).__name__}, not a tensor; pick an element"
                )
            self.features[tap.key] = value

        return hook

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, exc_type, exc, tb) -> None:
        self._remove()
        if exc_type is None:
            missing = [t.key for t in self.taps if t.key not in self.features]
            if missing:
                raise RecipeError(
                    f"tap '{missing[0]}': the module did not run in the forward pass; tap one that does"
                )


__all__ = [
    "TapSpec",
    "TapPlan",
    "parse_tap",
    "resolve_modules",
    "closest_modules",
    "resolve_taps",
    "uniform_layer_map",
    "pair_taps",
    "bind_taps",
    "capture",
]
