"""Confidence intervals the gate judges latency on. The reasoning is written up in docs/gate.md.

A *run* is one measurement in a fresh process (warm-up, then timed iterations). Samples within a run are
not independent of the run: the process, its memory layout and the machine's load at that moment shift
them all together, so run-to-run drift is usually larger than what one run's bootstrap interval shows.
The functions below treat the run as the unit wherever more than one run exists.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# Bootstrap resamples are drawn in blocks so that memory stays bounded for long traces.
_BOOT_BLOCK_ELEMENTS = 4_000_000


def stat_fn(metric: str) -> Callable[[np.ndarray], np.ndarray]:
    """The statistic of a latency metric over the last axis (linear-interpolated percentile, as np.percentile)."""
    if metric == "latency_mean":
        return lambda a: np.nanmean(a, axis=-1)
    q = int(metric.removeprefix("latency_p")) / 100
    return lambda a: np.nanquantile(a, q, axis=-1)


def point_value(runs: list[np.ndarray], metric: str) -> float:
    """The statistic of all samples pooled."""
    return float(stat_fn(metric)(np.concatenate(runs)))


def bootstrap_ci(
    runs: list[np.ndarray], metric: str, confidence: float, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of a latency statistic of the pooled samples.

    One run: the ordinary bootstrap (for the median, exactly the report's CI from bench.measure).
    Several runs: hierarchical — each resample draws runs with replacement, then samples with replacement
    within each drawn run — so run-to-run drift widens the interval as it should.
    """
    if len(runs) == 1 and metric == "latency_p50":
        from compressor.bench.measure import bootstrap_median_ci

        return bootstrap_median_ci(runs[0], confidence, n_boot, seed)
    rng = np.random.default_rng(seed)
    stat = stat_fn(metric)
    lengths = np.array([r.size for r in runs])
    flat = np.concatenate(runs)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    k, width = len(runs), int(lengths.max())
    ragged = bool((lengths != width).any())
    values = np.empty(n_boot)
    block = max(1, _BOOT_BLOCK_ELEMENTS // (k * width))
    for start in range(0, n_boot, block):
        rows = min(block, n_boot - start)
        pick = rng.integers(0, k, size=(rows, k)) if k > 1 else np.zeros((rows, 1), dtype=int)
        n_pick = lengths[pick][..., None]
        idx = offsets[pick][..., None] + (rng.random((rows, k, width)) * n_pick).astype(np.int64)
        drawn = flat[idx]
        if ragged:  # a run keeps its own length; the padding is ignored by the nan-statistic
            drawn = np.where(np.arange(width)[None, None, :] < n_pick, drawn, np.nan)
        values[start : start + rows] = stat(drawn.reshape(rows, k * width))
    alpha = 1.0 - confidence
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _t(confidence: float, df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, df))


def _log_stats(runs: list[np.ndarray], metric: str) -> np.ndarray:
    stat = stat_fn(metric)
    return np.log([float(stat(r)) for r in runs])


def ratio_ci(
    candidate: list[np.ndarray], baseline: list[np.ndarray], metric: str, confidence: float
) -> tuple[float, float | None, float | None]:
    """Ratio candidate/baseline with a pooled two-sample t interval over runs, on log scale.

    For runs measured at different times (the baseline's stored runs). The pooled variance lets a single
    candidate run be judged: the baseline's runs say how much runs drift on this target. Returns
    (ratio, low, high); low/high are None while there is no degree of freedom.
    """
    x, y = _log_stats(candidate, metric), _log_stats(baseline, metric)
    n, m = x.size, y.size
    diff = float(x.mean() - y.mean())
    df = n + m - 2
    if df < 1:
        return float(np.exp(diff)), None, None
    pooled = (float(((x - x.mean()) ** 2).sum()) + float(((y - y.mean()) ** 2).sum())) / df
    half = _t(confidence, df) * float(np.sqrt(pooled * (1 / n + 1 / m)))
    return float(np.exp(diff)), float(np.exp(diff - half)), float(np.exp(diff + half))


def paired_ratio_ci(
    pairs: list[tuple[np.ndarray, np.ndarray]], metric: str, confidence: float
) -> tuple[float | None, float | None, float | None]:
    """Ratio candidate/baseline from runs measured side by side: a paired t interval of log ratios.

    Each pair is (candidate run, baseline-model run) measured back to back, so a change of machine load
    moves both and cancels in their ratio. Returns (ratio, low, high); None while fewer than 2 pairs.
    """
    if not pairs:
        return None, None, None
    d = _log_stats([c for c, _ in pairs], metric) - _log_stats([b for _, b in pairs], metric)
    mean = float(d.mean())
    if d.size < 2:
        return float(np.exp(mean)), None, None
    half = _t(confidence, d.size - 1) * float(d.std(ddof=1)) / np.sqrt(d.size)
    return float(np.exp(mean)), float(np.exp(mean - half)), float(np.exp(mean + half))

