"""Which prompt and frames belong to each pair of a compared batch, and per-item scores from per-frame scores."""

from __future__ import annotations

import torch

from ..npo_core.errors import NPOError


def prompt_lines(text: str) -> list[str]:
    """One prompt per non-empty line (surrounding spaces stripped)."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def prompts_per_item(prompts: list[str], items: int, input_name: str = "prompts") -> list[str]:
    """The prompt of each of ``items`` images: one prompt for all, one per image, or (items a multiple of the
    prompts) each prompt for a run of items / prompts consecutive images (its seeds), in order."""
    if not prompts:
        raise NPOError(f"{input_name}: no prompt given; write the prompts, one per line.")
    if len(prompts) == 1:
        return prompts * items
    if items % len(prompts) == 0:
        run = items // len(prompts)
        return [p for p in prompts for _ in range(run)]
    raise NPOError(
        f"{input_name}: {len(prompts)} prompts for {items} images; give one prompt, one per image, or a number of "
        "prompts that divides the images (each prompt's seeds in a run, in the order the batch holds them)."
    )


def items_of(images: torch.Tensor, frames_per_item: int, input_name: str) -> int:
    """How many compared items an IMAGE batch [B, H, W, C] holds (B / frames_per_item for video)."""
    if images.dim() != 4:
        raise NPOError(f"{input_name}: expected an IMAGE batch [B, H, W, C], got shape {tuple(images.shape)}.")
    if frames_per_item < 1 or images.shape[0] % frames_per_item:
        raise NPOError(
            f"{input_name}: {images.shape[0]} frames do not split into items of {frames_per_item} frames; set "
            "frames_per_item to the frames of one video (1 for images)."
        )
    return images.shape[0] // frames_per_item


def mean_per_item(frame_scores: torch.Tensor, frames_per_item: int) -> torch.Tensor:
    """Per-frame scores [B] → per-item scores [B / frames_per_item] (a video's score is its frames' mean)."""
    return frame_scores.reshape(-1, frames_per_item).double().mean(dim=1)
