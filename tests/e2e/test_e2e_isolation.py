"""Isolation in ComfyUI's real executor: one workflow, one checkpoint, several NPO branches.

The executor shares the checkpoint's ModelPatcher between branches and caches node outputs by their
inputs. A second copy of the offset file under another name makes a branch that is computed again from
scratch (its inputs differ, its meaning does not), so it must give the first branch's image bit for bit
whatever ran in between."""

from __future__ import annotations

import random
import shutil

import npo_e2ekit as kit
import pytest
from PIL import ImageChops
from test_e2e_workflows import SIZE, STEPS, open_image, run_prompt

COPY = "copy_of_tiny_npo_sd15.safetensors"


def _branch(p: dict, nid: int, model: list, prefix: str, seed: int) -> None:
    p[str(nid)] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": seed, "steps": STEPS, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["10", 0], "denoise": 1.0}}
    p[str(nid + 1)] = {"class_type": "VAEDecode", "inputs": {"samples": [str(nid), 0], "vae": ["1", 2]}}
    p[str(nid + 2)] = {"class_type": "SaveImage", "inputs": {"images": [str(nid + 1), 0], "filename_prefix": prefix}}


@pytest.mark.fault(
    "one workflow sampling a checkpoint plain, with an offset, with another offset, then the first offset again "
    "(a copy of its file), on a real server",
    "the repeat is pixel-identical to the first NPO branch; plain CFG and the two offsets give three different images",
)
def test_branches_with_different_offsets_keep_their_own_results(server, object_info):
    src = server.base / "models" / "npo" / kit.TINY_OFFSET
    shutil.copyfile(src, server.base / "models" / "npo" / COPY)
    seed = random.randint(1, 2**31)
    p = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": kit.TINY_CKPT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox in the snow", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "NPOLoadOffset", "inputs": {"offset_name": kit.TINY_OFFSET}},
        "5": {"class_type": "NPOLoadOffset", "inputs": {"offset_name": COPY}},
        "6": {"class_type": "NPOCompressOffset", "inputs": {"npo_offset": ["4", 0], "model": ["1", 0], "rank": 1}},
        "7": {"class_type": "NPOApply", "inputs": {"model": ["1", 0], "npo_offset": ["4", 0], "strength": 2.0,
                                                   "start_percent": 0.0, "end_percent": 1.0}},
        "8": {"class_type": "NPOApply", "inputs": {"model": ["1", 0], "npo_offset": ["6", 0], "strength": 2.0,
                                                   "start_percent": 0.0, "end_percent": 1.0}},
        "9": {"class_type": "NPOApply", "inputs": {"model": ["1", 0], "npo_offset": ["5", 0], "strength": 2.0,
                                                   "start_percent": 0.0, "end_percent": 1.0}},
        "10": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
    }
    for nid, model, prefix in ((20, ["7", 0], "iso_a"), (30, ["1", 0], "iso_plain"), (40, ["8", 0], "iso_b"),
                               (50, ["9", 0], "iso_a_again")):
        _branch(p, nid, model, prefix, seed)
    fresh = {**object_info, **kit.get_json(f"{server.url}/object_info/NPOLoadOffset")}  # lists the copy now
    assert kit.validate_against_object_info(p, fresh) == []
    entry = run_prompt(server, p)
    assert entry["status"]["status_str"] == "success", kit.execution_error(entry)
    images = {}
    for rec in kit.output_images(entry):
        images[rec["filename"].rsplit("_", 2)[0]] = open_image(server, rec)
    assert sorted(images) == ["iso_a", "iso_a_again", "iso_b", "iso_plain"], sorted(images)

    def same(a, b):
        return ImageChops.difference(images[a], images[b]).getbbox() is None

    assert same("iso_a", "iso_a_again"), "the first offset's branch changed after other branches ran"
    for a, b in (("iso_a", "iso_plain"), ("iso_b", "iso_plain"), ("iso_a", "iso_b")):
        assert not same(a, b), f"{a} and {b} are identical: the check above would be vacuous"
