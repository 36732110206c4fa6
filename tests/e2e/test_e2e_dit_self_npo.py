"""Example workflow 7 (Self-NPO Train on Wan 2.1 text-to-video, then the same-seed A/B) end to end on the tiny
Wan 2.1 assets of test_e2e_dit_examples.py: UI JSON → API prompt → POST /prompt → offset and videos on disk.

The server runs the shipped workflow with input-value changes only: the tiny file names and CLIP-L as
CLIPLoader type "sd3" (test_e2e_dit_examples.py's docstring says why umt5-xxl cannot be tiny), 64×64 and
5 frames for the sampled video and for Self-NPO Train's data-free pool, 3 sampling steps, and the quick
training of test_e2e_workflows.py (2 optimizer steps, batch 1, a pool of 2 clips sampled in 2 steps, no
checkpoints).

One more value follows from the stand-in encoder: the negative prompt (the Wan template's, 28 terms
separated by "，") is cut to its first 7 terms. umt5 pads every prompt to at least 512 tokens, so with it the
training prompts and the negative have one length; CLIP-L encodes in 77-token chunks, and the whole negative
is five chunks against one for each training prompt. Wan's model takes c_crossattn as a CONDRegular
(comfy/model_base.py), which ComfyUI batches only with conds of the same shape (KSampler then runs them in
separate model calls); Self-NPO Train runs the prompts and the negative as one batch, so it refuses a set of
different lengths with the message "cannot be batched". The first 7 terms are 73 CLIP-L tokens: one chunk,
as each training prompt. Both KSamplers sample with the same cut negative.

Everything else (ModelSamplingSD3 in front of the training, Save NPO Offset, Apply NPO on the trained offset,
two same-seed KSamplers, VAEDecode, SaveAnimatedWEBP) runs as shipped.
"""

from __future__ import annotations

import copy
import os
import re

import npo_e2ekit as kit
import test_e2e_dit_examples as dit
from test_e2e_self_npo import by_class, training_texts
from test_e2e_workflows import FAST as SD_FAST

NAME = kit.EXAMPLE_WAN21_SELF_NPO
TRAIN_STEPS = SD_FAST[("SelfNPOTrain", "steps")]
TRAIN_FAST = {
    **dit.FAST,
    **{key: value for key, value in SD_FAST.items() if key[0] == "SelfNPOTrain"},
    ("SelfNPOTrain", "width"): dit.SIZE,
    ("SelfNPOTrain", "height"): dit.SIZE,
    ("SelfNPOTrain", "frames"): dit.FRAMES,
}
ON, OFF = "wan21_self_npo_on", "wan21_self_npo_off"
NEGATIVE_TERMS = 7  # the start of the Wan template's negative prompt that fits one CLIP-L chunk (module docstring)
# the DiT server (tiny Wan 2.1 files linked into its model folders) and its object_info, as fixtures of this module
dit_server, dit_object_info = dit.dit_server, dit.dit_object_info


