"""Host tier: the pack inside a real ComfyUI, in-process, on the CPU, with tiny random models.

ComfyUI is found by ``npo_headless.find_comfyui()`` ($COMFYUI_PATH or ~/comfy/ComfyUI).
Without it the whole directory is skipped with one loud line. With it, the ComfyUI root goes first
on ``sys.path`` and ``args.cpu`` is set before ``comfy.model_management`` is imported (it picks the device at import).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parents[1] / "scripts"))  # the pack's headless-ComfyUI helpers
import npo_headless  # noqa: E402

COMFY_ROOT = npo_headless.find_comfyui()
SKIP_REASON = "ComfyUI not found: set COMFYUI_PATH or install to ~/comfy/ComfyUI; host tests skipped"

if COMFY_ROOT is None:
    # Every test module but test_host_env.py (whose one test reports the skip) is left uncollected: they
    # import ComfyUI at module level. One loud line in the terminal summary (pytest_terminal_summary).
    # (pytest.skip in a conftest errors out when pytest is pointed at this folder directly.)
    collect_ignore = [p.name for p in _HERE.glob("test_*.py") if p.name != "test_host_env.py"]
else:
    if str(COMFY_ROOT) not in sys.path[:1]:
        sys.path.insert(0, str(COMFY_ROOT))
    if str(_HERE) not in sys.path:
        sys.path.insert(0, str(_HERE))

    from comfy.cli_args import args

    args.cpu = True

    import comfy.model_management  # noqa: F401  (after args.cpu)
    import torch

    import nodes  # noqa: F401  (ComfyUI's nodes.py, loaded before anything can shadow it with the pack's nodes/)

    npo_headless.register_pack()

    import npo_hostkit as kit


@pytest.fixture(autouse=True)
def _fresh_model_management():
    """Every test starts and ends with nothing loaded, so no test sees another's patched module.
    One intra-op thread: the tiny models' matmuls are far too small to gain from more, and on a busy
    2-core machine torch's thread pool made them ~30× slower."""
    if COMFY_ROOT is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    comfy.model_management.unload_all_models()
    try:
        yield
    finally:
        comfy.model_management.unload_all_models()
        torch.set_num_threads(threads)


@pytest.fixture()
def comfy_root():
    """The ComfyUI install in use; skips the test (with the one reason) when there is none."""
    if COMFY_ROOT is None:
        pytest.skip(SKIP_REASON)
    return COMFY_ROOT


@pytest.fixture()
def npo_dir(tmp_path, monkeypatch):
    """A private ``npo`` model folder (so nothing is written into the ComfyUI install)."""
    import folder_paths

    d = tmp_path / "npo"
    d.mkdir()
    exts = set(folder_paths.supported_pt_extensions)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "npo", ([str(d)], exts))
    return d


@pytest.fixture()
def out_dir(tmp_path, monkeypatch):
    """A private ComfyUI output folder (training checkpoints go to its npo_training/)."""
    import folder_paths

    d = tmp_path / "output"
    d.mkdir()
    monkeypatch.setattr(folder_paths, "output_directory", str(d))
    return d


@pytest.fixture(scope="session")
def tiny():
    """Factory for tiny models: ``tiny("sd15" | "sdxl" | "sdxl_v", seed=0)`` → fresh ModelPatcher,
    its pristine UNet weights cached per (kind, seed)."""
    return kit.TinyFactory()


@pytest.fixture()
def load_offset(npo_dir):
    """Write a state dict as a .safetensors file into the npo folder and load it through the
    Load NPO Offset node, as a workflow would: ``load_offset(sd, "name.safetensors", metadata=None)``."""
    from safetensors.torch import save_file

    from comfyui_npo.nodes.offsets import NPOLoadOffset

    def _load(sd, name="offset.safetensors", metadata=None):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(npo_dir / name), metadata=metadata)
        with torch.inference_mode():
            return NPOLoadOffset.execute(offset_name=name).result[0]

    return _load


@pytest.fixture(scope="session")
def full_models():
    """Full-size SD1.5 and SDXL UNets on the meta device (shapes and names only, no memory)."""
    return {kind: kit.meta_model(kind) for kind in ("sd15_full", "sdxl_full")}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.host)


def pytest_terminal_summary(terminalreporter):
    if COMFY_ROOT is None:
        terminalreporter.write_line(f"!!!!!! {SKIP_REASON} !!!!!!", red=True, bold=True)
