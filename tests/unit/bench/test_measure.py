"""Timing protocol and latency statistics: hand-computed values, bootstrap behaviour, bad input."""

import math

import numpy as np
import pytest

from compressor.bench import measure
from compressor.bench.measure import LatencyStats, Protocol, coefficient_of_variation, summarize
from compressor.errors import MeasurementError, RecipeError


def test_summarize_matches_hand_computed_values():
    samples = [4.0, 1.0, 3.0, 2.0, 5.0]

    s = summarize(samples)

    # Sorted 1..5: median 3; linear-interpolated p90 = 1 + 0.9*4 = 4.6 -> between 4 and 5 at 0.6.
    assert s.n == 5
    assert s.p50 == 3.0
    assert s.p90 == pytest.approx(4.6, abs=1e-12)
    assert s.p95 == pytest.approx(4.8, abs=1e-12)
    assert s.p99 == pytest.approx(4.96, abs=1e-12)
    assert s.mean == 3.0
    assert s.std == pytest.approx(math.sqrt(2.5), abs=1e-12)  # sample std: sum of squares 10 over n-1=4
    assert s.cv == pytest.approx(math.sqrt(2.5) / 3.0, abs=1e-12)
    assert (s.min, s.max) == (1.0, 5.0)
    # The bootstrap median of 5 values is always one of them; the interval sits inside the data.
    assert 1.0 <= s.median_ci_low <= 3.0 <= s.median_ci_high <= 5.0
    assert s.median_ci_low in samples and s.median_ci_high in samples


def test_constant_and_single_samples_have_zero_spread_and_a_point_interval():
    const = summarize([2.5] * 50)
    one = summarize([7.0])

    assert (const.std, const.cv, const.median_ci_low, const.median_ci_high) == (0.0, 0.0, 2.5, 2.5)
    assert (one.n, one.p50, one.std, one.median_ci_low, one.median_ci_high) == (1, 7.0, 0.0, 7.0, 7.0)


def test_bootstrap_is_deterministic_per_seed_and_narrows_with_more_samples():
    rng = np.random.default_rng(1)
    small = rng.lognormal(0.0, 0.3, size=30)
    large = rng.lognormal(0.0, 0.3, size=3000)

    a, b = summarize(small, seed=3), summarize(small, seed=3)
    c = summarize(small, seed=4)
    wide = a.median_ci_high - a.median_ci_low
    narrow = summarize(large).median_ci_high - summarize(large).median_ci_low

    assert a == b
    assert (a.median_ci_low, a.median_ci_high) != (c.median_ci_low, c.median_ci_high)
    assert narrow < wide / 4  # width shrinks ~1/sqrt(n): 100x the samples, ~10x narrower


def test_bootstrap_interval_covers_the_true_median_at_about_the_stated_rate():
    # Exponential(1): true median ln 2. A 90% interval should contain it in roughly 90% of repeated trials.
    rng = np.random.default_rng(0)
    trials, hits = 200, 0
    for t in range(trials):
        x = rng.exponential(1.0, size=41)
        low, high = measure.bootstrap_median_ci(x, confidence=0.9, n_boot=400, seed=t)
        hits += low <= math.log(2) <= high
    assert 0.82 <= hits / trials <= 0.97


def test_blocked_resampling_gives_the_same_interval_as_one_block(monkeypatch):
    x = np.random.default_rng(5).normal(10, 1, size=101)
    whole = measure.bootstrap_median_ci(x, n_boot=500, seed=2)

    monkeypatch.setattr(measure, "_BOOT_BLOCK_ELEMENTS", 101 * 7)  # 7 resamples per block
    blocked = measure.bootstrap_median_ci(x, n_boot=500, seed=2)

    assert blocked == whole


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [1.0, -0.5], [float("inf")], ["x"]])
def test_impossible_samples_are_a_measurement_error(bad):
    with pytest.raises(MeasurementError):
        summarize(bad)


def test_summary_round_trips_through_a_dict():
    s = summarize([1.0, 2.0, 4.0])
    assert LatencyStats.from_dict(s.to_dict()) == s


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"warmup": -1}, "warmup"),
        ({"iterations": 0}, "iterations"),
        ({"min_seconds": -1.0}, "min_seconds"),
        ({"iterations": 10, "max_iterations": 5}, "max_iterations"),
        ({"threads": -2}, "threads"),
        ({"timeout_s": 0}, "timeout_s"),
    ],
)
def test_protocol_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(RecipeError, match=rf"bench\.protocol\.{field}="):
        Protocol(**kwargs)


def test_protocol_from_dict_rejects_unknown_keys_and_round_trips():
    p = Protocol(warmup=3, iterations=7, min_seconds=0.5)

    assert Protocol.from_dict(p.to_dict()) == p
    with pytest.raises(RecipeError, match="unknown keys \\['iters'\\]"):
        Protocol.from_dict({"iters": 5})


def test_coefficient_of_variation_of_repeated_medians():
    assert coefficient_of_variation([10.0, 10.0, 10.0]) == 0.0
    # mean 10, sample std sqrt(((-1)^2 + 0 + 1^2)/2) = 1
    assert coefficient_of_variation([9.0, 10.0, 11.0]) == pytest.approx(0.1, abs=1e-12)
