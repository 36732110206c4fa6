"""Scorers inside ComfyUI: the ``models/npo_scorers`` folder, ComfyUI's model management around a scorer, and
ComfyUI's CLIP_VISION as the image tower of the aesthetic scorer."""

from __future__ import annotations

import os
from types import SimpleNamespace

import folder_paths
import torch

from ...npo_core.errors import NPOError
from .files import check_relative_name

SCORER_FOLDER = "npo_scorers"
HEAD_EXTENSIONS = (".safetensors", ".pth", ".pt")
# A folder is one scorer entry when it holds a transformers model (config.json with its weights: PickScore) or an
# ImageReward folder (med_config.json); any other folder (e.g. HPS's, tokenizer files and a .pt beside them, maybe
# with laion's config.json) lists its weight files
MODEL_FOLDER_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def register_scorer_folder() -> list[str]:
    """ComfyUI's ``models/npo_scorers`` folder (created if missing); its paths."""
    if SCORER_FOLDER not in folder_paths.folder_names_and_paths:
        path = os.path.join(folder_paths.models_dir, SCORER_FOLDER)
        folder_paths.folder_names_and_paths[SCORER_FOLDER] = ([path], set(HEAD_EXTENSIONS))
    paths = folder_paths.folder_names_and_paths[SCORER_FOLDER][0]
    for p in paths:
        os.makedirs(p, exist_ok=True)
    return paths


def scorer_entries() -> list[str]:
    """Scorer folders (holding a config.json, e.g. PickScore_v1, or ImageReward's med_config.json) and head files of
    ``models/npo_scorers``, subfolders and symlinks followed, as paths relative to it with '/'."""
    out: set[str] = set()
    for root in register_scorer_folder():
        for here, dirs, found in os.walk(root, followlinks=True):
            rel = os.path.relpath(here, root).replace(os.sep, "/")
            if rel != "." and _is_model_folder(set(found)):
                out.add(rel)
                dirs[:] = []  # a model folder's own subfolders are not entries
                continue
            out.update(f if rel == "." else f"{rel}/{f}" for f in found if f.endswith(HEAD_EXTENSIONS))
    return sorted(out)


def _is_model_folder(found: set[str]) -> bool:
    return "med_config.json" in found or ("config.json" in found and any(w in found for w in MODEL_FOLDER_WEIGHTS))


def scorer_path(name: str, input_name: str = "weights") -> str:
    check_relative_name(name, input_name)
    for root in register_scorer_folder():
        path = os.path.join(root, name)
        if os.path.exists(path):
            return path
    raise NPOError(f"{input_name}: '{name}' is not in models/{SCORER_FOLDER}; put the scorer's files there.")


class ManagedScorer:
    """A scorer module run on the device ComfyUI gives, loaded and offloaded by its model management."""

    def __init__(self, module: torch.nn.Module, name: str) -> None:
        import comfy.model_management as mm
        import comfy.model_patcher

        self.name = name
        self.module = module
        self.uses_prompt = getattr(module, "uses_prompt", True)  # the aesthetic scorer rates the image alone
        holder = torch.nn.Module()  # ComfyUI's patcher sets attributes (device, ...) on the module it manages
        holder.scorer = module
        self.patcher = comfy.model_patcher.ModelPatcher(
            holder, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
        )

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        import comfy.model_management as mm

        mm.load_models_gpu([self.patcher])
        return self.module.score(images, prompts)

    def release(self) -> None:
        """Unload the scorer from the device, as ComfyUI frees a model it no longer needs."""
        import comfy.model_management as mm

        for loaded in list(mm.current_loaded_models):
            if loaded.model is self.patcher:
                loaded.model_unload()
                mm.current_loaded_models.remove(loaded)


class ClipVisionTower(torch.nn.Module):
    """ComfyUI's CLIP_VISION as ``tower(pixel_values=...).image_embeds`` (the projected embedding ComfyUI's
    encode_image returns), fed pixel values prepared by the scorer's own CLIP preprocessing."""

    def __init__(self, clip_vision) -> None:
        super().__init__()
        self.clip_vision = clip_vision
        self.model = clip_vision.model  # registered: the scorer's parameters include the tower's

    def forward(self, pixel_values: torch.Tensor):
        import comfy.model_management as mm

        mm.load_model_gpu(self.clip_vision.patcher)
        px = pixel_values.to(self.clip_vision.load_device, torch.float32)
        out = self.clip_vision.model(pixel_values=px, intermediate_output=-2)
        return SimpleNamespace(image_embeds=out[2].float())


def clip_vision_preprocess_config(clip_vision) -> dict:
    """CLIP's image-processor settings for ComfyUI's CLIP_VISION: its size, mean and std, bicubic, centre crop."""
    size = int(clip_vision.image_size)
    return {
        "size": {"shortest_edge": size},
        "crop_size": {"height": size, "width": size},
        "image_mean": list(clip_vision.image_mean),
        "image_std": list(clip_vision.image_std),
        "resample": 3,
    }


def aesthetic_on_clip_vision(clip_vision, head_path: str):
    """The LAION aesthetic scorer: ComfyUI's CLIP_VISION (it must be CLIP ViT-L/14, 768-d) and the head file."""
    from ...evaluation.aesthetic import EMBED_DIM, AestheticHead, AestheticScorer
    from ...evaluation.clip_preprocess import ClipPreprocess

    dim = getattr(getattr(clip_vision.model, "visual_projection", None), "out_features", None)
    if dim is not None and dim != EMBED_DIM:
        raise NPOError(
            f"clip_vision: its embedding is {dim}-d; the aesthetic head needs CLIP ViT-L/14 ({EMBED_DIM}-d): load "
            "clip_vision_l (OpenAI's clip-vit-large-patch14)."
        )
    preprocess = ClipPreprocess.from_config(clip_vision_preprocess_config(clip_vision), "clip_vision")
    return AestheticScorer(ClipVisionTower(clip_vision), preprocess, AestheticHead.from_file(head_path))
