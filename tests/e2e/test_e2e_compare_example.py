"""Example 8 (Does NPO help on my checkpoint): NPO Prompt List → CLIP Text Encode → two same-seed KSamplers, with
and without Apply NPO → NPO Compare Report with NPO Load Scorer (PickScore v1), grid saved.

Static: what the workflow is wired to do, and that its Notes name the scorer files. On the server: the example
as the server's /object_info reads it (positional widget values), then a run on the tiny checkpoint, the tiny
offset and a tiny random PickScore folder (tests/host/npo_scorerkit.py) placed in models/npo_scorers, with
2 of its prompts × 2 seeds per prompt, 64×64 and 3 steps: the report must hold prompts × seeds pairs in prompt
order, and the grid must be saved.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import npo_e2ekit as kit
import pytest
from test_e2e_workflows import FAST, SIZE, SUBSTITUTIONS, open_image, run_prompt

NAME = kit.EXAMPLE_COMPARE
TINY_PICKSCORE = "tiny_PickScore_v1"  # the folder the test server's models/npo_scorers gets
PROMPTS_RUN, SEEDS_RUN = 2, 2  # the run: the example's first 2 prompts, a batch of 2 seeds each
USER_FILE_INPUTS = ("ckpt_name", "offset_name", "weights")


def _nodes(typ: str) -> list[dict]:
    return [n for n in kit.load_example(NAME)["nodes"] if n["type"] == typ]


def _notes() -> str:
    return " ".join(str(n["widgets_values"][0]) for n in kit.load_example(NAME)["nodes"]
                    if n["type"] in ("Note", "MarkdownNote"))


def _sources(wf: dict) -> dict[tuple[int, str], tuple[int, int]]:
    """{(target node, input name): (source node, output slot)} of the UI workflow's links."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    return {(dst, nodes[dst]["inputs"][dslot]["name"]): (src, sslot) for _, src, sslot, dst, dslot, _ in wf["links"]}


def _example_prompts() -> list[str]:
    (plist,) = _nodes("NPOPromptList")
    return [line.strip() for line in plist["widgets_values"][0].splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# static: the wiring and the Notes (no server)
# ---------------------------------------------------------------------------------------------
def test_the_prompt_list_feeds_the_positive_prompt_and_the_report():
    wf = kit.load_example(NAME)
    nodes = {n["id"]: n for n in wf["nodes"]}
    src = _sources(wf)
    (plist,) = _nodes("NPOPromptList")
    (report,) = _nodes("NPOCompareReport")
    assert src[(report["id"], "prompts")] == (plist["id"], 0)
    fed = [dst for (dst, name), s in src.items() if s == (plist["id"], 0) and name == "text"]
    (positive,) = fed
    assert nodes[positive]["type"] == "CLIPTextEncode"
    samplers = _nodes("KSampler")
    assert len(samplers) == 2 and all(src[(ks["id"], "positive")] == (positive, 0) for ks in samplers)
    # 4 or so Pick-a-Pic-style prompts, no test leftovers
    prompts = _example_prompts()
    assert 3 <= len(prompts) <= 8 and len(set(prompts)) == len(prompts)
    assert all(len(p.split()) >= 5 for p in prompts), prompts


def test_images_a_are_sampled_with_npo_and_images_b_without():
    wf = kit.load_example(NAME)
    nodes = {n["id"]: n for n in wf["nodes"]}
    src = _sources(wf)
    (report,) = _nodes("NPOCompareReport")
    (ckpt,) = _nodes("CheckpointLoaderSimple")

    def sampler_of(image_input: str) -> dict:
        decode = nodes[src[(report["id"], image_input)][0]]
        assert decode["type"] == "VAEDecode" and src[(decode["id"], "vae")] == (ckpt["id"], 2)
        return nodes[src[(decode["id"], "samples")][0]]

    ks_a, ks_b = sampler_of("images_a"), sampler_of("images_b")
    assert ks_a["type"] == ks_b["type"] == "KSampler" and ks_a["id"] != ks_b["id"]
    apply = nodes[src[(ks_a["id"], "model")][0]]
    assert apply["type"] == "NPOApply" and src[(apply["id"], "model")] == (ckpt["id"], 0)
    assert nodes[src[(apply["id"], "npo_offset")][0]]["type"] == "NPOLoadOffset"
    assert src[(ks_b["id"], "model")] == (ckpt["id"], 0)  # B: the checkpoint's own MODEL
    for name in ("positive", "negative", "latent_image"):
        assert src[(ks_a["id"], name)] == src[(ks_b["id"], name)], name
    assert "NPO on" in ks_a["title"] and "NPO off" in ks_b["title"]
    # the report's grid is kept; its text shows on the node
    (save,) = [nodes[dst] for (dst, _), s in src.items() if s == (report["id"], 1)]
    assert save["type"] in ("SaveImage", "PreviewImage")


def test_the_second_scorer_is_muted_and_optional():
    """Muted nodes are left out of the prompt, and so is the input they feed (frontend and converter alike:
    test_browser.py compares the two); only an optional input may hang on one."""
    wf = kit.load_example(NAME)
    nodes = {n["id"]: n for n in wf["nodes"]}
    src = _sources(wf)
    muted = [n for n in wf["nodes"] if n["mode"] == kit.MODE_NEVER]
    assert [n["type"] for n in muted] == ["NPOLoadScorer"]
    (report,) = _nodes("NPOCompareReport")
    fed = [(dst, name) for (dst, name), s in src.items() if s[0] == muted[0]["id"]]
    assert fed == [(report["id"], "scorer_2")]
    active = [n for n in _nodes("NPOLoadScorer") if n["mode"] == kit.MODE_ALWAYS]
    assert [src[(report["id"], "scorer")][0]] == [n["id"] for n in active]
    assert "Ctrl+M" in muted[0]["title"] or "unmute" in muted[0]["title"].lower()
    assert all(n["mode"] == kit.MODE_ALWAYS for n in nodes.values() if n not in muted)


def test_notes_name_the_scorer_files_and_how_many_pairs():
    note = _notes()
    for scorer in _nodes("NPOLoadScorer"):
        weights = scorer["widgets_values"][1]
        assert weights in note and not weights.startswith("tiny")
        assert "models" not in scorer["properties"]  # a folder of two repositories' files: nothing to fetch in one
    assert "models/npo_scorers/PickScore_v1/" in note
    assert "https://huggingface.co/yuvalkirstain/PickScore_v1" in note
    assert "https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in note
    for file in ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json", "vocab.json",
                 "merges.txt"):
        assert file in note, file
    assert "HPS_v2.1_compressed.pt" in note and "https://huggingface.co/xswu/HPSv2" in note
    (latent,) = _nodes("EmptyLatentImage")
    seeds = latent["widgets_values"][2]
    n_prompts = len(_example_prompts())
    assert "batch_size is the number of seeds per prompt" in note
    assert f"{n_prompts} × {seeds} = {n_prompts * seeds}" in note  # N as the example has it
    assert "too small" in note and "500" in note  # when N is enough, and the authors' N
    assert "input folder" in note and "prompt_file" in note


