"""Example 9 (Train an NPO offset from preference pairs): NPO Self-Generated Pairs (K samples per prompt, ranked by
NPO Load Scorer PickScore) → NPO Preference Train → Save NPO Offset, beside Self-NPO Train → Save NPO Offset; then
the same prompts × seeds sampled with plain CFG, with the Self-NPO offset and with the preference offset, and two
NPO Compare Reports (each offset vs plain CFG).

Static: the wiring, the authors' settings, the Notes (files, costs) and a layout that fits a small window. On the
server: the example as /object_info reads it, then a run on the tiny checkpoint and a tiny random PickScore
(tests/host/npo_scorerkit.py) with 2 training prompts × K = 2, 3 preference steps, 2 Self-NPO steps, 2 comparison
prompts × 2 seeds at 64×64 and 3 steps: both offsets must be saved and load, the preference offset must be non-zero
and differ from the Self-NPO one (their dense ΔW = up·down·alpha/rank, computed here from the files), both reports
must hold prompts × seeds pairs in prompt order, and the pairs must come from output/npo_pairs when sampled again.
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import npo_e2ekit as kit
from test_e2e_compare_example import TINY_PICKSCORE, scorer_object_info, scorer_server  # noqa: F401
from test_e2e_workflows import FAST, SIZE, SUBSTITUTIONS, run_prompt

NAME = kit.EXAMPLE_PREFERENCE
USER_FILE_INPUTS = ("ckpt_name", "weights")
TRAIN_PROMPTS_RUN, K_RUN, PROMPTS_RUN, SEEDS_RUN = 2, 2, 2, 2
TITLE_H = 30  # LiteGraph's title bar above a node's pos
FIT_W, FIT_H = 1260, 780  # a 1280×800 canvas less the frontend's 10 px fit padding: scale ≥ 0.75 in fitToBounds


def _wf() -> dict:
    return kit.load_example(NAME)


def _nodes(typ: str) -> list[dict]:
    return [n for n in _wf()["nodes"] if n["type"] == typ]


def _notes() -> str:
    return " ".join(str(n["widgets_values"][0]) for n in _wf()["nodes"] if n["type"] in ("Note", "MarkdownNote"))


def _sources(wf: dict) -> dict[tuple[int, str], tuple[int, int]]:
    """{(target node, input name): (source node, output slot)} of the UI workflow's links."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    return {(dst, nodes[dst]["inputs"][dslot]["name"]): (src, sslot) for _, src, sslot, dst, dslot, _ in wf["links"]}


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _train_prompts() -> list[str]:
    (pairs,) = _nodes("NPOSelfGeneratedPairs")
    return _lines(pairs["widgets_values"][0])


def _compare_prompts() -> list[str]:
    (plist,) = _nodes("NPOPromptList")
    return _lines(plist["widgets_values"][0])


# ---------------------------------------------------------------------------------------------
# static: the wiring, the Notes and the layout (no server)
# ---------------------------------------------------------------------------------------------
def test_the_preference_offset_is_trained_from_pairs_the_model_makes():
    wf = _wf()
    nodes = {n["id"]: n for n in wf["nodes"]}
    src = _sources(wf)
    (ckpt,) = _nodes("CheckpointLoaderSimple")
    (scorer,) = _nodes("NPOLoadScorer")
    (pairs,) = _nodes("NPOSelfGeneratedPairs")
    (train,) = _nodes("NPOPreferenceTrain")
    for name, slot in (("model", 0), ("clip", 1), ("vae", 2)):
        assert src[(pairs["id"], name)] == (ckpt["id"], slot), name
    assert src[(pairs["id"], "scorer")] == (scorer["id"], 0)
    assert scorer["widgets_values"][0] == "PickScore v1"
    assert src[(train["id"], "pairs")] == (pairs["id"], 0) and src[(train["id"], "model")] == (ckpt["id"], 0)
    saves = {src[(n["id"], "npo_offset")][0]: n for n in _nodes("NPOSaveOffset")}
    (self_train,) = _nodes("SelfNPOTrain")
    assert set(saves) == {train["id"], self_train["id"]}
    assert saves[train["id"]]["widgets_values"][0] != saves[self_train["id"]]["widgets_values"][0]
    assert src[(self_train["id"], "model")] == (ckpt["id"], 0)
    # held-out comparison prompts: none of the training prompts is measured
    train_prompts, compare = _train_prompts(), _compare_prompts()
    assert len(train_prompts) >= 4 and len(set(train_prompts)) == len(train_prompts)
    assert 3 <= len(compare) <= 8 and not set(compare) & set(train_prompts)
    assert all(len(p.split()) >= 5 for p in train_prompts + compare)
    # Self-NPO's negative is the sampling's empty negative
    negative = nodes[src[(self_train["id"], "negative")][0]]
    assert negative["type"] == "CLIPTextEncode" and negative["widgets_values"] == [""]


