"""ImageReward v1.0 (Xu et al. 2023) through the ImageReward package, only when that package is already importable.

The pack never installs it (``image-reward`` pins timm 0.6.13 and fairscale, which may not suit a ComfyUI
environment). The package's own code builds the model (BLIP ViT-L image encoder, BLIP text encoder with cross-attention
to the image, MLP head); this module feeds it without any download:
- weights: ``ImageReward.pt`` (or a .safetensors of the same state dict) read with ``torch.load(weights_only=True)``;
- ``med_config.json`` (the BLIP text encoder's BertConfig) from the same folder;
- the BERT tokenizer the package asks for as ``bert-base-uncased`` is read from the folder's ``bert-base-uncased/``
  subfolder (or the folder itself) with ``local_files_only=True``, by pointing the package's ``BertTokenizer`` at it
  while the model is built.

Conventions: score_i = (mlp(text encoder CLS feature of prompts[i] attending to images[i]) − mean) / std with the
package's mean and std, i.e. the package's ``model.score(prompt, image)``; prompts padded to and truncated at 35
tokens as the package does; images converted to the uint8 a saved PNG holds and through the package's own
``preprocess`` (resize 224 bicubic, centre crop, OpenAI CLIP mean / std); batched over images and prompts (each row
is independent); float32 scores on the CPU.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from ..npo_core.errors import NPOError
from .clip_preprocess import to_uint8
from .clip_scorer import check_pairs
from .weights import read_weights

PACKAGE = "ImageReward"
CHECKPOINTS = ("ImageReward.pt", "ImageReward.safetensors")
MED_CONFIG = "med_config.json"
TOKENIZER_SUBFOLDER = "bert-base-uncased"
MAX_TOKENS = 35  # the package's padding="max_length", max_length=35
FILES_FIX = (
    "put ImageReward.pt and med_config.json of THUDM/ImageReward, and the tokenizer files (vocab.txt, "
    "tokenizer_config.json) of google-bert/bert-base-uncased in a bert-base-uncased subfolder, into one folder of "
    "models/npo_scorers"
)
_BUILD_LOCK = threading.Lock()  # the package's tokenizer lookup is redirected while one model is built


def unavailable_reason() -> str | None:
    """None when the ImageReward package can be found in this Python; otherwise why the scorer is unavailable."""
    if importlib.util.find_spec(PACKAGE) is None:
        return (
            f"the {PACKAGE} package is not installed in this Python (pip install image-reward; it pins timm 0.6.13 "
            "and fairscale, so install it only if that suits your ComfyUI environment; the pack never installs it)"
        )
    return None


def _package_model_class():
    """The package's ImageReward model class and the module whose BertTokenizer builds its tokenizer."""
    reason = unavailable_reason()
    if reason:
        raise NPOError(f"scorer: ImageReward v1.0 is unavailable: {reason}")
    try:
        module = importlib.import_module(f"{PACKAGE}.{PACKAGE}")
    except Exception as e:  # its imports (timm, fairscale, transformers helpers) may fail in this environment
        hint = ""
        if "transformers" in str(e):
            import transformers

            hint = (
                f" image-reward 1.x was written for transformers 4 and this Python has transformers "
                f"{transformers.__version__}, whose modules no longer hold some helpers its BLIP code imports;"
            )
        raise NPOError(
            f"scorer: the {PACKAGE} package is installed but cannot be imported ({type(e).__name__}: {e});{hint} fix "
            "or uninstall it"
        ) from e
    model_class = getattr(module, PACKAGE, None)
    blip = getattr(module, "BLIP_Pretrain", None)
    tokenizer_module = None
    if blip is not None:
        init = getattr(sys.modules.get(blip.__module__), "init_tokenizer", None)
        tokenizer_module = sys.modules.get(getattr(init, "__module__", ""))
    if model_class is None or tokenizer_module is None or not hasattr(tokenizer_module, "BertTokenizer"):
        raise NPOError(
            f"scorer: this {PACKAGE} package is laid out differently from image-reward 1.x (no {PACKAGE} class or "
            "no BLIP init_tokenizer using BertTokenizer); the pack cannot load it without a download"
        )
    return model_class, tokenizer_module


