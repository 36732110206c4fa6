"""docs/FAULTS.md's fault table is exactly what the tests' ``pytest.mark.fault`` markers say."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("fault_table", ROOT / "scripts" / "fault_table.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_readme_table_is_generated_from_the_tests():
    ft = _script()
    faults = ft.collect()
    got = ft.readme_block((ROOT / "docs" / "FAULTS.md").read_text())
    assert got is not None, "docs/FAULTS.md lacks the fault-table block"
    assert got == ft.block(faults), "docs/FAULTS.md fault table is stale: run python scripts/fault_table.py --write"


def test_every_issue_area_has_tried_faults():
    """Hostile files, paths, isolation, training faults: each area has tests in the table, in every tier it needs."""
    faults = _script().collect()
    text = " ".join(f"{f.tried} {f.does}".lower() for f in faults)
    for word in (
        "truncated",
        "pickle",
        "header",
        "nan",
        "symlink",
        "..",
        "absolute",
        "overwrit",
        "cancel",
        "out of memory",
        "resume",
        "bit-identical",
        "different offsets",
    ):
        assert word in text, f"no fault-table entry mentions {word!r}"
    assert {f.tier for f in faults} >= {"unit", "host", "e2e"}


def test_collector_reads_markers_and_refuses_malformed_ones(tmp_path):
    ft = _script()
    (tmp_path / "unit").mkdir()
    (tmp_path / "unit" / "test_x.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.fault('a | b', 'c')\n"
        "@pytest.mark.parametrize('x', [1])\n"
        "def test_one(x):\n    pass\n\n"
        "def test_unmarked():\n    pass\n"
    )
    faults = ft.collect(tmp_path)
    assert [(f.tried, f.does, f.test, f.tier) for f in faults] == [("a | b", "c", "unit/test_x.py::test_one", "unit")]
    assert "a \\| b" in ft.table(faults)
    (tmp_path / "unit" / "test_y.py").write_text(
        "import pytest\n\n@pytest.mark.fault('only one')\ndef test_y():\n    pass\n"
    )
    with pytest.raises(ValueError, match="two string literals"):
        ft.collect(tmp_path)