def test_three_arms_share_prompts_seeds_and_settings_and_two_reports_compare_them():
    wf = _wf()
    nodes = {n["id"]: n for n in wf["nodes"]}
    src = _sources(wf)
    (ckpt,) = _nodes("CheckpointLoaderSimple")
    (plist,) = _nodes("NPOPromptList")
    (scorer,) = _nodes("NPOLoadScorer")
    (train,) = _nodes("NPOPreferenceTrain")
    (self_train,) = _nodes("SelfNPOTrain")
    samplers = _nodes("KSampler")
    assert len(samplers) == 3

    def arm(ks: dict) -> str:
        model = nodes[src[(ks["id"], "model")][0]]
        if model["id"] == ckpt["id"]:
            return "plain"
        assert model["type"] == "NPOApply" and src[(model["id"], "model")] == (ckpt["id"], 0)
        offset_from = src[(model["id"], "npo_offset")][0]
        return {train["id"]: "preference", self_train["id"]: "self_npo"}[offset_from]

    by_arm = {arm(ks): ks for ks in samplers}
    assert sorted(by_arm) == ["plain", "preference", "self_npo"]
    for name in ("positive", "negative", "latent_image"):
        assert len({src[(ks["id"], name)] for ks in samplers}) == 1, name
    assert len({json.dumps(ks["widgets_values"]) for ks in samplers}) == 1  # seed, steps, cfg, sampler
    positive = nodes[src[(samplers[0]["id"], "positive")][0]]
    assert positive["type"] == "CLIPTextEncode" and src[(positive["id"], "text")] == (plist["id"], 0)

    def decoded(image_input: tuple[int, str]) -> str:
        decode = nodes[src[image_input][0]]
        assert decode["type"] == "VAEDecode" and src[(decode["id"], "vae")] == (ckpt["id"], 2)
        (ks,) = [k for k in samplers if src[(decode["id"], "samples")] == (k["id"], 0)]
        return arm(ks)

    reports = _nodes("NPOCompareReport")
    got = {(decoded((r["id"], "images_a")), decoded((r["id"], "images_b"))): r for r in reports}
    assert sorted(got) == [("preference", "plain"), ("self_npo", "plain")]
    for (a, _), r in got.items():
        assert src[(r["id"], "scorer")] == (scorer["id"], 0) and src[(r["id"], "prompts")] == (plist["id"], 0)
        label_a, label_b, prefix = r["widgets_values"][1:4]
        assert label_b == "plain CFG" and ("Self-NPO" in label_a) == (a == "self_npo")
        assert prefix.startswith("npo_compare/")
    assert len({r["widgets_values"][3] for r in reports}) == 2  # each report its own files


