"""Static checks of example_workflows/ (no server needed, so they run even without ComfyUI):
well-formed UI JSON (version 0.4, consistent links), a Note naming the files to pick, a small JPEG
thumbnail beside each workflow."""

from __future__ import annotations

import npo_e2ekit as kit
import pytest

EXAMPLES = kit.example_names()


def test_the_examples_are_titled_and_numbered_simplest_first():
    """The template browser shows a pack's workflows by file name: readable titles, numbered in order."""
    assert EXAMPLES == [kit.EXAMPLE_KSAMPLER, kit.EXAMPLE_SDXL, kit.EXAMPLE_GUIDER, kit.EXAMPLE_SELF_NPO,
                        kit.EXAMPLE_SD35, kit.EXAMPLE_WAN21, kit.EXAMPLE_WAN21_SELF_NPO, kit.EXAMPLE_COMPARE,
                        kit.EXAMPLE_PREFERENCE]
    assert [int(name.split(" ", 1)[0]) for name in EXAMPLES] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert all(" " in name and "_" not in name for name in EXAMPLES)


WINDOWS_FORBIDDEN = set('<>:"/\\|?*')  # with control characters; nor may a name end in a dot or a space
WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"{p}{i}" for p in ("COM", "LPT") for i in range(1, 10))}


def portable_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a file name on Windows (a git clone there would fail for the whole pack), or None."""
    bad = sorted({c for c in name if c in WINDOWS_FORBIDDEN or ord(c) < 32})
    if bad:
        return f"holds {''.join(bad)!r}"
    if name != name.rstrip(". "):
        return "ends in a dot or a space"
    if name.split(".", 1)[0].strip().upper() in WINDOWS_RESERVED:
        return "is a name Windows reserves for a device"
    return None


def test_portable_name_problem_finds_what_windows_refuses():
    assert portable_name_problem("8 Does NPO help on my checkpoint.json") is None
    for name in ("8 Does NPO help?.json", 'a "b".json', "a:b.jpg", "a|b", "a*b", "a<b>", "a\\b", "tab\there",
                 "trailing.", "trailing ", "con.json", "COM1.jpg", "aux"):
        assert portable_name_problem(name), name


def test_example_file_names_are_portable():
    """Every file in example_workflows/ can be checked out on Windows, macOS and Linux."""
    files = sorted(p.name for p in kit.EXAMPLES.iterdir())
    assert len(files) >= 2 * len(EXAMPLES)  # the workflows and their thumbnails
    problems = {name: portable_name_problem(name) for name in files if portable_name_problem(name)}
    assert not problems, problems
    assert len({name.lower() for name in files}) == len(files), "two names differ only in case"


KNOWN_FILES = {  # the files the examples name, and where the frontend's missing-model dialog fetches them
    "v1-5-pruned-emaonly.safetensors": "checkpoints",
    "sd_xl_base_1.0.safetensors": "checkpoints",
    "sd15_beta500_2kiter.safetensors": "npo",
    "sdxl_beta2k_2kiter.safetensors": "npo",
    "sd3.5_large_fp8_scaled.safetensors": "checkpoints",
    "wan2.1_t2v_1.3B_fp16.safetensors": "diffusion_models",
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors": "text_encoders",
    "wan_2.1_vae.safetensors": "vae",
}
LOADERS = ("CheckpointLoaderSimple", "UNETLoader", "CLIPLoader", "VAELoader", "NPOLoadOffset")


@pytest.mark.parametrize("name", EXAMPLES)
def test_loaders_name_consistent_files_with_download_links(name):
    for n in kit.load_example(name)["nodes"]:
        if n["type"] not in LOADERS:
            continue
        file = n["widgets_values"][0]
        if name in kit.DIT_EXAMPLES and n["type"] == "NPOLoadOffset":
            # no NPO offset is released for these families: the user's own file, nothing to download; the
            # title (shown beside "Unknown" in the missing-model list) says to train it first
            # (test_e2e_dit_examples.py checks that the Note and the title name the training template)
            assert "models" not in n["properties"], f"{name}: a download link for an offset nobody published"
            assert "train it first" in n["title"], f"{name}: the offset loader does not say to train it first"
            continue
        assert file in KNOWN_FILES, f"{name}: {n['type']} names {file}"
        (model,) = n["properties"]["models"]
        assert model["name"] == file and model["directory"] == KNOWN_FILES[file]
        assert model["url"].startswith("https://huggingface.co/") and model["url"].endswith("/" + file)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_is_wellformed_ui_json(name):
    wf = kit.load_example(name)
    assert wf["version"] == 0.4
    assert isinstance(wf["groups"], list) and isinstance(wf["config"], dict) and isinstance(wf["extra"], dict)
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "duplicate node ids"
    assert wf["last_node_id"] >= max(nodes) and wf["last_link_id"] >= max(link[0] for link in wf["links"])
    for n in wf["nodes"]:
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "properties", "widgets_values"):
            assert key in n, f"node {n.get('id')} has no '{key}'"
        if n["type"] not in kit.FRONTEND_ONLY:
            assert n["properties"].get("Node name for S&R") == n["type"]
    for lid, src, sslot, dst, dslot, typ in wf["links"]:
        out = nodes[src]["outputs"][sslot]
        inp = nodes[dst]["inputs"][dslot]
        assert lid in (out["links"] or []), f"link {lid} missing from node {src} output {sslot}"
        assert inp["link"] == lid, f"link {lid} missing from node {dst} input {dslot}"
        assert out["type"] == typ == inp["type"], f"link {lid}: {out['type']} → {inp['type']} ({typ})"
    for n in wf["nodes"]:
        for slot, inp in enumerate(n.get("inputs", [])):
            if inp.get("link") is not None:
                link = next(lk for lk in wf["links"] if lk[0] == inp["link"])
                assert (link[3], link[4]) == (n["id"], slot)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_tells_the_user_which_files_to_pick(name):
    wf = kit.load_example(name)
    notes = " ".join(str(n["widgets_values"][0]) for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote"))
    assert "models/npo" in notes and "models/loras" in notes
    for n in wf["nodes"]:
        if n["type"] == "NPOLoadOffset":
            offset = n["widgets_values"][0]
            assert offset in notes, f"the Note does not name the offset file '{offset}'"
            assert not offset.startswith("tiny_"), "examples must name the real offset file, not a test asset"
        if n["type"] == "CheckpointLoaderSimple":
            assert not n["widgets_values"][0].startswith("tiny_")
        if n["type"] == "NPOLoadScorer":  # scorer files: in models/npo_scorers, named in the Note
            weights = n["widgets_values"][1]
            assert "models/npo_scorers" in notes and weights in notes, f"the Note does not name '{weights}'"
            assert not weights.startswith("tiny") and weights != "none"


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's start-of-frame segment (no imaging library needed)."""
    assert data[:2] == b"\xff\xd8" and data.rstrip(b"\x00")[-2:] == b"\xff\xd9", "not a complete JPEG file"
    i = 2
    while i + 9 < len(data):
        assert data[i] == 0xFF, "corrupt JPEG segment"
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        i += 2 + length
    raise AssertionError("no JPEG frame header")


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_has_a_small_jpeg_thumbnail(name):
    thumb = kit.EXAMPLES / f"{name}.jpg"
    assert thumb.is_file(), f"{thumb.name} is missing"
    data = thumb.read_bytes()
    assert len(data) < 100_000, f"{thumb.name} is {len(data)} bytes (limit 100 KB)"
    width, height = jpeg_size(data)
    assert min(width, height) >= 128, (width, height)
