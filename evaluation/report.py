"""The paired A/B report: readable text, a JSON document and one CSV row per pair, from per-pair scores."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict

from .stats import PairedSummary, paired_summary, verdict

REPORT_FORMAT = "comfyui-npo-compare/1"


def summarise(
    scores_a: Mapping[str, Sequence[float]], scores_b: Mapping[str, Sequence[float]], resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, PairedSummary]:
    """One summary per scorer (the same scorers on both sides)."""
    if set(scores_a) != set(scores_b):
        raise ValueError(f"scores: A has scorers {sorted(scores_a)}, B {sorted(scores_b)}")
    return {k: paired_summary(scores_a[k], scores_b[k], resamples, seed) for k in scores_a}


def text_report(summaries: Mapping[str, PairedSummary], label_a: str = "A", label_b: str = "B") -> str:
    lines = [f"{label_a} vs {label_b}: {next(iter(summaries.values())).n} pairs (same prompt and seed)"]
    for scorer, s in summaries.items():
        lines += [
            "",
            f"{scorer}",
            f"  mean {label_a} {s.mean_a:.4f} [{s.mean_a_ci.low:.4f}, {s.mean_a_ci.high:.4f}]   "
            f"mean {label_b} {s.mean_b:.4f} [{s.mean_b_ci.low:.4f}, {s.mean_b_ci.high:.4f}]",
            f"  difference {label_a} − {label_b} {s.mean_diff:+.4f} [{s.diff_ci.low:+.4f}, {s.diff_ci.high:+.4f}] "
            f"(paired bootstrap, {s.resamples} resamples)",
            f"  {label_a} wins {s.wins_a} ({100 * s.win_rate_a:.1f} % [{100 * s.win_rate_a_ci.low:.1f}, "
            f"{100 * s.win_rate_a_ci.high:.1f}]), {label_b} wins {s.wins_b} ({100 * s.win_rate_b:.1f} %), ties "
            f"{s.ties}; sign test p = {s.sign_test_p:.3g}",
            f"  {verdict(s, scorer, label_a, label_b)}",
        ]
    lines += ["", "95 % intervals; a win is a strictly higher score (ties count for neither), as the authors'."]
    return "\n".join(lines)


def json_report(
    summaries: Mapping[str, PairedSummary], label_a: str, label_b: str, pairs: Sequence[Mapping] = ()
) -> str:
    doc = {
        "format": REPORT_FORMAT,
        "label_a": label_a,
        "label_b": label_b,
        "scorers": {k: {**asdict(s), "verdict": verdict(s, k, label_a, label_b)} for k, s in summaries.items()},
        "pairs": list(pairs),
    }
    return json.dumps(doc, indent=2, ensure_ascii=False)


def csv_report(
    scores_a: Mapping[str, Sequence[float]], scores_b: Mapping[str, Sequence[float]], labels: Sequence[str] = ()
) -> str:
    """One row per pair: index, label (e.g. the file name or prompt), then A and B score per scorer."""
    scorers = list(scores_a)
    n = len(next(iter(scores_a.values()))) if scorers else 0
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["pair", "label", *[f"{k}_{side}" for k in scorers for side in ("a", "b")]])
    for i in range(n):
        row = [i, labels[i] if i < len(labels) else ""]
        for k in scorers:
            row += [repr(float(scores_a[k][i])), repr(float(scores_b[k][i]))]
        w.writerow(row)
    return out.getvalue()
