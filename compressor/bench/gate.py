"""Budgets → verdicts → exit code: the contract CI enforces on a report.

Budgets file (YAML; see docs/gate.md for the statistics):

    baseline: baselines/x86-cpu.json            # optional; relative to this file (or --baseline)
    policy: {confidence: 0.95, remeasure: 20, min_pairs: 4, inconclusive: fail}
    budgets:
      - {metric: latency_p90, target: x86-cpu, batch: 1, max: 2ms}
      - {metric: latency_p50, target: x86-cpu, batch: 1, max_regression: 5%}   # vs the baseline
      - {metric: accuracy_drop, max: 1.0}        # points, student (exported) vs teacher
      - {metric: accuracy, min: 0.95}            # or '95%'
      - {metric: size, max: 1MB}                 # bytes on disk of model.onnx
      - {metric: peak_memory, target: x86-cpu, max: 64MB}   # only where the runner records it

A latency verdict is judged on a confidence interval, not one number: pass when the whole interval is
within the limit, fail when the whole interval is beyond it, inconclusive when it straddles the limit.
Inconclusive latencies are re-measured (a fresh run on the target, samples pooled) up to
`policy.remeasure` times; what is still inconclusive then becomes `policy.inconclusive` (fail by default).

Exit codes: 0 every budget met, 1 a budget broken, 2 bad input (file, metric, target, units, baseline),
3 a measurement failed (never a pass: the gate fails closed). A broken budget (1) wins over a failed
measurement (3): it is a definite result that must be fixed whatever the infrastructure did.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compressor.artifact import sha256_file
from compressor.bench.baseline import (
    Baseline,
    BaselineError,
    identity_of,
    load_baseline,
    mismatch,
    write_baseline,
)
from compressor.bench.gate_stats import bootstrap_ci, paired_ratio_ci, point_value, ratio_ci
from compressor.config_files import load_yaml_model
from compressor.errors import CompressorError, MeasurementError

LATENCY_METRICS = ("latency_p50", "latency_p90", "latency_p95", "latency_p99", "latency_mean")
METRICS = (*LATENCY_METRICS, "accuracy", "accuracy_drop", "size", "cosine_to_teacher", "peak_memory")
# Metrics where larger is worse: they take `max` (and `max_regression` against a baseline).
_LOWER_IS_BETTER = (*LATENCY_METRICS, "size", "peak_memory", "accuracy_drop")
_RELATIVE_OK = (*LATENCY_METRICS, "size", "peak_memory")
_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
_SIZE_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)"

Status = Literal["pass", "fail", "inconclusive", "error", "skipped"]


class BudgetError(CompressorError):
    exit_code = 2


class Policy(BaseModel):
    """What the gate does about noise. See docs/gate.md."""

    model_config = ConfigDict(extra="forbid")
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    remeasure: int = Field(20, ge=0, le=200)  # extra runs (or pairs) per (target, batch) while inconclusive
    min_runs: int = Field(1, ge=1, le=200)  # runs before any latency verdict (captures run-to-run drift)
    # Side-by-side pairs before a relative verdict: a t interval from 2-3 pairs whose ratios happen to agree
    # is narrow by luck, and on a shared machine that luck produced decisive wrong verdicts.
    min_pairs: int = Field(4, ge=2, le=200)
    inconclusive: Literal["fail", "pass"] = "fail"
    baseline_runs: int = Field(10, ge=1, le=200)  # runs recorded by --update-baseline
    n_boot: int = Field(2000, ge=100, le=100_000)


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metric: str
    target: str | None = None
    batch: int = Field(1, ge=1)
    max: int | float | str | None = None
    min: int | float | str | None = None
    max_regression: int | float | str | None = None

    @field_validator("metric")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in METRICS:
            raise ValueError(f"metric '{v}' is unknown; allowed: {', '.join(METRICS)}")
        return v

    @model_validator(mode="after")
    def _check(self) -> Budget:
        given = [k for k in ("max", "min", "max_regression") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"budget for '{self.metric}' needs exactly one of 'max', 'min' or 'max_regression'")
        if self.metric in _LOWER_IS_BETTER and self.min is not None:
            raise ValueError(f"budget for '{self.metric}': lower is better, so give 'max' (or 'max_regression')")
        if self.metric not in _LOWER_IS_BETTER and self.max is not None:
            raise ValueError(f"budget for '{self.metric}': higher is better, so give 'min'")
        if self.max_regression is not None and self.metric not in _RELATIVE_OK:
            raise ValueError(
                f"budget for '{self.metric}': max_regression applies to {', '.join(_RELATIVE_OK)}; "
                "for accuracy use accuracy_drop with 'max'"
            )
        if (self.metric in LATENCY_METRICS or self.metric == "peak_memory") and self.target is None:
            raise ValueError(f"budget '{self.metric}' needs a 'target' (a profile name, e.g. x86-cpu)")
        return self

    @property
    def relative(self) -> bool:
        return self.max_regression is not None

    @property
    def is_latency(self) -> bool:
        return self.metric in LATENCY_METRICS

    @property
    def limit(self) -> float:
        """The limit in the metric's unit (ms, bytes, fraction, points); for a relative budget, a ratio."""
        if self.relative:
            return 1.0 + parse_regression(self.max_regression, self.metric)
        return parse_quantity(self.max if self.max is not None else self.min, self.metric)

    @property
    def upper(self) -> bool:
        return self.min is None

    @property
    def label(self) -> str:
        where = f" on {self.target} batch {self.batch}" if self.target else ""
        return f"{self.metric}{where}" + (" vs baseline" if self.relative else "")


class BudgetFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    budgets: list[Budget] = Field(min_length=1)
    policy: Policy = Field(default_factory=Policy)
    baseline: Path | None = None


def parse_quantity(value: float | str | None, metric: str) -> float:
    """'5ms' → 5.0 (ms), '4MB' → 4e6 (bytes), '95%' → 0.95 (accuracy). Latency and sizes need units."""
    text = str(value).strip()
    if metric in LATENCY_METRICS or metric in ("size", "peak_memory"):
        units = _TIME_UNITS if metric in LATENCY_METRICS else _SIZE_UNITS
        match = re.fullmatch(_NUMBER + r"\s*([a-zA-Z]+)", text)
        if not match or match.group(2).lower() not in units:
            example = "5ms" if metric in LATENCY_METRICS else "4MB"
            raise BudgetError(f"budget {metric}: '{value}' needs a unit ({', '.join(units)}), e.g. '{example}'")
        return float(match.group(1)) * units[match.group(2).lower()]
    if metric == "accuracy_drop":
        match = re.fullmatch(_NUMBER + r"\s*(points|point|pts|pt)?", text)
        if not match:
            raise BudgetError(f"budget {metric}: '{value}' is not a number of points, e.g. 1.5 or '1.5 points'")
        return float(match.group(1))
    percent = re.fullmatch(_NUMBER + r"\s*%", text)
    if percent and metric == "accuracy":
        return float(percent.group(1)) / 100
    try:
        number = float(text)
    except ValueError:
        raise BudgetError(f"budget {metric}: '{value}' is not a number") from None
    if metric == "accuracy" and not 0 <= number <= 1:
        raise BudgetError(f"budget accuracy: {value} is not a fraction in [0, 1]; write {number / 100:g} or '{value}%'")
    return number


def parse_regression(value: float | str | None, metric: str) -> float:
    """'5%' → 0.05. A bare number is refused: '5' could mean 5% or 500%."""
    match = re.fullmatch(_NUMBER + r"\s*%", str(value).strip())
    if not match:
        raise BudgetError(f"budget {metric}: max_regression '{value}' needs a percent sign, e.g. '5%'")
    return float(match.group(1)) / 100


def load_budget_file(path: Path) -> BudgetFile:
    """Read and validate a budgets file; units are checked here, before anything is measured."""
    path = Path(path)
    spec = load_yaml_model(path, BudgetFile, BudgetError, "budgets file")
    for budget in spec.budgets:
        budget.limit  # noqa: B018 - validates units up front
    if spec.baseline is not None and not spec.baseline.is_absolute():
        spec.baseline = path.parent / spec.baseline
    return spec


