"""Print one summary line per pytest run of ``scripts/test.sh`` and exit non-zero if any run failed.

Usage: python scripts/junit_summary.py "LABEL|JUNIT_XML|EXIT_CODE|SECONDS" ...

Counts come from each run's JUnit XML (passed = tests − failures − errors − skipped); below each run,
the reasons of its skipped tests, with counts (a skipped tier or browser module shows up here). A run
fails when pytest exited non-zero, including exit 5 (no test collected), or when it wrote no report.
The last line names the ComfyUI versions (runs labelled "ComfyUI <version>...") that passed and failed; a
run that passed without a single passing test counts as failed there ("nothing passed").
Standard library only.
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter


def counts(xml_path: str) -> dict[str, int] | None:
    """{"passed", "failed", "errors", "skipped"} summed over the report's test suites; None if unreadable."""
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in total:
            total[key] += int(suite.get(key, 0))
    failed, errors, skipped = total["failures"], total["errors"], total["skipped"]
    passed = total["tests"] - failed - errors - skipped
    return {"passed": passed, "failed": failed, "errors": errors, "skipped": skipped}


def skip_reasons(xml_path: str) -> Counter:
    """Skip message → number of tests skipped with it."""
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        return Counter()
    reasons = Counter()
    for case in root.iter("testcase"):
        skipped = case.find("skipped")
        if skipped is not None:
            message = skipped.get("message") or ""
            if message == "collection skipped":  # a module skipped as a whole: the reason is in the text
                found = re.search(r"Skipped: (.*?)['\"]\)\s*$", skipped.text or "", re.S)
                message = found.group(1) if found else message
            message = message.removeprefix("Skipped: ").strip()
            reasons[message.splitlines()[0][:160] if message else "no reason given"] += 1
    return reasons


def versions_line(outcomes: list[tuple[str, bool]]) -> str:
    """"passed on: A, B; failed on: C" over the runs labelled "ComfyUI <version>"; "" when there are none."""
    comfy = [(label.removeprefix("ComfyUI ").strip(), good) for label, good in outcomes if label.startswith("ComfyUI ")]
    if not comfy:
        return ""
    passed = ", ".join(v for v, good in comfy if good) or "none"
    failed = ", ".join(v for v, good in comfy if not good) or "none"
    return f"ComfyUI versions passed on: {passed}; failed on: {failed}"


def main(runs: list[str]) -> int:
    ok = True
    lines = []
    outcomes: list[tuple[str, bool]] = []
    for run in runs:
        label, xml_path, rc, seconds = run.rsplit("|", 3)
        c = counts(xml_path)
        if c is None:
            lines.append(f"{label}: NO REPORT (pytest exit {rc}), {seconds} s")
            outcomes.append((label, False))
            ok = False
            continue
        if rc == "0" and c["passed"] == 0:
            outcomes.append((f"{label} (nothing passed)", False))
        else:
            outcomes.append((label, rc == "0"))
        verdict = "ok" if rc == "0" else ("NO TEST RAN" if rc == "5" else f"FAILED (exit {rc})")
        ok = ok and rc == "0"
        lines.append(f"{label}: {c['passed']} passed, {c['failed']} failed, {c['errors']} errors, "
                     f"{c['skipped']} skipped in {seconds} s: {verdict}")
        for reason, n in skip_reasons(xml_path).most_common():
            lines.append(f"    skipped {n}: {reason}")
    width = max((len(line) for line in lines), default=0)
    print("=" * width)
    print("Summary (one line per pytest run):")
    for line in lines:
        print(line)
    if versions_line(outcomes):
        print(versions_line(outcomes))
    print("=" * width)
    if not runs:
        print("no pytest run at all: that is a failure")
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
