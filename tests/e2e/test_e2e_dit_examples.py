"""Example workflows 5 (SD3.5 Large) and 6 (Wan 2.1 text-to-video), end to end on tiny models:
UI JSON → API prompt (the converter the other e2e tests use) → POST /prompt → files on disk.

The server runs the shipped workflows with these changes only, all of them input values:

- file names: the examples name the real files (sd3.5_large_fp8_scaled, wan2.1_t2v_1.3B_fp16, umt5_xxl,
  wan_2.1_vae) and an offset the user trains; the test server offers tiny random files instead
  (``make_assets.build_dit``): an SD3.5-Large-shaped checkpoint (MMDiT hidden 128, depth 2, with a CLIP-L and
  a 16-channel TAESD inside, no CLIP-G / T5: SD3's clip_target leaves absent encoders out and zero-pads), a
  Wan 2.1 T2V model (dim 128, one block), the real-size Wan 2.1 VAE with random weights, and rank-4
  ComfyUI-format LoRAs on the attention layers as the offsets. ComfyUI's own detection must map the tiny
  files to SD3 / WAN21_T2V (the server log must name the model class it loads: SD3 / WAN21);
- speed: 64×64, 3 steps, 5 frames (2 latent frames) for Wan;
- Wan's text encoder: ``CLIPLoader(umt5_xxl_fp8_e4m3fn_scaled, type "wan")`` becomes
  ``CLIPLoader(tiny_clip_l, type "sd3")``. umt5-xxl cannot be made small: ComfyUI builds it from a fixed
  config (comfy/text_encoders/umt5_config_xxl.json, 24 layers of width 4096, 5.7 B parameters), and Wan's
  text_embedding always takes 4096 features (model_detection does not read text_dim from the weights).
  A CLIP-L loaded as type "sd3" is encoded by ComfyUI's SD3ClipModel, which zero-pads CLIP-L's 768 features
  to 4096: the conditioning has the width Wan takes (77 tokens instead of umt5's, other values), so the
  loader, both CLIPTextEncode nodes and the Wan model run as in the workflow, on a different encoder.

Everything else (ModelSamplingSD3, Load NPO Offset, Apply NPO, KSampler, VAEDecode, SaveImage /
SaveAnimatedWEBP) runs unchanged. That the offset acts: the NPO image differs from the same run with
Apply NPO at strength 0, and strength 0 equals the run without Apply NPO (bypassed) bit for bit, so the
difference is the offset's and not run-to-run noise. (That it acts on the negative rows only, against a
hand-merged reference, is the host tier's test for each family: tests/host/test_host_families.py.)

The DiT assets are linked into the session server's model folders (ComfyUI lists files added to a folder
on its next request); they are generated once (~15-20 s, ~720 MB) into their own cache folder.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import sys

import npo_e2ekit as kit
import pytest

SD35 = "5 NPO on SD3.5 with a trained offset"
WAN21 = "6 NPO on Wan 2.1 video"
SIZE, STEPS, FRAMES = 64, 3, 5
PROMPT_TIMEOUT = 300.0

# family: (example, the config class ComfyUI must detect, its model_base class as the server logs it,
#          the node classes the example needs, the tiny offset)
FAMILIES = {
    "sd35": (
        SD35,
        "SD3",
        "SD3",
        {"CheckpointLoaderSimple", "EmptySD3LatentImage", "KSampler", "SaveImage"},
        kit.TINY_NPO_SD35,
    ),
    "wan21": (
        WAN21,
        "WAN21_T2V",
        "WAN21",
        {"UNETLoader", "CLIPLoader", "VAELoader", "ModelSamplingSD3", "EmptyHunyuanLatentVideo", "SaveAnimatedWEBP"},
        kit.TINY_NPO_WAN21,
    ),
}
SUBSTITUTIONS = {
    "ckpt_name": kit.TINY_SD35_CKPT,
    "unet_name": kit.TINY_WAN21,
    "clip_name": kit.TINY_CLIP_L,
    "vae_name": kit.TINY_WAN21_VAE,
}
FAST = {
    ("EmptySD3LatentImage", "width"): SIZE,
    ("EmptySD3LatentImage", "height"): SIZE,
    ("EmptyHunyuanLatentVideo", "width"): SIZE,
    ("EmptyHunyuanLatentVideo", "height"): SIZE,
    ("EmptyHunyuanLatentVideo", "length"): FRAMES,
    ("KSampler", "steps"): STEPS,
    # the one stand-in that is not a file name (see the module docstring)
    ("CLIPLoader", "type"): "sd3",
}


def _nodes(name: str, typ: str) -> list[dict]:
    return [n for n in kit.load_example(name)["nodes"] if n["type"] == typ]


def _note(name: str) -> str:
    return " ".join(str(n["widgets_values"][0]) for n in kit.load_example(name)["nodes"] if n["type"] == "Note")


# ---------------------------------------------------------------------------------------------
# static: what the examples are (no server)
# ---------------------------------------------------------------------------------------------
def test_sd35_example_is_the_sd35_template_with_npo_before_the_samplers():
    (ckpt,) = _nodes(SD35, "CheckpointLoaderSimple")
    assert ckpt["widgets_values"] == ["sd3.5_large_fp8_scaled.safetensors"]
    assert _nodes(SD35, "EmptySD3LatentImage")[0]["widgets_values"] == [1024, 1024, 1]
    samplers = _nodes(SD35, "KSampler")
    assert len(samplers) == 2  # NPO on / off, same seed
    for ks in samplers:  # Comfy-Org's sd3.5_simple_example: 20 steps, cfg ~4, euler, sgm_uniform
        assert ks["widgets_values"][1:] == ["fixed", 20, 4.0, "euler", "sgm_uniform", 1.0]
    assert samplers[0]["widgets_values"][0] == samplers[1]["widgets_values"][0]
    assert [n["widgets_values"] for n in _nodes(SD35, "SaveImage")] == [["sd35_npo_on"], ["sd35_npo_off"]]


def test_wan_example_is_the_wan21_t2v_template_with_npo_before_the_sampler():
    assert _nodes(WAN21, "UNETLoader")[0]["widgets_values"] == ["wan2.1_t2v_1.3B_fp16.safetensors", "default"]
    assert _nodes(WAN21, "CLIPLoader")[0]["widgets_values"] == [
        "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
        "wan",
        "default",
    ]
    assert _nodes(WAN21, "VAELoader")[0]["widgets_values"] == ["wan_2.1_vae.safetensors"]
    assert _nodes(WAN21, "ModelSamplingSD3")[0]["widgets_values"] == [8.0]
    assert _nodes(WAN21, "EmptyHunyuanLatentVideo")[0]["widgets_values"] == [832, 480, 33, 1]
    (ks,) = _nodes(WAN21, "KSampler")
    assert ks["widgets_values"][1:] == ["fixed", 30, 6.0, "uni_pc", "simple", 1.0]
    (save,) = _nodes(WAN21, "SaveAnimatedWEBP")
    assert save["widgets_values"][1] == 16.0  # Wan 2.1 runs at 16 fps


@pytest.mark.parametrize("name", [SD35, WAN21])
def test_dit_example_wires_apply_npo_between_the_model_chain_and_the_sampler(name):
    wf = kit.load_example(name)
    nodes = {n["id"]: n for n in wf["nodes"]}
    src = {(lk[3], lk[4]): lk[1] for lk in wf["links"]}  # (target, slot) -> source node
    (apply,) = [n for n in wf["nodes"] if n["type"] == "NPOApply"]
    assert nodes[src[(apply["id"], 1)]]["type"] == "NPOLoadOffset"
    assert apply["widgets_values"] == [1.0, 0.0, 1.0]
    chain, nid = [], src[(apply["id"], 0)]
    while True:  # walk the MODEL input back to the loader
        chain.append(nodes[nid]["type"])
        if (nid, 0) not in src:
            break
        nid = src[(nid, 0)]
    assert chain == (["CheckpointLoaderSimple"] if name == SD35 else ["ModelSamplingSD3", "UNETLoader"])
    fed = [nodes[t]["type"] for (t, slot), s in src.items() if s == apply["id"]]
    assert fed and set(fed) == {"KSampler"}


# the training example each Note points to: 4 (a checkpoint, image latents) for SD3.5; 7 (the Wan 2.1 model
# chain, a pool of short clips) for Wan
TRAINING_TEMPLATE = {SD35: "template 4 (Train a Self-NPO offset and compare)",
                     WAN21: f"template 7 ({kit.EXAMPLE_WAN21_SELF_NPO.split(' ', 1)[1]})"}


@pytest.mark.parametrize("name", [SD35, WAN21])
def test_dit_example_says_no_offset_is_released_and_how_to_get_one(name):
    note = _note(name)
    (load,) = _nodes(name, "NPOLoadOffset")
    offset = load["widgets_values"][0]
    assert offset.startswith("my_") and f"models/npo/{offset}" in note and "models/loras" in note
    assert "no released NPO offset" in note
    assert "Self-NPO Train" in note and TRAINING_TEMPLATE[name] in note  # how to train one here
    assert name != WAN21 or "frames" in note  # the training pool's clip length (video)
    assert "diffusion_model.<module>.lora_up.weight" in note  # ComfyUI's LoRA format
    # no download link for a file nobody published (a properties.models entry without a url fails frontend
    # 1.48.7's workflow schema); the missing-model row shows the loader's title, which says how to get one
    assert "models" not in load["properties"]
    assert "train it first" in load["title"] and TRAINING_TEMPLATE[name].split(" (")[0] in load["title"]
    for n in kit.load_example(name)["nodes"]:
        if n["type"] in ("CheckpointLoaderSimple", "UNETLoader", "CLIPLoader", "VAELoader"):
            (model,) = n["properties"]["models"]
            assert model["name"] == n["widgets_values"][0] and model["name"] in note
            assert model["url"].startswith("https://huggingface.co/Comfy-Org/")
            assert model["url"].endswith("/" + model["name"])


# ---------------------------------------------------------------------------------------------
# on the server
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dit_server(request):
    root = kit.find_comfyui()
    if root is None:
        pytest.skip("ComfyUI not found (set COMFYUI_PATH): DiT example runs skipped")
    server = request.getfixturevalue("server")
    python = os.environ.get("NPO_E2E_PYTHON", sys.executable)
    with kit.step("DiT assets"):
        assets = kit.ensure_dit_assets(root, python, log=lambda m: print(m, file=sys.stderr))
    kit.place_dit_assets(server.base, assets)
    return server


@pytest.fixture(scope="module")
def dit_object_info(dit_server) -> dict:
    """Fetched after the assets were linked (the session's object_info may predate them)."""
    return kit.get_json(dit_server.url + "/object_info", timeout=60)


def _require_family(family: str, object_info: dict) -> None:
    _, config_class, _, node_types, _ = FAMILIES[family]
    supported = (kit.find_comfyui() / "comfy" / "supported_models.py").read_text(errors="replace")
    if f"class {config_class}(" not in supported:
        pytest.skip(f"this ComfyUI has no {config_class} model config")
    missing = sorted(t for t in node_types if t not in object_info)
    if missing:
        pytest.skip(f"this ComfyUI lacks the nodes {missing}")


def _prompt(family: str, object_info: dict, strength: float | None = None, bypass_npo: bool = False) -> dict:
    name, _, _, _, offset = FAMILIES[family]
    wf = copy.deepcopy(kit.load_example(name))
    for n in wf["nodes"]:
        if n["type"] == "NPOApply":
            if strength is not None:
                n["widgets_values"][0] = strength
            if bypass_npo:
                n["mode"] = kit.MODE_BYPASS  # what Ctrl+B does in the editor: MODEL passes through
    prompt = kit.ui_to_api(wf, object_info, {**SUBSTITUTIONS, "offset_name": offset}, FAST)
    assert kit.validate_against_object_info(prompt, object_info) == []
    return prompt


def _run(server, prompt: dict) -> dict:
    pid = kit.queue_prompt(server.url, prompt)
    entry = kit.wait_history(server.url, pid, timeout=PROMPT_TIMEOUT, server=server)
    assert entry["status"]["status_str"] == "success", kit.execution_error(entry)
    return entry


def _frames(server, entry: dict, prefix: str) -> list:
    """The decoded frames (RGB) of the one file whose name starts with ``prefix``."""
    from PIL import Image, ImageSequence

    recs = [r for r in kit.output_images(entry) if r["filename"].startswith(prefix + "_")]
    assert len(recs) == 1, kit.output_images(entry)
    path = server.output_dir / recs[0].get("subfolder", "") / recs[0]["filename"]
    assert path.is_file(), f"{path} was reported by /history but is not on disk"
    im = Image.open(io.BytesIO(path.read_bytes()))
    return [f.convert("RGB") for f in ImageSequence.Iterator(im)]


def _same(a: list, b: list) -> bool:
    from PIL import ImageChops

    return len(a) == len(b) and all(ImageChops.difference(x, y).getbbox() is None for x, y in zip(a, b, strict=True))


def _check_detected(server, log_start: int, model_base_class: str) -> None:
    """ComfyUI logs "Requested to load <model_base class>" when it loads a model for sampling."""
    log = server.log_text()[log_start:]
    assert re.search(rf"Requested to load {model_base_class}\b", log), (
        f"the server never loaded a {model_base_class} model: the tiny file was not detected as that family"
    )


def _seed(prompt: dict, seed: int) -> None:
    for entry in prompt.values():
        if "seed" in entry["inputs"]:
            entry["inputs"]["seed"] = seed


def _safetensors_header(path) -> dict:
    """The JSON header of a .safetensors file: tensor names (and shapes) plus ``__metadata__``."""
    data = path.read_bytes()
    return json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])