def load_budgets(path: Path) -> list[Budget]:
    return load_budget_file(path).budgets


# --------------------------------------------------------------------------------------------- verdicts


@dataclass
class Verdict:
    """One budget judged. `status` is final (pass/fail/error/skipped); `raw` is what the interval said."""

    budget: Budget
    measured: float | None
    passed: bool
    status: Status = "pass"
    raw: Status | None = None
    interval: tuple[float, float] | None = None
    runs: int = 0
    baseline_runs: int = 0
    baseline_value: float | None = None
    note: str = ""
    confidence: float = 0.95
    paired: bool = False  # relative latency judged side by side with the baseline's model

    def line(self) -> str:
        b = self.budget
        op = "<=" if b.upper else ">="
        if self.status == "skipped":
            return f"SKIPPED {b.label}: not judged; {self.note}"
        shown = "not measured" if self.measured is None else format_value(self.measured, b)
        text = f"{self.status.upper()} {b.label}: measured {shown}"
        if self.interval is not None:
            low, high = self.interval
            text += f" ({self.confidence:.0%} CI {format_value(low, b, unit=False)}-{format_value(high, b)}"
            if self.paired:
                text += f", {self.runs} side-by-side pairs)"
            else:
                text += f", {self.runs} run{'s' if self.runs != 1 else ''}"
                text += f" vs {self.baseline_runs} baseline runs)" if b.relative and self.baseline_runs else ")"
        text += f", allowed {op} {format_value(b.limit, b)}"
        if b.relative:
            text += f" (max_regression {b.max_regression})"
        return text + (f"; {self.note}" if self.note else "")

    def to_dict(self) -> dict[str, Any]:
        b = self.budget
        return {
            "label": b.label,
            "metric": b.metric,
            "target": b.target,
            "batch": b.batch,
            "kind": "relative" if b.relative else "absolute",
            "status": self.status,
            "raw": self.raw,
            "passed": self.passed,
            "measured": self.measured,
            "interval": list(self.interval) if self.interval else None,
            "confidence": self.confidence if self.interval else None,
            "limit": b.limit,
            "operator": "<=" if b.upper else ">=",
            "unit": unit_of(b),
            "runs": self.runs,
            "baseline_runs": self.baseline_runs,
            "baseline_value": self.baseline_value,
            "paired": self.paired,
            "note": self.note,
            "line": self.line(),
        }


def unit_of(budget: Budget) -> str:
    if budget.relative:
        return "ratio"
    if budget.is_latency:
        return "ms"
    return {"size": "bytes", "peak_memory": "bytes", "accuracy_drop": "points"}.get(budget.metric, "fraction")


def format_value(value: float, budget: Budget, unit: bool = True) -> str:
    if budget.relative:
        return f"x{value:.3f}"
    metric = budget.metric
    if metric in LATENCY_METRICS:
        return f"{value:.4f}" + (" ms" if unit else "")
    if metric in ("size", "peak_memory"):
        return f"{value / 1e6:.4f}" + (" MB" if unit else "")
    if metric == "accuracy_drop":
        return f"{value:.3f}" + (" points" if unit else "")
    return f"{value:.4f}"


@dataclass
class LatencyEvidence:
    """Latency samples of one model on one (target, batch): one array per run (a fresh process)."""

    target: str
    batch: int
    runs: list[np.ndarray]
    measurement: dict[str, Any]  # the report's entry: protocol, environment (identity), kind
    paired: bool = False  # relative budgets are judged on `pairs` (candidate, baseline model) run now
    pairs: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.target}/batch_{self.batch}"


