"""NPO Load Scorer → NPO Compare Report in real ComfyUI, on tiny random scorers in models/npo_scorers: the report's
numbers equal transformers computing the scores directly (PickScore; the LAION aesthetic head on ComfyUI's own
CLIP_VISION), and the loader refuses what it cannot use."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

import npo_scorerkit as kit  # noqa: E402  (the tiny scorer folders and the PickScore reference)
import test_host_scorers as ref  # noqa: E402  (the aesthetic reference)
from test_host_scorers import clip_folder, vision_folder  # noqa: E402, F401  (fixtures)

from comfyui_npo.nodes.evaluate import AESTHETIC, PICKSCORE, NPOCompareReport, NPOLoadScorer  # noqa: E402
from comfyui_npo.nodes.host import scorers  # noqa: E402
from comfyui_npo.npo_core.errors import NPOError  # noqa: E402


@pytest.fixture
def scorer_dir(tmp_path, monkeypatch):
    import folder_paths

    d = tmp_path / "npo_scorers"
    d.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, scorers.SCORER_FOLDER, ([str(d)], set()))
    return d


def _report(out_dir, scorer, a, b, prompts):
    with torch.inference_mode():
        out = NPOCompareReport.execute(
            images_a=a, images_b=b, scorer=scorer, prompts="\n".join(prompts), label_a="A", label_b="B",
            filename_prefix="cmp/s", frames_per_item=1, bootstrap_seed=0,
        )
    return out, json.loads((out_dir / "cmp" / "s_00001_.json").read_text())


def test_pickscore_report_equals_transformers(scorer_dir, clip_folder, out_dir):  # noqa: F811
    shutil.copytree(clip_folder, scorer_dir / "PickScore_v1")
    assert "PickScore_v1" in scorers.scorer_entries()
    with torch.inference_mode():
        scorer = NPOLoadScorer.execute(scorer=PICKSCORE, weights="PickScore_v1").result[0]
    prompts = kit.PROMPTS[:3]
    a, b = kit.comfy_images(37, 55, 3, seed=1), kit.comfy_images(37, 55, 3, seed=2)
    _, doc = _report(out_dir, scorer, a, b, prompts)
    want_a, want_b = kit.reference_pickscore(clip_folder, a, prompts), kit.reference_pickscore(clip_folder, b, prompts)
    got = doc["scorers"]["PickScore"]
    assert got["mean_a"] == pytest.approx(float(want_a.double().mean()), abs=1e-5)
    assert got["mean_b"] == pytest.approx(float(want_b.double().mean()), abs=1e-5)
    assert got["wins_a"] == int((want_a > want_b).sum()) and got["wins_b"] == int((want_a < want_b).sum())
    import comfy.model_management

    assert all(m.model is not scorer.patcher for m in comfy.model_management.current_loaded_models)  # unloaded


def _comfy_clip_vision(folder, tmp_path):
    """ComfyUI's ClipVisionModel of the tiny transformers vision tower (same config, same weights, fp32)."""
    import comfy.clip_vision

    cfg = json.loads((folder / "config.json").read_text())
    cfg = {**cfg.get("vision_config", cfg), "model_type": "clip_vision_model", "image_size": 32}
    (tmp_path / "cv.json").write_text(json.dumps(cfg))
    cv = comfy.clip_vision.ClipVisionModel(str(tmp_path / "cv.json"))
    cv.model.float()
    hf = transformers.CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True)
    missing, _ = cv.load_sd(hf.state_dict())
    assert not missing
    return cv


def test_aesthetic_on_comfy_clip_vision_equals_transformers(scorer_dir, vision_folder, out_dir, tmp_path):  # noqa: F811
    weights = kit.head_weights()
    save_file(kit.head_state_dict(weights), str(scorer_dir / "aesthetic.safetensors"))
    cv = _comfy_clip_vision(vision_folder, tmp_path)
    with torch.inference_mode():
        scorer = NPOLoadScorer.execute(scorer=AESTHETIC, weights="aesthetic.safetensors", clip_vision=cv).result[0]
    a, b = kit.comfy_images(61, 29, 4, seed=3), kit.comfy_images(61, 29, 4, seed=4)
    _, doc = _report(out_dir, scorer, a, b, ["unused"])
    want_a = ref.reference_aesthetic(vision_folder, a, weights)
    want_b = ref.reference_aesthetic(vision_folder, b, weights)
    got = doc["scorers"]["LAION aesthetic v2"]
    assert got["mean_a"] == pytest.approx(float(want_a.double().mean()), rel=1e-5)
    assert got["mean_diff"] == pytest.approx(float((want_a - want_b).double().mean()), rel=1e-4, abs=1e-5)


