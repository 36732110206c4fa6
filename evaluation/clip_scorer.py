"""What PickScore and HPS share: a transformers CLIPModel, its tokenizer and preprocessing, and the per-pair score
``scale() * cos(text embedding of prompts[i], image embedding of images[i])`` taken in float32, batched."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..npo_core.errors import NPOError
from .clip_preprocess import ClipPreprocess


def check_pairs(images, prompts: Sequence[str]) -> int:
    """The number of images, after refusing a batch that is not [B, H, W, 3] or empty, or prompts not one per image."""
    if isinstance(images, torch.Tensor) and images.dim() != 4:
        raise NPOError(f"images: shape {tuple(images.shape)}; expected a ComfyUI IMAGE batch [B, H, W, 3]")
    n = len(images)
    if n == 0:
        raise NPOError("images: the batch is empty; connect at least one image")
    if isinstance(prompts, str) or len(prompts) != n or not all(isinstance(p, str) for p in prompts):
        got = "a string" if isinstance(prompts, str) else f"{type(prompts).__name__} of {len(prompts)}"
        raise NPOError(f"prompts: expected a list of {n} strings, one per image; got {got}")
    return n


class ClipPairScorer(torch.nn.Module):
    """Subclasses give ``text_embeds(prompts)`` and ``scale()``; ``score(images, prompts)`` → [B] float32 (CPU)."""

    name = "CLIP"

    def __init__(self, model, tokenizer, preprocess: ClipPreprocess, backend: str = "pil", batch_size: int = 16):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.backend = backend
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def scale(self) -> torch.Tensor | float:
        """The factor on the cosine (PickScore: logit_scale.exp(); HPS: 1)."""
        raise NotImplementedError

    def image_embeds(self, images) -> torch.Tensor:
        """Projected image embeddings [N, D] float32 (not normalised) of IMAGE tensors or PIL images."""
        pixels = self.preprocess(images, backend=self.backend, device=self.device)
        dtype = self.model.visual_projection.weight.dtype
        out = self.model.vision_model(pixel_values=pixels.to(dtype))
        return self.model.visual_projection(out.pooler_output).float()

    @torch.no_grad()
    def score(self, images, prompts: Sequence[str]) -> torch.Tensor:
        """The score of images[i] for prompts[i]: [B] float32 on the CPU, batched by ``batch_size``."""
        n = check_pairs(images, prompts)
        scale = self.scale()
        scores = []
        for i in range(0, n, self.batch_size):
            t = torch.nn.functional.normalize(self.text_embeds(prompts[i : i + self.batch_size]), dim=-1)
            v = torch.nn.functional.normalize(self.image_embeds(images[i : i + self.batch_size]), dim=-1)
            scores.append((scale * (t * v).sum(-1)).cpu())
        return torch.cat(scores)
