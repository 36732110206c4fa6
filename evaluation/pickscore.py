"""PickScore v1 (Kirstain et al. 2023) from a local folder in the Hugging Face layout, on ComfyUI IMAGE tensors.

Conventions: score_i = logit_scale.exp() * cos(text embedding of prompts[i], image embedding of images[i]), as the
PickScore model card computes it (one prompt per image, not the B x B matrix); prompts are tokenised with padding and
truncation to 77 tokens; images go through ClipPreprocess (backend "pil" = CLIPImageProcessor's pixel values);
embeddings and the cosine are taken in float32 whatever the model dtype; scores come back as float32 on the CPU.
Local files only (``local_files_only=True``): nothing is downloaded. transformers is imported when a model is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..npo_core.errors import NPOError
from .clip_preprocess import CONFIG_NAME, ClipPreprocess
from .clip_scorer import ClipPairScorer
from .weights import load_pretrained

TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))  # either set is enough
MAX_TOKENS = 77


def require_tokenizer_files(folder: Path) -> None:
    """Refuse a folder without tokenizer.json nor (vocab.json and merges.txt), naming the missing files."""
    if any(all((folder / n).is_file() for n in group) for group in TOKENIZER_FILES):
        return
    missing = [n for n in ("tokenizer.json", "vocab.json", "merges.txt") if not (folder / n).is_file()]
    raise NPOError(
        f"{folder}: no CLIP tokenizer, {', '.join(missing)} missing; copy tokenizer.json (or vocab.json and "
        "merges.txt, with tokenizer_config.json and special_tokens_map.json) from the model's Hugging Face "
        "repository into this folder"
    )


def load_tokenizer(folder: Path):
    """The folder's CLIP tokenizer (the fast one, as AutoProcessor gives it), from local files only."""
    import transformers

    require_tokenizer_files(folder)
    cls = getattr(transformers, "CLIPTokenizerFast", None) or transformers.CLIPTokenizer
    try:
        return cls.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise NPOError(f"{folder}: the CLIP tokenizer files cannot be read ({e}); copy them again") from e


class PickScore(ClipPairScorer):
    """A CLIPModel + its tokenizer + CLIP preprocessing; ``score(images, prompts)`` → [B] float32 (CPU)."""

    name = "PickScore"

    def __init__(self, model, tokenizer, preprocess: ClipPreprocess, backend: str = "pil", batch_size: int = 16):
        super().__init__(model, tokenizer, preprocess, backend, batch_size)
        positions = getattr(model.config.text_config, "max_position_embeddings", MAX_TOKENS)
        self.max_length = min(MAX_TOKENS, positions)

    @classmethod
    def from_folder(
        cls,
        path: str | Path,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        processor_path: str | Path | None = None,
        backend: str = "pil",
    ) -> PickScore:
        """Load from ``path`` (config.json, model.safetensors); tokenizer and preprocessor_config.json from
        ``processor_path`` (default: the same folder; the model card takes them from laion/CLIP-ViT-H-14)."""
        import transformers

        path = Path(path)
        proc = Path(processor_path) if processor_path is not None else path
        for name, folder in (("path", path), ("processor_path", proc)):
            if not folder.is_dir():
                raise NPOError(
                    f"{name}: {folder} is not a folder; pass the PickScore folder in the Hugging Face layout "
                    f"(config.json, model.safetensors, tokenizer files, {CONFIG_NAME})"
                )
        if not (proc / CONFIG_NAME).is_file():
            raise NPOError(
                f"{proc}: {CONFIG_NAME} is missing; copy it from the model's Hugging Face repository "
                "(PickScore_v1 or laion/CLIP-ViT-H-14-laion2B-s32B-b79K) into this folder"
            )
        require_tokenizer_files(proc)
        model = load_pretrained(transformers.CLIPModel, path, "PickScore (CLIP)")
        model = model.to(device=device, dtype=dtype)
        return cls(model, load_tokenizer(proc), ClipPreprocess.from_file(proc), backend=backend)

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """Projected text embeddings [N, D] float32 (not normalised)."""
        tok = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        out = self.model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        return self.model.text_projection(out.pooler_output).float()

    def scale(self) -> torch.Tensor:
        return self.model.logit_scale.float().exp()
