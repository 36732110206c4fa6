"""ComfyUI adapters (the only layer that imports ComfyUI)."""

from __future__ import annotations


def node_list() -> list:
    from . import host
    from .guider import NPOCFGGuider
    from .models import NPOApply, NPONegativeModel
    from .offsets import NPOCompressOffset, NPOLoadOffset
    from .train import NPOSaveOffset, SelfNPOTrain

    host.register_npo_folder()
    return [NPOLoadOffset, NPOApply, NPONegativeModel, NPOCFGGuider, NPOCompressOffset, SelfNPOTrain, NPOSaveOffset]
