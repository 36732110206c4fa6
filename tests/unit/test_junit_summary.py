"""scripts/junit_summary.py: counts per run from hand-written JUnit reports, and the last line naming the
ComfyUI versions that passed and failed."""

from __future__ import annotations

from pathlib import Path

import junit_summary


def _report(path: Path, tests: int, failures: int = 0, skipped: int = 0) -> str:
    cases = "".join(f'<testcase name="t{i}"/>' for i in range(tests - failures - skipped))
    cases += "".join(f'<testcase name="f{i}"><failure message="boom"/></testcase>' for i in range(failures))
    cases += "".join(f'<testcase name="s{i}"><skipped message="not here"/></testcase>' for i in range(skipped))
    path.write_text(
        f'<testsuites><testsuite tests="{tests}" failures="{failures}" errors="0" skipped="{skipped}">'
        f"{cases}</testsuite></testsuites>"
    )
    return str(path)


def test_the_last_line_names_the_versions_that_passed_and_failed(tmp_path, capsys):
    runs = [
        f"unit (no ComfyUI)|{_report(tmp_path / 'u.xml', 5)}|0|3",
        f"ComfyUI v0.3.64|{_report(tmp_path / 'a.xml', 10, skipped=2)}|0|60",
        f"ComfyUI v0.14.1|{_report(tmp_path / 'b.xml', 10, failures=1)}|1|61",
        f"ComfyUI v0.33.0|{_report(tmp_path / 'c.xml', 9)}|0|62",
        f"ComfyUI v0.40.0 at /opt/ComfyUI|{tmp_path / 'missing.xml'}|2|1",
    ]
    assert junit_summary.main(runs) == 1
    out = capsys.readouterr().out.splitlines()
    assert "ComfyUI v0.3.64: 8 passed, 0 failed, 0 errors, 2 skipped in 60 s: ok" in out
    assert "ComfyUI v0.14.1: 9 passed, 1 failed, 0 errors, 0 skipped in 61 s: FAILED (exit 1)" in out
    assert out[-2] == (
        "ComfyUI versions passed on: v0.3.64, v0.33.0; failed on: v0.14.1, v0.40.0 at /opt/ComfyUI"
    )


def test_a_version_where_nothing_passed_is_not_named_as_passed(tmp_path, capsys):
    runs = [f"ComfyUI v0.33.0|{_report(tmp_path / 'a.xml', 3, skipped=3)}|0|5"]
    assert junit_summary.main(runs) == 0
    assert capsys.readouterr().out.splitlines()[-2] == (
        "ComfyUI versions passed on: none; failed on: v0.33.0 (nothing passed)"
    )


def test_no_comfyui_run_prints_no_versions_line(tmp_path, capsys):
    assert junit_summary.main([f"unit (no ComfyUI)|{_report(tmp_path / 'u.xml', 2)}|0|1"]) == 0
    assert not any("versions passed on" in line for line in capsys.readouterr().out.splitlines())
