"""Paired A/B statistics over per-pair scores: pair i is A's and B's image of the same prompt and seed.

A win is a strictly higher score, as in the authors' compare_rate.py; ties are counted apart. Win rates are
over all N pairs (the authors' definition: ties lower both), with Wilson score intervals. The sign test drops
the ties and is exact (two-sided binomial, p = 1/2). Means and the paired mean difference get percentile
bootstrap intervals from one set of resampled pairs (seeded, so a report is reproducible).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

Z_95 = 1.959963984540054  # the standard normal's 97.5 % quantile
ALPHA = 0.05


@dataclass(frozen=True)
class Interval:
    low: float
    high: float

    def excludes(self, value: float) -> bool:
        return not (self.low <= value <= self.high)


@dataclass(frozen=True)
class PairedSummary:
    """What the report says about one scorer (A minus B for differences)."""

    n: int
    mean_a: float
    mean_a_ci: Interval
    mean_b: float
    mean_b_ci: Interval
    mean_diff: float
    diff_ci: Interval
    wins_a: int
    wins_b: int
    ties: int
    win_rate_a: float  # wins_a / n
    win_rate_a_ci: Interval
    win_rate_b: float
    win_rate_b_ci: Interval
    sign_test_p: float
    resamples: int
    seed: int


def wilson(k: int, n: int, z: float = Z_95) -> Interval:
    """The Wilson score interval of a proportion k / n (n = 0: the whole [0, 1])."""
    if n == 0:
        return Interval(0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Interval(max(0.0, centre - half), min(1.0, centre + half))


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided sign test of wins vs losses (ties already dropped): P(|X − n/2| ≥ |k − n/2|), X ~ Bin(n, ½)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n] pair indices drawn with replacement (numpy's PCG64 seeded with ``seed``)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def percentile_interval(stats: np.ndarray, confidence: float = 0.95) -> Interval:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return Interval(float(low), float(high))


def paired_summary(
    a, b, resamples: int = 10_000, seed: int = 0, confidence: float = 0.95
) -> PairedSummary:
    """Summary of paired scores ``a[i]`` vs ``b[i]``; ``resamples`` bootstrap draws of the pairs."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"scores: {a.size} scores for A but {b.size} for B; every pair needs both")
    if a.size == 0:
        raise ValueError("scores: no pairs to compare")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("scores: a score is NaN or infinite")
    n = int(a.size)
    wins_a, wins_b = int((a > b).sum()), int((a < b).sum())
    idx = bootstrap_indices(n, resamples, seed)
    z = Z_95 if math.isclose(confidence, 0.95) else _normal_quantile(0.5 + confidence / 2)
    return PairedSummary(
        n=n,
        mean_a=float(a.mean()),
        mean_a_ci=percentile_interval(a[idx].mean(axis=1), confidence),
        mean_b=float(b.mean()),
        mean_b_ci=percentile_interval(b[idx].mean(axis=1), confidence),
        mean_diff=float((a - b).mean()),
        diff_ci=percentile_interval((a - b)[idx].mean(axis=1), confidence),
        wins_a=wins_a,
        wins_b=wins_b,
        ties=n - wins_a - wins_b,
        win_rate_a=wins_a / n,
        win_rate_a_ci=wilson(wins_a, n, z),
        win_rate_b=wins_b / n,
        win_rate_b_ci=wilson(wins_b, n, z),
        sign_test_p=sign_test_p(wins_a, wins_b),
        resamples=resamples,
        seed=seed,
    )


def min_pairs_for_significance(alpha: float = ALPHA) -> int:
    """The fewest non-tied pairs with which the sign test can reach p < alpha at all (6 for 0.05)."""
    n = 1
    while sign_test_p(n, 0) >= alpha:
        n += 1
    return n


def verdict(s: PairedSummary, scorer: str, label_a: str = "A", label_b: str = "B", alpha: float = ALPHA) -> str:
    """One plain-language sentence about ``s``."""
    decided = s.wins_a + s.wins_b
    floor = min_pairs_for_significance(alpha)
    if decided < floor:
        return (
            f"{scorer}: too few pairs to tell {label_a} from {label_b} ({decided} without a tie; even if one side "
            f"won all of them the sign test needs at least {floor}). Add prompts or seeds."
        )
    better, other = (label_a, label_b) if s.mean_diff > 0 else (label_b, label_a)
    by_mean = s.diff_ci.excludes(0.0)
    by_wins = s.sign_test_p < alpha
    if by_mean and by_wins:
        winner_rate = s.win_rate_a if better == label_a else s.win_rate_b
        return (
            f"{scorer}: {better} scores higher (mean difference {s.mean_diff:+.4g}, 95 % CI [{s.diff_ci.low:+.4g}, "
            f"{s.diff_ci.high:+.4g}]; {better} wins {100 * winner_rate:.1f} % of {s.n} pairs, sign test p = "
            f"{s.sign_test_p:.3g})."
        )
    if by_mean or by_wins:
        return (
            f"{scorer}: mixed evidence for {better} over {other} with {s.n} pairs: the "
            f"mean difference's CI [{s.diff_ci.low:+.4g}, {s.diff_ci.high:+.4g}] "
            f"{'excludes' if by_mean else 'includes'} 0 but the sign test gives p = {s.sign_test_p:.3g}. More pairs "
            "would settle it."
        )
    return (
        f"{scorer}: no difference shown between {label_a} and {label_b} with {s.n} pairs (mean difference "
        f"{s.mean_diff:+.4g}, 95 % CI [{s.diff_ci.low:+.4g}, {s.diff_ci.high:+.4g}]; sign test p = "
        f"{s.sign_test_p:.3g}). The interval narrows as 1/√N: four times the pairs halve it."
    )


def _normal_quantile(p: float) -> float:
    """Φ⁻¹(p) by bisection on math.erf (for confidence levels other than 95 %)."""
    lo, hi = -10.0, 10.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
