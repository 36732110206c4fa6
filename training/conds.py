"""Batch-aligned conditioning helpers. A "cond" is a tensor [B, ...], a dict of such tensors
(e.g. ``{"c_crossattn": [B,77,768], "y": [B,2816]}``) or None; row i belongs to batch sample i."""

from __future__ import annotations

from typing import Any

import torch

Cond = Any


def cat(conds: list[Cond]) -> Cond:
    first = conds[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(conds, 0)
    if isinstance(first, dict):
        return {k: cat([c[k] for c in conds]) for k in first}
    raise TypeError(f"unsupported cond type {type(first).__name__}")


def index(cond: Cond, idx: torch.Tensor) -> Cond:
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond[idx.to(cond.device)]
    if isinstance(cond, dict):
        return {k: index(v, idx) for k, v in cond.items()}
    raise TypeError(f"unsupported cond type {type(cond).__name__}")


def where(mask: torch.Tensor, a: Cond, b: Cond) -> Cond:
    """Row-wise select: rows with mask True from ``a``, others from ``b``."""
    if a is None:
        return None
    if isinstance(a, torch.Tensor):
        m = mask.to(a.device).view(-1, *([1] * (a.dim() - 1)))
        return torch.where(m, a, b)
    if isinstance(a, dict):
        return {k: where(mask, a[k], b[k]) for k in a}
    raise TypeError(f"unsupported cond type {type(a).__name__}")
