"""Intervals and paired tests for benchmark scores: pure functions of lists of numbers, deterministic.

- `wilson`: the Wilson score interval of a proportion (Wilson 1927), for scores that are all 0 or 1. Unlike the
  normal approximation it stays inside [0, 1] and is not empty at 0/n or n/n.
- `bootstrap`: a percentile bootstrap interval of the mean of group means (each group, e.g. a task, resampled on its
  own), for partial-credit scores; seeded, so the same scores give the same interval.
- `score_interval`: Wilson where it applies, the bootstrap for one task with partial credit, and for an average over
  tasks the tasks' own intervals `combined`.
- `mcnemar`: the exact McNemar test, a two-sided binomial test on the discordant pairs of two 0/1 scorings of the
  same questions; `sign_flip`: a paired permutation test of the mean difference (exact up to 16 non-zero
  differences, else Monte Carlo with a fixed seed); `paired_test` picks the one that applies;
- `kept_share`: the share of a baseline's score another scoring of the same questions keeps, with a paired
  bootstrap interval (what "keeps 95% of the uncompressed score" is decided on);
- `mcnemar_power`: how likely the exact McNemar test finds a given paired difference with n questions (to size a
  suite).

Every question counts as an independent draw; questions that share a context are not, so these intervals are a
little narrower than the truth on multi-question tasks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from statistics import NormalDist

import numpy as np

from kvsqueeze.validation import check_float, check_int

LEVEL = 0.95
ALPHA = 0.05  # a paired difference with p < ALPHA is reported as significant
RESAMPLES = 2000  # bootstrap resamples
FLIPS = 10_000  # Monte Carlo sign flips, where exact enumeration is too long
EXACT_FLIPS = 16  # enumerate all 2**m sign vectors up to m non-zero differences
_CHUNK = 2**22  # numbers drawn at once (memory bound: 32 MiB of float64)


@dataclass(frozen=True)
class Interval:
    """A confidence interval [low, high] of a score in [0, 1], and how it was computed ('wilson' or 'bootstrap')."""

    low: float
    high: float
    method: str


@dataclass(frozen=True)
class PairedTest:
    """One cell compared with a baseline on the same questions: `difference` is the mean of (cell - baseline),
    `better` / `worse` count the questions where the cell scored higher / lower, `p_value` is two-sided."""

    test: str  # 'mcnemar' (0/1 scores) or 'sign-flip' (partial credit)
    pairs: int
    difference: float
    better: int
    worse: int
    p_value: float

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA


def _z(level: float) -> float:
    check_float("level", level, 0.0, 1.0, low_open=True, high_open=True)
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson(successes: int, n: int, level: float = LEVEL) -> Interval:
    """The Wilson score interval of `successes` out of `n`."""
    check_int("n", n, 1)
    check_int("successes", successes, 0, n)
    z2 = _z(level) ** 2
    p = successes / n
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) * math.sqrt(z2) / (1 + z2 / n)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Interval(low, high, "wilson")


def is_binary(values: Sequence[float]) -> bool:
    """Whether every value is 0 or 1."""
    return all(v in (0.0, 1.0) for v in values)


def _checked_groups(groups: Sequence[Sequence[float]]) -> list[np.ndarray]:
    arrays = [np.asarray(g, dtype=np.float64) for g in groups]
    if not arrays or any(a.ndim != 1 or a.size == 0 for a in arrays):
        raise ValueError(f"need at least one group, each with at least one score; got sizes {[a.size for a in arrays]}")
    return arrays


def _resampled_means(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples,) means of `values` resampled with replacement."""
    out = np.empty(resamples)
    step = max(1, _CHUNK // values.size)
    for start in range(0, resamples, step):
        stop = min(resamples, start + step)
        out[start:stop] = values[rng.integers(0, values.size, size=(stop - start, values.size))].mean(axis=1)
    return out


def bootstrap(
    groups: Sequence[Sequence[float]], level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0
) -> Interval:
    """Percentile bootstrap interval of the mean of the group means: each group is resampled with replacement
    within itself (a stratified bootstrap), `resamples` times, from a generator seeded with `seed`."""
    check_int("resamples", resamples, 100, 10_000_000)
    check_int("seed", seed, 0)
    _z(level)  # checks the level
    arrays = _checked_groups(groups)
    tail = (1 - level) / 2
    rng = np.random.default_rng(seed)
    means = np.mean([_resampled_means(a, resamples, rng) for a in arrays], axis=0)
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(low), float(high), "bootstrap")


