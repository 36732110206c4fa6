"""ComfyUI-NPO: Diffusion-NPO and Self-NPO for ComfyUI.

ComfyUI imports this folder and calls ``comfy_entrypoint()``. Without ComfyUI the package still
imports (``npo_core`` and ``training`` are pure torch).
"""

from __future__ import annotations

try:
    from comfy_api.latest import ComfyExtension
except ImportError:  # not running inside ComfyUI
    ComfyExtension = None

if ComfyExtension is not None:

    class NPOExtension(ComfyExtension):
        async def get_node_list(self) -> list:
            from .nodes import node_list

            return node_list()

    async def comfy_entrypoint() -> NPOExtension:
        return NPOExtension()
