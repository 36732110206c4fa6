"""scripts/check_publish.py: the pack as committed is ready but for the owner's two values, and each
defect a publish would carry (a test file shipped, a stale range, a script importing a left-out module,
a broken link, a missing icon or workflow, a description behind the features) is named."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import check_publish as cp
import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
MATRIX = ["0.3.64", "0.14.1", "0.33.0"]


def _copy(tmp_path: Path) -> Path:
    """The tracked files of this checkout (as the working tree has them) in a fresh git repository."""
    dest = tmp_path / "pack"
    for rel in cp.git_tracked(ROOT):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    _index(dest)
    return dest


def _index(root: Path) -> None:
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run(["git", "-C", str(root), "add", "-A"], check=True)


def _edit(root: Path, rel: str, old: str, new: str) -> None:
    path = root / rel
    text = path.read_text(encoding="utf-8")
    assert old in text, (rel, old)
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def _problems(root: Path, matrix: list[str] = MATRIX) -> list[str]:
    return cp.check(root, matrix)[0].problems


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    return _copy(tmp_path_factory.mktemp("publish"))


def test_the_pack_is_ready_but_for_the_owner_values(pack):
    found, shipped = cp.check(pack, MATRIX)
    assert found.problems == []
    assert len(found.owner) == 2 and "PublisherId" in found.owner[0] and "Repository" in found.owner[1]
    assert not any(p.startswith(("tests/", ".ci/", ".github/")) for p in shipped)
    assert not any(p.startswith("benchmarks/") and p.endswith(".py") for p in shipped)
    assert {"scripts/run_demo.py", "scripts/npo_headless/make_assets.py", "nodes/train.py",
            "web/npo_templates.js"} <= shipped
    assert any(p.startswith("example_workflows/") and p.endswith(".json") for p in shipped)
    assert cp.main(["--root", str(pack), "--matrix", " ".join(MATRIX), "--owner-fields", "pending"]) == 0
    assert cp.main(["--root", str(pack), "--matrix", " ".join(MATRIX)]) == 1  # a publish needs both values


def test_the_archive_is_what_comfy_cli_packs(pack):
    """comfy-cli's rule, computed by hand: git-tracked, not matched by a .comfyignore line, plus includes."""
    tracked = cp.git_tracked(pack)
    shipped = cp.archive_files(pack, tracked, [])
    assert "tests/conftest.py" in tracked and "tests/conftest.py" not in shipped
    assert "benchmarks/README.md" in shipped and "benchmarks/bench_tdft.py" not in shipped  # the ! line
    assert "scripts/gpu_check.py" not in shipped and "scripts/npo_gpucheck/plan.py" not in shipped
    assert set(tracked) - shipped == {p for p in tracked if p.startswith(("tests/", ".ci/", ".github/"))
                                      or (p.startswith("benchmarks/") and p != "benchmarks/README.md")
                                      or p in {"scripts/test.sh", "scripts/requirements-test.txt",
                                               "scripts/requirements_ok.py", "scripts/junit_summary.py",
                                               "scripts/fault_table.py", "scripts/make_thumbnails.py",
                                               "scripts/check_publish.py", "scripts/gpu_check.py",
                                               ".gitignore", ".comfyignore"}
                                      or p.startswith("scripts/npo_gpucheck/")}
    forced = cp.archive_files(pack, tracked, ["tests/unit"])  # includes override .comfyignore
    assert "tests/unit/test_offset.py" in forced


@pytest.mark.fault("a .comfyignore that leaves out web/ (the frontend extension)",
                   "the check names web/npo_templates.js as a file an install needs")
def test_a_comfyignore_dropping_the_web_extension_is_named(tmp_path):
    """WEB_DIRECTORY names ./web; an archive without it would list the templates unsorted again."""
    root = _copy(tmp_path)
    assert (root / "web" / "npo_templates.js").is_file() and 'WEB_DIRECTORY = "./web"' in (
        root / "__init__.py").read_text(encoding="utf-8")
    with (root / ".comfyignore").open("a", encoding="utf-8") as f:
        f.write("/web/\n")
    _index(root)
    assert any("web/npo_templates.js" in p and "leave out" in p for p in _problems(root))