def _entry(report: dict[str, Any], budget: Budget) -> dict[str, Any]:
    latency = report.get("latency") or {}
    if budget.target not in latency:
        known = ", ".join(latency) or "none"
        raise BudgetError(
            f"budget {budget.label}: target '{budget.target}' was never benchmarked (benchmarked: {known}); "
            f"run `compress bench ARTIFACT --target {budget.target}` first"
        )
    entry = latency[budget.target].get(f"batch_{budget.batch}")
    if entry is None:
        measured = ", ".join(k.removeprefix("batch_") for k in latency[budget.target]) or "none"
        raise BudgetError(
            f"budget {budget.label}: batch {budget.batch} was not measured on {budget.target} (measured batches: "
            f"{measured}); run `compress bench ARTIFACT --target {budget.target} --batch {budget.batch}`"
        )
    return entry


def evidence_from_report(report: dict[str, Any], budget: Budget) -> LatencyEvidence:
    return _evidence(_entry(report, budget), budget.target or "", budget.batch)


def _evidence(entry: dict[str, Any], target: str, batch: int) -> LatencyEvidence:
    samples = entry.get("samples_ms") if isinstance(entry, dict) else None
    if not isinstance(samples, list) or not samples or not all(isinstance(s, (int, float)) for s in samples):
        raise BudgetError(
            f"report latency {target} batch {batch} has no samples_ms (truncated or hand-edited?); "
            f"re-run `compress bench ARTIFACT --target {target}`"
        )
    x = np.asarray(samples, dtype=np.float64)
    if not np.all(np.isfinite(x)) or np.any(x < 0):
        raise BudgetError(f"report latency {target} batch {batch} has impossible samples (negative or NaN)")
    return LatencyEvidence(target, batch, [x], entry)


def scalar_value(report: dict[str, Any], budget: Budget) -> float:
    """The measured value of a non-latency budget; BudgetError when the report does not have it."""
    metric = budget.metric
    if metric == "peak_memory":
        entry = _entry(report, budget)
        value = (entry.get("extra") or {}).get("peak_memory_bytes")
        if value is None:
            raise BudgetError(
                f"budget {budget.label}: peak memory was not measured (the {budget.target} runner records none "
                "in report latency.<target>.<batch>.extra.peak_memory_bytes); remove this budget"
            )
        return float(value)
    accuracy = report.get("accuracy") or {}
    if metric == "accuracy":
        return _required(accuracy.get("student_onnx"), budget, "accuracy.student_onnx")
    if metric == "accuracy_drop":
        return _required(accuracy.get("drop_points"), budget, "accuracy.drop_points (was a teacher given?)")
    if metric == "cosine_to_teacher":
        return _required(accuracy.get("cosine_to_teacher"), budget, "accuracy.cosine_to_teacher")
    return _required((report.get("size") or {}).get("model_bytes"), budget, "size.model_bytes")


def measured_value(report: dict[str, Any], budget: Budget) -> float:
    """Point value of any budget's metric from the report (latency: the report's statistic)."""
    if budget.is_latency:
        return point_value(evidence_from_report(report, budget).runs, budget.metric)
    return scalar_value(report, budget)


def _required(value: Any, budget: Budget, where: str) -> float:
    if value is None:
        raise BudgetError(f"budget {budget.label}: the report has no '{budget.metric}' ({where} is missing)")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise BudgetError(f"budget {budget.label}: report value {where}={value!r} is not a number") from None


def _decide(low: float, high: float, budget: Budget) -> Status:
    limit = budget.limit
    if budget.upper:
        return "pass" if high <= limit else "fail" if low > limit else "inconclusive"
    return "pass" if low >= limit else "fail" if high < limit else "inconclusive"


