"""NPO Compare Report: does NPO (or offset A over offset B) score higher, pair by pair?"""

from __future__ import annotations

import os

import torch
from comfy_api.latest import io, ui

from ..evaluation import pairing, report
from ..npo_core.atomic import atomic_write
from ..npo_core.errors import NPOError
from .common import NPOScorerType, advanced, refusal, schema
from .host import files, runtime, scorers
from .plot import compare_grid

PICKSCORE, AESTHETIC, HPS, IMAGE_REWARD = "PickScore v1", "LAION aesthetic v2", "HPS v2.1", "ImageReward v1.0"
NONE = "none"


class NPOLoadScorer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="NPOLoadScorer",
            display_name="NPO Load Scorer",
            search_aliases=["scorer", "pickscore", "aesthetic", "hps", "imagereward", "reward model", "evaluate"],
            description="Loads one of the authors' image scorers from models/npo_scorers (nothing is downloaded): "
            "PickScore v1 (a folder in the Hugging Face layout), the LAION aesthetic predictor v2 (its MLP head "
            "file, on ComfyUI's CLIP ViT-L/14 from Load CLIP Vision), HPS v2.1 (its checkpoint, without the hpsv2 "
            "package) or ImageReward v1.0 (only where the ImageReward package is installed; the pack never installs "
            "it).",
            inputs=[
                io.Combo.Input(
                    "scorer",
                    options=[PICKSCORE, AESTHETIC, HPS, IMAGE_REWARD],
                    default=PICKSCORE,
                    tooltip="PickScore v1: logit_scale · cosine of text and image embeddings (SD1.5 ≈ 20.75 in the "
                    "paper). LAION aesthetic v2: 1–10 rating of the image alone (the prompt is not used). HPS v2.1: "
                    "cosine of the normalised embeddings of its open_clip ViT-H-14 (run on transformers' CLIP). "
                    "ImageReward v1.0: the ImageReward package's reward (SD1.5 ≈ 0.11 in the paper); "
                    + image_reward_status(),
                ),
                io.Combo.Input(
                    "weights",
                    options=[NONE, *scorers.scorer_entries()],
                    default=NONE,
                    tooltip="In models/npo_scorers: PickScore, the folder of yuvalkirstain/PickScore_v1 with the "
                    "tokenizer and preprocessor_config.json of laion/CLIP-ViT-H-14-laion2B-s32B-b79K beside its "
                    "config.json and model.safetensors; aesthetic, sac+logos+ava1-l14-linearMSE.pth (or "
                    ".safetensors); HPS, HPS_v2.1_compressed.pt in a folder holding the tokenizer files of "
                    "laion/CLIP-ViT-H-14; ImageReward, a folder holding ImageReward.pt and med_config.json of "
                    "THUDM/ImageReward and the tokenizer files of bert-base-uncased in a bert-base-uncased subfolder.",
                ),
                io.ClipVision.Input(
                    "clip_vision",
                    optional=True,
                    tooltip="LAION aesthetic: CLIP ViT-L/14 (clip_vision_l / OpenAI's clip-vit-large-patch14) from "
                    "Load CLIP Vision. Not used by PickScore.",
                ),
            ],
            outputs=[NPOScorerType.Output(display_name="scorer")],
        )

    @classmethod
    def execute(cls, scorer: str, weights: str, clip_vision=None) -> io.NodeOutput:
        if not weights or weights == NONE:
            raise NPOError(f"weights: choose the {scorer} files in models/{scorers.SCORER_FOLDER}.")
        path = scorers.scorer_path(weights)
        if scorer == PICKSCORE:
            from ..evaluation.pickscore import PickScore

            return io.NodeOutput(scorers.ManagedScorer(PickScore.from_folder(path), "PickScore"))
        if scorer == AESTHETIC:
            if clip_vision is None:
                raise NPOError("clip_vision: the aesthetic scorer needs CLIP ViT-L/14; connect Load CLIP Vision.")
            return io.NodeOutput(scorers.aesthetic_on_clip_vision(clip_vision, path))
        if scorer == HPS:
            from ..evaluation.hps import HPSv21

            return io.NodeOutput(scorers.ManagedScorer(HPSv21.from_file(path, os.path.dirname(path)), "HPS v2.1"))
        if scorer == IMAGE_REWARD:
            from ..evaluation.image_reward import ImageRewardScorer

            return io.NodeOutput(scorers.ManagedScorer(ImageRewardScorer.from_folder(path), "ImageReward"))
        raise NPOError(f"scorer: '{scorer}' is not one of {PICKSCORE}, {AESTHETIC}, {HPS}, {IMAGE_REWARD}.")


