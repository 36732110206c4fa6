"""EMA teacher without a second model: the EMA values are swapped into the trainable parameters
for the teacher's forward passes (a pointer swap, no copy), then swapped back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class EMATeacher:
    """φ ← decay·φ + (1 − decay)·θ after every optimizer step; φ starts at θ."""

    def __init__(self, params: dict[str, nn.Parameter], decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
        self.params = params
        self.decay = float(decay)
        self.shadow = {n: p.detach().clone() for n, p in params.items()}

    @torch.no_grad()
    def update(self) -> None:
        names = list(self.params)
        torch._foreach_lerp_(
            [self.shadow[n] for n in names], [self.params[n].detach() for n in names], 1.0 - self.decay
        )

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside the block the parameters hold the EMA (teacher) values. No autograd graph may span it."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def _swap(self) -> None:
        for n, p in self.params.items():
            p.data, self.shadow[n] = self.shadow[n], p.data

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().cpu().clone() for n, t in self.shadow.items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) ^ set(sd)
        if missing:
            raise ValueError(f"EMA state does not match the trainable parameters (e.g. {sorted(missing)[:3]})")
        for n, t in sd.items():
            self.shadow[n].copy_(t)