def _verdict(
    report: dict[str, Any],
    budget: Budget,
    policy: Policy,
    evidence: dict[str, LatencyEvidence],
    baseline: Baseline | None,
) -> Verdict:
    conf = policy.confidence
    if budget.relative and baseline is None:
        return Verdict(budget, None, True, "skipped", note="no baseline to compare with (it is being written)")
    if not budget.is_latency:
        value = scalar_value(report, budget)
        if budget.relative:
            base = baseline.metric(budget.metric) if baseline else None
            if base is None or base <= 0:
                raise BaselineError(f"budget {budget.label}: the baseline records no '{budget.metric}'")
            status = _decide(value / base, value / base, budget)
            return Verdict(budget, value / base, status == "pass", status, status, baseline_value=base, confidence=conf)
        status = _decide(value, value, budget)
        return Verdict(budget, value, status == "pass", status, status, confidence=conf)
    ev = evidence[f"{budget.target}/batch_{budget.batch}"]
    if budget.relative and ev.paired:
        ratio, low, high = paired_ratio_ci(ev.pairs, budget.metric, conf)
        n = len(ev.pairs)
        base_value = point_value([b for _, b in ev.pairs], budget.metric) if n else None
        if low is None or high is None or n < policy.min_pairs:
            return Verdict(budget, ratio, False, "inconclusive", "inconclusive", None, n, n, base_value,
                           f"side by side with the baseline model: needs at least {policy.min_pairs} pairs of runs",
                           conf, True)  # fmt: skip
        status = _decide(low, high, budget)
        return Verdict(budget, ratio, status == "pass", status, status, (low, high), n, n, base_value,
                       confidence=conf, paired=True)  # fmt: skip
    if budget.relative:
        base_runs = baseline.runs_for(budget.target, budget.batch) if baseline else []
        ratio, low, high = ratio_ci(ev.runs, base_runs, budget.metric, conf)
        base_value = point_value(base_runs, budget.metric)
        if low is None or high is None:
            return Verdict(budget, ratio, False, "inconclusive", "inconclusive", None, len(ev.runs), len(base_runs),
                           base_value, "one run on each side: run-to-run noise unknown", conf)  # fmt: skip
        status = _decide(low, high, budget)
        return Verdict(budget, ratio, status == "pass", status, status, (low, high), len(ev.runs), len(base_runs),
                       base_value, confidence=conf)  # fmt: skip
    value = point_value(ev.runs, budget.metric)
    low, high = bootstrap_ci(ev.runs, budget.metric, conf, policy.n_boot)
    status = _decide(low, high, budget)
    return Verdict(budget, value, status == "pass", status, status, (low, high), len(ev.runs), confidence=conf)


def _resolve(verdict: Verdict, policy: Policy, why: str) -> Verdict:
    """Turn a still-inconclusive verdict into pass or fail, as the policy says."""
    if verdict.status != "inconclusive":
        return verdict
    verdict.status = policy.inconclusive
    verdict.passed = policy.inconclusive == "pass"
    verdict.note = "; ".join(n for n in (verdict.note, f"inconclusive {why}; policy: {policy.inconclusive}") if n)
    return verdict


def judge(
    report: dict[str, Any],
    budgets: list[Budget],
    *,
    policy: Policy | None = None,
    baseline: Baseline | None = None,
    evidence: dict[str, LatencyEvidence] | None = None,
) -> list[Verdict]:
    """Judge every budget on what is in hand (no re-measurement); inconclusive → the policy's outcome."""
    policy = policy or Policy()
    evidence = dict(evidence or {})
    if baseline is None and any(b.relative for b in budgets):
        raise BudgetError("relative budgets (max_regression) need a baseline: pass --baseline PATH")
    for budget in budgets:
        if budget.is_latency:
            key = f"{budget.target}/batch_{budget.batch}"
            evidence.setdefault(key, evidence_from_report(report, budget))
            if budget.relative and baseline is not None:
                check_baseline(baseline, evidence[key])
    verdicts = [_verdict(report, b, policy, evidence, baseline) for b in budgets]
    return [_resolve(v, policy, f"after {v.runs} run{'s' if v.runs != 1 else ''}") for v in verdicts]


def check_baseline(baseline: Baseline, ev: LatencyEvidence) -> None:
    """Refuse a baseline measured differently (target, runtime version, input shape, ...); exit 2."""
    recorded = baseline.identity_for(ev.target, ev.batch)
    if recorded is None:
        raise BaselineError(
            f"baseline {baseline.path} has no {ev.target} batch {ev.batch} (it has: {', '.join(baseline.keys()) or 'none'}); "
            "re-create it with `compress gate ARTIFACT --budgets FILE --update-baseline PATH`"
        )
    problem = mismatch(recorded, identity_of(ev.measurement, ev.target, ev.batch))
    if problem:
        raise BaselineError(
            f"baseline {baseline.path} does not match this measurement: {problem}; compare like with like, or "
            "re-create the baseline with --update-baseline"
        )