def test_sd35_example_runs_on_a_tiny_sd3_and_the_offset_acts(dit_server, dit_object_info):
    _require_family("sd35", dit_object_info)
    seed = int.from_bytes(os.urandom(4), "big")  # a new seed: nothing comes from an earlier session's files
    log_start = len(dit_server.log_text())
    shipped = _prompt("sd35", dit_object_info)
    _seed(shipped, seed)
    with kit.step(f"{SD35} (64x64, {STEPS} steps, NPO on + off)"):
        entry = _run(dit_server, shipped)
    _check_detected(dit_server, log_start, "SD3")
    on, off = _frames(dit_server, entry, "sd35_npo_on"), _frames(dit_server, entry, "sd35_npo_off")
    assert [f.size for f in on + off] == [(SIZE, SIZE)] * 2
    assert on[0].getcolors(16) is None, "the decoded image is (nearly) constant"
    assert not _same(on, off), "NPO on and off are identical: the offset had no effect"

    zero = _prompt("sd35", dit_object_info, strength=0.0)
    _seed(zero, seed)
    with kit.step(f"{SD35} at strength 0"):
        entry = _run(dit_server, zero)
    assert _same(_frames(dit_server, entry, "sd35_npo_on"), off), (
        "Apply NPO at strength 0 does not reproduce the plain KSampler's image"
    )


