"""Shared node pieces: the NPO_OFFSET socket type, category, knob checks, validation and UI features."""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable

from comfy_api.latest import io

from ..npo_core.errors import NPOError

NPOOffsetType = io.Custom("NPO_OFFSET")
# a scorer: ``.name`` and ``.score(images [B, H, W, C] in 0..1, prompts) -> [B]`` (higher is better)
NPOScorerType = io.Custom("NPO_SCORER")
CATEGORY = "NPO"
STRENGTH_MAX = 4.0
# what every node is found by in the node search, besides its own aliases
SEARCH_ALIASES = ["npo", "diffusion-npo", "negative preference optimization"]

STRENGTH_TOOLTIP = (
    "How much of the NPO offset δ the negative pass adds: θ_neg = θ + strength·δ. 1.0 is what the "
    "authors used; 0 turns NPO off (plain CFG)."
)


class Absent:
    """The default of a socket in ``validate_inputs``: not connected (a connected one arrives as None there)."""


ABSENT = Absent()


def check_range(name: str, value: float, lo: float | None, hi: float | None) -> float:
    """``value`` as a float inside [lo, hi] (a bound of None is open); NaN and ±inf are refused."""
    value = float(value)
    if not math.isfinite(value):
        raise NPOError(f"{name} = {value} is not a finite number; set a number in [{lo}, {hi}].")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise NPOError(f"{name} = {value} is outside [{lo}, {hi}]; set it inside that range.")
    return value


def check_widgets(cls, values: dict) -> None:
    """Each Int / Float widget value against the bounds its schema declares; a None value (a widget fed by a
    link, unknown at validation) is skipped. ComfyUI skips its own min/max check for inputs that
    ``validate_inputs`` takes, so this is where those bounds are enforced (NaN included, which passes them)."""
    specs = {i.id: i for i in cls.define_schema().inputs}
    for name, value in values.items():
        spec = specs[name]
        if value is not None and isinstance(spec, (io.Int.Input, io.Float.Input)):
            check_range(name, value, getattr(spec, "min", None), getattr(spec, "max", None))


def refusal(check: Callable[[], object]) -> bool | str:
    """What ``validate_inputs`` answers: True, or the message of the NPOError that ``check`` raises."""
    try:
        check()
    except NPOError as e:
        return str(e)
    return True


def strength_input(default: float = 1.0) -> io.Float.Input:
    return io.Float.Input("strength", default=default, min=0.0, max=STRENGTH_MAX, step=0.05, tooltip=STRENGTH_TOOLTIP)


# ---- UI features of newer ComfyUI versions (0.14+), used only where they exist ----------------------------------
# v0.3.64's inputs and Schema raise TypeError on keywords they do not know.
HAS_ADVANCED = "advanced" in inspect.signature(io.Int.Input.__init__).parameters
HAS_SEARCH_ALIASES = "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}


def advanced() -> dict:
    """Keywords of a rarely changed widget: ``advanced=True`` (folded away in the node) where ComfyUI has it."""
    return {"advanced": True} if HAS_ADVANCED else {}


def schema(*, search_aliases: list[str] = (), **kwargs) -> io.Schema:
    """``io.Schema`` in category NPO, found in the node search by the pack's aliases and ``search_aliases`` where
    ComfyUI has them."""
    kwargs.setdefault("category", CATEGORY)
    if HAS_SEARCH_ALIASES:
        kwargs["search_aliases"] = [*SEARCH_ALIASES, *(a for a in search_aliases if a not in SEARCH_ALIASES)]
    return io.Schema(**kwargs)
