"""NPO Compare Report through the node, with hand-computable scorers (a real scorer's numbers are tested apart):
the numbers of its JSON and CSV against a hand count, prompts per pair, video frames averaged, refusals."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

from comfyui_npo.nodes.evaluate import NPOCompareReport
from comfyui_npo.npo_core.errors import NPOError


class RedScorer:
    """Score = the image's mean red value (the prompt ignored); records what it was asked."""

    name = "red"

    def __init__(self):
        self.prompts = []

    def score(self, images, prompts):
        self.prompts.append(list(prompts))
        return images[..., 0].mean(dim=(1, 2))


class PromptLengthScorer:
    """Score = the prompt's length + the image's mean green value / 10."""

    name = "prompt_len"

    def score(self, images, prompts):
        return torch.tensor([float(len(p)) for p in prompts]) + images[..., 1].mean(dim=(1, 2)) / 10


def _batch(values, h=12, w=10):
    """Images whose red channel is constant per image (green = 1 − red)."""
    out = torch.zeros(len(values), h, w, 3)
    for i, v in enumerate(values):
        out[i, ..., 0], out[i, ..., 1] = v, 1 - v
    return out


RED_A = [0.9, 0.8, 0.1, 0.7, 0.6, 0.2, 0.5, 0.3]
RED_B = [0.5, 0.7, 0.3, 0.2, 0.55, 0.6, 0.5, 0.45]  # A wins 0, 1, 3, 4; B wins 2, 5, 7; tie 6


def _run(out_dir, **kw):
    args = dict(
        images_a=_batch(RED_A), images_b=_batch(RED_B), scorer=RedScorer(), prompts="a fox\na cat",
        label_a="NPO", label_b="plain", filename_prefix="cmp/run", frames_per_item=1, bootstrap_seed=0,
    )
    args.update(kw)
    with torch.inference_mode():
        return NPOCompareReport.execute(**args)


def test_report_numbers_match_a_hand_count(out_dir):
    scorer = RedScorer()
    out = _run(out_dir, scorer=scorer, scorer_2=PromptLengthScorer())
    text, grid = out.result
    # two prompts for 8 images: each prompt for a run of 4 (its seeds), A's and B's batch alike
    assert scorer.prompts == [["a fox"] * 4 + ["a cat"] * 4] * 2
    doc = json.loads((out_dir / "cmp" / "run_00001_.json").read_text())
    red = doc["scorers"]["red"]
    assert (red["n"], red["wins_a"], red["wins_b"], red["ties"]) == (8, 4, 3, 1)
    assert red["mean_a"] == pytest.approx(sum(RED_A) / 8, abs=1e-6)
    assert red["mean_diff"] == pytest.approx((sum(RED_A) - sum(RED_B)) / 8, abs=1e-6)
    assert red["win_rate_a"] == 0.5 and red["sign_test_p"] == pytest.approx(2 * (1 + 7 + 21 + 35) / 128)
    # the prompt-length scorer: same prompt per pair, so only green decides: B (green = 1 − red) wins where A did
    pl = doc["scorers"]["prompt_len"]
    assert (pl["wins_a"], pl["wins_b"], pl["ties"]) == (3, 4, 1)
    assert [p["prompt"] for p in doc["pairs"]] == ["a fox"] * 4 + ["a cat"] * 4
    rows = list(csv.reader((out_dir / "cmp" / "run_00001_.csv").open()))
    assert rows[0] == ["pair", "label", "red_a", "red_b", "prompt_len_a", "prompt_len_b"]
    assert [float(r[2]) for r in rows[1:]] == pytest.approx(RED_A, abs=1e-6)
    assert [float(r[3]) for r in rows[1:]] == pytest.approx(RED_B, abs=1e-6)
    assert "NPO wins 4 (50.0 %" in text and "written: cmp/run_00001_.json, cmp/run_00001_.csv" in text
    assert grid.shape[0] == 1 and grid.shape[-1] == 3 and grid.shape[1] > 20 and grid.shape[2] > 300
    mask = os.umask(0)
    os.umask(mask)
    for ext in ("json", "csv"):  # the permissions ComfyUI's own outputs get
        assert (out_dir / "cmp" / f"run_00001_.{ext}").stat().st_mode & 0o777 == 0o666 & ~mask
    _run(out_dir)
    assert (out_dir / "cmp" / "run_00002_.json").exists()  # the next run does not overwrite


def test_video_items_score_the_mean_of_their_frames(out_dir):
    # 2 videos of 3 frames per side: A's frames 0.9, 0.3, 0.6 (mean 0.6) and 0.1, 0.2, 0.3 (0.2)
    a, b = _batch([0.9, 0.3, 0.6, 0.1, 0.2, 0.3]), _batch([0.5, 0.5, 0.5, 0.4, 0.4, 0.4])
    _run(out_dir, images_a=a, images_b=b, frames_per_item=3, prompts="one prompt")
    doc = json.loads((out_dir / "cmp" / "run_00001_.json").read_text())
    red = doc["scorers"]["red"]
    assert red["n"] == 2 and (red["wins_a"], red["wins_b"]) == (1, 1)
    assert red["mean_a"] == pytest.approx(0.4, abs=1e-6) and red["mean_b"] == pytest.approx(0.45, abs=1e-6)
    assert "too few pairs" in doc["scorers"]["red"]["verdict"]


