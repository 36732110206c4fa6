"""ComfyUI-NPO: Diffusion-NPO and Self-NPO for ComfyUI.

ComfyUI imports this folder and calls ``comfy_entrypoint()``. Without ComfyUI the package still
imports (``npo_core`` and ``training`` are pure torch). Inside a ComfyUI older than
``MIN_COMFYUI`` (the oldest release the tests prove) nothing registers, and one log line says why.
"""

from __future__ import annotations

import logging
import re

MIN_COMFYUI = "0.3.64"
# The frontend extension (web/npo_templates.js: the template browser lists the templates 1, 2, 3, ... in order).
WEB_DIRECTORY = "./web"


def _version_tuple(version: str) -> tuple[int, ...]:
    """'0.3.64' → (0, 3, 64); a suffix such as 'rc1' or '+git' is ignored."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def _host_version() -> str | None:
    """The running ComfyUI's version (its top-level ``comfyui_version`` module), or None outside ComfyUI."""
    try:
        import comfyui_version
    except ImportError:
        return None
    return str(getattr(comfyui_version, "__version__", "0"))


def _refusal() -> str | None:
    """Why this ComfyUI cannot run the pack, or None when it can (or when there is no ComfyUI)."""
    found = _host_version()
    if found is None:
        return None
    if _version_tuple(found) < _version_tuple(MIN_COMFYUI):
        return (
            f"ComfyUI-NPO needs ComfyUI {MIN_COMFYUI} or newer, found {found}: update ComfyUI "
            "(git pull, or the updater of your install). The NPO nodes are not loaded."
        )
    return None


_REFUSED = _refusal()
try:
    from comfy_api.latest import ComfyExtension
except ImportError:  # not running inside ComfyUI (or a ComfyUI without the V3 API)
    ComfyExtension = None
    if _REFUSED is None and _host_version() is not None:
        _REFUSED = (
            f"ComfyUI-NPO needs comfy_api.latest (ComfyUI {MIN_COMFYUI} or newer); this ComfyUI "
            f"{_host_version()} lacks it. The NPO nodes are not loaded."
        )

if _REFUSED is not None:
    logging.error(_REFUSED)
elif ComfyExtension is not None:

    class NPOExtension(ComfyExtension):
        async def get_node_list(self) -> list:
            from .nodes import node_list

            return node_list()

    async def comfy_entrypoint() -> NPOExtension:
        return NPOExtension()
