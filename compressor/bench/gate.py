"""Budgets → verdicts → exit code: the contract CI enforces on a report.

Budgets file (YAML):

    budgets:
      - {metric: latency_p90, target: x86-cpu, batch: 1, max: 2ms}
      - {metric: accuracy_drop, max: 1.0}        # points, student (exported) vs teacher
      - {metric: accuracy, min: 0.95}
      - {metric: size, max: 1MB}                 # bytes on disk of model.onnx

Exit codes: 0 every budget met, 1 a budget broken, 2 bad input (file, metric, target, units).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from compressor.errors import CompressorError

LATENCY_METRICS = ("latency_p50", "latency_p90", "latency_p95", "latency_p99", "latency_mean")
METRICS = (*LATENCY_METRICS, "accuracy", "accuracy_drop", "size", "cosine_to_teacher")
_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
_SIZE_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


class BudgetError(CompressorError):
    exit_code = 2


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metric: Literal[METRICS]  # type: ignore[valid-type]
    target: str | None = None
    batch: int = Field(1, ge=1)
    max: float | str | None = None
    min: float | str | None = None

    @model_validator(mode="after")
    def _check(self) -> Budget:
        if (self.max is None) == (self.min is None):
            raise ValueError(f"budget for '{self.metric}' needs exactly one of 'max' or 'min'")
        if self.metric in LATENCY_METRICS and self.target is None:
            raise ValueError(
                f"latency budget '{self.metric}' needs a 'target' (a profile name, e.g. x86-cpu)"
            )
        return self

    @property
    def limit(self) -> float:
        return parse_quantity(self.max if self.max is not None else self.min, self.metric)

    @property
    def label(self) -> str:
        where = f" on {self.target} batch {self.batch}" if self.target else ""
        return f"{self.metric}{where}"


class BudgetFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    budgets: list[Budget]


def parse_quantity(value: float | str | None, metric: str) -> float:
    """'5ms' → 5.0 (ms), '4MB' → 4e6 (bytes). Latency and size need units; accuracy is a plain number."""
    if metric in LATENCY_METRICS or metric == "size":
        units = _TIME_UNITS if metric != "size" else _SIZE_UNITS
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e-?\d+)?)\s*([a-zA-Z]+)\s*", str(value))
        if not match or match.group(2).lower() not in units:
            example = "5ms" if metric != "size" else "4MB"
            raise BudgetError(
                f"budget {metric}: '{value}' needs a unit ({', '.join(units)}), e.g. '{example}'"
            )
        return float(match.group(1)) * units[match.group(2).lower()]
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise BudgetError(f"budget {metric}: '{value}' is not a number") from None


def load_budgets(path: Path) -> list[Budget]:
    path = Path(path)
    if not path.is_file():
        raise BudgetError(f"budgets file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text())
        budgets = BudgetFile.model_validate(data).budgets
    except yaml.YAMLError as exc:
        raise BudgetError(f"{path}: not valid YAML: {exc}") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise BudgetError(f"{path}: {loc}: {err['msg'].removeprefix('Value error, ')}") from None
    for budget in budgets:
        budget.limit  # noqa: B018 - validates units up front, before anything is judged
    return budgets


@dataclass
class Verdict:
    budget: Budget
    measured: float | None
    passed: bool

    def line(self) -> str:
        op = "<=" if self.budget.max is not None else ">="
        shown = "not measured" if self.measured is None else _show(self.measured, self.budget.metric)
        status = "PASS" if self.passed else "FAIL"
        return f"{status} {self.budget.label}: measured {shown}, allowed {op} {_show(self.budget.limit, self.budget.metric)}"


def _show(value: float, metric: str) -> str:
    if metric in LATENCY_METRICS:
        return f"{value:.4f} ms"
    if metric == "size":
        return f"{value / 1e6:.4f} MB"
    if metric == "accuracy_drop":
        return f"{value:.3f} points"
    return f"{value:.4f}"


def measured_value(report: dict[str, Any], budget: Budget) -> float:
    metric = budget.metric
    if metric in LATENCY_METRICS:
        latency = report.get("latency", {})
        if budget.target not in latency:
            known = ", ".join(latency) or "none"
            raise BudgetError(
                f"budget {budget.label}: target '{budget.target}' was never benchmarked (benchmarked: {known}); "
                f"run `compress bench ARTIFACT --target {budget.target}` first"
            )
        entry = latency[budget.target].get(f"batch_{budget.batch}")
        if entry is None:
            raise BudgetError(
                f"budget {budget.label}: batch {budget.batch} was not measured on {budget.target}"
            )
        return float(entry["stats"][metric.removeprefix("latency_")])
    accuracy = report.get("accuracy", {})
    if metric == "accuracy":
        return _required(accuracy.get("student_onnx"), budget)
    if metric == "accuracy_drop":
        return _required(accuracy.get("drop_points"), budget)
    if metric == "cosine_to_teacher":
        return _required(accuracy.get("cosine_to_teacher"), budget)
    return _required(report.get("size", {}).get("model_bytes"), budget)


def _required(value, budget: Budget) -> float:
    if value is None:
        raise BudgetError(
            f"budget {budget.label}: the report has no '{budget.metric}' (was a teacher given?)"
        )
    return float(value)


def judge(report: dict[str, Any], budgets: list[Budget]) -> list[Verdict]:
    verdicts = []
    for budget in budgets:
        value = measured_value(report, budget)
        ok = value <= budget.limit if budget.max is not None else value >= budget.limit
        verdicts.append(Verdict(budget=budget, measured=value, passed=ok))
    return verdicts


def exit_code(verdicts: list[Verdict]) -> int:
    return 0 if all(v.passed for v in verdicts) else 1
