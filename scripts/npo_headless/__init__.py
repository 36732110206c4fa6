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


def find_comfyui(explicit: str | os.PathLike | None = None) -> Path | None:
    """ComfyUI as any custom node pack finds it: ``explicit``, else $COMFYUI_PATH, else ~/comfy/ComfyUI
    (the first folder with main.py and comfy/)."""
    candidates = [explicit] if explicit else [os.environ.get("COMFYUI_PATH"), Path.home() / "comfy" / "ComfyUI"]
    for cand in candidates:
        if cand and (Path(cand).expanduser() / "main.py").is_file() and (Path(cand).expanduser() / "comfy").is_dir():
            return Path(cand).expanduser().resolve()
    return None


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