# ---------------------------------------------------------------------------------------------
# on the server
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scorer_server(request, tmp_path_factory):
    """The session server with a tiny random PickScore folder in its models/npo_scorers."""
    if kit.find_comfyui() is None:
        pytest.skip("ComfyUI not found (set COMFYUI_PATH): example 8's server tests skipped")
    pytest.importorskip("transformers")
    server = request.getfixturevalue("server")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "host"))
    import npo_scorerkit  # the tiny PickScore folder

    tiny = npo_scorerkit.write_pickscore_folder(tmp_path_factory.mktemp("pickscore"))
    dest = server.base / "models" / "npo_scorers" / TINY_PICKSCORE
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(tiny, dest)
    return server


@pytest.fixture(scope="module")
def scorer_object_info(scorer_server) -> dict:
    """Fetched after the folder was placed (the session's object_info may predate it)."""
    info = kit.get_json(scorer_server.url + "/object_info", timeout=60)
    assert TINY_PICKSCORE in kit.combo_options(*kit.input_spec(info["NPOLoadScorer"], "weights"))
    return info


def test_example_converts_and_validates_against_object_info(scorer_object_info):
    wf = kit.load_example(NAME)
    as_shipped = kit.ui_to_api(wf, scorer_object_info)
    problems = kit.validate_against_object_info(as_shipped, scorer_object_info)
    # only the user's own files are absent on the test server: checkpoint, offset, PickScore folder
    assert problems and all(any(f".{inp}:" in p for inp in USER_FILE_INPUTS) for p in problems), problems
    assert any(".weights: 'PickScore_v1'" in p for p in problems), problems
    subs = {**SUBSTITUTIONS, "weights": TINY_PICKSCORE}
    assert kit.validate_against_object_info(kit.ui_to_api(wf, scorer_object_info, subs), scorer_object_info) == []
    # the muted HPS scorer is not sent, nor the input it feeds
    assert sorted(e["class_type"] for e in as_shipped.values()).count("NPOLoadScorer") == 1
    (report,) = [e for e in as_shipped.values() if e["class_type"] == "NPOCompareReport"]
    assert "scorer_2" not in report["inputs"] and "scorer_3" not in report["inputs"]


