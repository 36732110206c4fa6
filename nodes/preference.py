"""Diffusion-NPO from preference pairs: NPO Pairs From Images, NPO Pairs From Folder, NPO Self-Generated Pairs,
NPO Preference Train."""

from __future__ import annotations

import os

import torch
from comfy_api.latest import io, ui

from ..npo_core.errors import NPOError
from ..npo_core.families import PRESET_NAMES
from ..training import optimizers, pairs, parquet_pairs
from ..training.preference import LOSS_TYPES
from ..training.trainer import Callbacks
from .common import NPOOffsetType, NPOScorerType, advanced, check_widgets, refusal, schema
from .host import files, pair_generation, preference_run, runtime, training_conds, training_preview
from .host.training_model import TrainingModel
from .plot import loss_curve_image
from .train import NONE, _new_checkpoint_path, _resume_path, checkpoint_files, parse_learning_rate

NPOPairsType = io.Custom("NPO_PAIRS")
PAIR_ALIASES = ["preference", "pairs", "dpo", "diffusion-npo", "dataset"]


def _encode(vae, images: torch.Tensor, input_name: str) -> torch.Tensor:
    """IMAGE [B, H, W, C] → the VAE's latents; sizes off its downscale factor are refused, naming the input."""
    factor = getattr(vae, "downscale_ratio", 8)
    if isinstance(factor, int) and (images.shape[1] % factor or images.shape[2] % factor):
        raise NPOError(
            f"{input_name}: {images.shape[2]}×{images.shape[1]} px is not a multiple of the VAE's factor {factor}; "
            "resize or crop the images (e.g. Upscale Image to a multiple of 8)."
        )
    return vae.encode(images[:, :, :, :3])


class NPOPairsFromImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="NPOPairsFromImages",
            display_name="NPO Pairs From Images",
            search_aliases=PAIR_ALIASES,
            description="Preference pairs from two IMAGE batches of one size: image i of preferred and image i of "
            "rejected are one pair, made for the prompt of positive (one prompt for all, or one per pair). "
            "Encoded with the VAE; feed NPO Preference Train.",
            inputs=[
                io.Image.Input("preferred", tooltip="The images people (or a scorer) liked, one per pair."),
                io.Image.Input("rejected", tooltip="The images they liked less, in the same order and size."),
                io.Conditioning.Input(
                    "positive",
                    tooltip="The prompt the pairs were made for (CLIP Text Encode); several prompts combined with "
                    "Conditioning (Combine) are one per pair, in order.",
                ),
                io.Vae.Input("vae", tooltip="The VAE of the model to train (encodes the images into its latents)."),
            ],
            outputs=[NPOPairsType.Output(display_name="pairs")],
        )

    @classmethod
    def execute(cls, preferred, rejected, positive, vae) -> io.NodeOutput:
        if preferred.shape != rejected.shape:
            raise NPOError(
                f"rejected: {tuple(rejected.shape)} does not match preferred {tuple(preferred.shape)}; each pair is "
                "two images of one size, in the same order."
            )
        entries = training_conds.conditioning_entries(positive, "positive")
        n = preferred.shape[0]
        if len(entries) not in (1, n):
            raise NPOError(f"positive: {len(entries)} prompts for {n} pairs; give one prompt, or one per pair.")
        prompt_of = torch.zeros(n, dtype=torch.long) if len(entries) == 1 else torch.arange(n)
        pair_set = preference_run.PairSet(
            _encode(vae, preferred, "preferred"), _encode(vae, rejected, "rejected"), entries, prompt_of,
            [f"pair {i + 1}" for i in range(n)], "NPO Pairs From Images",
        )
        return io.NodeOutput(pair_set, ui=ui.PreviewText(f"{n} pairs, {len(entries)} prompt(s)"))


class NPOPairsFromFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="NPOPairsFromFolder",
            display_name="NPO Pairs From Folder",
            search_aliases=PAIR_ALIASES,
            description="Preference pairs from a folder in ComfyUI's input folder holding pairs.jsonl, one JSON "
            'object per line: {"prompt": …, "preferred": "a.png", "rejected": "b.png"} (paths relative to the '
            "folder). Images are resized and centre-cropped as the authors do, prompts encoded with the CLIP, "
            "images with the VAE. Every bad line is named before anything trains.",
            inputs=[
                io.String.Input(
                    "folder",
                    default="npo_pairs",
                    tooltip="A folder inside ComfyUI's input folder (subfolders with '/') holding pairs.jsonl.",
                ),
                io.Clip.Input("clip", tooltip="The text encoder of the model to train (encodes each pair's prompt)."),
                io.Vae.Input("vae", tooltip="The VAE of the model to train (encodes the images)."),
                io.Int.Input(
                    "resolution",
                    default=512,
                    min=16,
                    max=4096,
                    step=8,
                    tooltip="The shorter side is resized to this and the centre cropped square, as the authors' "
                    "trainer does (512 for SD1.5, 1024 for SDXL).",
                ),
                io.Boolean.Input(
                    "mirrored_copies",
                    default=True,
                    tooltip="Also add every pair mirrored left-right (the authors flip images at random as they "
                    "load them; a mirrored copy of each pair gives the same data, fixed).",
                ),
            ],
            outputs=[NPOPairsType.Output(display_name="pairs")],
        )

    @classmethod
    def validate_inputs(cls, folder=None, resolution=None) -> bool | str:
        return refusal(lambda: _check_folder_inputs(cls, folder, resolution))

    @classmethod
    def fingerprint_inputs(cls, folder, clip, vae, resolution, mirrored_copies) -> str:
        try:
            st = os.stat(os.path.join(files.input_subfolder(folder, "folder"), pairs.INDEX))
            return f"{folder}:{st.st_mtime_ns}:{st.st_size}"
        except Exception:
            return folder

    @classmethod
    def execute(cls, folder: str, clip, vae, resolution: int, mirrored_copies: bool) -> io.NodeOutput:
        _check_folder_inputs(cls, folder, resolution)
        try:
            found = pairs.read_pair_folder(files.input_subfolder(folder, "folder"))
        except pairs.PairError as e:
            raise NPOError(f"folder: {e}") from None
        pair_set, n_prompts = _prepared_pair_set(
            found, clip, vae, resolution, mirrored_copies, "folder", f"NPO Pairs From Folder ({folder})"
        )
        text = f"{len(found)} pairs from {folder}/{pairs.INDEX}, {n_prompts} prompt(s), {resolution} px"
        return io.NodeOutput(pair_set, ui=ui.PreviewText(text + (", with mirrored copies" if mirrored_copies else "")))


def _prepared_pair_set(
    found: list, clip, vae, resolution: int, mirrored_copies: bool, input_name: str, source: str
) -> tuple[preference_run.PairSet, int]:
    """Pairs (``.prompt``, ``.preferred``, ``.rejected`` files or image bytes, ``.item``) resized and centre-cropped
    as the authors do, mirrored copies added, prompts encoded with ``clip`` and images with ``vae``; bad images are
    errors naming the item and ``input_name``."""
    pbar = runtime.progress_bar(len(found))
    good, bad = [], []
    try:
        for p in found:
            good.append(pairs.prepared(p.preferred, resolution, p.item))
            bad.append(pairs.prepared(p.rejected, resolution, p.item))
            runtime.throw_if_interrupted()
            pbar.update(1)
    except pairs.PairError as e:
        raise NPOError(f"{input_name}: {e}") from None
    preferred, rejected = torch.stack(good), torch.stack(bad)
    items = [p.item for p in found]
    prompts = list(dict.fromkeys(p.prompt for p in found))
    prompt_of = torch.tensor([prompts.index(p.prompt) for p in found])
    if mirrored_copies:
        preferred, rejected = torch.cat([preferred, preferred.flip(2)]), torch.cat([rejected, rejected.flip(2)])
        items += [f"{i} (mirrored)" for i in items]
        prompt_of = torch.cat([prompt_of, prompt_of])
    entries = [clip.encode_from_tokens_scheduled(clip.tokenize(text))[0] for text in prompts]
    empty = clip.encode_from_tokens_scheduled(clip.tokenize(""))[0]  # the preview's negative: the empty prompt
    pair_set = preference_run.PairSet(
        _encode(vae, preferred, input_name), _encode(vae, rejected, input_name), entries, prompt_of, items, source,
        negative=empty,
    )
    return pair_set, len(prompts)