def test_notes_name_the_files_the_costs_and_the_authors_settings():
    note = _notes()
    (scorer,) = _nodes("NPOLoadScorer")
    assert scorer["widgets_values"][1] == "PickScore_v1" and "models/npo_scorers/PickScore_v1/" in note
    assert "https://huggingface.co/yuvalkirstain/PickScore_v1" in note
    assert "https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in note
    for file in ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json", "vocab.json",
                 "merges.txt", "v1-5-pruned-emaonly.safetensors"):
        assert file in note, file
    for save in _nodes("NPOSaveOffset"):  # where each offset goes, and how to load it later
        assert f"models/npo/{save['widgets_values'][0]}_00001_.safetensors" in note
    assert "models/loras" in note and "Load NPO Offset" in note
    # the numbers the Note states are the example's own
    (pairs,) = _nodes("NPOSelfGeneratedPairs")
    k, steps = pairs["widgets_values"][2], pairs["widgets_values"][5]
    p = len(_train_prompts())
    assert f"{p} prompts = {p} pairs" in note and f"(K = {k})" in note
    assert f"{p} prompts x {k} samples x {steps} steps x 2 (cfg) = {p * k * steps * 2:,} UNet passes" in note
    (train,) = _nodes("NPOPreferenceTrain")
    t_steps, batch = train["widgets_values"][0], train["widgets_values"][1]
    assert f"{t_steps} steps x {batch} pairs x 2 images x (1 reference pass + 1 pass with gradients) = " \
           f"{t_steps * batch * 4:,} UNet passes" in note
    (latent,) = _nodes("EmptyLatentImage")
    n, seeds = len(_compare_prompts()), latent["widgets_values"][2]
    assert f"{n} prompts x {seeds} seeds = {n * seeds} pairs" in note
    assert f"3 x {n * seeds} images x 25 steps x 2 = {3 * n * seeds * 25 * 2:,} UNet passes" in note
    for authors in ("rank 8", "alpha 8", "to_q/to_k/to_v/to_out.0", "500", "5e-6", "Pick-a-Pic", "batch 64"):
        assert authors in note, authors
    assert "min" in note and "collapsed" in note.lower()
    assert "favours" in note  # the scorer that ranked the pairs is not an independent judge


def _rect(n: dict) -> tuple[float, float, float, float]:
    """A node's bounds as the frontend draws it: the title bar above pos; a collapsed node is its title only
    (its width estimated from the title, generously)."""
    x, y = n["pos"]
    if n["flags"].get("collapsed"):
        return x, y - TITLE_H, min(n["size"][0], 8 * len(n.get("title", n["type"])) + 40), TITLE_H
    return x, y - TITLE_H, n["size"][0], n["size"][1] + TITLE_H


def test_the_layout_is_a_compact_grid_that_fits_a_small_window():
    """The frontend fits the graph to the window at 0.75 × min(window / bounds): bounds within the window keep
    the scale ≥ 0.75 (test_browser.py measures it as the frontend sizes the nodes); no node covers another."""
    wf = _wf()
    rects = [_rect(n) for n in wf["nodes"]]
    x0, y0 = min(r[0] for r in rects), min(r[1] for r in rects)
    x1, y1 = max(r[0] + r[2] for r in rects), max(r[1] + r[3] for r in rects)
    assert x1 - x0 <= FIT_W and y1 - y0 <= FIT_H, (x1 - x0, y1 - y0)
    for i, a in enumerate(rects):
        for b in rects[i + 1:]:
            apart = a[0] + a[2] <= b[0] or b[0] + b[2] <= a[0] or a[1] + a[3] <= b[1] or b[1] + b[3] <= a[1]
            assert apart, (a, b)
    assert len(wf["groups"]) >= 3
    ds = wf["extra"]["ds"]
    assert ds["scale"] >= 0.75


