"""Shared node pieces: the NPO_OFFSET socket type, category and knob checks."""

from __future__ import annotations

from comfy_api.latest import io

from ..npo_core.errors import NPOError

NPOOffsetType = io.Custom("NPO_OFFSET")
# a scorer: ``.name`` and ``.score(images [B, H, W, C] in 0..1, prompts) -> [B]`` (higher is better)
NPOScorerType = io.Custom("NPO_SCORER")
CATEGORY = "NPO"
STRENGTH_MAX = 4.0

STRENGTH_TOOLTIP = (
    "How much of the NPO offset δ the negative pass adds: θ_neg = θ + strength·δ. 1.0 is what the "
    "authors used; 0 turns NPO off (plain CFG)."
)


def check_range(name: str, value: float, lo: float, hi: float) -> float:
    value = float(value)
    if not (lo <= value <= hi):
        raise NPOError(f"{name} = {value} is outside [{lo}, {hi}]; set it inside that range.")
    return value


def strength_input(default: float = 1.0) -> io.Float.Input:
    return io.Float.Input("strength", default=default, min=0.0, max=STRENGTH_MAX, step=0.05, tooltip=STRENGTH_TOOLTIP)
