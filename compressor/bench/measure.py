"""The timing protocol every runner follows, and the statistics every result reports.

A runner collects per-iteration latencies (milliseconds) under a `Protocol`; `summarize` turns them into
`LatencyStats`: percentiles, mean, standard deviation, coefficient of variation and a percentile-bootstrap
confidence interval of the median (Efron & Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 13).
The median, not the mean, is the headline number: latency distributions on shared machines have long
right tails (p99 at 1.5-4x the median here), which drag the mean but barely move the median.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from compressor.errors import MeasurementError, RecipeError

# Bootstrap resamples are drawn in blocks so that memory stays bounded for long traces
# (a 60 s trtexec run can hold 100k samples; 2000 x 100k float64 would be 1.6 GB at once).
_BOOT_BLOCK_ELEMENTS = 4_000_000


@dataclass
class Protocol:
    """How a latency is measured: warm-up, then timed iterations until both limits are met.

    Args:
        warmup: untimed runs before timing starts (lazy allocation, caches, clocks ramping up).
        iterations: minimum number of timed runs.
        min_seconds: keep timing until this much wall time has passed as well (0: iterations only).
        max_iterations: hard cap when `min_seconds` would otherwise run a fast model for millions of
            iterations.
        threads: intra-op threads on the device (None: the target profile decides; 0: runtime default).
        timeout_s: the whole measurement, copy and setup included, must finish within this.
    """

    warmup: int = 20
    iterations: int = 200
    min_seconds: float = 0.0
    max_iterations: int = 100_000
    threads: int | None = None
    timeout_s: float = 900.0

    def __post_init__(self) -> None:
        checks = [
            ("warmup", self.warmup >= 0, "an integer >= 0"),
            ("iterations", self.iterations >= 1, "an integer >= 1"),
            ("min_seconds", self.min_seconds >= 0 and math.isfinite(self.min_seconds), "a number >= 0"),
            (
                "max_iterations",
                self.max_iterations >= self.iterations,
                f"an integer >= iterations ({self.iterations})",
            ),
            ("threads", self.threads is None or self.threads >= 0, "null or an integer >= 0"),
            ("timeout_s", self.timeout_s > 0, "a number of seconds > 0"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise RecipeError(f"bench.protocol.{name}={getattr(self, name)!r} is invalid: use {allowed}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Protocol:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecipeError(f"bench.protocol has unknown keys {unknown}; allowed: {sorted(known)}")
        return cls(**data)


@dataclass
class LatencyStats:
    """Summary of per-iteration latencies. All times in milliseconds; `cv` is std/mean (a fraction)."""

    n: int
    p50: float
    p90: float
    p95: float
    p99: float
    mean: float
    std: float
    cv: float
    median_ci_low: float
    median_ci_high: float
    min: float
    max: float
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyStats:
        return cls(**{f.name: data[f.name] for f in fields(cls)})


def _validated(samples_ms: Sequence[float]) -> np.ndarray:
    try:
        x = np.asarray(samples_ms, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MeasurementError(f"latency samples are not numbers: {exc}") from exc
    if x.ndim != 1 or x.size == 0:
        raise MeasurementError("no latency samples were collected; nothing to summarize")
    if not np.all(np.isfinite(x)) or np.any(x < 0):
        bad = x[~np.isfinite(x) | (x < 0)][0]
        raise MeasurementError(
            f"latency samples contain an impossible value ({bad}); the measurement is unusable"
        )
    return x


def bootstrap_median_ci(
    x: np.ndarray, confidence: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median: resample with replacement, take quantiles of medians."""
    if x.size == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    medians = np.empty(n_boot)
    block = max(1, _BOOT_BLOCK_ELEMENTS // x.size)
    for start in range(0, n_boot, block):
        rows = min(block, n_boot - start)
        idx = rng.integers(0, x.size, size=(rows, x.size))
        medians[start : start + rows] = np.median(x[idx], axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(medians, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def summarize(
    samples_ms: Sequence[float], confidence: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> LatencyStats:
    """Summarize per-iteration latencies (ms).

    Raises:
        MeasurementError: no samples, or a sample that is not a finite non-negative number.
    """
    if not 0 < confidence < 1:
        raise RecipeError(f"confidence={confidence!r} is invalid: use a fraction between 0 and 1, e.g. 0.95")
    if n_boot < 1:
        raise RecipeError(f"n_boot={n_boot!r} is invalid: use an integer >= 1 (2000 is typical)")
    x = _validated(samples_ms)
    p50, p90, p95, p99 = (float(v) for v in np.percentile(x, [50, 90, 95, 99]))
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if x.size > 1 else 0.0
    ci_low, ci_high = bootstrap_median_ci(x, confidence, n_boot, seed)
    return LatencyStats(
        n=int(x.size),
        p50=p50,
        p90=p90,
        p95=p95,
        p99=p99,
        mean=mean,
        std=std,
        cv=std / mean if mean > 0 else 0.0,
        median_ci_low=ci_low,
        median_ci_high=ci_high,
        min=float(x.min()),
        max=float(x.max()),
        confidence=confidence,
    )


def coefficient_of_variation(values: Sequence[float]) -> float:
    """Sample std / mean of repeated measurements (e.g. the medians of 10 runs); 0 for one value."""
    x = _validated(values)
    if x.size < 2 or x.mean() == 0:
        return 0.0
    return float(x.std(ddof=1) / x.mean())