def exit_code(verdicts: list[Verdict]) -> int:
    if any(v.status == "fail" for v in verdicts):
        return 1
    if any(v.status == "error" for v in verdicts):
        return 3
    return 0


# --------------------------------------------------------------------------------------------- the gate


@dataclass
class GateResult:
    verdicts: list[Verdict]
    exit_code: int
    error: str | None = None  # bad input or a failed measurement outside a verdict: one line
    notes: list[str] = field(default_factory=list)
    runs: dict[str, int] = field(default_factory=dict)  # (target/batch) → candidate runs judged on
    baseline_written: Path | None = None

    def lines(self) -> list[str]:
        return [v.line() for v in self.verdicts] + [f"note: {n}" for n in self.notes]


# (evidence, model file) → one more run's samples (ms), on the evidence's target, protocol and batch.
Measure = Callable[[LatencyEvidence, Path], np.ndarray]


# (evidence, candidate model, baseline model) → one side-by-side pair of runs' samples (ms).
MeasurePair = Callable[[LatencyEvidence, Path, Path], tuple[np.ndarray, np.ndarray]]


def _runner_and_protocol(ev: LatencyEvidence):
    from compressor.bench.measure import Protocol
    from compressor.targets.profile import load_profile
    from compressor.targets.runner import get_runner

    return get_runner(load_profile(ev.target)), Protocol.from_dict(ev.measurement.get("protocol") or {})


def _samples_checked(ev: LatencyEvidence, m: Any, model_path: Path) -> np.ndarray:
    problem = mismatch(identity_of(ev.measurement, ev.target, ev.batch), identity_of(m.to_dict(), ev.target, ev.batch))
    if problem:
        raise MeasurementError(f"re-measuring {ev.key} with {Path(model_path).name} measured something else: {problem}")
    return np.asarray(m.samples_ms, dtype=np.float64)


def runner_measure(ev: LatencyEvidence, model_path: Path) -> np.ndarray:
    """One more run of `model_path` with the target's runner, the report's protocol and batch."""
    runner, protocol = _runner_and_protocol(ev)
    return _samples_checked(ev, runner.measure(Path(model_path), protocol, batch=ev.batch), model_path)


def runner_measure_pair(ev: LatencyEvidence, first: Path, second: Path) -> tuple[np.ndarray, np.ndarray]:
    """One side-by-side pair: both models in one process where the runtime allows (ONNX Runtime), in
    alternating blocks, so that the machine's load hits both alike; otherwise two runs back to back."""
    runner, protocol = _runner_and_protocol(ev)
    a, b = runner.measure_pair(Path(first), Path(second), protocol, batch=ev.batch)
    return _samples_checked(ev, a, first), _samples_checked(ev, b, second)


def sequential_pairs(measure: Measure) -> MeasurePair:
    """A MeasurePair from a single-run Measure: the two runs one after the other."""

    def pair(ev: LatencyEvidence, first: Path, second: Path) -> tuple[np.ndarray, np.ndarray]:
        return measure(ev, first), measure(ev, second)

    return pair


def model_beside(source: Path, report: dict[str, Any]) -> Path | None:
    """The artifact's model.onnx, if it is there; BudgetError if it is not the model the report measured."""
    source = Path(source)
    model = (source if source.is_dir() else source.parent) / "model.onnx"
    if not model.is_file():
        return None
    recorded = {
        (m.get("environment") or {}).get("model_sha256")
        for per_batch in (report.get("latency") or {}).values()
        if isinstance(per_batch, dict)
        for m in per_batch.values()
        if isinstance(m, dict)
    } - {None}
    if recorded and sha256_file(model) not in recorded:
        raise BudgetError(f"{model} is not the model the report measured (sha256 differs); re-run `compress bench`")
    return model



