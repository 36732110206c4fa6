"""End-to-end tier: a real ComfyUI server (``main.py --cpu``) on 127.0.0.1 with this pack installed.

ComfyUI is found by ``npo_headless.find_comfyui()`` ($COMFYUI_PATH or ~/comfy/ComfyUI).
Without it the server-based modules are not collected and the terminal summary says so in one
loud line; the static checks of example_workflows/ (test_e2e_examples.py) still run.

The session fixture ``server`` builds a temporary ``--base-directory``:
- ``custom_nodes/comfyui-npo`` → a symlink to this repository;
- ``models/checkpoints/tiny_sd15.safetensors``: a tiny random SD1.5 (UNet detected as SD15, random
  CLIP-L, random TAESD as the checkpoint's VAE); ``models/vae_approx/taesd_{encoder,decoder}``;
  ``models/npo/``: a rank-8 NPO LoRA in the authors' key format and an SDXL-shaped offset.
The assets are generated once by ``scripts/npo_headless/make_assets.py`` (~300 MB, 10-30 s) and cached in
``<parent>/e2e-assets-<version>`` (and ``e2e-dit-assets-<version>``, ~1 GB in all); the parent folder is
``$NPO_E2E_CACHE``, else ``$NPO_CACHE``, else ``~/.cache/comfyui-npo`` (scripts/test.sh sets NPO_E2E_CACHE to
its cache); the base directory links to them. The server runs with the current Python (the test venv), its output
in ``<base>/comfyui.log``; the tail of that log is attached to every failing e2e test.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parents[1] / "scripts"))  # the pack's headless-ComfyUI helpers
import npo_headless  # noqa: E402

COMFY_ROOT = npo_headless.find_comfyui()
SKIP_REASON = "ComfyUI not found (set COMFYUI_PATH or install to ~/comfy/ComfyUI): e2e server tests skipped"
# Without ComfyUI the server-based modules are not collected (a pytest.skip() in a conftest that is
# given on the command line aborts the whole run), and the terminal summary says so in one line.
# test_e2e_examples.py (static checks of example_workflows/) still runs.
# test_e2e_demo.py skips its own server-based tests (its missing-ComfyUI test runs everywhere).
collect_ignore = [] if COMFY_ROOT else ["test_e2e_server.py", "test_e2e_workflows.py", "test_browser.py",
                                       "test_e2e_self_npo.py", "test_e2e_isolation.py", "test_e2e_compare.py"]


def pytest_terminal_summary(terminalreporter):
    if COMFY_ROOT is None:
        terminalreporter.write_line(f"!!!!!! {SKIP_REASON} !!!!!!", red=True, bold=True)


if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import npo_e2ekit as kit  # noqa: E402

_SERVERS: list[kit.ComfyServer] = []


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _SERVERS and _HERE in Path(str(item.fspath)).resolve().parents:
        report.sections.append(("ComfyUI server log", _SERVERS[-1].log_tail(120)))


@pytest.fixture(scope="session")
def comfy_root() -> Path:
    assert COMFY_ROOT is not None, SKIP_REASON
    return COMFY_ROOT


@pytest.fixture(scope="session")
def assets(comfy_root) -> Path:
    python = os.environ.get("NPO_E2E_PYTHON", sys.executable)
    return kit.ensure_assets(comfy_root, python, log=lambda m: print(m, file=sys.stderr))


@pytest.fixture(scope="session")
def server(comfy_root, assets, tmp_path_factory):
    """A running ComfyUI server with this pack and the tiny assets; stopped at the end of the session."""
    base = tmp_path_factory.mktemp("comfy_base")
    kit.prepare_base_directory(base, assets)
    python = os.environ.get("NPO_E2E_PYTHON", sys.executable)
    srv = kit.ComfyServer(comfy_root, python, base, base / "comfyui.log")
    _SERVERS.append(srv)
    try:
        with kit.step("ComfyUI server start"):
            srv.start(timeout=float(os.environ.get("NPO_E2E_START_TIMEOUT", "180")))
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def object_info(server) -> dict:
    return kit.get_json(server.url + "/object_info", timeout=60)