def combined(means: Sequence[float], intervals: Sequence[Interval]) -> Interval:
    """The interval of the mean of T independent estimates, from their own intervals (all at one level): each gives
    a standard error se = width / 2z, and the mean's interval is mean ± z·√(Σ se²) / T, cut to [0, 1]."""
    if not means or len(means) != len(intervals):
        raise ValueError(f"need one interval per mean, got {len(means)} means and {len(intervals)} intervals")
    centre = sum(means) / len(means)
    half = math.sqrt(sum(((i.high - i.low) / 2) ** 2 for i in intervals)) / len(means)  # each half-width is z·se
    return Interval(max(0.0, centre - half), min(1.0, centre + half), "combined")


def score_interval(groups: Sequence[Sequence[float]], level: float = LEVEL, seed: int = 0) -> Interval:
    """The interval of the mean of group (task) means:

    - every score 0 or 1 and the groups of one size (the mean of means is then one proportion): Wilson;
    - one group with partial credit: the percentile bootstrap;
    - several groups otherwise: each group's own interval (Wilson or bootstrap), `combined`. A stratified bootstrap
      would be narrower but wrong at the edges: a task whose questions all scored 1 would count as certain.
    """
    arrays = _checked_groups(groups)
    if len({a.size for a in arrays}) == 1 and all(is_binary(a.tolist()) for a in arrays):
        n = sum(a.size for a in arrays)
        return wilson(int(sum(a.sum() for a in arrays)), n, level)
    if len(arrays) == 1:
        return bootstrap(groups, level, seed=seed)
    each = [score_interval([a.tolist()], level, seed) for a in arrays]
    return combined([float(a.mean()) for a in arrays], each)


def mcnemar(better: int, worse: int) -> float:
    """Exact two-sided McNemar p-value from the discordant pairs: twice the binomial(better + worse, 1/2) tail of the
    smaller count, at most 1 (no discordant pair: 1)."""
    check_int("better", better, 0)
    check_int("worse", worse, 0)
    n, k = better + worse, min(better, worse)
    tail = Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2**n)
    return float(min(Fraction(1), 2 * tail))