@contextlib.contextmanager
def _local_bert_tokenizer(module, folder: Path):
    """While the model is built, ``module.BertTokenizer.from_pretrained(any name)`` reads ``folder`` (local files)."""
    real = module.BertTokenizer

    class LocalBertTokenizer(real):
        @classmethod
        def from_pretrained(cls, _name, *args, **kwargs):
            kwargs["local_files_only"] = True
            return super().from_pretrained(str(folder), *args, **kwargs)

    if not hasattr(real, "additional_special_tokens_ids"):  # transformers 5 calls them extra_special_tokens
        LocalBertTokenizer.additional_special_tokens_ids = property(
            lambda self: self.convert_tokens_to_ids(list(self.extra_special_tokens))
        )

    with _BUILD_LOCK:
        module.BertTokenizer = LocalBertTokenizer
        try:
            yield
        finally:
            module.BertTokenizer = real


def _files(folder: Path) -> tuple[Path, Path, Path]:
    """(checkpoint, med_config.json, tokenizer folder) of an ImageReward folder, each refused by name if missing."""
    if not folder.is_dir():
        raise NPOError(f"weights: {folder} is not a folder; {FILES_FIX}")
    checkpoint = next((folder / n for n in CHECKPOINTS if (folder / n).is_file()), None)
    if checkpoint is None:
        raise NPOError(f"{folder}: {CHECKPOINTS[0]} is missing; {FILES_FIX}")
    med = folder / MED_CONFIG
    if not med.is_file():
        raise NPOError(f"{folder}: {MED_CONFIG} is missing; {FILES_FIX}")
    tokenizer = folder / TOKENIZER_SUBFOLDER if (folder / TOKENIZER_SUBFOLDER).is_dir() else folder
    if not (tokenizer / "vocab.txt").is_file():
        raise NPOError(f"{tokenizer}: vocab.txt (the BERT tokenizer) is missing; {FILES_FIX}")
    return checkpoint, med, tokenizer


class ImageRewardScorer(torch.nn.Module):
    """The package's ImageReward model, fed batches; ``score(images, prompts)`` → [B] float32 (CPU)."""

    name = "ImageReward"

    def __init__(self, model, batch_size: int = 16) -> None:
        super().__init__()
        self.model = model
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.mlp.parameters()).device

    @classmethod
    def from_folder(cls, path: str | Path, device: torch.device | str | None = None) -> ImageRewardScorer:
        """Build the package's model from an ImageReward folder (see FILES_FIX), weights read weights-only."""
        checkpoint, med, tokenizer = _files(Path(path))
        model_class, tokenizer_module = _package_model_class()
        sd = read_weights(checkpoint, missing=FILES_FIX)
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise NPOError(f"{checkpoint} holds {type(sd).__name__}, not ImageReward's state dict; {FILES_FIX}")
        with _local_bert_tokenizer(tokenizer_module, tokenizer):
            try:
                model = model_class(med_config=str(med), device="cpu")
            except (OSError, ValueError) as e:
                raise NPOError(f"{tokenizer}: the ImageReward model could not be built ({e}); {FILES_FIX}") from e
        result = model.load_state_dict(sd, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
        if missing:
            raise NPOError(
                f"{checkpoint}: {len(missing)} weights of the ImageReward model are missing (first: {missing[0]}); "
                "this is not ImageReward-v1.0's ImageReward.pt: download it again"
            )
        model = model.eval().requires_grad_(False).to(device or "cpu")
        return cls(model)

    @torch.no_grad()
    def score(self, images, prompts: Sequence[str]) -> torch.Tensor:
        """The reward of images[i] for prompts[i] (the package's normalised score): [B] float32 on the CPU."""
        from PIL import Image

        n = check_pairs(images, prompts)
        levels = to_uint8(images)
        out = []
        for i in range(0, n, self.batch_size):
            pil = [Image.fromarray(x.cpu().numpy()) for x in levels[i : i + self.batch_size]]
            pixels = torch.stack([self.model.preprocess(im) for im in pil]).to(self.device)
            out.append(self._rewards(pixels, list(prompts[i : i + self.batch_size])).cpu())
        return torch.cat(out)

    def _rewards(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        blip = self.model.blip
        tok = blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        image_embeds = blip.visual_encoder(pixels)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = blip.text_encoder(
            tok.input_ids.to(self.device),
            attention_mask=tok.attention_mask.to(self.device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            return_dict=True,
        )
        rewards = self.model.mlp(text.last_hidden_state[:, 0, :].float()).reshape(-1)
        return ((rewards - self.model.mean) / self.model.std).float()