# ---------------------------------------------------------------------------------------------
# on the server
# ---------------------------------------------------------------------------------------------
def test_example_converts_and_validates_against_object_info(scorer_object_info):  # noqa: F811
    wf = _wf()
    as_shipped = kit.ui_to_api(wf, scorer_object_info)
    problems = kit.validate_against_object_info(as_shipped, scorer_object_info)
    # only the user's own files are absent on the test server: the checkpoint and the PickScore folder
    assert problems and all(any(f".{inp}:" in p for inp in USER_FILE_INPUTS) for p in problems), problems
    subs = {**SUBSTITUTIONS, "weights": TINY_PICKSCORE}
    assert kit.validate_against_object_info(kit.ui_to_api(wf, scorer_object_info, subs), scorer_object_info) == []


def test_example_settings_as_the_server_reads_them(scorer_object_info):  # noqa: F811
    """Widget values are positional: read through /object_info's input order, each lands where meant."""
    prompt = kit.ui_to_api(_wf(), scorer_object_info)

    def one(cls: str) -> dict:
        (entry,) = [e["inputs"] for e in prompt.values() if e["class_type"] == cls]
        return entry

    pairs = one("NPOSelfGeneratedPairs")
    assert (pairs["samples_per_prompt"], pairs["width"], pairs["height"], pairs["cache"], pairs["frames"]) == (
        4, 512, 512, True, 1)
    assert (pairs["steps"], pairs["cfg"], pairs["sampler_name"], pairs["negative_prompt"]) == (25, 7.5, "dpmpp_2m",
                                                                                               "")
    train = one("NPOPreferenceTrain")
    # the authors' settings: 2000 steps, lr 5e-6 (auto), β 500 for SD1.5 (0 = auto), sigmoid, rank 8 on attention
    assert (train["steps"], train["learning_rate"], train["beta"], train["loss_type"]) == (2000, "auto", 0.0,
                                                                                           "sigmoid")
    assert (train["rank"], train["lora_layers"], train["resume_from"], train["optimizer"]) == (8, "attention",
                                                                                               "none", "AdamW")
    assert train["save_every"] > 0 and train["gradient_checkpointing"] is True
    self_train = one("SelfNPOTrain")
    assert self_train["mode"] == "lora" and self_train["learning_rate"] == "auto"
    assert (self_train["width"], self_train["height"]) == (512, 512) and self_train["resume_from"] == "none"
    latent = one("EmptyLatentImage")
    assert (latent["width"], latent["height"]) == (512, 512) and latent["batch_size"] >= 2
    for ks in [e["inputs"] for e in prompt.values() if e["class_type"] == "KSampler"]:
        assert (ks["steps"], ks["cfg"], ks["sampler_name"], ks["scheduler"], ks["denoise"]) == (
            25, 7.5, "dpmpp_2m", "normal", 1.0)
    for apply in [e["inputs"] for e in prompt.values() if e["class_type"] == "NPOApply"]:
        assert (apply["strength"], apply["start_percent"], apply["end_percent"]) == (1.0, 0.0, 1.0)


def _fast_overrides(seed: int) -> dict:
    train_prompts = "\n".join(_train_prompts()[:TRAIN_PROMPTS_RUN])
    return {
        **FAST,
        ("SelfNPOTrain", "seed"): seed, ("SelfNPOTrain", "preview_every"): 0,
        ("NPOSelfGeneratedPairs", "prompts"): train_prompts, ("NPOSelfGeneratedPairs", "samples_per_prompt"): K_RUN,
        ("NPOSelfGeneratedPairs", "width"): SIZE, ("NPOSelfGeneratedPairs", "height"): SIZE,
        ("NPOSelfGeneratedPairs", "steps"): 3, ("NPOSelfGeneratedPairs", "seed"): seed,
        ("NPOPreferenceTrain", "steps"): 3, ("NPOPreferenceTrain", "batch_size"): 2,
        ("NPOPreferenceTrain", "save_every"): 0, ("NPOPreferenceTrain", "seed"): seed,
        ("NPOPreferenceTrain", "preview_every"): 0,
        ("NPOPromptList", "text"): "\n".join(_compare_prompts()[:PROMPTS_RUN]),
        ("EmptyLatentImage", "batch_size"): SEEDS_RUN, ("KSampler", "seed"): seed,
    }