def _key(budget: Budget) -> str:
    return f"{budget.target}/batch_{budget.batch}"


def gate_report(
    report: dict[str, Any],
    spec: BudgetFile,
    *,
    model: Path | None = None,
    baseline: Baseline | None = None,
    baseline_model: Path | None = None,
    measure: Measure = runner_measure,
    measure_pair: MeasurePair | None = None,
    skip_relative: bool = False,
    log: Callable[[str], None] = print,
) -> GateResult:
    """Judge the budgets; while a latency verdict is inconclusive, measure again (per the policy).

    `model`: the candidate's file (None: the gate cannot re-measure; an inconclusive latency that should be
    re-measured is then a measurement failure, never a pass). `baseline_model`: the baseline's own file;
    when given, relative latency budgets are judged on pairs of runs of both models measured side by side
    (`measure_pair`; default: the runner's paired measurement, or two `measure` runs when `measure` is not
    the runner's).
    """
    policy = spec.policy
    if measure_pair is None:
        measure_pair = runner_measure_pair if measure is runner_measure else sequential_pairs(measure)
    if baseline is None and not skip_relative and any(b.relative for b in spec.budgets):
        raise BudgetError("relative budgets (max_regression) need a baseline: pass --baseline PATH")
    evidence: dict[str, LatencyEvidence] = {}
    for budget in spec.budgets:
        if budget.is_latency:
            evidence.setdefault(_key(budget), evidence_from_report(report, budget))
        else:
            scalar_value(report, budget)  # bad input is found before anything is measured
    # Side by side needs both model files and room for min_pairs pairs; otherwise the stored runs are used.
    paired = baseline_model is not None and model is not None and policy.remeasure >= policy.min_pairs
    for budget in spec.budgets:
        if budget.relative and budget.is_latency and baseline is not None:
            check_baseline(baseline, evidence[_key(budget)])
            evidence[_key(budget)].paired = paired
    extra = dict.fromkeys(evidence, 0)
    errors: dict[str, str] = {}
    # min_runs first, then up to `remeasure` more runs while inconclusive; side-by-side pairs: up to
    # `remeasure` pairs, and never fewer than min_pairs can decide.
    cap = policy.min_runs - 1 + policy.remeasure
    while True:
        verdicts = [_verdict(report, b, policy, evidence, baseline) for b in spec.budgets]
        wanted = sorted({_key(v.budget) for v in verdicts if v.budget.is_latency and _needs_runs(v, policy)})
        todo = [k for k in wanted if k not in errors and extra[k] < cap]
        if not todo:
            break
        for key in todo:
            ev = evidence[key]
            if model is None:
                errors[key] = "could not re-measure: the gate was given a report without its model.onnx (pass the artifact directory)"
                continue
            try:
                if ev.paired:
                    # Alternate which model goes first (loads first, runs first): neither position may
                    # decide the ratio.
                    if len(ev.pairs) % 2 == 0:
                        mine, theirs = measure_pair(ev, model, baseline_model)  # type: ignore[arg-type]
                    else:
                        theirs, mine = measure_pair(ev, baseline_model, model)  # type: ignore[arg-type]
                    ev.pairs.append((mine, theirs))
                    ev.runs.append(mine)
                else:
                    ev.runs.append(measure(ev, model))
                extra[key] += 1
            except MeasurementError as exc:
                errors[key] = f"re-measurement failed: {exc}"
    for v in verdicts:
        key = _key(v.budget)
        if v.budget.is_latency and key in errors and _needs_runs(v, policy):
            v.status, v.passed, v.note = "error", False, errors[key]  # fail closed: never a pass
    final = [_resolve(v, policy, f"after {v.runs} {'pairs' if v.paired else 'runs'}") for v in verdicts]
    for key, n in extra.items():
        if n:
            what = "side-by-side pairs" if evidence[key].paired else "extra runs"
            log(f"gate: re-measured {key}: {n} {what}")
    return GateResult(final, exit_code(final), runs={k: len(e.runs) for k, e in evidence.items()})