def image_reward_status() -> str:
    """Whether ImageReward can be chosen in this ComfyUI, and if not, why (shown in the scorer's tooltip)."""
    from ..evaluation.image_reward import unavailable_reason

    reason = unavailable_reason()
    return f"unavailable here: {reason}." if reason else "the ImageReward package is installed here."


SCORE_CHUNK = 16  # images per scorer call: the progress bar moves and Cancel is checked between calls


def prompts_input() -> io.String.Input:
    return io.String.Input(
        "prompts",
        multiline=True,
        default="",
        tooltip="The prompts, one per line: one for every image, one per image, or N prompts for a batch of N runs "
        "of seeds (each prompt's images consecutive); or connect NPO Prompt List.",
    )


def frames_per_item_input() -> io.Int.Input:
    return io.Int.Input(
        "frames_per_item",
        default=1,
        min=1,
        max=4096,
        tooltip="Video: the frames of one video in the batch; its score is the mean of its frames' scores. 1 for "
        "images.",
        **advanced(),
    )


def score_frames(scorer, images: torch.Tensor, prompts: list[str], pbar) -> torch.Tensor:
    """The scorer's score of every frame (its prompt repeated), in chunks, the progress bar ticking per image."""
    out = []
    for i in range(0, images.shape[0], SCORE_CHUNK):
        runtime.throw_if_interrupted()
        got = scorer.score(images[i : i + SCORE_CHUNK], prompts[i : i + SCORE_CHUNK])
        out.append(got.detach().double().cpu().reshape(-1))
        pbar.update(out[-1].shape[0])
    return torch.cat(out)


def one(value):
    """A widget or single input of a list-input node (ComfyUI passes each as a list)."""
    return value[0] if isinstance(value, list) else value


def joined_images(value, input_name: str) -> torch.Tensor:
    """IMAGE batches of a list input (one per prompt of an NPO Prompt List) as one batch, in order."""
    if not isinstance(value, list):
        return value
    sizes = {tuple(v.shape[1:]) for v in value}
    if len(sizes) > 1:
        raise NPOError(f"{input_name}: the batches differ in size ({sorted(sizes)}); sample every prompt at one size.")
    return torch.cat(value)


def joined_prompts(value) -> list[str]:
    """Prompt lines of a list input: an NPO Prompt List's prompts, or a text of one prompt per line."""
    texts = value if isinstance(value, list) else [value]
    return [line for t in texts for line in pairing.prompt_lines(t)]


def release(scorers_used) -> None:
    """Give the pack's own scorer models back to ComfyUI's model management (moved off the device)."""
    for s in scorers_used:
        getattr(s, "release", lambda: None)()


class NPOPromptList(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="NPOPromptList",
            display_name="NPO Prompt List",
            search_aliases=["prompt list", "prompts", "batch prompts", "text lines", "evaluate"],
            description="Prompts, one per line (or from a .txt file in ComfyUI's input folder), as a list: the nodes "
            "after it run once per prompt (CLIP Text Encode, KSampler, ...), and NPO Compare Report / NPO Score "
            "Images collect the results in order.",
            inputs=[
                io.String.Input(
                    "text", multiline=True, default="", tooltip="One prompt per line; empty lines are skipped."
                ),
                io.Combo.Input(
                    "prompt_file",
                    options=[NONE, *files.input_text_files()],
                    default=NONE,
                    optional=True,
                    tooltip="A .txt file in ComfyUI's input folder, one prompt per line, added after the text's.",
                ),
            ],
            outputs=[
                io.String.Output(display_name="prompts", is_output_list=True),
                io.Int.Output(display_name="count"),
            ],
        )

    @classmethod
    def execute(cls, text: str, prompt_file: str = NONE) -> io.NodeOutput:
        prompts = pairing.prompt_lines(text)
        if prompt_file and prompt_file != NONE:
            prompts += pairing.prompt_lines(files.read_input_text(prompt_file, "prompt_file"))
        if not prompts:
            raise NPOError("text: no prompt; write one prompt per line (or choose a prompt_file).")
        return io.NodeOutput(prompts, len(prompts))


class NPOScoreImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="NPOScoreImages",
            display_name="NPO Score Images",
            search_aliases=["score", "pickscore", "aesthetic", "hps", "imagereward", "evaluate", "metric"],
            description="Scores an IMAGE batch against its prompts with a scorer from NPO Load Scorer.",
            inputs=[
                io.Image.Input("images", tooltip="The images (or the frames of videos, see frames_per_item)."),
                NPOScorerType.Input("scorer", tooltip="A scorer from NPO Load Scorer (higher = better)."),
                prompts_input(),
                frames_per_item_input(),
            ],
            outputs=[
                io.Float.Output(display_name="scores", is_output_list=True),
                io.String.Output(display_name="text"),
            ],
            is_input_list=True,  # the image batches of an NPO Prompt List's prompts arrive together
        )

    @classmethod
    def execute(cls, images, scorer, prompts, frames_per_item) -> io.NodeOutput:
        images, scorer, frames_per_item = joined_images(images, "images"), one(scorer), one(frames_per_item)
        items = pairing.items_of(images, frames_per_item, "images")
        per_item = pairing.prompts_per_item(joined_prompts(prompts), items)
        per_frame = [p for p in per_item for _ in range(frames_per_item)]
        frames = score_frames(scorer, images, per_frame, runtime.progress_bar(images.shape[0]))
        release([scorer])
        scores = pairing.mean_per_item(frames, frames_per_item).tolist()
        mean = sum(scores) / len(scores)
        lines = [f"{scorer.name}: mean {mean:.4f} over {len(scores)} item(s)"]
        lines += [f"{i}: {v:.4f}  {p}" for i, (v, p) in enumerate(zip(scores, per_item, strict=True))]
        text = "\n".join(lines)
        return io.NodeOutput(scores, text, ui=ui.PreviewText(text))


class NPOCompareReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="NPOCompareReport",
            display_name="NPO Compare Report",
            search_aliases=["compare", "a/b", "win rate", "score", "evaluate", "report", "negative", "guidance"],
            description="Scores two batches made with the same prompts and seeds (with NPO / without, or offset A / "
            "offset B) and reports, per scorer, the means, the paired difference, the win rate (a strictly higher "
            "score, as the authors count it) and whether the difference is more than chance. Writes the numbers "
            "as JSON and CSV into the output folder.",
            inputs=[
                io.Image.Input("images_a", tooltip="A's images (e.g. sampled with Apply NPO), pair i = image i."),
                io.Image.Input(
                    "images_b", tooltip="B's images (e.g. the same sampler without NPO), same prompts and seeds."
                ),
                NPOScorerType.Input("scorer", tooltip="A scorer from NPO Load Scorer (higher = better)."),
                prompts_input(),
                io.String.Input("label_a", default="NPO", tooltip="What A is called in the report."),
                io.String.Input("label_b", default="plain CFG", tooltip="What B is called in the report."),
                io.String.Input(
                    "filename_prefix",
                    default="npo_compare/report",
                    tooltip="Where the JSON and CSV go, inside ComfyUI's output folder.",
                ),
                frames_per_item_input(),
                io.Int.Input(
                    "bootstrap_seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFF,
                    control_after_generate=False,
                    tooltip="Seed of the bootstrap resampling (the confidence intervals); the same seed gives the "
                    "same report.",
                    **advanced(),
                ),
                NPOScorerType.Input("scorer_2", optional=True, tooltip="A second scorer (optional)."),
                NPOScorerType.Input("scorer_3", optional=True, tooltip="A third scorer (optional)."),
            ],
            outputs=[io.String.Output(display_name="report"), io.Image.Output(display_name="grid")],
            is_output_node=True,
            is_input_list=True,  # the image batches of an NPO Prompt List's prompts arrive together
        )

    @classmethod
    def validate_inputs(cls, filename_prefix=None) -> bool | str:
        prefix = one(filename_prefix)
        return refusal(lambda: prefix is None or files.check_prefix(prefix))

    @classmethod
    def execute(
        cls, images_a, images_b, scorer, prompts, label_a, label_b, filename_prefix, frames_per_item, bootstrap_seed,
        scorer_2=None, scorer_3=None,
    ) -> io.NodeOutput:
        images_a, images_b = joined_images(images_a, "images_a"), joined_images(images_b, "images_b")
        label_a, label_b, filename_prefix = one(label_a), one(label_b), one(filename_prefix)
        frames_per_item, bootstrap_seed = one(frames_per_item), one(bootstrap_seed)
        scorers = [one(s) for s in (scorer, scorer_2, scorer_3) if one(s) is not None]
        names = [s.name for s in scorers]
        if len(set(names)) != len(names):
            raise NPOError(f"scorer_2 / scorer_3: the same scorer is connected twice ({', '.join(names)}).")
        items = pairing.items_of(images_a, frames_per_item, "images_a")
        if pairing.items_of(images_b, frames_per_item, "images_b") != items or images_a.shape != images_b.shape:
            raise NPOError(
                f"images_b: {tuple(images_b.shape)} does not pair with images_a {tuple(images_a.shape)}; both "
                "batches need the same prompts, seeds and size."
            )
        per_item = pairing.prompts_per_item(joined_prompts(prompts), items)
        per_frame = [p for p in per_item for _ in range(frames_per_item)]
        pbar = runtime.progress_bar(2 * images_a.shape[0] * len(scorers))
        scores_a, scores_b = {}, {}
        for s in scorers:
            for images, out in ((images_a, scores_a), (images_b, scores_b)):
                frames = score_frames(s, images, per_frame, pbar)
                out[s.name] = pairing.mean_per_item(frames, frames_per_item).tolist()
        release(scorers)
        summaries = report.summarise(scores_a, scores_b, seed=bootstrap_seed)
        text = report.text_report(summaries, label_a, label_b)
        json_path, csv_path = _write(summaries, scores_a, scores_b, per_item, label_a, label_b, filename_prefix)
        text += f"\nwritten: {json_path}, {csv_path}"
        first = slice(0, images_a.shape[0], frames_per_item)  # a video's first frame stands for it
        captions = [
            "\n".join(f"{k}: {scores_a[k][i]:.3f} | {scores_b[k][i]:.3f}" for k in scores_a) for i in range(items)
        ]
        grid = compare_grid(images_a[first], images_b[first], captions, label_a, label_b)
        return io.NodeOutput(text, grid, ui=ui.PreviewText(text))


def _write(summaries, scores_a, scores_b, prompts, label_a, label_b, filename_prefix) -> tuple[str, str]:
    """The report's JSON and CSV in the output folder (written atomically); paths relative to it."""
    base = files.output_dir()
    folder, name, counter = files.save_path(base, filename_prefix)
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, f"{name}_{counter:05}_")
    pairs = [{"pair": i, "prompt": p} for i, p in enumerate(prompts)]
    doc = report.json_report(summaries, label_a, label_b, pairs)
    table = report.csv_report(scores_a, scores_b, prompts)
    atomic_write(stem + ".json", lambda tmp: _text_to(tmp, doc))
    atomic_write(stem + ".csv", lambda tmp: _text_to(tmp, table))
    return tuple(os.path.relpath(stem + ext, base).replace(os.sep, "/") for ext in (".json", ".csv"))


def _text_to(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
