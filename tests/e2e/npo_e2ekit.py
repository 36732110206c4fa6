"""The end-to-end tier's kit: the pack's headless-ComfyUI package (``scripts/npo_headless``: assets,
server, HTTP, workflow conversion) under one name, plus timing for test steps."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from npo_headless import EXAMPLES, PACK_FOLDER, REPO, find_comfyui  # noqa: E402, F401
from npo_headless.assets import *  # noqa: E402, F403
from npo_headless.server import *  # noqa: E402, F403
from npo_headless.workflows import *  # noqa: E402, F403


@contextlib.contextmanager
def step(msg: str):
    t0 = time.time()
    yield
    print(f"[e2e] {msg}: {time.time() - t0:.1f} s", file=sys.stderr)