class NPOPairsFromParquet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="NPOPairsFromParquet",
            display_name="NPO Pairs From Parquet",
            search_aliases=[*PAIR_ALIASES, "pick-a-pic", "pickapic", "parquet"],
            description="Preference pairs from a Pick-a-Pic-style parquet shard in ComfyUI's input folder (columns "
            "caption, jpg_0, jpg_1, label_0; label_0 1 = jpg_0 preferred, 0 = jpg_1, 0.5 = a tie), the data the "
            "released Diffusion-NPO offsets were trained on. Needs pyarrow in ComfyUI's Python (never installed by "
            "the pack). Images are resized and centre-cropped as the authors do.",
            inputs=[
                io.Combo.Input(
                    "file",
                    options=files.input_files(".parquet") or [NONE],
                    tooltip="A .parquet file in ComfyUI's input folder (subfolders included), e.g. a Pick-a-Pic "
                    "v1 train shard.",
                ),
                io.Clip.Input("clip", tooltip="The text encoder of the model to train (encodes each caption)."),
                io.Vae.Input("vae", tooltip="The VAE of the model to train (encodes the images)."),
                io.Int.Input(
                    "resolution", default=512, min=16, max=4096, step=8,
                    tooltip="The shorter side is resized to this and the centre cropped square, as the authors' "
                    "trainer does (512 for SD1.5, 1024 for SDXL).",
                ),
                io.Int.Input(
                    "max_pairs", default=256, min=0, max=1_000_000,
                    tooltip="Use the first N usable pairs of the shard, in file order (0 = all; every pair is "
                    "held in memory as two images and two latents).",
                ),
                io.Combo.Input(
                    "ties", options=list(parquet_pairs.TIES), default="skip",
                    tooltip="Rows with label_0 0.5 or the same image twice teach nothing: skip them (Diffusion-DPO "
                    "drops Pick-a-Pic's ties) or stop with an error naming the first.",
                    **advanced(),
                ),
                io.Boolean.Input(
                    "mirrored_copies", default=True,
                    tooltip="Also add every pair mirrored left-right (the authors flip images at random as they "
                    "load them; a mirrored copy of each pair gives the same data, fixed).",
                ),
            ],
            outputs=[NPOPairsType.Output(display_name="pairs")],
        )

    @classmethod
    def validate_inputs(cls, file=None, resolution=None, max_pairs=None) -> bool | str:
        return refusal(lambda: _check_parquet_inputs(cls, file, resolution, max_pairs))

    @classmethod
    def fingerprint_inputs(cls, file, clip, vae, resolution, max_pairs, ties, mirrored_copies) -> str:
        try:
            st = os.stat(files.input_file_path(file, "file"))
            return f"{file}:{st.st_mtime_ns}:{st.st_size}"
        except Exception:
            return file

    @classmethod
    def execute(
        cls, file: str, clip, vae, resolution: int, max_pairs: int, ties: str, mirrored_copies: bool
    ) -> io.NodeOutput:
        _check_parquet_inputs(cls, file, resolution, max_pairs)
        try:
            read = parquet_pairs.read_parquet_pairs(files.input_file_path(file, "file"), max_pairs, ties)
        except pairs.PairError as e:
            raise NPOError(f"file: {e}") from None
        pair_set, n_prompts = _prepared_pair_set(
            read.pairs, clip, vae, resolution, mirrored_copies, "file", f"NPO Pairs From Parquet ({file})"
        )
        text = (
            f"{len(read.pairs)} pairs from {read.rows_read} rows of {file} ({read.skipped} ties or same-image rows "
            f"skipped), {n_prompts} prompt(s), {resolution} px"
        )
        return io.NodeOutput(pair_set, ui=ui.PreviewText(text + (", with mirrored copies" if mirrored_copies else "")))


