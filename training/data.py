"""Start latents and prompts for TDFT: a pool of latents (self-generated or the user's), each
optionally tied to the prompt that made it; prompts otherwise cycle over the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import conds as C


def epoch_indices(n: int, seed: int, step: int, batch_size: int) -> torch.Tensor:
    """Item indices of one step over n items: a fresh permutation per epoch, a pure function of (seed, step), so a
    resumed run draws what an uninterrupted one would."""
    pos = torch.arange(step * batch_size, (step + 1) * batch_size)
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in pos.div(n, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        sel = pos.div(n, rounding_mode="floor") == epoch
        out[sel] = perm[pos[sel] % n]
    return out


@dataclass
class StartData:
    latents: torch.Tensor  # [N, C, H, W] clean start latents z0 (the model's latent space, scaled)
    conds_pos: list[C.Cond]  # one cond per prompt, batch 1 each
    cond_neg: C.Cond  # the negative / empty conditioning, batch 1
    prompt_of: torch.Tensor | None = None  # [N] prompt index of each latent (pool made from prompts), or None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.latents.dim() < 3 or self.latents.shape[0] < 1:
            raise ValueError(f"latents must be a non-empty batch [N, C, ...], got shape {tuple(self.latents.shape)}")
        if not self.conds_pos:
            raise ValueError("at least one positive prompt is needed")
        if self.prompt_of is not None and (
            self.prompt_of.shape[0] != self.latents.shape[0] or int(self.prompt_of.max()) >= len(self.conds_pos)
        ):
            raise ValueError("prompt_of must give a valid prompt index for every latent")

    def indices(self, step: int, batch_size: int) -> torch.Tensor:
        """Latent indices for a step: a fresh permutation per epoch, a pure function of (seed, step)."""
        return epoch_indices(self.latents.shape[0], self.seed, step, batch_size)

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, C.Cond, C.Cond]:
        idx = self.indices(step, batch_size)
        if self.prompt_of is not None:
            prompts = self.prompt_of[idx]
        else:
            prompts = torch.arange(step * batch_size, (step + 1) * batch_size) % len(self.conds_pos)
        cond_pos = C.cat([self.conds_pos[int(p)] for p in prompts])
        cond_neg = C.cat([self.cond_neg] * batch_size)
        return self.latents[idx], cond_pos, cond_neg
