"""Shared test setup: import the pack under one package name, find ComfyUI for the host tiers.

The pack uses relative imports (ComfyUI imports the folder under a generated name), so tests
register the repository root as the package ``comfyui_npo`` and import everything through it.
Both helpers live in the pack's headless-ComfyUI package (``scripts/npo_headless``), which the demo
and the benchmarks use too.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))

from npo_headless import PACKAGE, find_comfyui, register_pack  # noqa: E402, F401

register_pack()