def _check_parquet_inputs(cls, file, resolution, max_pairs) -> None:
    check_widgets(cls, {"resolution": resolution, "max_pairs": max_pairs})
    if resolution is not None and resolution % 8:
        raise NPOError(f"resolution: {resolution} is not a multiple of 8 (the latent factor of SD-family VAEs).")
    missing = parquet_pairs.reader_missing()
    if missing:
        raise NPOError(f"file: {missing}")
    if file is not None:
        if file == NONE:
            raise NPOError("file: no .parquet file in ComfyUI's input folder; put a Pick-a-Pic shard there and "
                           "refresh (R) the node list.")
        files.input_file_path(file, "file")


class NPOSelfGeneratedPairs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers

        return schema(
            node_id="NPOSelfGeneratedPairs",
            display_name="NPO Self-Generated Pairs",
            search_aliases=[*PAIR_ALIASES, "self-generated", "scorer", "reward"],
            description="Preference pairs with no dataset: samples_per_prompt images (or videos) per prompt from "
            "the model itself, scored by a scorer (NPO Load Scorer); the highest and the lowest of each prompt are "
            "its preferred and rejected sample. Cached in output/npo_pairs, so a resumed run does not sample again.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample from: the one NPO Preference Train trains."),
                io.Clip.Input("clip", tooltip="Its text encoder (encodes the prompts)."),
                io.Vae.Input("vae", tooltip="Its VAE (decodes the samples for the scorer)."),
                NPOScorerType.Input("scorer", tooltip="Ranks each prompt's samples (higher is better)."),
                io.String.Input(
                    "prompts", multiline=True, default="a photo of a cat\na watercolor of a lighthouse",
                    tooltip="One prompt per line; each gives one pair.",
                ),
                io.String.Input("negative_prompt", default="", tooltip="The negative prompt the samples use."),
                io.Int.Input(
                    "samples_per_prompt", default=4, min=2, max=64,
                    tooltip="K samples per prompt; the best and the worst by the scorer form the pair.",
                ),
                io.Int.Input("width", default=512, min=16, max=8192, step=8, tooltip="Sample width in pixels."),
                io.Int.Input("height", default=512, min=16, max=8192, step=8, tooltip="Sample height in pixels."),
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip="Sampler steps per sample."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, tooltip="CFG scale of the samples."),
                io.Combo.Input(
                    "sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default="euler",
                    tooltip="The sampler, as in KSampler.",
                ),
                io.Combo.Input(
                    "scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="normal",
                    tooltip="The scheduler, as in KSampler.",
                ),
                io.Int.Input(
                    "seed", default=0, min=0, max=2**48, tooltip="Sample k of prompt p uses seed + p·K + k."
                ),
                io.Boolean.Input(
                    "cache", default=True,
                    tooltip="Keep the pairs in output/npo_pairs (keyed by every setting and the model) and reuse "
                    "them when nothing changed.",
                ),
                io.Int.Input(
                    "frames", default=1, min=1, max=4096, optional=True,
                    tooltip="Video models (Wan, HunyuanVideo, LTX-Video, ...): frames per sample, as their "
                    "empty-latent nodes take them (Wan: 4·n + 1, e.g. 33); the scorer scores every frame and a "
                    "sample's score is their mean. Image models: 1.",
                ),
            ],
            outputs=[NPOPairsType.Output(display_name="pairs"), io.Image.Output(display_name="preview")],
        )

    @classmethod
    def validate_inputs(cls, prompts=None, width=None, height=None, cfg=None, steps=None, frames=None) -> bool | str:
        return refusal(lambda: _check_generation_inputs(cls, prompts, width, height, cfg, steps, frames))

    @classmethod
    def execute(
        cls, model, clip, vae, scorer, prompts: str, negative_prompt: str, samples_per_prompt: int, width: int,
        height: int, steps: int, cfg: float, sampler_name: str, scheduler: str, seed: int, cache: bool,
        frames: int = 1,
    ) -> io.NodeOutput:
        _check_generation_inputs(cls, prompts, width, height, cfg, steps, frames)
        texts = _prompt_lines(prompts)
        tm = TrainingModel(model.clone(), "model")
        layout = tm.latent
        if layout.rank == 4 and frames != 1:
            raise NPOError(f"frames: {tm.family.name} makes single images; set frames to 1.")
        if layout.rank == 5 and (frames - 1) % layout.temporal_factor:
            k = layout.temporal_factor
            raise NPOError(
                f"frames: {tm.family.name} takes {k}·n + 1 frames (e.g. {k * ((frames - 1) // k) + 1}); got {frames}."
            )
        f = layout.spatial_factor
        if width % f or height % f:
            raise NPOError(f"width/height: {width}×{height} is not divisible by this model's latent factor {f}.")
        settings = pair_generation.GenerationSettings(
            tuple(texts), negative_prompt, samples_per_prompt, width, height, steps, float(cfg), sampler_name,
            scheduler, seed, getattr(scorer, "name", type(scorer).__name__), frames,
        )
        positive = [clip.encode_from_tokens_scheduled(clip.tokenize(t))[0] for t in texts]
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(negative_prompt))
        pbar = runtime.progress_bar(len(texts) * samples_per_prompt)

        def on_sample() -> None:
            runtime.throw_if_interrupted()
            pbar.update(1)

        shape = layout.pool_shape(width, height, frames)
        made = pair_generation.generate(model, vae, scorer, positive, negative, settings, shape, cache, on_sample)
        pair_set = preference_run.PairSet(
            made.preferred, made.rejected, positive, torch.arange(len(texts)),
            [f"prompt {i + 1}" for i in range(len(texts))], "NPO Self-Generated Pairs", negative=negative[0],
        )
        # preferred | rejected, side by side (a video's frames one after the other)
        preview = torch.cat([_frames(vae.decode(made.preferred)), _frames(vae.decode(made.rejected))], dim=2)
        lines = [
            f"{t[:40]!r}: best {made.scores[i, made.best[i]]:.4f} (sample {made.best[i]}), worst "
            f"{made.scores[i, made.worst[i]]:.4f} (sample {made.worst[i]})"
            for i, t in enumerate(texts)
        ]
        head = f"{len(texts)} pairs from {samples_per_prompt} samples per prompt"
        head += " (cached)" if made.from_cache else ""
        return io.NodeOutput(pair_set, preview, ui=ui.PreviewText("\n".join([head, *lines])))