def _needs_runs(v: Verdict, policy: Policy) -> bool:
    return v.status == "inconclusive" or (v.status != "skipped" and v.runs < policy.min_runs)


def run_gate(
    source: Path,
    budgets_path: Path,
    *,
    baseline_path: Path | None = None,
    update_baseline: Path | None = None,
    remeasure: int | None = None,
    inconclusive: str | None = None,
    baseline_runs: int | None = None,
    measure: Measure = runner_measure,
    measure_pair: MeasurePair | None = None,
    log: Callable[[str], None] = print,
) -> GateResult:
    """`compress gate`: read the budgets and the report (an artifact directory or its report.json), judge,
    re-measure what is inconclusive when the artifact's model is at hand, optionally write a baseline.

    Raises CompressorError (exit 2) for bad input before anything is judged.
    """
    from compressor.artifact import read_report

    spec = load_budget_file(budgets_path)
    overrides = {"remeasure": remeasure, "inconclusive": inconclusive, "baseline_runs": baseline_runs}
    try:
        merged = {**spec.policy.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
        spec.policy = Policy.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise BudgetError(f"gate option {err['loc'][0]}: {err['msg']}") from None
    report = read_report(source)
    for key in ("latency", "accuracy", "size"):
        if key in report and not isinstance(report[key], dict):
            raise BudgetError(f"report '{source}': '{key}' is not a mapping (truncated or hand-edited?)")
    model = model_beside(source, report)
    baseline = None
    path = baseline_path or spec.baseline
    if update_baseline is not None:
        # Writing a baseline never judges against the file it replaces (it may be from an older runtime);
        # relative budgets are then skipped unless --baseline names another file.
        path = baseline_path if baseline_path and Path(baseline_path).resolve() != Path(update_baseline).resolve() else None
    if any(b.relative for b in spec.budgets):
        if path is None and update_baseline is None:
            raise BudgetError(
                "relative budgets (max_regression) need a baseline: pass --baseline PATH or set 'baseline:' in the "
                "budgets file; create one with --update-baseline PATH"
            )
        if path is not None:
            baseline = load_baseline(Path(path))
    baseline_model = baseline.model_file() if baseline is not None else None
    result = gate_report(
        report, spec, model=model, baseline=baseline, baseline_model=baseline_model, measure=measure,
        measure_pair=measure_pair,
        skip_relative=update_baseline is not None, log=log,
    )  # fmt: skip
    if baseline is not None and baseline_model is None and any(b.relative and b.is_latency for b in spec.budgets):
        result.notes.append(
            f"baseline {baseline.path} has no model file beside it: relative latency was compared with runs stored "
            "at another time, which assumes the machine's load has not changed since"
        )
    if update_baseline is not None:
        result.baseline_written = _update_baseline(report, spec, Path(update_baseline), model, measure, log)
        result.notes.append(f"baseline written to {update_baseline} (with its model, {Path(update_baseline).with_suffix('.onnx').name})")
    return result


def _update_baseline(
    report: dict[str, Any], spec: BudgetFile, path: Path, model: Path | None, measure: Measure, log
) -> Path:
    wanted = spec.policy.baseline_runs
    evidence: list[LatencyEvidence] = []
    for target, per_batch in (report.get("latency") or {}).items():
        for key, entry in per_batch.items():
            evidence.append(_evidence(entry, target, int(entry.get("batch") or key.removeprefix("batch_"))))
    if model is None:
        raise BudgetError(
            "--update-baseline needs the artifact's model.onnx (it is copied beside the baseline and measured "
            f"{wanted} times): pass the artifact directory, not report.json"
        )
    for ev in evidence:
        while len(ev.runs) < wanted:
            ev.runs.append(measure(ev, model))  # a failed run raises (exit 3): no partial baseline
        log(f"baseline: {ev.key} recorded over {len(ev.runs)} runs")
    metrics = {"size": (report.get("size") or {}).get("model_bytes")}
    return write_baseline(path, evidence, metrics=metrics, model=model, name=report.get("name"))
