"""Preference pairs for Diffusion-NPO training: a folder of pairs, and pairs picked from a model's own scored samples.

A pair folder holds ``pairs.jsonl``, one JSON object per line::

    {"prompt": "a cat on a sofa", "preferred": "0001_a.png", "rejected": "0001_b.png"}

image paths relative to the folder (sub-folders allowed; no absolute paths, no ``..``). Every problem (a line that
is not JSON or lacks a key, a missing or unreadable image, the same image on both sides, an empty file) is an
error naming the line, raised before anything trains.

Images are prepared as the authors' trainer does (``Resize(resolution)`` of the shorter side, bilinear, then
``CenterCrop(resolution)``; ``RandomHorizontalFlip`` per image when ``flip``), as ComfyUI IMAGE rows
[H, W, 3] in [0, 1], for the graph's VAE to encode.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from . import conds as C
from .data import epoch_indices

INDEX = "pairs.jsonl"
KEYS = ("prompt", "preferred", "rejected")


class PairError(ValueError):
    """Bad pair data; the message names the item (file line, prompt) and the fix."""


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    preferred: Path
    rejected: Path
    item: str  # how messages name it: "pairs.jsonl line 3"


def _inside(folder: Path, name: object, item: str, key: str) -> Path:
    if not isinstance(name, str) or not name:
        raise PairError(f"{item}: '{key}' must be an image path relative to the folder, got {name!r}.")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise PairError(f"{item}: '{key}' = {name!r} leaves the pair folder; give a path relative to it.")
    path = folder / rel
    if not path.is_file():
        raise PairError(f"{item}: '{key}' image {name!r} is missing from {folder}.")
    return path


def read_pair_folder(folder: str | Path) -> list[PreferencePair]:
    """The pairs of ``folder``/pairs.jsonl, checked (files exist, inside the folder, two different images)."""
    root = Path(folder)
    index = root / INDEX
    if not index.is_file():
        raise PairError(
            f"{root}: no {INDEX}; a pair folder lists its pairs there, one JSON object per line "
            '({"prompt": …, "preferred": "a.png", "rejected": "b.png"}).'
        )
    pairs: list[PreferencePair] = []
    for n, line in enumerate(index.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        item = f"{INDEX} line {n}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise PairError(f"{item}: not JSON ({e}).") from None
        if not isinstance(row, dict) or any(k not in row for k in KEYS):
            raise PairError(f"{item}: needs the keys {', '.join(KEYS)}; got {row!r:.120}.")
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise PairError(f"{item}: 'prompt' must be non-empty text.")
        preferred = _inside(root, row["preferred"], item, "preferred")
        rejected = _inside(root, row["rejected"], item, "rejected")
        if preferred.resolve() == rejected.resolve():
            raise PairError(
                f"{item}: the same image is preferred and rejected (a tie teaches nothing); drop the line."
            )
        pairs.append(PreferencePair(row["prompt"], preferred, rejected, item))
    if not pairs:
        raise PairError(f"{index}: holds no pairs.")
    return pairs


def prepared(source: Path | bytes, resolution: int, item: str, flip: bool = False) -> torch.Tensor:
    """One image (a file, or its encoded bytes) as the authors prepare it, as an IMAGE row [resolution, resolution, 3]
    in [0, 1]."""
    name = source.name if isinstance(source, Path) else "the image bytes"
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as im:
            im = im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise PairError(f"{item}: cannot read {name} ({e}).") from None
    w, h = im.size  # torchvision's Resize(int): the shorter side to resolution, the longer int(r · long / short)
    size = (resolution, int(resolution * h / w)) if w <= h else (int(resolution * w / h), resolution)
    im = im.resize(size, Image.BILINEAR)
    left, top = int(round((size[0] - resolution) / 2.0)), int(round((size[1] - resolution) / 2.0))  # CenterCrop
    im = im.crop((left, top, left + resolution, top + resolution))
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3).float() / 255


def best_and_worst(scores: Sequence[float], prompt: str) -> tuple[int, int]:
    """(index of the highest, index of the lowest) of one prompt's K scored samples: the preferred and the
    rejected image of its pair. A tie between them is an error naming the prompt."""
    if len(scores) < 2:
        raise PairError(f"prompt {prompt!r:.80}: {len(scores)} sample(s); a pair needs at least 2 per prompt.")
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    if scores[best] == scores[worst]:
        raise PairError(
            f"prompt {prompt!r:.80}: all {len(scores)} samples score {scores[best]:.6g}: no preference to learn "
            "(raise samples_per_prompt, change the seed, or use another scorer)."
        )
    return best, worst


@dataclass
class PairData:
    """Encoded pairs: ``preferred`` / ``rejected`` [N, C, ...] latents (the model's latent space, scaled), pair i
    made for prompt ``prompt_of[i]`` of ``conds`` (one cond per prompt, batch 1 each)."""

    preferred: torch.Tensor
    rejected: torch.Tensor
    conds: list[C.Cond]
    prompt_of: torch.Tensor
    seed: int = 0

    def __post_init__(self) -> None:
        if self.preferred.shape != self.rejected.shape or self.preferred.dim() < 3 or self.preferred.shape[0] < 1:
            raise ValueError(
                f"preferred {tuple(self.preferred.shape)} and rejected {tuple(self.rejected.shape)} must be "
                "non-empty latent batches of one shape"
            )
        if self.prompt_of.shape[0] != self.preferred.shape[0] or int(self.prompt_of.max()) >= len(self.conds):
            raise ValueError("prompt_of must give a valid prompt index for every pair")

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, C.Cond]:
        """(preferred, rejected, cond) of the step's pairs, drawn as ``StartData`` draws latents."""
        idx = epoch_indices(self.preferred.shape[0], self.seed, step, batch_size)
        return self.preferred[idx], self.rejected[idx], C.cat([self.conds[int(p)] for p in self.prompt_of[idx]])