def sign_flip(differences: Sequence[float], resamples: int = FLIPS, seed: int = 0) -> float:
    """Two-sided p-value of a paired sign-flip permutation test of the mean difference: under the null each
    difference is as likely negative as positive. Exact with up to 16 non-zero differences; otherwise
    `resamples` random sign vectors from a generator seeded with `seed`, p = (1 + hits) / (1 + resamples)."""
    check_int("resamples", resamples, 100, 10_000_000)
    d = np.asarray([x for x in differences if x != 0], dtype=np.float64)
    if d.size == 0:
        return 1.0
    observed = abs(d.sum()) - 1e-9 * max(1.0, float(np.abs(d).sum()))  # ties count as extreme
    if d.size <= EXACT_FLIPS:
        bits = (np.arange(2**d.size)[:, None] >> np.arange(d.size)) & 1
        return float(np.mean(np.abs((2 * bits - 1) @ d) >= observed))
    rng, hits = np.random.default_rng(seed), 0
    step = max(1, _CHUNK // d.size)
    for start in range(0, resamples, step):
        signs = rng.integers(0, 2, size=(min(step, resamples - start), d.size)) * 2 - 1
        hits += int(np.sum(np.abs(signs @ d) >= observed))
    return (1 + hits) / (1 + resamples)


def paired_test(baseline: Sequence[float], other: Sequence[float], seed: int = 0) -> PairedTest:
    """`other` against `baseline`, paired question by question (same order): exact McNemar when every score is
    0 or 1, else the sign-flip test."""
    if len(baseline) != len(other) or not baseline:
        raise ValueError(f"need the same non-zero number of scores on both sides, got {len(baseline)} and {len(other)}")
    diffs = [o - b for b, o in zip(baseline, other, strict=True)]
    better, worse = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    binary = is_binary(baseline) and is_binary(other)
    p = mcnemar(better, worse) if binary else sign_flip(diffs, seed=seed)
    return PairedTest("mcnemar" if binary else "sign-flip", len(diffs), sum(diffs) / len(diffs), better, worse, p)


def kept_share(
    baseline: Sequence[float], other: Sequence[float], level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, Interval]:
    """(mean(other) / mean(baseline), its percentile bootstrap interval): the questions, paired (same order), are
    resampled with replacement `resamples` times from a generator seeded with `seed`. Pairing makes the interval much
    narrower than comparing two separate intervals: questions both scorings answer alike do not add to it. A baseline
    scoring 0 everywhere keeps everything (share 1). The interval is of a ratio, so it may pass 1."""
    if len(baseline) != len(other) or not baseline:
        raise ValueError(f"need the same non-zero number of scores on both sides, got {len(baseline)} and {len(other)}")
    check_int("resamples", resamples, 100, 10_000_000)
    check_int("seed", seed, 0)
    _z(level)
    base, mine = np.asarray(baseline, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if base.sum() == 0:
        return 1.0, Interval(1.0, 1.0, "paired-bootstrap")

    def share(b: np.ndarray, o: np.ndarray) -> np.ndarray:
        safe = np.where(b > 0, b, 1.0)
        return np.where(b > 0, o / safe, np.where(o > 0, np.inf, 1.0))

    point = float(share(base.sum(keepdims=True), mine.sum(keepdims=True))[0])
    rng, out = np.random.default_rng(seed), np.empty(resamples)
    step = max(1, _CHUNK // base.size)
    for start in range(0, resamples, step):
        idx = rng.integers(0, base.size, size=(min(step, resamples - start), base.size))
        out[start : start + idx.shape[0]] = share(base[idx].sum(axis=1), mine[idx].sum(axis=1))
    tail = (1 - level) / 2
    low, high = np.quantile(out, [tail, 1 - tail], method="inverted_cdf")  # no interpolation: a share may be inf
    return point, Interval(float(low), float(high), "paired-bootstrap")


def _log_binom_pmf(k: int, n: int, p: float) -> float:
    if p in (0.0, 1.0):
        return 0.0 if k == round(n * p) else -math.inf
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)


def mcnemar_power(n: int, p_better: float, p_worse: float, alpha: float = ALPHA) -> float:
    """The probability that the exact McNemar test (`mcnemar`) finds, at p < `alpha`, that one side is better, on `n`
    paired questions of which a fraction `p_better` go its way and `p_worse` the other way (the rest are ties).

    The number of discordant questions D is binomial(n, p_better + p_worse); given D, the test is significant in the
    right direction when the better side's count reaches the smallest b > D / 2 with mcnemar(b, D - b) < alpha."""
    check_int("n", n, 1, 10_000)
    check_float("p_better", p_better, 0.0, 1.0)
    check_float("p_worse", p_worse, 0.0, 1.0 - p_better)
    check_float("alpha", alpha, 0.0, 1.0, low_open=True, high_open=True)
    discordant = p_better + p_worse
    if p_better == 0.0:
        return 0.0
    share, power = p_better / discordant, 0.0
    for d in range(1, n + 1):
        weight = math.exp(_log_binom_pmf(d, n, discordant))
        if weight < 1e-15:  # far in the tail: skip the exact test
            continue
        critical = next((b for b in range(d // 2 + 1, d + 1) if mcnemar(b, d - b) < alpha), None)
        if critical is None:
            continue
        power += weight * sum(math.exp(_log_binom_pmf(b, d, share)) for b in range(critical, d + 1))
    return min(1.0, power)
