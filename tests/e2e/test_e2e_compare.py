"""Does NPO help? Measured on a real server: NPO Prompt List → CLIP Text Encode / KSampler per prompt (ComfyUI's
list execution), with and without Apply NPO, → NPO Load Scorer (a tiny random PickScore in models/npo_scorers)
→ NPO Compare Report, which collects every prompt's batch in order and writes its JSON and CSV."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import npo_e2ekit as kit
import pytest
from test_e2e_workflows import SIZE, STEPS, run_prompt

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "host"))
import npo_scorerkit  # noqa: E402  (the tiny PickScore folder)


def test_compare_report_collects_a_prompt_list_over_http(server, object_info, tmp_path_factory):
    tiny = npo_scorerkit.write_pickscore_folder(tmp_path_factory.mktemp("pickscore"))
    dest = server.base / "models" / "npo_scorers" / "tiny_pickscore"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(tiny, dest)
    seed = random.randint(1, 2**31)

    def sampler(nid: int, model: list) -> dict:
        return {
            str(nid): {"class_type": "KSampler", "inputs": {
                "model": model, "seed": seed, "steps": STEPS, "cfg": 6.0, "sampler_name": "euler",
                "scheduler": "normal", "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
                "denoise": 1.0}},
            str(nid + 1): {"class_type": "VAEDecode", "inputs": {"samples": [str(nid), 0], "vae": ["1", 2]}},
        }

    p = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": kit.TINY_CKPT}},
        "2": {"class_type": "NPOPromptList", "inputs": {"text": "a red fox in the snow\na black cat"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": ["2", 0], "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 2}},
        "6": {"class_type": "NPOLoadOffset", "inputs": {"offset_name": kit.TINY_OFFSET}},
        "7": {"class_type": "NPOApply", "inputs": {"model": ["1", 0], "npo_offset": ["6", 0], "strength": 1.0,
                                                   "start_percent": 0.0, "end_percent": 1.0}},
        **sampler(10, ["7", 0]),
        **sampler(20, ["1", 0]),
        "30": {"class_type": "NPOLoadScorer", "inputs": {"scorer": "PickScore v1", "weights": "tiny_pickscore"}},
        "31": {"class_type": "NPOCompareReport", "inputs": {
            "images_a": ["11", 0], "images_b": ["21", 0], "scorer": ["30", 0], "prompts": ["2", 0],
            "label_a": "NPO", "label_b": "plain", "filename_prefix": "e2e_compare/report", "frames_per_item": 1,
            "bootstrap_seed": 0}},
    }
    run_prompt(server, p)
    (path,) = sorted((server.output_dir / "e2e_compare").glob("report_*.json"))
    doc = json.loads(path.read_text())
    # two prompts × a batch of 2 seeds, NPO vs plain: 4 pairs in prompt order
    assert [x["prompt"] for x in doc["pairs"]] == ["a red fox in the snow"] * 2 + ["a black cat"] * 2
    pick = doc["scorers"]["PickScore"]
    assert pick["n"] == 4 and pick["wins_a"] + pick["wins_b"] + pick["ties"] == 4
    rows = path.with_suffix(".csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("pair,label,PickScore_a,PickScore_b")
