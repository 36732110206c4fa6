"""A second MODEL for the negative pass (Dual Model CFG Guider, ComfyUI ≥ 0.33).
"""

from __future__ import annotations

import contextlib
import math

import comfy.patcher_extension
import torch

from ...npo_core.errors import NPOError
from .injection import NegativeRowsOffset, npo_actions, patch_difference
from .model_facts import folded_layers, resolve_for_model

DUAL_WRAPPER_KEY = "npo_dual_model"


class NegativePassModel:
    """Stands in for the BaseModel of a MODEL that a guider runs as its *negative* model only.

    Dual Model CFG Guider loads its negative model, then its positive model, and runs the negative
    pass on the negative model's BaseModel with the positive model's options. When both are clones of
    one module (NPO Negative Model or Apply NPO on the checkpoint the positive uses), the module then
    holds the positive's weights and the negative model's wrappers never run: plain CFG, silently.
    Every ``apply_model`` call here runs the negative model's weights instead: the difference between
    the weights loaded now and the negative model's own (exact low-rank for stacked LoRA patches,
    dense otherwise) and its Apply NPO offsets, injected on every row. All else is the BaseModel's."""

    def __init__(self, inner, patcher) -> None:
        self.__dict__["_inner"] = inner
        self.__dict__["_patcher"] = patcher
        self.__dict__["_diffs"] = {}  # loaded patches_uuid -> NegativeRowsOffset | None
        self.__dict__["_actions"] = npo_actions(patcher)  # its Apply NPO offsets, read once per sampling run

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __setattr__(self, name, value):
        setattr(self._inner, name, value)

    def _weights_difference(self) -> NegativeRowsOffset | None:
        inner, patcher = self._inner, self._patcher
        loaded_uuid = getattr(inner, "current_weight_patches_uuid", None)
        if loaded_uuid is None or loaded_uuid == patcher.patches_uuid:
            return None  # the module holds the negative model's own weights (or no patches at all)
        if loaded_uuid not in self._diffs:
            loaded = getattr(inner, "current_patcher", None)
            if loaded is None or loaded.patches_uuid != loaded_uuid or not patcher.is_clone(loaded):
                raise NPOError(
                    "model_negative: its module holds the weights of another model that is not the one "
                    "sampling now, so NPO cannot tell which weights the negative pass would use. Use NPO "
                    "CFG Guider with npo_offset instead."
                )
            diff = patch_difference(loaded, patcher)
            self._diffs[loaded_uuid] = (
                NegativeRowsOffset(resolve_for_model(diff, patcher), 1.0, 0.0, 0.0, True, folded_layers(patcher, diff))
                if diff.entries
                else None
            )
        return self._diffs[loaded_uuid]

    def apply_model(self, x, t, *args, **kwargs):
        actions = [a for a in [self._weights_difference(), *self._actions] if a is not None]
        unet = self._inner.diffusion_model
        every_row = torch.ones(x.shape[0], dtype=torch.bool)
        with contextlib.ExitStack() as stack:
            for action in actions:
                rows = action.rows(every_row, t)
                if rows:
                    stack.enter_context(action.active(unet, rows, x.shape[0]))
            return self._inner.apply_model(x, t, *args, **kwargs)


def _prepare_as_negative_model(executor, model, noise_shape, conds, *args, **kwargs):
    """PREPARE_SAMPLING wrapper: a model prepared with negative conds only (how Dual Model CFG Guider
    prepares its negative model) gets a ``NegativePassModel`` as its inner model."""
    inner, conds_out, models = executor(model, noise_shape, conds, *args, **kwargs)
    if set(conds) == {"negative"} and not isinstance(inner, NegativePassModel):
        inner = NegativePassModel(inner, model)
    return inner, conds_out, models


def _check_dual_guider(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper of an Apply NPO model: in a Dual Model CFG Guider the negative pass runs on
    ``model_negative``; refuse when that model does not carry this model's NPO offsets."""
    guider = getattr(executor, "class_obj", None)
    negative = getattr(guider, "uncond_model_patcher", None)
    if negative is not None and not math.isclose(getattr(guider, "cfg", 1.0), 1.0):
        mine = npo_actions(guider.model_patcher)
        theirs = {id(a) for a in npo_actions(negative)}
        if mine and not all(id(a) in theirs for a in mine):
            raise NPOError(
                "Apply NPO's model is the positive model of a Dual Model CFG Guider whose model_negative "
                "does not carry the offset, and that guider runs the negative pass on model_negative only: "
                "the offset would change nothing. Connect Apply NPO's output to model_negative (too), or use "
                "NPO CFG Guider."
            )
    return executor(*args, **kwargs)


def add_dual_model_support(mp) -> None:
    """Registers both wrappers once per patcher (ComfyUI versions without a dual-model guider never
    meet the case they act on). The PREPARE_SAMPLING one goes into ``model_options``: a guider prepares
    its negative model with that model's own options, which never get the patcher's ``wrappers``."""
    ext = comfy.patcher_extension
    if not ext.get_wrappers_with_key(ext.WrappersMP.PREPARE_SAMPLING, DUAL_WRAPPER_KEY, mp.model_options, True):
        ext.add_wrapper_with_key(
            ext.WrappersMP.PREPARE_SAMPLING, DUAL_WRAPPER_KEY, _prepare_as_negative_model, mp.model_options, True
        )
    if npo_actions(mp) and not mp.get_wrappers(ext.WrappersMP.OUTER_SAMPLE, DUAL_WRAPPER_KEY):
        mp.add_wrapper_with_key(ext.WrappersMP.OUTER_SAMPLE, DUAL_WRAPPER_KEY, _check_dual_guider)
