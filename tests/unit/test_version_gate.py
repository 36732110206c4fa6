"""Loading the pack inside a ComfyUI older than the oldest tested release: one clear line, no nodes."""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


class _Extension:
    """Stands in for comfy_api.latest.ComfyExtension."""


def _load_pack(monkeypatch, version: str | None, has_v3_api: bool = True, name: str = "npo_gate_probe"):
    """Imports the pack's __init__.py as ComfyUI would, with a ComfyUI of ``version`` (None: no ComfyUI)."""
    if version is None:
        monkeypatch.setitem(sys.modules, "comfyui_version", None)  # import raises ImportError
    else:
        monkeypatch.setitem(sys.modules, "comfyui_version", types.SimpleNamespace(__version__=version))
    latest = types.SimpleNamespace(ComfyExtension=_Extension) if has_v3_api else None
    monkeypatch.setitem(sys.modules, "comfy_api", types.SimpleNamespace(latest=latest))
    monkeypatch.setitem(sys.modules, "comfy_api.latest", latest)
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def _oldest() -> str:
    return (ROOT / "pyproject.toml").read_text().split('requires-comfyui = ">=', 1)[1].split('"', 1)[0]


@pytest.mark.fault(
    "ComfyUI older than the oldest tested release", "one error line naming both versions; no node registers"
)
@pytest.mark.parametrize("found", ["0.3.40", "0.2.7", "0.3.63"])
def test_an_older_comfyui_gets_one_line_and_no_nodes(monkeypatch, caplog, found):
    with caplog.at_level(logging.ERROR):
        pack = _load_pack(monkeypatch, found)
    assert not hasattr(pack, "comfy_entrypoint")
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1
    assert found in lines[0] and _oldest() in lines[0] and "update ComfyUI" in lines[0]


def test_a_comfyui_without_the_v3_api_gets_one_line(monkeypatch, caplog):
    with caplog.at_level(logging.ERROR):
        pack = _load_pack(monkeypatch, "0.3.70", has_v3_api=False)
    assert not hasattr(pack, "comfy_entrypoint")
    assert ["comfy_api.latest" in r.getMessage() for r in caplog.records] == [True]


@pytest.mark.parametrize("found", ["0.3.64", "0.14.1", "0.33.0", "0.4.0rc1", "1.0.0+git"])
def test_supported_versions_register(monkeypatch, caplog, found):
    with caplog.at_level(logging.ERROR):
        pack = _load_pack(monkeypatch, found)
    assert callable(pack.comfy_entrypoint)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_outside_comfyui_the_package_imports_quietly(monkeypatch, caplog):
    with caplog.at_level(logging.ERROR):
        _load_pack(monkeypatch, None, has_v3_api=False)
    assert not caplog.records


def test_the_gate_is_the_version_pyproject_declares(monkeypatch):
    assert _load_pack(monkeypatch, None).MIN_COMFYUI == _oldest()