@pytest.mark.fault("a .comfyignore that lets the tests through", "the check names the files a publish would ship")
def test_a_leaking_comfyignore_is_named(tmp_path):
    root = _copy(tmp_path)
    _edit(root, ".comfyignore", "/tests/\n", "")
    (problem,) = _problems(root)
    assert "test/benchmark/CI files" in problem and "tests/" in problem


@pytest.mark.fault("requires-comfyui or MIN_COMFYUI off the oldest version the tests run",
                   "the check names both versions")
def test_a_stale_comfyui_range_is_named(tmp_path):
    root = _copy(tmp_path)
    _edit(root, "pyproject.toml", 'requires-comfyui = ">=0.3.64"', 'requires-comfyui = ">=0.3.40"')
    (problem,) = _problems(root)
    assert "'>=0.3.40'" in problem and "0.3.64" in problem
    (problem,) = _problems(_copy(tmp_path / "b"), ["0.14.1", "0.33.0"])
    assert "0.14.1" in problem and "claim exactly what the tests prove" in problem


def test_a_description_behind_the_features_is_named(tmp_path):
    root = _copy(tmp_path)
    text = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]["description"]
    _edit(root, "pyproject.toml", text, text.replace("win rate", "numbers").replace("Qwen-Image", "others"))
    problems = _problems(root)
    assert len(problems) == 2
    assert "measuring" in problems[0] and "NPOCompareReport" in problems[0] and "Qwen-Image" in problems[1]


@pytest.mark.fault("a shipped script imports a module a publish leaves out", "the check names the import")
def test_a_shipped_import_of_a_left_out_module_is_named(tmp_path):
    root = _copy(tmp_path)
    _edit(root, "scripts/run_demo.py", "from npo_headless import REPO",
          "from npo_gpucheck import plan\nfrom npo_headless import REPO")
    (problem,) = _problems(root)
    assert problem.startswith("scripts/run_demo.py imports npo_gpucheck")
    assert "scripts/npo_gpucheck/__init__.py" in problem


def test_broken_links_missing_icon_and_workflow_are_named(tmp_path):
    root = _copy(tmp_path)
    readme = root / "README.md"
    readme.write_text(readme.read_text(encoding="utf-8") + "\n[gone](docs/NOPE.md)\n", encoding="utf-8")
    (root / cp.ICON_PATH).unlink()
    (root / cp.PUBLISH_WORKFLOW).unlink()
    problems = _problems(root)
    assert any("docs/icon.svg (the Registry icon) is missing" in p for p in problems)
    assert any("README.md links docs/NOPE.md" in p for p in problems)
    assert any("publish.yml (publish on a version bump) is missing" in p for p in problems)
    assert len(problems) == 4  # the icon: missing, and so left out of the archive


def test_setting_the_owner_values_writes_them_and_the_icon(tmp_path):
    root = _copy(tmp_path)
    code = cp.main(["--root", str(root), "--matrix", " ".join(MATRIX),
                    "--set-repository", "https://github.com/someone/ComfyUI-NPO", "--set-publisher", "someone"])
    assert code == 0
    data = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    assert data["project"]["urls"]["Repository"] == "https://github.com/someone/ComfyUI-NPO"
    assert data["tool"]["comfy"]["PublisherId"] == "someone"
    assert data["tool"]["comfy"]["Icon"] == "https://raw.githubusercontent.com/someone/ComfyUI-NPO/main/docs/icon.svg"
    _edit(root, "pyproject.toml", "/someone/ComfyUI-NPO/main/docs/icon.svg", "/other/x/main/docs/icon.svg")
    (problem,) = _problems(root)
    assert "Icon" in problem and "someone/ComfyUI-NPO/main/docs/icon.svg" in problem
