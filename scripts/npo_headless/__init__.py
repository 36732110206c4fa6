"""A headless ComfyUI for this pack's demo, benchmarks and end-to-end tests: finding ComfyUI, importing
the pack outside ComfyUI, tiny generated model files, a ComfyUI server on 127.0.0.1 in a temporary base
directory, HTTP helpers and the UI-format → API-format workflow converter.

Nothing here imports ComfyUI: the server runs in its own process, and the tiny models are made by
``make_assets.py`` in a subprocess with ComfyUI's Python. Shipped scripts import this package (it sits
beside them in ``scripts/``); nothing here imports ``tests/``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "example_workflows"
PACK_FOLDER = "comfyui-npo"  # the pack's folder name inside a headless server's custom_nodes/
PACKAGE = "comfyui_npo"  # the name the pack is imported under outside ComfyUI


def is_comfyui(folder: str | os.PathLike | None) -> bool:
    """A ComfyUI checkout: a folder with main.py and comfy/."""
    return bool(folder) and (Path(folder).expanduser() / "main.py").is_file() and (
        Path(folder).expanduser() / "comfy").is_dir()


def find_comfyui(explicit: str | os.PathLike | None = None) -> Path | None:
    """ComfyUI as the tests find it: ``explicit``, else $COMFYUI_PATH, else ~/comfy/ComfyUI (the first folder with
    main.py and comfy/)."""
    candidates = [explicit] if explicit else [os.environ.get("COMFYUI_PATH"), Path.home() / "comfy" / "ComfyUI"]
    for cand in candidates:
        if is_comfyui(cand):
            return Path(cand).expanduser().resolve()
    return None


def pack_folders(script: str | None = None) -> list[Path]:
    """Where this pack may sit, symlinks kept: the folder above the running script's ``scripts/`` as it was named
    (relative to the shell's $PWD, which keeps a symlinked custom_nodes/<pack> in the path), then the repository."""
    script = sys.argv[0] if script is None else script
    found: list[Path] = []
    if script and Path(script).name.endswith(".py"):
        path = Path(script)
        pwd = os.environ.get("PWD")
        if not path.is_absolute() and pwd and Path(pwd).resolve() == Path.cwd().resolve():
            path = Path(pwd) / path
        path = Path(os.path.abspath(path))
        if path.parent.name == "scripts":
            found.append(path.parent.parent)
    found.append(REPO)
    return list(dict.fromkeys(found))


def enclosing_comfyui(script: str | None = None) -> Path | None:
    """The ComfyUI this pack is installed in: a pack folder whose parent is ``custom_nodes/`` of a ComfyUI."""
    for pack in pack_folders(script):
        if pack.parent.name == "custom_nodes" and is_comfyui(pack.parent.parent):
            return Path(os.path.abspath(pack.parent.parent))
    return None


def locate_comfyui(explicit: str | os.PathLike | None = None, script: str | None = None) -> tuple[Path | None, str]:
    """The ComfyUI a user's script runs, and why that one: ``explicit`` (--comfyui), else the ComfyUI this pack is
    installed in (custom_nodes/<pack>), else $COMFYUI_PATH, else ~/comfy/ComfyUI; (None, "") when none is."""
    if explicit:
        return (Path(explicit).expanduser().resolve(), "--comfyui") if is_comfyui(explicit) else (None, "")
    enclosing = enclosing_comfyui(script)
    if enclosing is not None:
        return enclosing, "the ComfyUI this pack is installed in"
    env = os.environ.get("COMFYUI_PATH")
    if is_comfyui(env):
        return Path(env).expanduser().resolve(), "$COMFYUI_PATH"
    home = Path.home() / "comfy" / "ComfyUI"
    return (home.resolve(), "~/comfy/ComfyUI") if is_comfyui(home) else (None, "")


def register_pack(name: str = PACKAGE):
    """Import the repository as the package ``name`` (its modules use relative imports, as ComfyUI imports
    the folder under a generated name)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