def _sources(wf: dict) -> dict:
    """(target node id, input name) -> the node the link comes from."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    return {(dst, nodes[dst]["inputs"][slot]["name"]): nodes[src] for _, src, _, dst, slot, _ in wf["links"]}


def _fed_by(wf: dict, node: dict, typ: str) -> list[dict]:
    """The nodes of type ``typ`` that take an output of ``node``."""
    targets = {dst for _, src, _, dst, _, _ in wf["links"] if src == node["id"]}
    return [n for n in wf["nodes"] if n["id"] in targets and n["type"] == typ]


# ---------------------------------------------------------------------------------------------
# static: what the example is (no server)
# ---------------------------------------------------------------------------------------------
def test_wan_training_example_loads_and_samples_as_example_6():
    """The same model files (with their download links), shift, latent and sampler settings as example 6."""
    for typ in ("UNETLoader", "CLIPLoader", "VAELoader", "ModelSamplingSD3", "EmptyHunyuanLatentVideo"):
        (mine,), (six,) = dit._nodes(NAME, typ), dit._nodes(dit.WAN21, typ)
        assert mine["widgets_values"] == six["widgets_values"], typ
        assert mine["properties"] == six["properties"], typ  # properties.models: the missing-model downloads
    (ks6,) = dit._nodes(dit.WAN21, "KSampler")
    samplers = dit._nodes(NAME, "KSampler")
    assert len(samplers) == 2 and all(ks["widgets_values"] == ks6["widgets_values"] for ks in samplers)
    (save6,) = dit._nodes(dit.WAN21, "SaveAnimatedWEBP")
    saves = dit._nodes(NAME, "SaveAnimatedWEBP")
    assert sorted(s["widgets_values"][0] for s in saves) == [OFF, ON]
    assert all(s["widgets_values"][1:] == save6["widgets_values"][1:] for s in saves)  # 16 fps, as Wan 2.1


def test_wan_training_example_trains_on_the_sampling_model_and_compares_with_and_without():
    wf = kit.load_example(NAME)
    src = _sources(wf)
    (train,) = dit._nodes(NAME, "SelfNPOTrain")
    (save,) = dit._nodes(NAME, "NPOSaveOffset")
    (apply,) = dit._nodes(NAME, "NPOApply")
    (shift,) = dit._nodes(NAME, "ModelSamplingSD3")
    # trained on the model after ModelSamplingSD3: the flow schedule the KSamplers sample with
    assert src[(train["id"], "model")]["id"] == shift["id"] and src[(shift["id"], "model")]["type"] == "UNETLoader"
    assert src[(save["id"], "npo_offset")]["id"] == train["id"] == src[(apply["id"], "npo_offset")]["id"]
    assert src[(save["id"], "model")]["id"] == shift["id"] == src[(apply["id"], "model")]["id"]
    assert apply["widgets_values"] == [1.0, 0.0, 1.0]
    (curve,) = _fed_by(wf, train, "PreviewImage")
    assert [lk[2] for lk in wf["links"] if lk[3] == curve["id"]] == [1]  # output 1: the loss curve

    off, on = sorted(dit._nodes(NAME, "KSampler"), key=lambda ks: src[(ks["id"], "model")]["id"] == apply["id"])
    assert (src[(on["id"], "model")]["id"], src[(off["id"], "model")]["id"]) == (apply["id"], shift["id"])
    for name in ("positive", "negative", "latent_image"):
        assert src[(on["id"], name)]["id"] == src[(off["id"], name)]["id"], name
    # the negative the sampler runs with θ + δ is the one the offset was trained with: example 6's
    neg = src[(on["id"], "negative")]
    assert neg["id"] == src[(train["id"], "negative")]["id"]
    six = {n["title"]: n["widgets_values"][0] for n in dit._nodes(dit.WAN21, "CLIPTextEncode")}
    assert neg["widgets_values"][0] == six["Negative prompt (the Wan template's)"]
    assert src[(on["id"], "positive")]["widgets_values"][0] == six["Positive prompt"]
    for ks, prefix in ((on, ON), (off, OFF)):
        (decode,) = _fed_by(wf, ks, "VAEDecode")
        (webp,) = _fed_by(wf, decode, "SaveAnimatedWEBP")
        assert webp["widgets_values"][0] == prefix


def test_wan_training_example_note_says_cost_knobs_and_reuse():
    note = dit._note(NAME)
    (save,) = dit._nodes(NAME, "NPOSaveOffset")
    assert f"models/npo/{save['widgets_values'][0]}_00001_.safetensors" in note and "models/loras" in note
    assert "template 6 (NPO on Wan 2.1 video)" in note and "Load NPO Offset" in note  # reuse without retraining
    assert "passes" in note and "in proportion to steps" in note  # what training costs, in the model's passes
    tune = note.split("Inputs to tune:", 1)[1].split("\n\n", 1)[0]
    for knob in ("steps", "strength", "cfg", "frames"):
        assert re.search(rf"^- [\w ]*\b{knob} \(", tune, re.M), knob  # a line of its own: "- [Node] knob (..."
    for n in kit.load_example(NAME)["nodes"]:
        for model in n["properties"].get("models", []):
            assert model["name"] in note
    assert "not established" in note  # no measured claim that Self-NPO helps Wan


# ---------------------------------------------------------------------------------------------
# on the server
# ---------------------------------------------------------------------------------------------
def test_wan_training_example_user_defaults(dit_object_info):
    info = dit_object_info["SelfNPOTrain"]
    (node,) = dit._nodes(NAME, "SelfNPOTrain")
    widgets = [n for n in kit.input_order(info) if kit.is_widget(kit.input_spec(info, n)[0])]
    assert list(kit.widget_values(node, info)) == widgets  # the example stores a value for every widget, in order
    prompt = kit.ui_to_api(kit.load_example(NAME), dit_object_info)
    (train,) = by_class(prompt, "SelfNPOTrain")
    ti = prompt[train]["inputs"]
    sd = kit.ui_to_api(kit.load_example(kit.EXAMPLE_SELF_NPO), dit_object_info)
    (sd_train,) = by_class(sd, "SelfNPOTrain")
    assert ti["steps"] == sd[sd_train]["inputs"]["steps"] and ti["mode"] == "lora" and ti["learning_rate"] == "auto"
    assert ti["resume_from"] == "none" and ti["save_every"] > 0 and "latents" not in ti  # the data-free pool
    (latent,) = by_class(prompt, "EmptyHunyuanLatentVideo")
    li = prompt[latent]["inputs"]
    (ks, _) = by_class(prompt, "KSampler")
    # the pool: the video size the user samples, short clips (Wan: 4k+1 frames), the sampler's cfg
    assert (ti["width"], ti["height"]) == (li["width"], li["height"])
    assert ti["frames"] % 4 == 1 and 1 < ti["frames"] < li["length"]
    assert ti["pool_cfg"] == prompt[ks]["inputs"]["cfg"] > 1
    texts = training_texts(prompt, ti["positive"])
    assert len(texts) >= 3 and len(set(texts)) == len(texts) and all(texts), texts


def test_wan_training_example_trains_a_wan_offset_and_compares(dit_server, dit_object_info):
    dit._require_family("wan21", dit_object_info)
    wf = kit.load_example(NAME)
    prompt = kit.ui_to_api(wf, dit_object_info, dit.SUBSTITUTIONS, TRAIN_FAST)
    assert kit.validate_against_object_info(prompt, dit_object_info) == []
    dit._seed(prompt, int.from_bytes(os.urandom(4), "big"))  # a new seed: training is not taken from the cache
    (train,) = by_class(prompt, "SelfNPOTrain")
    assert prompt[train]["inputs"]["frames"] == dit.FRAMES and prompt[train]["inputs"]["steps"] == TRAIN_STEPS
    negative = prompt[prompt[train]["inputs"]["negative"][0]]["inputs"]
    terms = negative["text"].split("，")
    assert len(terms) > NEGATIVE_TERMS, terms
    negative["text"] = "，".join(terms[:NEGATIVE_TERMS])
    npo_dir = dit_server.base / "models" / "npo"
    before = {p.name for p in npo_dir.iterdir()}
    log_start = len(dit_server.log_text())
    with kit.step(
        f"{NAME} ({TRAIN_STEPS} training steps, {dit.FRAMES} frames at {dit.SIZE}x{dit.SIZE}, {dit.STEPS} steps)"
    ):
        entry = dit._run(dit_server, prompt)
    dit._check_detected(dit_server, log_start, "WAN21")
    outputs = entry["outputs"]
    assert f"Self-NPO (lora) {TRAIN_STEPS}/{TRAIN_STEPS} steps" in " ".join(outputs[train]["text"]), outputs[train]

    (save,) = by_class(prompt, "NPOSaveOffset")
    report = outputs[save]["text"][0]
    written = {p.name for p in npo_dir.iterdir()} - before
    assert len(written) == 1, (written, report)
    (offset_name,) = written
    assert report.startswith(f"saved models/npo/{offset_name}") and offset_name.startswith("wan21_t2v_1.3B_self_npo_")
    header = dit._safetensors_header(npo_dir / offset_name)
    meta = header["__metadata__"]
    assert meta["npo.base_arch"] == "WAN21_T2V" and meta["npo.steps"] == str(TRAIN_STEPS), meta
    keys = [k for k in header if k != "__metadata__"]
    assert keys and all(k.startswith("diffusion_model.") for k in keys), keys

    (preview,) = by_class(prompt, "PreviewImage")
    (curve,) = outputs[preview]["images"]
    assert (dit_server.base / "temp" / curve.get("subfolder", "") / curve["filename"]).is_file(), curve
    on, off = dit._frames(dit_server, entry, ON), dit._frames(dit_server, entry, OFF)
    assert [f.size for f in on + off] == [(dit.SIZE, dit.SIZE)] * (2 * dit.FRAMES), "not two 5-frame 64x64 animations"
    assert on[0].getcolors(16) is None, "the decoded video is (nearly) constant"
    assert not dit._same(on, off), "Self-NPO on and off are identical: the trained offset had no effect"

    # the difference is the offset's: at strength 0 the NPO sampler gives the plain video; the training,
    # upstream of Apply NPO and unchanged, is taken from the cache and writes no second file
    zero = copy.deepcopy(prompt)
    (apply,) = by_class(zero, "NPOApply")
    zero[apply]["inputs"]["strength"] = 0.0
    with kit.step(f"{NAME} at strength 0"):
        entry = dit._run(dit_server, zero)
    assert dit._same(dit._frames(dit_server, entry, ON), off), "Apply NPO at strength 0 does not give the plain video"
    assert {p.name for p in npo_dir.iterdir()} - before == written