@pytest.mark.fault(
    "NPO Load Scorer with no weights chosen, the aesthetic scorer without a CLIP vision model, or a name outside "
    "models/npo_scorers",
    "NPOError naming the input and what to connect or where to put the files",
)
def test_loader_refusals(scorer_dir, vision_folder, tmp_path):  # noqa: F811
    save_file(kit.head_state_dict(kit.head_weights()), str(scorer_dir / "aesthetic.safetensors"))
    with pytest.raises(NPOError, match="weights: choose the PickScore v1 files"):
        NPOLoadScorer.execute(scorer=PICKSCORE, weights="none")
    with pytest.raises(NPOError, match="clip_vision: the aesthetic scorer needs CLIP ViT-L/14"):
        NPOLoadScorer.execute(scorer=AESTHETIC, weights="aesthetic.safetensors")
    with pytest.raises(NPOError, match="weights: '../x' must be a file name inside its folder"):
        NPOLoadScorer.execute(scorer=PICKSCORE, weights="../x")
    with pytest.raises(NPOError, match="not in models/npo_scorers"):
        NPOLoadScorer.execute(scorer=PICKSCORE, weights="missing")


def test_folder_script_follows_compare_rate_and_matches_transformers(clip_folder, tmp_path):  # noqa: F811
    """scripts/npo_compare_folders.py on two folders of name.png + name.txt (one name only in A, one without a
    prompt in B): the pairs it scores and their PickScore numbers equal transformers' on the same PNGs."""
    import subprocess
    import sys
    from pathlib import Path

    a_dir, b_dir = tmp_path / "npo", tmp_path / "plain"
    a_dir.mkdir()
    b_dir.mkdir()
    prompts = [f"a red cat {'lower ' * i}".strip() for i in range(8)]
    images_a, images_b = kit.comfy_images(37, 55, 8, seed=5), kit.comfy_images(37, 55, 8, seed=6)
    for folder, images in ((a_dir, images_a), (b_dir, images_b)):
        for i, (png, prompt) in enumerate(zip(kit.saved_pngs(images), prompts, strict=True)):
            png.save(folder / f"{i:03}.png")
            if not (folder is b_dir and i == 3):
                (folder / f"{i:03}.txt").write_text(prompt + "\n")
    kit.saved_pngs(images_a[:1])[0].save(a_dir / "only_a.png")
    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "report"
    run = subprocess.run(
        [sys.executable, str(repo / "scripts" / "npo_compare_folders.py"), str(a_dir), str(b_dir),
         "--pickscore", str(clip_folder), "--labels", "NPO", "plain", "--out", str(out), "--resamples", "500"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "7 pairs sampled of 8 common names; 1 left out without a .txt prompt" in run.stderr
    doc = json.loads(Path(str(out) + ".json").read_text())
    names = [p["name"] for p in doc["pairs"]]
    assert sorted(names) == [f"{i:03}.png" for i in range(8) if i != 3]
    keep = [int(n[:3]) for n in names]
    want_a = kit.reference_pickscore(clip_folder, images_a[keep], [prompts[i] for i in keep])
    want_b = kit.reference_pickscore(clip_folder, images_b[keep], [prompts[i] for i in keep])
    got = doc["scorers"]["PickScore"]
    assert got["n"] == 7 and got["wins_a"] == int((want_a > want_b).sum())
    assert got["mean_a"] == pytest.approx(float(want_a.double().mean()), abs=1e-5)
    rows = Path(str(out) + ".csv").read_text().splitlines()
    assert len(rows) == 8 and rows[1].split(",")[1] == names[0]
    assert "NPO vs plain: 7 pairs" in run.stdout and Path(str(out) + ".txt").read_text().startswith("NPO vs plain")


def test_hps_through_the_loader_equals_open_clip(scorer_dir, out_dir, monkeypatch, tmp_path):
    """NPO Load Scorer (HPS v2.1: a checkpoint in a folder with the tokenizer files) → NPO Compare Report equals
    open_clip's own cosine on the same checkpoint. The tiny towers are 32 wide, a width the head table does not
    know, so their head counts are passed in (the real ViT-H-14 widths are in the table)."""
    pytest.importorskip("open_clip")
    import functools

    import test_host_hps as hps_ref

    from comfyui_npo.evaluation import hps

    model = hps_ref.tiny_open_clip()
    folder = scorer_dir / "hps"
    folder.mkdir()
    torch.save({"state_dict": model.state_dict()}, folder / "HPS_v2.1_compressed.pt")
    kit.write_tokenizer(folder)
    (folder / "config.json").write_text("{}")  # laion's config.json beside the tokenizer: still the .pt is listed
    assert "hps/HPS_v2.1_compressed.pt" in scorers.scorer_entries() and "hps" not in scorers.scorer_entries()
    monkeypatch.setattr(hps.HPSv21, "from_file", functools.partial(hps.HPSv21.from_file.__func__, hps.HPSv21,
                                                                   **hps_ref.HEADS))
    with torch.inference_mode():
        scorer = NPOLoadScorer.execute(scorer="HPS v2.1", weights="hps/HPS_v2.1_compressed.pt").result[0]
    prompts = kit.PROMPTS[:3]
    a, b = kit.comfy_images(37, 55, 3, seed=7), kit.comfy_images(37, 55, 3, seed=8)
    _, doc = _report(out_dir, scorer, a, b, prompts)
    want_a, want_b = hps_ref.reference_hps(model, a, prompts, folder), hps_ref.reference_hps(model, b, prompts, folder)
    got = doc["scorers"]["HPS v2.1"]
    assert got["mean_a"] == pytest.approx(float(want_a.double().mean()), abs=1e-5)
    assert got["mean_diff"] == pytest.approx(float((want_a - want_b).double().mean()), abs=1e-5)
