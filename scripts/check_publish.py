"""Is the pack ready for the Comfy Registry (ComfyUI-Manager, ``comfy node install``)? Lists what is missing or stale.

    python scripts/check_publish.py [--matrix "0.3.64 0.14.1 0.33.0"] [--owner-fields pending]
    python scripts/check_publish.py --set-repository https://github.com/NAME/ComfyUI-NPO --set-publisher ID

Checks ``pyproject.toml`` (name, version, description, ``requires-comfyui``, Icon, license), the files
a publish would ship (computed as ``comfy node pack`` does: the git-tracked files minus
``.comfyignore``, plus ``[tool.comfy].includes``), that every shipped Python file's own imports and
every README link resolve inside that archive, and the publish workflow. Exit 1 with the list.

Two values only the owner can supply: the Registry publisher id (``[tool.comfy].PublisherId``) and
the public repository URL (``[project.urls].Repository``; Icon and the other URLs are derived from it).
``--owner-fields pending`` (what the test command passes) reports them without failing; a publish
runs without it. ``--set-repository`` / ``--set-publisher`` write them, and everything derived, in place.
"""

from __future__ import annotations

import argparse
import ast
import posixpath
import re
import subprocess
import sys
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parent.parent
ICON_PATH = "docs/icon.svg"
PUBLISH_WORKFLOW = ".github/workflows/publish.yml"
PUBLISH_SECRET = "REGISTRY_ACCESS_TOKEN"
PLACEHOLDER_OWNER = "OWNER"
# What a publish must never ship: the test tiers and their kits, benchmarks, CI (their Markdown may ship).
NEVER_SHIPPED = ("tests/", "benchmarks/", ".ci/", ".github/", "scripts/test.sh", "scripts/requirements-test.txt")
# What a user's install needs: the pack, its templates, and the scripts users run with their helpers.
ALWAYS_SHIPPED = ("__init__.py", "LICENSE", "README.md", "pyproject.toml", "requirements.txt", "scripts/run_demo.py",
                  "scripts/npo_compare_folders.py", "scripts/npo_generate_pairs.py", ICON_PATH,
                  "web/npo_templates.js")  # the frontend extension (WEB_DIRECTORY): templates in order
# Features the description must name, each as (what, any of these phrases, the node that makes it a feature).
FEATURES = (
    ("NPO inference", ("Diffusion-NPO", "NPO guidance"), "NPOApply"),
    ("Self-NPO training", ("Self-NPO training", "trains Self-NPO", "train Self-NPO"), "SelfNPOTrain"),
    ("measuring an offset (scorers, win rate)", ("win rate",), "NPOCompareReport"),
)
# Model families the description must name (one phrase per family line of the README's opening).
FAMILIES = ("SD1.x", "SDXL", "SD3.5", "Wan", "Qwen-Image")
REGISTRY_NAME = re.compile(r"^[A-Za-z](?:[A-Za-z0-9]|[-_.](?=[A-Za-z0-9]))*$")
SEMVER = re.compile(r"^\d+\.\d+\.\d+$")
GITHUB_REPO = re.compile(r"^https://github\.com/(?P<owner>[A-Za-z0-9][A-Za-z0-9-]*)/(?P<name>[A-Za-z0-9._-]+)$")
ICON_MAX = (800, 400)


@dataclass
class Findings:
    """Problems that block a publish, and the owner-only values still unset."""

    problems: list[str] = field(default_factory=list)
    owner: list[str] = field(default_factory=list)


