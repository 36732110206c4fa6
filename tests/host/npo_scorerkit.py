"""Tiny scorer models for the tests, written in the layouts users download (nothing is fetched): a tiny CLIP BPE
tokenizer, a PickScore-shaped CLIPModel folder, the aesthetic head's key layout, ComfyUI IMAGE batches and the PNGs
SaveImage would write of them, and transformers' own PickScore computation as the reference. Needs transformers
(the ComfyUI venvs have it); used by the host and e2e tiers."""

from __future__ import annotations

import json
import math

import numpy as np
import torch
import transformers
from PIL import Image
from torch import nn

from comfyui_npo.evaluation.clip_preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOCAB = [*LETTERS, *(c + "</w>" for c in LETTERS), "lo", "low</w>", "er</w>", "<|startoftext|>", "<|endoftext|>"]
MERGES = ["#version: 0.2", "l o", "lo w</w>", "e r</w>"]
BOS, EOS = len(VOCAB) - 2, len(VOCAB) - 1
TINY = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
SIZES = [(37, 55), (61, 29)]  # odd sizes, upscaled; the crop margins (15, 35 px) are odd: floor != round
PROMPTS = ["a red cat", "lower newer wider", "x", "a red cat " * 15]  # the last: 107 tokens, truncated to 77


def laion_preprocessor(size: int, crop: int | dict) -> dict:
    """A preprocessor_config.json in the old CLIPFeatureExtractor format of laion/CLIP-ViT-H-14 (int sizes)."""
    return {
        "crop_size": crop,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "resample": 3,
        "size": size,
    }


def write_tokenizer(folder, full: bool = True) -> None:
    """vocab.json + merges.txt of a tiny CLIP BPE (as transformers' own CLIP tokenizer tests build one); ``full``
    also writes tokenizer.json / tokenizer_config.json through save_pretrained."""
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(VOCAB)}))
    (folder / "merges.txt").write_text("\n".join(MERGES) + "\n")
    if full:
        transformers.CLIPTokenizerFast.from_pretrained(str(folder), local_files_only=True).save_pretrained(str(folder))


def spread_weights(model: nn.Module, seed: int) -> None:
    """Re-draw every weight with std 0.1, LayerNorm scales around 1 (the default 0.02 init maps all images to nearly
    the same embedding, which would let a wrong preprocessing pass); logit_scale stays as the config sets it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "logit_scale":
                centre = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(centre + 0.1 * torch.randn(p.shape, generator=g))


def write_pickscore_folder(folder):
    """Write the tiny PickScore-shaped CLIPModel, its tokenizer and preprocessor config into ``folder``."""
    text = dict(TINY, vocab_size=len(VOCAB), max_position_embeddings=77, bos_token_id=BOS, eos_token_id=EOS)
    config = transformers.CLIPConfig(
        text_config=dict(text, pad_token_id=EOS, projection_dim=16),
        vision_config=dict(TINY, image_size=32, patch_size=8, projection_dim=16),
        projection_dim=16,
        logit_scale_init_value=math.log(20.0),
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    spread_weights(model, 1)
    model.save_pretrained(str(folder))
    write_tokenizer(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(laion_preprocessor(32, 32)))
    return folder


def head_weights(seed: int = 4, dims=(768, 1024, 128, 64, 16, 1)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, bias) of the five Linear layers, drawn so the scores spread."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(o, i, generator=g) * 2.5 / math.sqrt(i), torch.randn(o, generator=g) * 0.5)
        for i, o in zip(dims[:-1], dims[1:], strict=True)
    ]


def head_state_dict(weights) -> dict[str, torch.Tensor]:
    """The predictor's key layout: nn.Sequential indices 0, 2, 4, 6, 7 (1, 3, 5 are Dropout)."""
    sd = {}
    for idx, (w, b) in zip((0, 2, 4, 6, 7), weights, strict=True):
        sd[f"layers.{idx}.weight"], sd[f"layers.{idx}.bias"] = w, b
    return sd


def comfy_images(h: int, w: int, n: int, seed: int) -> torch.Tensor:
    """A ComfyUI IMAGE batch [n, h, w, 3] in 0..1: noise plus smooth colour fields."""
    g = torch.Generator().manual_seed(seed)
    smooth = nn.functional.interpolate(torch.rand(n, 3, 5, 5, generator=g), size=(h, w), mode="bilinear")
    return (0.6 * smooth.permute(0, 2, 3, 1) + 0.4 * torch.rand(n, h, w, 3, generator=g)).clamp(0, 1)


def saved_pngs(images: torch.Tensor) -> list[Image.Image]:
    """The images as ComfyUI's SaveImage writes them (np.clip(255. * i, 0, 255).astype(np.uint8))."""
    return [Image.fromarray(np.clip(255.0 * i.numpy(), 0, 255).astype(np.uint8)) for i in images]


def pil_image_processor(folder):
    """transformers' PIL CLIP image processor (what PickScore and CLIP were evaluated with) from the folder."""
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    proc = cls.from_pretrained(str(folder), local_files_only=True)
    assert getattr(proc, "backend", "pil") == "pil"
    return proc


def reference_pickscore(folder, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """diag(CLIPModel(**CLIPProcessor(...)).logits_per_image): the model card's score of image i for prompt i."""
    model = transformers.CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()
    tokenizer = transformers.CLIPTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    processor = transformers.CLIPProcessor(image_processor=pil_image_processor(folder), tokenizer=tokenizer)
    inputs = processor(
        text=prompts, images=saved_pngs(images), padding=True, truncation=True, max_length=77, return_tensors="pt"
    )
    with torch.no_grad():
        return model(**inputs).logits_per_image.diagonal()