def test_wan_example_runs_on_a_tiny_wan21_and_the_offset_acts(dit_server, dit_object_info):
    _require_family("wan21", dit_object_info)
    seed = int.from_bytes(os.urandom(4), "big")
    log_start = len(dit_server.log_text())
    runs = {}
    for label, kwargs in (("npo", {}), ("strength 0", {"strength": 0.0}), ("bypassed", {"bypass_npo": True})):
        prompt = _prompt("wan21", dit_object_info, **kwargs)
        _seed(prompt, seed)
        if label == "npo":
            (clip,) = [e for e in prompt.values() if e["class_type"] == "CLIPLoader"]
            assert clip["inputs"] == {"clip_name": kit.TINY_CLIP_L, "type": "sd3", "device": "default"}
        if label == "bypassed":
            assert "NPOApply" not in {e["class_type"] for e in prompt.values()}
        with kit.step(f"{WAN21} ({label}: 64x64, {FRAMES} frames, {STEPS} steps)"):
            entry = _run(dit_server, prompt)
        runs[label] = _frames(dit_server, entry, "wan21_npo")
    _check_detected(dit_server, log_start, "WAN21")
    assert [f.size for f in runs["npo"]] == [(SIZE, SIZE)] * FRAMES, "not a 5-frame 64x64 animation"
    assert runs["npo"][0].getcolors(16) is None, "the decoded video is (nearly) constant"
    assert not _same(runs["npo"], runs["strength 0"]), "the video with NPO equals strength 0: the offset had no effect"
    assert _same(runs["strength 0"], runs["bypassed"]), "Apply NPO at strength 0 changed the video"


def test_dit_offsets_load_as_comfyui_lora_files(dit_server):
    """The tiny offsets are what the Notes tell users to bring: ComfyUI-format LoRA keys, nothing else."""
    for offset in (kit.TINY_NPO_SD35, kit.TINY_NPO_WAN21):
        header = _safetensors_header(dit_server.base / "models" / "npo" / offset)
        keys = [k for k in header if k != "__metadata__"]
        assert keys and all(
            k.startswith("diffusion_model.") and k.endswith((".lora_up.weight", ".lora_down.weight", ".alpha"))
            for k in keys
        ), keys