def _prompt_lines(prompts: str) -> list[str]:
    return [line.strip() for line in str(prompts).splitlines() if line.strip()]


def _frames(images: torch.Tensor) -> torch.Tensor:
    """A VAE's decode (images [B, H, W, 3] or videos [B, T, H, W, 3]) as IMAGE frames [B·T, H, W, 3]."""
    return images.reshape(-1, *images.shape[-3:])


def _check_generation_inputs(cls, prompts, width, height, cfg, steps, frames=None) -> None:
    check_widgets(cls, {"width": width, "height": height, "cfg": cfg, "steps": steps, "frames": frames})
    if prompts is not None and not _prompt_lines(prompts):
        raise NPOError("prompts: empty; write one prompt per line.")


def _check_folder_inputs(cls, folder, resolution) -> None:
    check_widgets(cls, {"resolution": resolution})
    if resolution is not None and resolution % 8:
        raise NPOError(f"resolution: {resolution} is not a multiple of 8 (the latent factor of SD-family VAEs).")
    if folder is not None:
        files.check_relative_name(folder, "folder")


class NPOPreferenceTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="NPOPreferenceTrain",
            display_name="NPO Preference Train",
            search_aliases=["diffusion-npo", "dpo", "preference", "train", "training", "negative", "offset"],
            description="Diffusion-NPO: trains an NPO offset from preference pairs by the authors' reversed "
            "Diffusion-DPO (the rejected image takes DPO's preferred slot, so the offset learns what people "
            "dislike): LoRA rank 8, alpha 8 on the attention projections, β 500 (SD1.5) / 2000 (SDXL), lr 5e-6. "
            "The model you connect is never changed; the result is an NPO_OFFSET for Apply NPO / NPO CFG Guider.",
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The model to make an NPO offset for (the one the pairs' images are judged for): SD "
                    "UNets (eps / v) or DiT / video models with real CFG (flow velocity loss on their own schedule).",
                ),
                NPOPairsType.Input("pairs", tooltip="From NPO Pairs From Images or NPO Pairs From Folder."),
                io.Int.Input(
                    "steps", default=2000, min=1, max=1_000_000,
                    tooltip="Optimizer steps in total (the released offsets: 2000). When resuming, the total.",
                ),
                io.Int.Input(
                    "batch_size", default=4, min=1, max=256,
                    tooltip="Pairs per step (the authors: 64 for SD1.5, 30 × 2 accumulation for SDXL).",
                ),
                io.String.Input(
                    "learning_rate", default="auto",
                    tooltip="auto = the authors' 5e-6 (Adafactor: its own 1e-2). Or a number, e.g. 1e-5.",
                ),
                io.Float.Input(
                    "beta", default=0.0, min=0.0, max=100_000.0, step=10.0,
                    tooltip="DPO's β (how far the offset may move from the model): 0 = auto, the authors' 500 for "
                    "SD1.5-like models and 2000 for SDXL.",
                ),
                io.Combo.Input(
                    "loss_type", options=list(LOSS_TYPES), default="sigmoid",
                    tooltip="sigmoid: Diffusion-DPO's −log σ(β·logits) (the authors'); hinge and ipo as in their "
                    "script.",
                    **advanced(),
                ),
                io.Int.Input(
                    "rank", default=8, min=1, max=1024,
                    tooltip="The LoRA rank (alpha = rank, as the authors').",
                ),
                io.Combo.Input(
                    "lora_layers", options=list(PRESET_NAMES), default="attention",
                    tooltip="Which layers get adapters (attention = to_q/k/v/out, the authors' targets).",
                    **advanced(),
                ),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, tooltip="Noise, timesteps and pair order."),
                io.Boolean.Input(
                    "gradient_checkpointing", default=True,
                    tooltip="Recompute activations in the backward: much less memory, ~30% slower.",
                ),
                io.Combo.Input(
                    "training_dtype", options=["fp32", "bf16"], default="fp32",
                    tooltip="The adapters' dtype (the frozen weights keep theirs).", **advanced(),
                ),
                io.Int.Input(
                    "save_every", default=0, min=0, max=1_000_000,
                    tooltip="Write a resumable checkpoint to output/npo_training every N steps (0 = none).",
                ),
                io.String.Input(
                    "filename_prefix", default="npo_preference",
                    tooltip="Checkpoint name under output/npo_training (subfolders with '/').",
                ),
                io.Combo.Input(
                    "resume_from", options=checkpoint_files(), default=NONE,
                    tooltip="A checkpoint of an NPO Preference Train run with the same model, rank and layers; "
                    "training continues from its step, exactly.",
                ),
                io.Int.Input(
                    "grad_accumulation_steps", default=1, min=1, max=1024,
                    tooltip="Micro-batches of batch_size per optimizer step: the update of a k·batch_size batch in "
                    "the memory of one.",
                    **advanced(),
                ),
                io.Combo.Input(
                    "optimizer", options=list(optimizers.OPTIMIZERS), default=optimizers.ADAMW,
                    tooltip="AdamW; the authors used 8-bit Adam (bitsandbytes, where installed). A resume keeps the "
                    "optimizer it was trained with.",
                    **advanced(),
                ),
                io.Int.Input(
                    "preview_every", default=100, min=0, max=1_000_000, optional=True,
                    tooltip="Every N optimizer steps (and at the end) one fixed-seed pair is sampled, plain CFG and "
                    "with the current offset on the negative pass (8 Euler steps, the first prompt, the negative, "
                    "preview_cfg), shown as the progress preview over the loss curve and saved beside the "
                    "checkpoints (when save_every > 0). Needs a negative prompt: the pairs' own (pair folders and "
                    "parquet: the empty prompt; self-generated pairs: theirs) or preview_negative. 0 = off.",
                    **advanced(),
                ),
                io.Conditioning.Input(
                    "preview_negative", optional=True,
                    tooltip="The negative prompt the preview samples with (instead of the pairs' own; NPO Pairs From "
                    "Images carries none).",
                ),
                io.Float.Input(
                    "preview_cfg", default=7.5, min=0.0, max=100.0, step=0.1, optional=True,
                    tooltip="CFG scale of the preview pair.", **advanced(),
                ),
                io.Vae.Input(
                    "preview_vae", optional=True,
                    tooltip="Decode the previews with this VAE (exact images); without it ComfyUI's latent "
                    "previewer draws them (TAESD or a rough latent-to-RGB).",
                ),
                NPOScorerType.Input(
                    "preview_scorer", optional=True,
                    tooltip="A scorer from NPO Load Scorer: each preview pair is scored, logged and plotted "
                    "(connect preview_vae: scores of rough latent previews mean little).",
                ),
                io.String.Input(
                    "preview_prompt", default="", optional=True,
                    tooltip="The text of the first pair's prompt, for preview_scorer (PickScore, HPS and ImageReward "
                    "score an image against its prompt; the aesthetic scorer ignores it).",
                ),
                io.Boolean.Input(
                    "partial_loading", default=False, optional=True,
                    tooltip="For models larger than the GPU: ComfyUI loads what fits after keeping room for "
                    "training, and casts the rest of the frozen weights to the GPU layer by layer in each forward, "
                    "as it does for sampling in low VRAM. Slower in proportion to the weights left off the GPU; "
                    "needs gradient_checkpointing. Off: the whole model is loaded.",
                    **advanced(),
                ),
            ],
            outputs=[
                NPOOffsetType.Output(display_name="npo_offset"),
                io.Image.Output(display_name="loss_curve"),
                io.Int.Output(display_name="steps"),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(
        cls, learning_rate=None, filename_prefix=None, save_every=None, beta=None, preview_cfg=None
    ) -> bool | str:
        return refusal(lambda: _check_train_inputs(cls, learning_rate, filename_prefix, save_every, beta, preview_cfg))

    @classmethod
    def execute(
        cls, model, pairs, steps: int, batch_size: int, learning_rate, beta: float, loss_type: str, rank: int,
        lora_layers: str, seed: int, gradient_checkpointing: bool, training_dtype: str, save_every: int,
        filename_prefix: str, resume_from: str, grad_accumulation_steps: int, optimizer: str,
        preview_every: int = 100, preview_negative=None, preview_cfg: float = 7.5, preview_vae=None,
        preview_scorer=None, preview_prompt: str = "", partial_loading: bool = False,
    ) -> io.NodeOutput:
        _check_train_inputs(cls, learning_rate, filename_prefix, save_every, beta, preview_cfg)
        if partial_loading and not gradient_checkpointing:
            raise NPOError("partial_loading: needs gradient_checkpointing on (without it the backward keeps every "
                           "weight cast to the device alive, which is what partial loading avoids).")
        hidden = cls.hidden
        provenance = files.provenance(getattr(hidden, "prompt", None), getattr(hidden, "extra_pnginfo", None))
        tm = TrainingModel(model.clone())
        recipe = preference_run.PreferenceRecipe(
            rank=rank, lora_layers=lora_layers, training_dtype=training_dtype, steps=steps, batch_size=batch_size,
            learning_rate=parse_learning_rate(learning_rate), beta=float(beta), loss_type=loss_type, seed=seed,
            save_every=save_every, grad_accumulation_steps=grad_accumulation_steps, optimizer=optimizer,
        )
        resume_path = _resume_path(resume_from)
        ckpt = resume_path or (_new_checkpoint_path(filename_prefix) if save_every > 0 else None)
        negative = None
        if preview_negative is not None:
            negative = training_conds.conditioning_entries(preview_negative, "preview_negative")[0]
        job = preference_run.plan(
            tm, recipe, pairs, resume_path, ckpt if save_every > 0 else None, provenance, negative
        )
        preview, preview_note = _preference_preview(
            job, preview_every, preview_cfg, seed, preview_vae, preview_scorer, preview_prompt
        )
        pbar = runtime.progress_bar(steps)
        tm.load(partial_loading, preference_run.training_memory(job) if partial_loading else 0.0)
        pbar.update_absolute(job.trainer.done, steps)
        with torch.inference_mode(False), torch.enable_grad():
            callbacks = Callbacks(
                on_step=lambda done, total, value: pbar.update_absolute(
                    done, steps, preview.progress_preview(done) if preview else None
                ),
                should_stop=runtime.interrupted,
            )
            result, offset = preference_run.train(job, callbacks, gradient_checkpointing, preview)
        if result.stopped_early:
            runtime.throw_if_interrupted()
        cfg = job.trainer.cfg
        last = result.losses[-1] if result.losses else float("nan")
        text = (
            f"Diffusion-NPO (reversed DPO, {cfg.preference.loss_type}, β {cfg.preference.beta:g}, "
            f"{cfg.preference.prediction} loss) {result.steps_done}/{steps} steps on {pairs.preferred.shape[0]} "
            f"pairs, last loss {last:.5f} (log 2 = {0.693147:.5f} at the start), lr {cfg.learning_rate:g}"
        )
        if result.last_checkpoint:
            text += f"\ncheckpoint: {os.path.basename(result.last_checkpoint)}"
        if preview_note:
            text += f"\n{preview_note}"
        return io.NodeOutput(offset, loss_curve_image(result.losses), result.steps_done, ui=ui.PreviewText(text))


def _preference_preview(
    job, every: int, cfg: float, seed: int, vae, scorer, prompt: str
) -> tuple[training_preview.TrainingPreview | None, str]:
    """NPO Preference Train's preview (None when preview_every is 0 or no negative prompt is known) and the note
    its report shows when a preview was asked for but cannot run."""
    if every <= 0:
        return None, ""
    if job.negative is None:
        return None, ("preview off: these pairs carry no negative prompt (NPO Pairs From Images); connect "
                      "preview_negative, or set preview_every 0.")
    if scorer is not None and not prompt.strip() and getattr(scorer, "uses_prompt", True):
        raise NPOError(
            f"preview_prompt: {scorer.name} scores an image against its prompt; write the text of the first pair's "
            "prompt (or disconnect preview_scorer)."
        )
    settings = training_preview.PreviewSettings(
        every, preference_run.preview_shape(job), float(cfg), seed, vae, scorer, prompt.strip()
    )
    return training_preview.TrainingPreview(
        job.model.mp, settings, training_preview.preview_stem(job.checkpoint_path)
    ), ""


def _check_train_inputs(cls, learning_rate, filename_prefix, save_every, beta, preview_cfg=None) -> None:
    check_widgets(cls, {"save_every": save_every, "beta": beta, "preview_cfg": preview_cfg})
    if learning_rate is not None:
        parse_learning_rate(learning_rate)
    if filename_prefix is not None and save_every:
        files.check_prefix(filename_prefix)
