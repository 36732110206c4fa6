"""The offset on the negative rows of a UNet call, and offsets read off weight patches.
"""

from __future__ import annotations

import contextlib

import comfy.lora
import comfy.patcher_extension
import torch

from ...npo_core.errors import NPOError
from ...npo_core.inject import UNCOND, OffsetInjector, RowGate, mask_to_slices
from ...npo_core.offset import Dense, LowRank, NPOOffset
from .model_facts import PREFIX, dequantized, original_weight, unet_of


class NegativeRowsOffset:
    """One Apply NPO: θ + strength·δ on the rows of the negative chunk, between two sigmas.

    The APPLY_MODEL wrapper finds those rows from ``cond_or_uncond``; in a Dual Model CFG Guider's
    negative pass every row is negative (see ``NegativePassModel``). The injector is attached to
    whichever UNet runs the call (the model, or a multi-GPU clone of it)."""

    def __init__(
        self,
        offset: NPOOffset,
        strength: float,
        sigma_hi: float,
        sigma_lo: float,
        full_range: bool,
        folded: frozenset[str] = frozenset(),
    ):
        self.gate = RowGate()
        self.injector = OffsetInjector(offset, strength, self.gate, folded)
        self.sigma_hi, self.sigma_lo, self.full_range = sigma_hi, sigma_lo, full_range
        self.negative_calls = 0  # UNet calls that had negative rows to act on, since the last reset
        self.negative_uuids: set = set()  # the uuids of the guider's unconditional conds, this sampling run
        self.negative_index: int | None = None  # their position in the guider's cond list, once seen

    def negative_chunk(self, cond_or_uncond, uuids) -> int:
        """The ``cond_or_uncond`` value of the unconditional chunks in this UNet call. CFG lists
        [cond, uncond] (1); other guiders order their conds otherwise (DualCFGGuider: [negative, middle,
        positive]), so the position is learned from a chunk that carries one of the unconditional conds'
        uuids (chunks ComfyUI adds for area prompts carry the positive's uuid but the same position)."""
        if self.negative_uuids and cond_or_uncond and uuids:
            for kind, cond_uuid in zip(cond_or_uncond, uuids, strict=False):
                if cond_uuid in self.negative_uuids:
                    self.negative_index = kind
                    break
        return UNCOND if self.negative_index is None else self.negative_index

    def covers(self, sigma: float) -> bool:
        """Whether a step at ``sigma`` lies in the start/end range."""
        return self.full_range or self.sigma_lo * (1 - 1e-5) <= sigma <= self.sigma_hi * (1 + 1e-5)

    def rows(self, mask: torch.Tensor, t: torch.Tensor) -> list[slice]:
        """``mask`` (negative rows) narrowed to the rows whose sigma lies in the range."""
        if not self.full_range:
            sig = t.detach().flatten().float().cpu()
            if sig.numel() == 1:
                sig = sig.expand(mask.shape[0])
            mask = mask & (sig <= self.sigma_hi * (1 + 1e-5)) & (sig >= self.sigma_lo * (1 - 1e-5))
        return mask_to_slices(mask)

    def active(self, unet: torch.nn.Module, rows: list[slice], batch: int):
        """Inject on ``rows`` of a model call whose input has ``batch`` rows, for the duration of the block."""
        self.negative_calls += 1
        stack = contextlib.ExitStack()
        stack.enter_context(self.injector.attached_to(unet))
        stack.enter_context(self.gate.active(rows, batch))
        return stack


def unet_running(executor, fallback) -> torch.nn.Module:
    """The UNet of the BaseModel whose ``apply_model`` the APPLY_MODEL wrapper wraps (a multi-GPU clone
    has its own)."""
    base_model = getattr(executor, "class_obj", None)
    return getattr(base_model, "diffusion_model", None) or unet_of(fallback)


def transformer_options_of(args: tuple, kwargs: dict) -> dict:
    topts = kwargs.get("transformer_options")
    if topts is None and len(args) >= 4:
        topts = args[3]
    return topts or {}


def npo_actions(mp) -> list[NegativeRowsOffset]:
    """The Apply NPO offsets ``mp`` carries, in the order they were applied."""
    wrappers = mp.get_all_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL)
    return [w.npo_action for w in wrappers if hasattr(w, "npo_action")]


def patch_difference(model, negative) -> NPOOffset:
    """For a ``negative`` that shares weights with ``model`` (``is_clone``): the offset δ with
    θ_negative = θ_model + δ, read from the two patchers' weight patches. LoRA patches stacked on top of
    ``model``'s stay low-rank (exact); anything else becomes a dense difference of patched weights."""
    if negative.object_patches.keys() != model.object_patches.keys():
        raise NPOError(
            "negative_model: has object patches (e.g. a different model_sampling) that model lacks; "
            "connect a separately loaded model instead."
        )
    entries: dict[str, LowRank | Dense] = {}
    for key in sorted(set(model.patches) | set(negative.patches)):
        if not key.startswith(PREFIX):
            continue
        pos = model.patches.get(key, [])
        neg = negative.patches.get(key, [])
        name = key[len(PREFIX) :]
        stacked = len(neg) >= len(pos) and all(a is b for a, b in zip(pos, neg, strict=False))
        extra = neg[len(pos) :] if stacked else None
        if extra is not None and not extra:
            continue
        lowrank = _as_lowrank(extra, name) if extra is not None else None
        if lowrank is not None:
            entries[name] = lowrank
            continue
        w0 = dequantized(model, name, original_weight(model, name))
        wp = comfy.lora.calculate_weight(pos, w0.clone(), key) if pos else w0
        wn = comfy.lora.calculate_weight(neg, w0.clone(), key) if neg else w0
        d = wn.float() - wp.float()
        if torch.count_nonzero(d):
            entries[name] = Dense(d)
    return NPOOffset(entries, source_format="negative_model patches", source="negative_model")


def _as_lowrank(extra: list, name: str) -> LowRank | None:
    """Stacked LoRA patches (strength, LoRAAdapter, strength_model=1, no offset/function) as one LowRank."""
    ups, downs = [], []
    for strength_patch, value, strength_model, off, fn in extra:
        weights = getattr(value, "weights", None)
        if getattr(value, "name", None) != "lora" or strength_model != 1.0 or off is not None or fn is not None:
            return None
        up, down, alpha, mid, dora, reshape = (list(weights) + [None] * 6)[:6]
        if mid is not None or dora is not None or reshape is not None:
            return None
        rank = down.shape[0]
        scale = strength_patch * (float(alpha) / rank if alpha is not None else 1.0)
        ups.append(up.float() * scale)
        downs.append(down.float())
    if not ups:
        return None
    return LowRank(torch.cat(ups, 1), torch.cat(downs, 0))