@pytest.mark.fault(
    "NPO Compare Report with batches that do not pair, prompts that do not divide the images, or a video batch "
    "that does not split into frames_per_item",
    "NPOError naming the input and what pairs",
)
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"images_b": _batch(RED_B[:6])}, "images_b: .* does not pair"),
        ({"prompts": "a\nb\nc"}, "prompts: 3 prompts for 8 images"),
        ({"prompts": "  \n"}, "prompts: no prompt"),
        ({"frames_per_item": 3}, "images_a: 8 frames do not split"),
        ({"scorer_2": RedScorer()}, "the same scorer is connected twice"),
    ],
)
def test_bad_inputs_name_the_input(kw, match, out_dir):
    with pytest.raises(NPOError, match=match):
        _run(out_dir, **kw)
    assert not (out_dir / "cmp").exists()


def test_scoring_moves_the_progress_bar_per_chunk_and_stops_on_cancel(out_dir, monkeypatch):
    import comfy.model_management

    import comfyui_npo.nodes.evaluate as evaluate
    from comfyui_npo.nodes.host import runtime

    ticks = []

    class Bar:
        def __init__(self, total):
            ticks.append(("total", total))

        def update(self, n):
            ticks.append(n)

    monkeypatch.setattr(runtime, "progress_bar", Bar)
    monkeypatch.setattr(evaluate, "SCORE_CHUNK", 3)
    scorer = RedScorer()
    _run(out_dir, scorer=scorer, prompts="p")
    assert ticks == [("total", 16), 3, 3, 2, 3, 3, 2]  # A's 8 images, then B's, 3 at a time
    assert [len(p) for p in scorer.prompts] == [3, 3, 2, 3, 3, 2]

    calls = []

    class CancelAfterOne(RedScorer):
        def score(self, images, prompts):
            calls.append(1)
            comfy.model_management.interrupt_current_processing(True)
            return super().score(images, prompts)

    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _run(out_dir, scorer=CancelAfterOne(), prompts="p")
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert calls == [1]  # the next chunk is not scored


def test_score_images_node_scores_each_item(out_dir):
    from comfyui_npo.nodes.evaluate import NPOScoreImages

    with torch.inference_mode():
        out = NPOScoreImages.execute(images=_batch([0.9, 0.3, 0.6, 0.1, 0.2, 0.3]), scorer=RedScorer(),
                                     prompts="a\nb", frames_per_item=3)
    scores, text = out.result
    assert scores == pytest.approx([0.6, 0.2], abs=1e-6)  # each video's frames averaged
    assert text.startswith("red: mean 0.4000 over 2 item(s)") and "1: 0.2000  b" in text


def test_prompt_list_runs_per_prompt_and_the_report_collects_in_order(out_dir, tmp_path, monkeypatch):
    """NPO Prompt List (text + a prompt file) feeds the report the way ComfyUI's list execution does: one IMAGE
    batch per prompt on each side, every input as a list; pairs stay in prompt order."""
    import folder_paths

    from comfyui_npo.nodes.evaluate import NPOPromptList

    inputs = tmp_path / "input"
    inputs.mkdir()
    (inputs / "more.txt").write_text("a cat\n\n")
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(inputs))
    prompts, count = NPOPromptList.execute(text="a fox\n  \n", prompt_file="more.txt").result
    assert prompts == ["a fox", "a cat"] and count == 2
    scorer = RedScorer()
    lists = dict(
        images_a=[_batch(RED_A[:4]), _batch(RED_A[4:])], images_b=[_batch(RED_B[:4]), _batch(RED_B[4:])],
        scorer=[scorer], prompts=prompts, label_a=["NPO"], label_b=["plain"], filename_prefix=["cmp/run"],
        frames_per_item=[1], bootstrap_seed=[0],
    )
    with torch.inference_mode():
        NPOCompareReport.execute(**lists)
    doc = json.loads((out_dir / "cmp" / "run_00001_.json").read_text())
    assert [p["prompt"] for p in doc["pairs"]] == ["a fox"] * 4 + ["a cat"] * 4
    assert (doc["scorers"]["red"]["wins_a"], doc["scorers"]["red"]["ties"]) == (4, 1)
    with pytest.raises(NPOError, match="text: no prompt"):
        NPOPromptList.execute(text=" \n")
    with pytest.raises(NPOError, match="images_a: the batches differ in size"):
        NPOCompareReport.execute(**{**lists, "images_a": [_batch(RED_A[:4]), _batch(RED_A[4:], h=8)]})
