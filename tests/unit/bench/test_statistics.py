"""Intervals and paired tests against closed forms: Wilson at 0/n, n/n and small n, exact McNemar on known tables,
the exact sign-flip test on small cases, the bootstrap's determinism and coverage, and McNemar's power against a
slow enumeration."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsqueeze.bench.statistics import (
    Interval,
    bootstrap,
    combined,
    kept_share,
    mcnemar,
    mcnemar_power,
    paired_test,
    score_interval,
    sign_flip,
    wilson,
)

Z = 1.959963984540054  # the 97.5% quantile of the standard normal
Z2 = Z * Z


@pytest.mark.parametrize("n", [1, 4, 10, 16, 100])
def test_wilson_at_zero_and_at_n_has_its_closed_form(n: int) -> None:
    zero, full = wilson(0, n), wilson(n, n)
    assert zero.low == 0.0 and zero.high == pytest.approx(Z2 / (n + Z2), abs=1e-12)
    assert full.high == 1.0 and full.low == pytest.approx(n / (n + Z2), abs=1e-12)
    assert zero.method == full.method == "wilson"


def test_wilson_small_n_matches_the_formula_and_the_tables() -> None:
    # 3 of 10: p = 0.3, centre = (p + z²/2n) / (1 + z²/n), half = z sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n)
    centre = (0.3 + Z2 / 20) / (1 + Z2 / 10)
    half = Z * math.sqrt(0.3 * 0.7 / 10 + Z2 / 400) / (1 + Z2 / 10)
    interval = wilson(3, 10)
    assert (interval.low, interval.high) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert (round(interval.low, 4), round(interval.high, 4)) == (0.1078, 0.6032)
    assert (round(wilson(8, 16).low, 4), round(wilson(8, 16).high, 4)) == (0.2800, 0.7200)  # symmetric at 1/2


def test_wilson_narrows_with_n_and_a_lower_level() -> None:
    assert wilson(50, 100).high - wilson(50, 100).low < wilson(5, 10).high - wilson(5, 10).low
    assert wilson(5, 10, level=0.8).high < wilson(5, 10).high


@pytest.mark.parametrize(("args", "match"), [((1, 0), "n"), ((11, 10), "successes"), ((-1, 10), "successes")])
def test_wilson_rejects_impossible_counts(args: tuple[int, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        wilson(*args)


@pytest.mark.parametrize(
    ("better", "worse", "p"),
    [
        (0, 6, 2 * 0.5**6),  # 0.03125
        (6, 0, 2 * 0.5**6),
        (1, 6, 2 * (1 + 7) / 2**7),  # 0.125
        (2, 10, 2 * (1 + 12 + 66) / 2**12),  # 0.0386
        (3, 3, 1.0),  # twice the tail would be above 1
        (0, 0, 1.0),  # no discordant pair: no evidence of a difference
        (0, 5, 2 * 0.5**5),  # 0.0625: five questions lost are not yet significant
    ],
)
def test_exact_mcnemar_on_known_tables(better: int, worse: int, p: float) -> None:
    assert mcnemar(better, worse) == pytest.approx(p, rel=1e-12)


def test_mcnemar_handles_large_tables_without_overflow() -> None:
    assert mcnemar(600, 600) == 1.0
    assert 0 < mcnemar(450, 600) < 1e-4


@pytest.mark.parametrize(
    ("differences", "p"),
    [
        ([1.0] * 5, 2 / 2**5),  # only all-plus and all-minus reach |sum| = 5
        ([0.5] * 6 + [0.0] * 10, 2 / 2**6),  # zero differences carry no sign
        ([1.0, -1.0], 1.0),
        ([0.5, 0.25], 2 / 4),  # |0.5 + 0.25| reached by ++ and -- only
        ([0.0, 0.0], 1.0),
    ],
)
def test_exact_sign_flip_on_small_cases(differences: list[float], p: float) -> None:
    assert sign_flip(differences) == pytest.approx(p, rel=1e-12)


def test_monte_carlo_sign_flip_is_seeded_and_sensible() -> None:
    one_sided = [0.5] * 30  # exact p = 2 / 2**30: no random vector reaches it
    assert sign_flip(one_sided) == pytest.approx(1 / 10_001)
    balanced = [0.5, -0.5] * 15
    assert sign_flip(balanced) > 0.9
    mixed = [0.25, 0.5, -0.25, 0.75] * 6
    assert sign_flip(mixed, seed=1) == sign_flip(mixed, seed=1)
    assert abs(sign_flip(mixed, seed=1) - sign_flip(mixed, seed=2)) < 0.01


def test_paired_test_chooses_mcnemar_for_zero_one_scores() -> None:
    base = [1.0] * 10
    other = [1.0] * 4 + [0.0] * 6
    test = paired_test(base, other)
    assert (test.test, test.pairs, test.better, test.worse) == ("mcnemar", 10, 0, 6)
    assert test.p_value == pytest.approx(0.03125) and test.significant
    assert test.difference == pytest.approx(-0.6)


def test_paired_test_chooses_sign_flip_for_partial_credit() -> None:
    test = paired_test([1.0, 1.0, 0.5, 1.0], [0.75, 1.0, 0.5, 0.5])
    assert (test.test, test.better, test.worse) == ("sign-flip", 0, 2)
    assert test.p_value == pytest.approx(2 / 4) and not test.significant


def test_paired_test_needs_matching_sides() -> None:
    with pytest.raises(ValueError, match="same"):
        paired_test([1.0, 0.0], [1.0])
    with pytest.raises(ValueError, match="same"):
        paired_test([], [])


def test_bootstrap_is_deterministic_per_seed() -> None:
    groups = [[0.0, 0.5, 1.0, 0.75, 0.25, 1.0, 0.5], [1.0, 0.25, 0.5]]
    assert bootstrap(groups, seed=3) == bootstrap(groups, seed=3)
    other = bootstrap(groups, seed=4)
    assert other != bootstrap(groups, seed=3)
    assert abs(other.low - bootstrap(groups, seed=3).low) < 0.05


def test_bootstrap_resamples_within_each_group() -> None:
    # each group is constant, so every stratified resample has the same mean of means: (1 + 0) / 2
    assert bootstrap([[1.0, 1.0, 1.0], [0.0] * 5]) == pytest.approx(bootstrap([[0.5]]))
    interval = bootstrap([[1.0, 1.0, 1.0], [0.0] * 5])
    assert (interval.low, interval.high, interval.method) == (0.5, 0.5, "bootstrap")


def test_bootstrap_covers_the_true_mean_about_95_percent_of_the_time() -> None:
    rng, levels = random.Random(0), [0.0, 0.25, 0.5, 0.75, 1.0]  # uniform on these: mean 0.5
    hits = 0
    for rep in range(200):
        scores = [rng.choice(levels) for _ in range(40)]
        interval = bootstrap([scores], seed=rep)
        hits += interval.low <= 0.5 <= interval.high
    assert 0.88 <= hits / 200 <= 0.99


def test_combined_interval_adds_the_variances_of_its_parts() -> None:
    # halves 0.3 and 0.4 (z·se each): the mean's half is √(0.3² + 0.4²) / 2 = 0.25
    interval = combined([0.5, 0.7], [Interval(0.2, 0.8, "wilson"), Interval(0.2, 1.0, "bootstrap")])
    assert (interval.low, interval.high, interval.method) == pytest.approx((0.35, 0.85, "combined"))
    assert combined([1.0, 1.0], [Interval(0.5, 1.0, "wilson")] * 2).high == 1.0  # cut to [0, 1]
    with pytest.raises(ValueError, match="one interval per mean"):
        combined([0.5], [])


def test_score_interval_uses_wilson_only_for_one_proportion() -> None:
    assert score_interval([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]) == wilson(3, 6)
    assert score_interval([[1.0, 0.5]]).method == "bootstrap"  # one task with partial credit


def test_an_average_over_unlike_tasks_combines_their_own_intervals() -> None:
    # 4 of 4 and 0 of 6 (unequal sizes: the average 0.5 is not one proportion): each task's Wilson interval
    interval = score_interval([[1.0] * 4, [0.0] * 6])
    half = math.sqrt(((1 - 4 / (4 + Z2)) / 2) ** 2 + (Z2 / (6 + Z2) / 2) ** 2) / 2
    assert (interval.low, interval.high, interval.method) == pytest.approx((0.5 - half, 0.5 + half, "combined"))
    assert interval.high - interval.low > 0.3  # a stratified bootstrap would say [0.5, 0.5]: no uncertainty at all
    mixed = score_interval([[1.0] * 4, [0.5, 1.0, 0.75, 0.25]])
    assert mixed.method == "combined" and mixed.low < 0.8125 < mixed.high
    with pytest.raises(ValueError, match="group"):
        score_interval([[1.0], []])


def _power_by_enumeration(n: int, p_better: float, p_worse: float) -> float:
    """Every (better, worse) table of n questions, weighted by its multinomial probability."""
    total = 0.0
    for better in range(n + 1):
        for worse in range(n - better + 1):
            ties = n - better - worse
            weight = math.factorial(n) / (math.factorial(better) * math.factorial(worse) * math.factorial(ties))
            weight *= p_better**better * p_worse**worse * (1 - p_better - p_worse) ** ties
            total += weight if better > worse and mcnemar(better, worse) < 0.05 else 0.0
    return total


@pytest.mark.parametrize(("n", "p_better", "p_worse"), [(12, 0.3, 0.1), (20, 0.15, 0.0), (25, 0.4, 0.2), (7, 0.5, 0.5)])
def test_mcnemar_power_matches_an_enumeration(n: int, p_better: float, p_worse: float) -> None:
    assert mcnemar_power(n, p_better, p_worse) == pytest.approx(_power_by_enumeration(n, p_better, p_worse), abs=1e-9)


def test_mcnemar_power_closed_forms() -> None:
    assert mcnemar_power(5, 1.0, 0.0) == 0.0 and mcnemar_power(6, 1.0, 0.0) == 1.0  # 2 x 0.5^6 = 0.031 < 0.05
    assert mcnemar_power(6, 0.5, 0.0) == pytest.approx(0.5**6)  # only 6 discordant of 6 is significant
    assert mcnemar_power(50, 0.0, 0.3) == 0.0  # the other side is never found better
    assert mcnemar_power(96, 0.20, 0.05) > mcnemar_power(48, 0.20, 0.05)  # more questions, more power
    with pytest.raises(ValueError, match="p_worse"):
        mcnemar_power(10, 0.7, 0.5)


def test_kept_share_is_paired() -> None:
    base = [1.0] * 80 + [0.0] * 20
    other = [1.0] * 76 + [0.0] * 24  # loses 4 of the 80 the baseline answered
    share, interval = kept_share(base, other)
    assert share == pytest.approx(0.95) and interval.low < 0.95 < interval.high <= 1.0
    # unpaired, the two 95% Wilson intervals of 0.80 and 0.76 overlap widely; paired, the interval is tight
    assert interval.high - interval.low < 0.1
    assert kept_share(base, base)[1] == Interval(1.0, 1.0, "paired-bootstrap")
    assert kept_share([0.0, 0.0], [1.0, 0.0]) == (1.0, Interval(1.0, 1.0, "paired-bootstrap"))
    with pytest.raises(ValueError, match="same non-zero number"):
        kept_share([1.0], [1.0, 0.0])


@given(st.lists(st.tuples(st.sampled_from([0.0, 0.5, 1.0]), st.sampled_from([0.0, 0.5, 1.0])), min_size=1, max_size=60))
@settings(max_examples=40, deadline=None)
def test_kept_share_interval_is_ordered_and_respects_dominance(pairs: list[tuple[float, float]]) -> None:
    base, other = [b for b, _ in pairs], [o for _, o in pairs]
    share, interval = kept_share(base, other, resamples=200)
    assert 0.0 <= interval.low <= interval.high and share >= 0.0
    if all(o >= b for b, o in pairs):  # every resample keeps at least all of the baseline's score
        assert interval.low >= 1.0 and share >= 1.0
    if all(o <= b for b, o in pairs) and sum(base) > 0:
        assert interval.high <= 1.0 and share <= 1.0
