"""Example 4 (Train a Self-NPO offset and compare) end to end on the tiny checkpoint: its structure as the
server converts it, then a quick training run (2 steps on a 2-latent 64×64 pool) that must write an offset
into models/npo, the two comparison images and the loss curve; the saved file must load again through
Load NPO Offset in another example."""

from __future__ import annotations

import random
import re

import npo_e2ekit as kit
from test_e2e_workflows import FAST, SIZE, SUBSTITUTIONS, open_image, run_prompt

NAME = kit.EXAMPLE_SELF_NPO


def by_class(prompt: dict, cls: str) -> list[str]:
    return sorted((nid for nid, e in prompt.items() if e["class_type"] == cls), key=int)


def training_texts(prompt: dict, link) -> list[str]:
    e = prompt[link[0]]
    if e["class_type"] == "ConditioningCombine":
        return training_texts(prompt, e["inputs"]["conditioning_1"]) + training_texts(prompt,
                                                                                   e["inputs"]["conditioning_2"])
    assert e["class_type"] == "CLIPTextEncode", e
    return [e["inputs"]["text"]]


def test_example_structure_and_user_defaults(object_info):
    prompt = kit.ui_to_api(kit.load_example(NAME), object_info)
    (train,) = by_class(prompt, "SelfNPOTrain")
    ti = prompt[train]["inputs"]
    # user defaults: LoRA, hundreds of steps, data-free pool at SD1.5 resolution, nothing to resume
    assert ti["mode"] == "lora" and 100 <= ti["steps"] <= 2000 and ti["learning_rate"] == "auto"
    assert (ti["width"], ti["height"]) == (512, 512) and ti["pool_size"] >= 4 and ti["resume_from"] == "none"
    assert ti["teacher_guidance"] == -1.0 and ti["truncation_steps"] == 5 and "latents" not in ti
    # several prompts through Conditioning (Combine); the negative is the empty prompt
    texts = training_texts(prompt, ti["positive"])
    assert len(texts) >= 3 and all(texts) and len(set(texts)) == len(texts), texts
    assert prompt[ti["negative"][0]]["inputs"]["text"] == ""
    # the trained offset is saved, previewed and applied; the loss curve (output 1) goes to Preview Image
    (save,) = by_class(prompt, "NPOSaveOffset")
    assert prompt[save]["inputs"]["npo_offset"] == [train, 0]
    (preview,) = by_class(prompt, "PreviewImage")
    assert prompt[preview]["inputs"]["images"] == [train, 1]
    (apply,) = by_class(prompt, "NPOApply")
    assert prompt[apply]["inputs"]["npo_offset"] == [train, 0] and prompt[apply]["inputs"]["strength"] == 1.0
    # two same-seed KSamplers: one through Apply NPO, one on the plain checkpoint; saved side by side
    samplers = by_class(prompt, "KSampler")
    assert len(samplers) == 2
    models = sorted(prompt[prompt[s]["inputs"]["model"][0]]["class_type"] for s in samplers)
    assert models == ["CheckpointLoaderSimple", "NPOApply"]
    keys = ("seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative", "latent_image")
    assert [prompt[samplers[0]]["inputs"][k] for k in keys] == [prompt[samplers[1]]["inputs"][k] for k in keys]
    assert prompt[samplers[0]]["inputs"]["cfg"] > 1
    prefixes = sorted(e["inputs"]["filename_prefix"] for e in prompt.values() if e["class_type"] == "SaveImage")
    assert prefixes == ["self_npo_off", "self_npo_on"]


def test_example_trains_saves_and_compares(server, object_info):
    wf = kit.load_example(NAME)
    seed = random.randint(1, 2**31)  # a new seed: the training is not taken from the execution cache
    overrides = {**FAST, ("SelfNPOTrain", "seed"): seed, ("KSampler", "seed"): seed}
    prompt = kit.ui_to_api(wf, object_info, SUBSTITUTIONS, overrides)
    assert kit.validate_against_object_info(prompt, object_info) == []
    npo_dir = server.base / "models" / "npo"
    before = set(p.name for p in npo_dir.iterdir())
    with kit.step(f"{NAME} (2 training steps, pool 2 at {SIZE}x{SIZE})"):
        entry = run_prompt(server, prompt, wf)
    assert entry["status"]["status_str"] == "success", kit.execution_error(entry)
    outputs = entry["outputs"]

    (train,) = by_class(prompt, "SelfNPOTrain")
    assert "Self-NPO (lora) 2/2 steps" in " ".join(outputs[train]["text"]), outputs[train]
    (save,) = by_class(prompt, "NPOSaveOffset")
    saved = re.match(r"saved models/npo/(\S+\.safetensors)", outputs[save]["text"][0])
    assert saved, outputs[save]
    offset_name = saved.group(1)
    assert (npo_dir / offset_name).is_file() and {p.name for p in npo_dir.iterdir()} - before == {offset_name}
    assert "base architecture: SD15" in outputs[save]["text"][0]

    images = {r["filename"].rsplit("_", 2)[0]: r for r in kit.output_images(entry) if r["type"] == "output"}
    assert sorted(images) == ["self_npo_off", "self_npo_on"], kit.output_images(entry)
    for rec in images.values():
        assert open_image(server, rec).size == (SIZE, SIZE)
    # the same seed, prompts and latent: only the trained offset differs, so the images must too
    on, off = open_image(server, images["self_npo_on"]), open_image(server, images["self_npo_off"])
    same = on.tobytes() == off.tobytes()
    assert not same, "Self-NPO on and off are identical: the trained offset had no effect"
    (preview,) = by_class(prompt, "PreviewImage")
    (curve,) = outputs[preview]["images"]
    assert curve["type"] == "temp"
    path = server.base / "temp" / curve.get("subfolder", "") / curve["filename"]
    from PIL import Image

    with Image.open(path) as im:
        assert im.width > 2 * SIZE and im.height > SIZE, im.size  # a plot, not a sample

    # the saved file is a usable NPO offset: Load NPO Offset lists it and npo_ksampler runs with it
    info = kit.get_json(server.url + "/object_info/NPOLoadOffset")["NPOLoadOffset"]
    assert offset_name in kit.combo_options(*kit.input_spec(info, "offset_name"))
    reuse = kit.ui_to_api(kit.load_example(kit.EXAMPLE_KSAMPLER), object_info,
                          {**SUBSTITUTIONS, "offset_name": offset_name}, {**FAST, ("KSampler", "seed"): seed})
    (load,) = by_class(reuse, "NPOLoadOffset")
    reuse[load]["inputs"]["offset_name"] = offset_name
    entry = run_prompt(server, reuse)
    assert entry["status"]["status_str"] == "success", kit.execution_error(entry)
    assert len([r for r in kit.output_images(entry) if r["type"] == "output"]) == 2