def git_tracked(root: Path) -> list[str]:
    """``git ls-files`` of ``root`` (what ``comfy node pack`` starts from); an error outside a checkout."""
    out = subprocess.run(["git", "-C", str(root), "ls-files"], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{root} is not a git checkout ({out.stderr.strip()}): the archive cannot be computed.")
    return [line for line in out.stdout.splitlines() if line.strip()]


def archive_files(root: Path, tracked: list[str], includes: list[str]) -> set[str]:
    """The paths ``comfy node pack`` would zip: tracked files not matched by ``.comfyignore``, plus includes."""
    import pathspec

    ignore = root / ".comfyignore"
    lines = []
    if ignore.is_file():
        lines = [s.strip() for s in ignore.read_text(encoding="utf-8").splitlines()
                 if s.strip() and not s.lstrip().startswith("#")]
    with warnings.catch_warnings():  # comfy-cli's pattern kind, deprecated in pathspec 1.x but still its rule
        warnings.simplefilter("ignore", DeprecationWarning)
        spec = pathspec.PathSpec.from_lines("gitwildmatch", lines) if lines else None
        matched = {p for p in tracked if spec is not None and spec.match_file(p)}
    prefixes = [inc.strip("/") for inc in includes if inc.strip("/")]

    def forced(path: str) -> bool:
        return any(path == p or path.startswith(p + "/") for p in prefixes)

    shipped = {p for p in tracked if (root / p).is_file() and (forced(p) or p not in matched)}
    for prefix in prefixes:
        target = root / prefix
        found = [target] if target.is_file() else [f for f in target.rglob("*") if f.is_file()]
        shipped.update(f.relative_to(root).as_posix() for f in found)
    return shipped


def raw_url(repository: str, path: str) -> str:
    """The raw.githubusercontent.com address of ``path`` on the default branch (main) of ``repository``."""
    m = GITHUB_REPO.match(repository)
    return f"https://raw.githubusercontent.com/{m['owner']}/{m['name']}/main/{path}" if m else ""


def check_owner_fields(project: dict, comfy: dict, found: Findings) -> str:
    """The publisher id and the repository URL; returns the repository URL when it is a real one."""
    publisher = str(comfy.get("PublisherId", "")).strip()
    if not publisher:
        found.owner.append("[tool.comfy].PublisherId is empty: the Registry publisher id (after @ on your "
                           "registry.comfy.org profile); set it with --set-publisher")
    elif not re.match(r"^[a-z0-9][a-z0-9-]*$", publisher):
        found.problems.append(f"PublisherId {publisher!r} is not a Registry publisher id (lower case, digits, '-')")
    repository = str(project.get("urls", {}).get("Repository", "")).strip()
    m = GITHUB_REPO.match(repository)
    if not m or m["owner"] == PLACEHOLDER_OWNER:
        found.owner.append(f"[project.urls].Repository is {repository!r}, not the public repository: set it "
                           "with --set-repository https://github.com/NAME/REPO")
        return ""
    return repository


def check_identity(project: dict, comfy: dict, found: Findings) -> None:
    name = str(project.get("name", ""))
    if not REGISTRY_NAME.match(name) or len(name) >= 100:
        found.problems.append(f"[project].name {name!r} is not a Registry node id (letters first, then letters, "
                              "digits and single '-', '_' or '.'; under 100 characters)")
    if "comfyui" in name.lower():
        found.problems.append(f"[project].name {name!r} contains 'ComfyUI', which the Registry advises against")
    version = str(project.get("version", ""))
    if not SEMVER.match(version):
        found.problems.append(f"[project].version {version!r} is not X.Y.Z (the Registry needs semantic versions)")
    if not str(comfy.get("DisplayName", "")).strip():
        found.problems.append("[tool.comfy].DisplayName is empty")
    licence = project.get("license", {})
    if not (isinstance(licence, dict) and ((REPO / str(licence.get("file", ""))).is_file() or licence.get("text"))):
        found.problems.append("[project].license must be {file = \"LICENSE\"} naming a file, or {text = ...}")


def node_ids(root: Path) -> set[str]:
    """Node ids the pack registers (``node_id="..."`` in nodes/)."""
    ids = set()
    for src in (root / "nodes").rglob("*.py"):
        ids.update(re.findall(r'node_id="([A-Za-z0-9_]+)"', src.read_text(encoding="utf-8")))
    return ids


def check_description(project: dict, ids: set[str], found: Findings) -> None:
    text = str(project.get("description", ""))
    for what, phrases, node in FEATURES:
        if node in ids and not any(p.lower() in text.lower() for p in phrases):
            found.problems.append(f"the description does not name {what} (the {node} node): say one of {phrases}")
    missing = [f for f in FAMILIES if f not in text]
    if missing:
        found.problems.append(f"the description does not name the model families {missing}")


def min_comfyui(root: Path) -> str:
    """``MIN_COMFYUI`` of the pack's ``__init__.py`` (the version it refuses to load below)."""
    m = re.search(r'^MIN_COMFYUI = "([^"]+)"', (root / "__init__.py").read_text(encoding="utf-8"), re.M)
    return m.group(1) if m else ""


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def check_comfyui_range(comfy: dict, matrix: list[str], root: Path, found: Findings) -> None:
    requires = str(comfy.get("requires-comfyui", ""))
    pack_min = min_comfyui(root)
    if requires != f">={pack_min}":
        found.problems.append(f"[tool.comfy].requires-comfyui is {requires!r}, but __init__.py refuses ComfyUI "
                              f"below MIN_COMFYUI {pack_min!r}: write '>={pack_min}'")
    if matrix:
        oldest = min((v.lstrip("v") for v in matrix), key=version_key)
        if version_key(pack_min) != version_key(oldest):
            found.problems.append(f"MIN_COMFYUI / requires-comfyui is {pack_min}, but the oldest ComfyUI the test "
                                  f"matrix runs is {oldest}: claim exactly what the tests prove")


def svg_size(path: Path) -> tuple[float, float] | None:
    """An SVG's width and height (its attributes, else its viewBox), or None when neither says."""
    root = ET.parse(path).getroot()
    try:
        return float(root.attrib["width"].rstrip("px")), float(root.attrib["height"].rstrip("px"))
    except (KeyError, ValueError):
        box = root.attrib.get("viewBox", "").split()
        return (float(box[2]), float(box[3])) if len(box) == 4 else None


def check_icon(comfy: dict, repository: str, shipped: set[str], root: Path, found: Findings) -> None:
    icon = str(comfy.get("Icon", ""))
    if not (root / ICON_PATH).is_file():
        found.problems.append(f"{ICON_PATH} (the Registry icon) is missing")
        return
    if ICON_PATH not in shipped:
        found.problems.append(f"{ICON_PATH} is not in the archive (untracked, or matched by .comfyignore)")
    size = svg_size(root / ICON_PATH)
    if size is None or size[0] > ICON_MAX[0] or size[1] > ICON_MAX[1]:
        found.problems.append(f"{ICON_PATH} must state its size, at most {ICON_MAX[0]}x{ICON_MAX[1]} (is {size})")
    if repository and icon != raw_url(repository, ICON_PATH):
        found.problems.append(f"[tool.comfy].Icon is {icon!r}; for this repository it is "
                              f"{raw_url(repository, ICON_PATH)!r} (--set-repository writes it)")
    if not repository and not icon.endswith("/main/" + ICON_PATH):
        found.problems.append(f"[tool.comfy].Icon {icon!r} does not point at {ICON_PATH} on the main branch")


def local_imports(path: Path, root: Path) -> list[tuple[str, Path | None]]:
    """The repository files a Python file imports: (module as written, the file, or None when none exists)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = path.parent
            for _ in range(node.level - 1):
                base = base.parent
            parts = (node.module or "").split(".") if node.module else []
            names = [a.name for a in node.names] if not parts else [None]
            for name in names:
                target = base.joinpath(*parts, *([name] if name else []))
                module = "." * node.level + ".".join(p for p in [*parts, name] if p)
                resolved = _module_file(target)
                if resolved is None and name:  # `from . import x` where x is a name in __init__.py
                    resolved = _module_file(base.joinpath(*parts))
                out.append((module, resolved))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for module in modules:
                first = module.split(".")[0]
                for base in (path.parent, root):  # a script's own folder is on sys.path, then the pack root
                    if _module_file(base / first) is not None:
                        out.append((module, _module_file(base.joinpath(*module.split(".")))
                                    or _module_file(base / first)))
                        break
    return out


def _module_file(target: Path) -> Path | None:
    if target.with_suffix(".py").is_file():
        return target.with_suffix(".py")
    if (target / "__init__.py").is_file():
        return target / "__init__.py"
    return None


def check_archive(shipped: set[str], includes: list[str], root: Path, found: Findings) -> None:
    leaked = sorted(p for p in shipped if p.startswith(NEVER_SHIPPED) and not p.endswith(".md"))
    if leaked:
        found.problems.append(f"a publish would ship {len(leaked)} test/benchmark/CI files ({leaked[:5]} ...): "
                              "add them to .comfyignore")
    absent = [p for p in ALWAYS_SHIPPED if p not in shipped]
    if absent:
        found.problems.append(f"a publish would leave out {absent}, which an install needs")
    if not any(p.startswith("example_workflows/") and p.endswith(".json") for p in shipped):
        found.problems.append("a publish would ship no example_workflows/*.json (the templates)")
    for inc in includes:
        if not (root / inc.strip("/")).exists():
            found.problems.append(f"[tool.comfy].includes names {inc!r}, which does not exist")
    for rel in sorted(p for p in shipped if p.endswith(".py")):
        for module, target in local_imports(root / rel, root):
            where = target.relative_to(root).as_posix() if target else None
            if where is None or where not in shipped:
                found.problems.append(f"{rel} imports {module} ({where or 'no such file'}), "
                                      "which a publish does not ship")


def check_links(shipped: set[str], root: Path, found: Findings) -> None:
    """Relative links of the shipped Markdown files must name shipped files."""
    for doc in sorted(p for p in shipped if p.endswith(".md")):
        text = (root / doc).read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:|^#", target):
                continue
            relative = target.split("#")[0].replace("%20", " ")
            path = posixpath.normpath(posixpath.join(posixpath.dirname(doc), relative))
            if path not in shipped and not any(p.startswith(path.rstrip("/") + "/") for p in shipped):
                found.problems.append(f"{doc} links {target}, which a publish does not ship")


def check_workflow(root: Path, found: Findings) -> None:
    flow = root / PUBLISH_WORKFLOW
    if not flow.is_file():
        found.problems.append(f"{PUBLISH_WORKFLOW} (publish on a version bump) is missing")
        return
    text = flow.read_text(encoding="utf-8")
    for needed, why in ((f"secrets.{PUBLISH_SECRET}", "the owner's Registry API key"),
                        ("Comfy-Org/publish-node-action", "the Registry's publish action"),
                        ("scripts/check_publish.py", "this check, without --owner-fields pending"),
                        ("pyproject.toml", "a trigger on pyproject.toml (where the version lives)")):
        if needed not in text:
            found.problems.append(f"{PUBLISH_WORKFLOW} lacks {needed} ({why})")
    if "--owner-fields" in text:
        found.problems.append(f"{PUBLISH_WORKFLOW} must run the check strictly (no --owner-fields)")


def check(root: Path, matrix: list[str]) -> tuple[Findings, set[str]]:
    data = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    project, comfy = data.get("project", {}), data.get("tool", {}).get("comfy", {})
    found = Findings()
    repository = check_owner_fields(project, comfy, found)
    check_identity(project, comfy, found)
    check_description(project, node_ids(root), found)
    check_comfyui_range(comfy, matrix, root, found)
    includes = list(comfy.get("includes", []))
    shipped = archive_files(root, git_tracked(root), includes)
    check_icon(comfy, repository, shipped, root, found)
    check_archive(shipped, includes, root, found)
    check_links(shipped, root, found)
    check_workflow(root, found)
    return found, shipped


def set_owner_values(root: Path, repository: str | None, publisher: str | None) -> None:
    """Write the repository URL (and the Icon derived from it) and the publisher id into pyproject.toml."""
    path = root / "pyproject.toml"
    text = path.read_text(encoding="utf-8")
    if repository is not None:
        if not GITHUB_REPO.match(repository):
            raise SystemExit(f"--set-repository {repository!r}: give https://github.com/NAME/REPO")
        text = re.sub(r'^Repository = ".*"$', f'Repository = "{repository}"', text, count=1, flags=re.M)
        text = re.sub(r'^Icon = ".*"$', f'Icon = "{raw_url(repository, ICON_PATH)}"', text, count=1, flags=re.M)
    if publisher is not None:
        text = re.sub(r'^PublisherId = ".*?"', f'PublisherId = "{publisher}"', text, count=1, flags=re.M)
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matrix", default="", help="the ComfyUI versions the test matrix runs (space-separated)")
    parser.add_argument("--owner-fields", choices=("required", "pending"), default="required",
                        help="pending: report an unset publisher id / repository URL without failing")
    parser.add_argument("--set-repository", help="write the public repository URL (and the Icon derived from it)")
    parser.add_argument("--set-publisher", help="write the Registry publisher id")
    parser.add_argument("--list", action="store_true", help="print the files a publish would ship")
    parser.add_argument("--root", type=Path, default=REPO, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.set_repository is not None or args.set_publisher is not None:
        set_owner_values(args.root, args.set_repository, args.set_publisher)
    found, shipped = check(args.root, args.matrix.split())
    if args.list:
        print("\n".join(sorted(shipped)))
    for line in found.owner:
        print(f"check_publish: owner: {line}")
    for line in found.problems:
        print(f"check_publish: FAIL: {line}")
    blocking = found.problems + (found.owner if args.owner_fields == "required" else [])
    state = "not ready" if blocking else ("ready but for the owner's values" if found.owner else "ready")
    print(f"check_publish: {len(shipped)} files would ship; {state} to publish")
    return 1 if blocking else 0


if __name__ == "__main__":
    sys.exit(main())
