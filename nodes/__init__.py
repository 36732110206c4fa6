"""ComfyUI adapters (the only layer that imports ComfyUI)."""

from __future__ import annotations


def node_list() -> list:
    from .evaluate import NPOCompareReport, NPOLoadScorer, NPOPromptList, NPOScoreImages
    from .guider import NPOCFGGuider
    from .host import files
    from .models import NPOApply, NPONegativeModel
    from .offsets import NPOCompressOffset, NPOLoadOffset, NPOSaveOffset
    from .preference import (
        NPOPairsFromFolder,
        NPOPairsFromImages,
        NPOPairsFromParquet,
        NPOPreferenceTrain,
        NPOSelfGeneratedPairs,
    )
    from .train import SelfNPOTrain

    files.register_npo_folder()
    return [
        NPOLoadOffset, NPOApply, NPONegativeModel, NPOCFGGuider, NPOCompressOffset, SelfNPOTrain, NPOSaveOffset,
        NPOLoadScorer, NPOCompareReport, NPOScoreImages, NPOPromptList, NPOPreferenceTrain, NPOPairsFromImages,
        NPOPairsFromFolder, NPOSelfGeneratedPairs, NPOPairsFromParquet,
    ]
