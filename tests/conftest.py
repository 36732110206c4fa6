"""Shared test setup: import the pack under one package name, find ComfyUI for the host tiers.

The pack uses relative imports (ComfyUI imports the folder under a generated name), so tests
register the repository root as the package ``comfyui_npo`` and import everything through it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "comfyui_npo"


def register_pack(name: str = PACKAGE):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def find_comfyui() -> Path | None:
    """ComfyUI is found like any custom node pack finds it: $COMFYUI_PATH, else ~/comfy/ComfyUI."""
    for cand in (os.environ.get("COMFYUI_PATH"), str(Path.home() / "comfy" / "ComfyUI")):
        if cand and (Path(cand) / "main.py").is_file() and (Path(cand) / "comfy").is_dir():
            return Path(cand).resolve()
    return None


register_pack()
