"""The paired A/B report's numbers against hand computations and scipy (a test-only reference)."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import scipy.stats

from comfyui_npo.evaluation import folders, report, stats

# 12 pairs, hand-counted: A higher in 7 (0, 1, 3, 4, 6, 9, 11), B higher in 3 (2, 5, 8), ties in 2 (7, 10)
A = [0.9, 0.8, 0.1, 0.7, 0.6, 0.2, 0.95, 0.5, 0.3, 0.65, 0.4, 0.85]
B = [0.5, 0.7, 0.3, 0.2, 0.55, 0.6, 0.35, 0.5, 0.45, 0.6, 0.4, 0.25]


def test_wins_losses_and_ties_are_counted_as_the_authors_do():
    s = stats.paired_summary(A, B, resamples=200)
    assert (s.n, s.wins_a, s.wins_b, s.ties) == (12, 7, 3, 2)
    assert s.win_rate_a == 7 / 12 and s.win_rate_b == 3 / 12  # over all pairs: ties lower both rates
    assert s.mean_a == pytest.approx(sum(A) / 12) and s.mean_b == pytest.approx(sum(B) / 12)
    assert s.mean_diff == pytest.approx((sum(A) - sum(B)) / 12)
    swapped = stats.paired_summary(B, A, resamples=200)
    assert (swapped.wins_a, swapped.wins_b, swapped.ties) == (3, 7, 2)
    assert swapped.mean_diff == pytest.approx(-s.mean_diff)
    assert swapped.sign_test_p == s.sign_test_p


def test_one_pair_swapped_changes_the_counts():
    """Scores must stay paired by index: moving one of B's scores to another pair changes the result."""
    b = list(B)
    b[1], b[3] = b[3], b[1]  # pair 1: 0.8 vs 0.2 (A, was A); pair 3: 0.7 vs 0.7 (tie, was A)
    s = stats.paired_summary(A, b, resamples=200)
    assert (s.wins_a, s.wins_b, s.ties) == (6, 3, 3)


@pytest.mark.parametrize("wins, losses", [(7, 3), (0, 0), (5, 0), (0, 6), (30, 19), (250, 200), (13, 13)])
def test_exact_sign_test_matches_scipy(wins, losses):
    n = wins + losses
    want = 1.0 if n == 0 else scipy.stats.binomtest(wins, n, 0.5, alternative="two-sided").pvalue
    assert stats.sign_test_p(wins, losses) == pytest.approx(want, rel=1e-12, abs=1e-300)


def test_sign_test_by_hand():
    # 7 wins, 3 losses: P(X ≤ 3) = (1 + 10 + 45 + 120) / 1024, doubled
    assert stats.sign_test_p(7, 3) == pytest.approx(2 * 176 / 1024)
    assert stats.min_pairs_for_significance() == 6  # 5-0: p = 2/32 = 0.0625; 6-0: 2/64 = 0.03125


@pytest.mark.parametrize("k, n", [(7, 12), (0, 10), (10, 10), (1, 3), (312, 500)])
def test_wilson_interval_matches_scipy_and_the_formula(k, n):
    got = stats.wilson(k, n)
    ci = scipy.stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert (got.low, got.high) == pytest.approx((ci.low, ci.high), abs=1e-12)
    z, p = 1.959963984540054, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert got.low == pytest.approx(max(0.0, centre - half)) and got.high == pytest.approx(min(1.0, centre + half))


def test_paired_bootstrap_by_hand_and_against_scipy():
    rng = np.random.default_rng(5)
    a = rng.normal(0.3, 1.0, 200)
    b = a - 0.2 + rng.normal(0, 0.5, 200)  # correlated with a: the paired interval is much narrower
    s = stats.paired_summary(a, b, resamples=4000, seed=11)
    # by hand: the same resampled pair indices, a loop over resamples, the 2.5 / 97.5 percentiles
    idx = np.random.default_rng(11).integers(0, 200, size=(4000, 200))
    diffs = sorted(float(np.mean([a[j] - b[j] for j in row])) for row in idx)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    assert (s.diff_ci.low, s.diff_ci.high) == pytest.approx((lo, hi), rel=1e-9)
    means_a = [float(np.mean(a[row])) for row in idx]
    assert (s.mean_a_ci.low, s.mean_a_ci.high) == pytest.approx(tuple(np.percentile(means_a, [2.5, 97.5])))
    # scipy's own percentile bootstrap (its own random draws): the same interval within resampling noise
    ref = scipy.stats.bootstrap((a - b,), np.mean, n_resamples=20000, method="percentile", random_state=1)
    se = float(np.std(a - b) / np.sqrt(200))
    assert abs(s.diff_ci.low - ref.confidence_interval.low) < 0.1 * se
    assert abs(s.diff_ci.high - ref.confidence_interval.high) < 0.1 * se
    unpaired = stats.paired_summary(a, rng.permutation(b), resamples=4000, seed=11)
    assert (s.diff_ci.high - s.diff_ci.low) < 0.6 * (unpaired.diff_ci.high - unpaired.diff_ci.low)


