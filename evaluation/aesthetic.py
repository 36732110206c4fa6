"""The LAION aesthetic predictor v2 head (sac+logos+ava1-l14-linearMSE.pth) on CLIP ViT-L/14 image embeddings.

Conventions: input = projected CLIP ViT-L/14 image embeddings [B, 768] (OpenAI CLIP's encode_image, i.e.
CLIPVisionModelWithProjection's image_embeds), L2-normalised here (a zero vector stays zero, as the LAION code's
``normalized``), then the MLP of christophschuhmann/improved-aesthetic-predictor in eval mode (dropout off, no
activations): keys layers.{0,2,4,6,7}.{weight,bias}. Scores are float32 on the CPU, about 1..10.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..npo_core.errors import NPOError
from .clip_preprocess import ClipPreprocess
from .weights import load_pretrained, load_state_dict_file

EMBED_DIM = 768
# (index in layers, out, in) of the five Linear layers; 1, 3, 5 are Dropout(0.2), Dropout(0.2), Dropout(0.1)
LINEARS = ((0, 1024, EMBED_DIM), (2, 128, 1024), (4, 64, 128), (6, 16, 64), (7, 1, 16))


class AestheticHead(nn.Module):
    """``layers`` = Linear(768,1024), Dropout, Linear(1024,128), Dropout, Linear(128,64), Dropout, Linear(64,16),
    Linear(16,1), as in the LAION predictor's MLP."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(EMBED_DIM, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    @classmethod
    def from_file(cls, path: str | Path, device: torch.device | str | None = None) -> AestheticHead:
        """Load a .safetensors or weights-only .pth head, refusing other keys or shapes by name."""
        sd = load_state_dict_file(path)
        expected = {
            f"layers.{i}.{p}": (o, n) if p == "weight" else (o,) for i, o, n in LINEARS for p in ("weight", "bias")
        }
        missing = sorted(set(expected) - set(sd))
        unexpected = sorted(set(sd) - set(expected))
        if missing or unexpected:
            raise NPOError(
                f"{path}: not a LAION aesthetic v2 head (sac+logos+ava1-l14-linearMSE): keys missing {missing[:4]}, "
                f"unexpected {unexpected[:4]}; use the predictor's .pth (or its .safetensors conversion)"
            )
        wrong = [
            f"{k} {tuple(sd[k].shape)} (expected {shape})" for k, shape in expected.items() if sd[k].shape != shape
        ]
        if wrong:
            raise NPOError(
                f"{path}: wrong head shape, {'; '.join(wrong[:3])}; this head needs CLIP ViT-L/14 (768-d) embeddings: "
                "use sac+logos+ava1-l14-linearMSE.pth"
            )
        head = cls()
        head.load_state_dict({k: v.float() for k, v in sd.items()})
        return head.to(device).eval().requires_grad_(False)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """[B, 768] embeddings (any scale) → [B] scores, normalised inside."""
        if image_embeds.dim() != 2 or image_embeds.shape[-1] != EMBED_DIM:
            raise NPOError(
                f"image_embeds: shape {tuple(image_embeds.shape)}; expected [B, {EMBED_DIM}] projected CLIP ViT-L/14 "
                "image embeddings"
            )
        x = image_embeds.to(device=self.layers[0].weight.device, dtype=torch.float32)
        norm = x.norm(dim=-1, keepdim=True)
        x = x / torch.where(norm == 0, torch.ones_like(norm), norm)
        return self.layers(x).squeeze(-1)

    @torch.no_grad()
    def score(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Aesthetic scores [B] float32 on the CPU."""
        return self(image_embeds).cpu()


def load_clip_vision(folder: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
    """(CLIPVisionModelWithProjection, ClipPreprocess) from a local HF folder such as openai/clip-vit-large-patch14."""
    import transformers

    preprocess = ClipPreprocess.from_file(folder)
    model = load_pretrained(transformers.CLIPVisionModelWithProjection, folder, "CLIP vision")
    return model.to(device=device, dtype=dtype), preprocess


@torch.no_grad()
def clip_image_embeds(
    model, images, preprocess: ClipPreprocess, backend: str = "pil", batch_size: int = 16
) -> torch.Tensor:
    """Projected image embeddings [B, D] float32 (not normalised) of a CLIPVisionModelWithProjection."""
    if len(images) == 0:
        raise NPOError("images: the batch is empty; connect at least one image")
    param = next(model.parameters())
    out = []
    for i in range(0, len(images), batch_size):
        pixels = preprocess(images[i : i + batch_size], backend=backend, device=param.device)
        out.append(model(pixel_values=pixels.to(param.dtype)).image_embeds.float())
    return torch.cat(out)


class AestheticScorer(nn.Module):
    """CLIP ViT-L/14 vision model + AestheticHead: ``score(images, prompts=None)`` → [B] (prompts unused)."""

    name = "LAION aesthetic v2"
    uses_prompt = False  # rates the image alone

    def __init__(self, vision, preprocess: ClipPreprocess, head: AestheticHead, backend: str = "pil"):
        super().__init__()
        self.vision, self.preprocess, self.head, self.backend = vision, preprocess, head, backend

    @classmethod
    def from_files(
        cls,
        clip_folder: str | Path,
        head_path: str | Path,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "pil",
    ) -> AestheticScorer:
        """The CLIP vision folder (HF layout, e.g. openai/clip-vit-large-patch14) and the head file."""
        head = AestheticHead.from_file(head_path, device=device)
        vision, preprocess = load_clip_vision(clip_folder, device=device, dtype=dtype)
        dim = vision.config.projection_dim
        if dim != EMBED_DIM:
            raise NPOError(
                f"{clip_folder}: CLIP projection_dim is {dim}; the aesthetic head needs CLIP ViT-L/14 ({EMBED_DIM}-d): "
                "use openai/clip-vit-large-patch14"
            )
        return cls(vision, preprocess, head, backend=backend)

    @torch.no_grad()
    def score(self, images, prompts=None) -> torch.Tensor:
        """Aesthetic scores [B] float32 on the CPU of IMAGE tensors or PIL images."""
        return self.head.score(clip_image_embeds(self.vision, images, self.preprocess, backend=self.backend))