def test_example_settings_as_the_server_reads_them(scorer_object_info):
    """Widget values are positional: read through /object_info's input order, each lands where meant."""
    prompt = kit.ui_to_api(kit.load_example(NAME), scorer_object_info)

    def one(cls: str) -> tuple[str, dict]:
        (nid,) = [nid for nid, e in prompt.items() if e["class_type"] == cls]
        return nid, prompt[nid]["inputs"]

    plist_id, plist = one("NPOPromptList")
    assert plist["prompt_file"] == "none" and len(plist["text"].splitlines()) == len(_example_prompts())
    _, latent = one("EmptyLatentImage")
    assert (latent["width"], latent["height"]) == (512, 512) and latent["batch_size"] >= 2
    samplers = [e["inputs"] for e in prompt.values() if e["class_type"] == "KSampler"]
    assert len(samplers) == 2
    for ks in samplers:  # the authors' SD1.5 setting: DPM-Solver multistep, 25 steps, cfg 7.5
        assert (ks["steps"], ks["cfg"], ks["sampler_name"], ks["scheduler"], ks["denoise"]) == (
            25, 7.5, "dpmpp_2m", "normal", 1.0)
    keys = ("seed", "positive", "negative", "latent_image")
    assert [samplers[0][k] for k in keys] == [samplers[1][k] for k in keys]
    _, apply = one("NPOApply")
    assert (apply["strength"], apply["start_percent"], apply["end_percent"]) == (1.0, 0.0, 1.0)
    _, scorer = one("NPOLoadScorer")
    assert (scorer["scorer"], scorer["weights"]) == ("PickScore v1", "PickScore_v1")
    _, report = one("NPOCompareReport")
    assert report["prompts"] == [plist_id, 0]
    assert (report["label_a"], report["label_b"], report["frames_per_item"], report["bootstrap_seed"]) == (
        "NPO", "plain CFG", 1, 0)
    negatives = {prompt[ks["negative"][0]]["inputs"]["text"] for ks in samplers}
    assert negatives == {""}


def test_example_runs_and_reports_every_pair_in_prompt_order(scorer_server, scorer_object_info):
    wf = kit.load_example(NAME)
    prompts = _example_prompts()[:PROMPTS_RUN]
    fast = {**FAST, ("NPOPromptList", "text"): "\n".join(prompts), ("EmptyLatentImage", "batch_size"): SEEDS_RUN}
    prompt = kit.ui_to_api(wf, scorer_object_info, {**SUBSTITUTIONS, "weights": TINY_PICKSCORE}, fast)
    (report_id,) = [nid for nid, e in prompt.items() if e["class_type"] == "NPOCompareReport"]
    prefix = prompt[report_id]["inputs"]["filename_prefix"]
    folder = scorer_server.output_dir / Path(prefix).parent
    before = set(folder.glob("*")) if folder.is_dir() else set()
    with kit.step(f"{NAME} ({PROMPTS_RUN} prompts × {SEEDS_RUN} seeds, {SIZE}x{SIZE})"):
        entry = run_prompt(scorer_server, prompt, wf)
    assert entry["status"]["status_str"] == "success", kit.execution_error(entry)

    n = PROMPTS_RUN * SEEDS_RUN
    (json_path,) = [p for p in set(folder.glob(Path(prefix).name + "_*.json")) - before]
    doc = json.loads(json_path.read_text())
    assert [x["prompt"] for x in doc["pairs"]] == [p for p in prompts for _ in range(SEEDS_RUN)]
    assert (doc["label_a"], doc["label_b"]) == ("NPO", "plain CFG")
    assert list(doc["scorers"]) == ["PickScore"]  # the muted HPS scorer stayed out
    pick = doc["scorers"]["PickScore"]
    assert pick["n"] == n and pick["wins_a"] + pick["wins_b"] + pick["ties"] == n
    rows = json_path.with_suffix(".csv").read_text().splitlines()
    assert len(rows) == n + 1 and rows[0] == "pair,label,PickScore_a,PickScore_b"
    # A and B are different images (the offset acts on A only): some pair scores differently
    assert any(a != b for a, b in (row.rsplit(",", 2)[1:] for row in rows[1:])), rows
    # the report's text on the node
    text = " ".join(entry["outputs"][report_id]["text"])
    assert f"NPO vs plain CFG: {n} pairs" in text and "too few pairs" in text, text
    # the grid: one image of the pairs side by side, in the example's SaveImage folder
    (save,) = _nodes("SaveImage")
    (rec,) = [r for r in kit.output_images(entry) if r.get("type", "output") == "output"]
    assert f"{rec.get('subfolder', '')}/{rec['filename']}".startswith(save["widgets_values"][0] + "_")
    grid = open_image(scorer_server, rec)
    assert grid.width >= n * 2 * SIZE and grid.height >= SIZE, grid.size