def test_bad_scores_are_refused():
    with pytest.raises(ValueError, match="every pair needs both"):
        stats.paired_summary([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="no pairs"):
        stats.paired_summary([], [])
    with pytest.raises(ValueError, match="NaN"):
        stats.paired_summary([1.0, float("nan")], [1.0, 2.0])


def test_verdicts():
    small = stats.paired_summary([2, 3, 4, 5, 6], [1, 2, 3, 4, 5], resamples=500)
    assert "too few pairs" in stats.verdict(small, "PickScore") and "at least 6" in stats.verdict(small, "PickScore")
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, 400)
    clear = stats.paired_summary(a + 0.5, a + rng.normal(0, 0.1, 400), resamples=2000)
    text = stats.verdict(clear, "HPS", "NPO", "plain")
    assert text.startswith("HPS: NPO scores higher") and "sign test p" in text
    null = stats.paired_summary(a, a[::-1].copy(), resamples=2000)
    assert "no difference shown" in stats.verdict(null, "HPS")


def test_report_text_json_and_csv():
    sa, sb = {"PickScore": A, "Aesthetic": B}, {"PickScore": B, "Aesthetic": A}
    summaries = report.summarise(sa, sb, resamples=500, seed=3)
    text = report.text_report(summaries, "NPO", "plain")
    assert "NPO vs plain: 12 pairs" in text and "NPO wins 7 (58.3 %" in text and "ties 2" in text
    assert "NPO wins 3 (25.0 %" in text  # the aesthetic rows are the swapped scores
    doc = json.loads(report.json_report(summaries, "NPO", "plain", [{"prompt": "p"}] * 12))
    assert doc["format"] == report.REPORT_FORMAT and doc["scorers"]["PickScore"]["wins_a"] == 7
    assert doc["scorers"]["Aesthetic"]["sign_test_p"] == pytest.approx(stats.sign_test_p(3, 7))
    rows = list(csv.reader(io.StringIO(report.csv_report(sa, sb, [f"img{i}" for i in range(12)]))))
    assert rows[0] == ["pair", "label", "PickScore_a", "PickScore_b", "Aesthetic_a", "Aesthetic_b"]
    assert len(rows) == 13 and rows[3][1] == "img2" and float(rows[3][2]) == A[2] and float(rows[3][3]) == B[2]
    with pytest.raises(ValueError, match="scorers"):
        report.summarise({"PickScore": A}, {"HPS": B})


def _folder(root, names, prompt=lambda n: f"prompt of {n}", skip_txt=()):
    root.mkdir()
    for n in names:
        (root / f"{n}.png").write_bytes(b"png")
        if n not in skip_txt:
            (root / f"{n}.txt").write_text(prompt(n) + "\n", encoding="utf-8")
    return root


def test_folder_pairs_follow_compare_rate(tmp_path):
    a = _folder(tmp_path / "a", [f"{i:03}" for i in range(30)] + ["only_a"], skip_txt=("005",))
    b = _folder(tmp_path / "b", [f"{i:03}" for i in range(30)] + ["only_b"],
                prompt=lambda n: "other" if n == "007" else f"prompt of {n}", skip_txt=("009",))
    (b / "notes.txt").write_text("x")
    got = folders.common_pairs(a, b, count=10, seed=4)
    assert got.common == 30 and sorted(got.without_prompt) == ["005.png", "009.png"]
    assert len(got.names) == 10 and len(set(got.names)) == 10
    assert not {"005.png", "009.png", "only_a.png", "only_b.png"} & set(got.names)
    assert got.prompts == [f"prompt of {n[:-4]}" for n in got.names]
    assert got.names == folders.common_pairs(a, b, count=10, seed=4).names  # reproducible
    assert got.names != folders.common_pairs(a, b, count=10, seed=5).names
    every = folders.common_pairs(a, b, count=500)
    assert len(every.names) == 28 and every.prompt_differs == ["007.png"]
    with pytest.raises(ValueError, match="folder_b"):
        folders.common_pairs(a, tmp_path / "missing")
