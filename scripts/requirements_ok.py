"""Exit 0 when every requirement in the given requirement files is installed, else 1.

Used by ``scripts/test.sh`` to skip ``pip install`` when the virtual environment already has
everything (fast path). Checks names, version specifiers and environment markers of the listed
requirements (not their transitive dependencies). Option lines (``-r``, ``--index-url``, ...) and
URL/path requirements cannot be checked here and count as "missing", so pip gets to handle them.
Standard library only (plus ``packaging``, or the copy that pip vendors).

Usage: python scripts/requirements_ok.py FILE [FILE ...]   (add -v to list what is missing)
"""

from __future__ import annotations

import sys
from importlib import metadata

try:
    from packaging.requirements import InvalidRequirement, Requirement
except ImportError:  # a fresh venv: pip vendors packaging
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement


def requirement_lines(path: str) -> list[str]:
    out = []
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def problem(line: str) -> str | None:
    """None when ``line`` is satisfied, else a short reason."""
    if line.startswith("-"):
        return f"option line, left to pip: {line}"
    try:
        req = Requirement(line)
    except InvalidRequirement:
        return f"not a plain requirement, left to pip: {line}"
    if req.url:
        return f"URL requirement, left to pip: {line}"
    if req.marker is not None and not req.marker.evaluate():
        return None
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        return f"missing: {req.name}"
    if req.specifier and not req.specifier.contains(version, prereleases=True):
        return f"wrong version: {req.name} {version} does not satisfy {req.specifier}"
    return None


def main(argv: list[str]) -> int:
    verbose = "-v" in argv
    problems = [p for path in argv if path != "-v" for line in requirement_lines(path) if (p := problem(line))]
    if verbose:
        for p in problems:
            print(f"  {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