def _dense_deltas(path: Path) -> dict[str, object]:
    """{module: ΔW} of a LoRA-format offset file: up · down · alpha / rank (computed here from the tensors)."""
    from safetensors.torch import load_file

    t = load_file(str(path))
    out = {}
    for key in t:
        if key.endswith(".lora_up.weight"):
            module = key[: -len(".lora_up.weight")]
            up, down = t[key].double(), t[module + ".lora_down.weight"].double()
            alpha = float(t[module + ".alpha"]) if module + ".alpha" in t else float(down.shape[0])
            out[module] = (up.flatten(1) @ down.flatten(1)) * (alpha / down.shape[0])
    return out


def _header(path: Path) -> dict:
    data = path.read_bytes()
    return json.loads(data[8: 8 + int.from_bytes(data[:8], "little")])


def test_example_trains_both_offsets_and_reports_each_against_plain_cfg(scorer_server, scorer_object_info):  # noqa: F811
    wf = _wf()
    seed = random.randint(1, 2**31)  # a new seed: nothing comes from the execution cache or earlier pair files
    subs = {**SUBSTITUTIONS, "weights": TINY_PICKSCORE}
    prompt = kit.ui_to_api(wf, scorer_object_info, subs, _fast_overrides(seed))
    assert kit.validate_against_object_info(prompt, scorer_object_info) == []
    ids = {cls: sorted((nid for nid, e in prompt.items() if e["class_type"] == cls), key=int)
           for cls in {e["class_type"] for e in prompt.values()}}
    out_dir, npo_dir = scorer_server.output_dir, scorer_server.base / "models" / "npo"
    pair_dir, compare_dir = out_dir / "npo_pairs", out_dir / "npo_compare"
    before = {d: set(d.glob("*")) if d.is_dir() else set() for d in (npo_dir, pair_dir, compare_dir)}
    with kit.step(f"{NAME} ({TRAIN_PROMPTS_RUN} prompts × K {K_RUN}, 3 + 2 training steps, "
                  f"{PROMPTS_RUN} × {SEEDS_RUN} pairs at {SIZE}x{SIZE})"):
        entry = run_prompt(scorer_server, prompt, wf)
    assert entry["status"]["status_str"] == "success", kit.execution_error(entry)
    outputs = entry["outputs"]

    # the pairs: sampled, scored, cached
    (pairs_id,) = ids["NPOSelfGeneratedPairs"]
    text = " ".join(outputs[pairs_id]["text"])
    assert text.startswith(f"{TRAIN_PROMPTS_RUN} pairs from {K_RUN} samples per prompt\n") and "(cached)" not in text
    (cache_file,) = set(pair_dir.glob("pairs_*.pt")) - before[pair_dir]
    (train_id,) = ids["NPOPreferenceTrain"]
    assert f"3/3 steps on {TRAIN_PROMPTS_RUN} pairs" in " ".join(outputs[train_id]["text"]), outputs[train_id]
    assert "β 500" in " ".join(outputs[train_id]["text"])  # auto = the authors' SD1.5 value

    # both offsets saved into models/npo, readable, and Load NPO Offset lists them
    saved = {}
    for save_id in ids["NPOSaveOffset"]:
        m = re.match(r"saved models/npo/(\S+\.safetensors)", outputs[save_id]["text"][0])
        assert m, outputs[save_id]
        saved[prompt[save_id]["inputs"]["npo_offset"][0]] = m.group(1)
    (self_id,) = ids["SelfNPOTrain"]
    assert set(saved) == {train_id, self_id}
    assert {p.name for p in set(npo_dir.glob("*")) - before[npo_dir]} == set(saved.values())
    info = kit.get_json(scorer_server.url + "/object_info/NPOLoadOffset")["NPOLoadOffset"]
    assert set(saved.values()) <= set(kit.combo_options(*kit.input_spec(info, "offset_name")))
    pref_path, self_path = npo_dir / saved[train_id], npo_dir / saved[self_id]
    for path in (pref_path, self_path):
        header = _header(path)
        keys = [k for k in header if k != "__metadata__"]
        assert keys and all(re.search(r"\.(lora_up|lora_down)\.weight$|\.alpha$", k) for k in keys), keys[:5]
    pref, self_npo = _dense_deltas(pref_path), _dense_deltas(self_path)
    assert pref and any(float(d.abs().max()) > 0 for d in pref.values()), "the preference offset is zero"
    shared = sorted(set(pref) & set(self_npo))
    assert shared and any(not (pref[m] - self_npo[m]).abs().max() < 1e-12 for m in shared)
    header = _header(pref_path)
    ranks = {header[k]["shape"][0] for k in header if k.endswith(".lora_down.weight")}
    assert ranks == {8}, ranks  # the authors' rank 8

    # two reports, each offset against the same plain-CFG images, prompts × seeds pairs in prompt order
    prompts = _compare_prompts()[:PROMPTS_RUN]
    n = PROMPTS_RUN * SEEDS_RUN
    new_json = sorted(set(compare_dir.glob("*.json")) - before[compare_dir])
    docs = {}
    for report_id in ids["NPOCompareReport"]:
        prefix = Path(prompt[report_id]["inputs"]["filename_prefix"]).name
        (path,) = [p for p in new_json if p.name.startswith(prefix + "_")]
        docs[prompt[report_id]["inputs"]["label_a"]] = json.loads(path.read_text())
        assert f"vs plain CFG: {n} pairs" in " ".join(outputs[report_id]["text"])
    assert sorted(docs) == ["Self-NPO", "preference NPO"]
    plain = []
    for doc in docs.values():
        assert doc["label_b"] == "plain CFG"
        assert [x["prompt"] for x in doc["pairs"]] == [p for p in prompts for _ in range(SEEDS_RUN)]
        pick = doc["scorers"]["PickScore"]
        assert pick["n"] == n and pick["wins_a"] + pick["wins_b"] + pick["ties"] == n
    for path in new_json:
        rows = path.with_suffix(".csv").read_text().splitlines()
        assert rows[0] == "pair,label,PickScore_a,PickScore_b" and len(rows) == n + 1
        plain.append([row.rsplit(",", 1)[1] for row in rows[1:]])
    assert len(plain) == 2 and plain[0] == plain[1]  # both reports score the same plain-CFG images

    # sampled again with nothing changed, the pairs come from output/npo_pairs (the executor cache emptied first)
    again = {nid: prompt[nid] for nid in _upstream(prompt, pairs_id)}
    again["900"] = {"class_type": "PreviewImage", "inputs": {"images": [pairs_id, 1]}}
    status, _ = kit.post_json(scorer_server.url + "/free", {"free_memory": True})
    assert status == 200
    time.sleep(2.0)  # the worker empties its cache when it next wakes
    stamp = cache_file.stat().st_mtime_ns
    entry = run_prompt(scorer_server, again)
    assert entry["status"]["status_str"] == "success", kit.execution_error(entry)
    text = " ".join(entry["outputs"][pairs_id]["text"])
    assert f"{TRAIN_PROMPTS_RUN} pairs from {K_RUN} samples per prompt (cached)" in text, text
    assert set(pair_dir.glob("pairs_*.pt")) - before[pair_dir] == {cache_file}
    assert cache_file.stat().st_mtime_ns == stamp


def _upstream(prompt: dict, node_id: str) -> list[str]:
    """node_id and every node it depends on."""
    seen, todo = [], [node_id]
    while todo:
        nid = todo.pop()
        if nid in seen:
            continue
        seen.append(nid)
        todo += [v[0] for v in prompt[nid]["inputs"].values() if isinstance(v, list) and len(v) == 2
                 and isinstance(v[0], str) and v[0] in prompt]
    return seen
