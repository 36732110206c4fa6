"""The host tier's environment: a real ComfyUI found, on the CPU, with the pack importable.
(Without ComfyUI this is the one test of the folder that is collected, and it reports the skip.)"""

from __future__ import annotations

import sys


def test_comfyui_found_and_on_cpu(comfy_root):
    import comfy.model_management
    from comfy.cli_args import args

    assert sys.path[0] == str(comfy_root) or str(comfy_root) in sys.path
    assert args.cpu and comfy.model_management.get_torch_device().type == "cpu"
    from comfyui_npo.nodes import node_list

    ids = {n.define_schema().node_id for n in node_list()}
    assert ids == {"NPOLoadOffset", "NPOApply", "NPONegativeModel", "NPOCFGGuider", "NPOCompressOffset",
                   "SelfNPOTrain", "NPOSaveOffset", "NPOLoadScorer", "NPOCompareReport",
                   "NPOScoreImages", "NPOPromptList", "NPOPreferenceTrain", "NPOPairsFromImages",
                   "NPOPairsFromFolder", "NPOSelfGeneratedPairs", "NPOPairsFromParquet"}  # landed ids never change
