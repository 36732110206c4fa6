"""Sampling with NPO: Apply NPO's per-row injection, NPO Negative Model's weight patches, NPO CFG Guider.
"""

from __future__ import annotations

import math
import uuid
import weakref

import comfy.lora
import comfy.patcher_extension
import comfy.samplers
import torch

from ...npo_core import formats
from ...npo_core.errors import NPOError
from ...npo_core.inject import chunk_row_mask
from ...npo_core.offset import NPOOffset
from .dual_model import add_dual_model_support
from .injection import NegativeRowsOffset, npo_actions, patch_difference, transformer_options_of, unet_running
from .model_facts import PREFIX, check_supported_model, folded_layers, model_arch, resolve_for_model, unet_of
from .runtime import log


def apply_offset(model, offset: NPOOffset, strength: float, start_percent: float = 0.0, end_percent: float = 1.0):
    """A clone of ``model`` whose negative/uncond rows (``cond_or_uncond == 1``) run θ + strength·δ,
    between ``start_percent`` and ``end_percent`` of the schedule. One batched UNet call per step."""
    offset = resolve_for_model(offset, model)
    mp = model.clone()
    ms = mp.get_model_object("model_sampling")
    action = NegativeRowsOffset(
        offset,
        strength,
        float(ms.percent_to_sigma(start_percent)),
        float(ms.percent_to_sigma(end_percent)),
        start_percent <= 0.0 and end_percent >= 1.0,
        folded_layers(model, offset),
    )
    action.injector.check(unet_of(model))

    def npo_apply_model(executor, x, t, *args, **kwargs):
        topts = transformer_options_of(args, kwargs)
        cond_or_uncond = topts.get("cond_or_uncond")
        negative = action.negative_chunk(cond_or_uncond, topts.get("uuids"))
        rows = action.rows(chunk_row_mask(cond_or_uncond, x.shape[0], negative), t)
        if not rows:
            return executor(x, t, *args, **kwargs)
        with action.active(unet_running(executor, mp), rows, x.shape[0]):
            return executor(x, t, *args, **kwargs)

    npo_apply_model.npo_action = action
    key = f"npo_offset_{uuid.uuid4().hex[:8]}"
    mp.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, npo_apply_model)
    mp.set_injections(
        key,
        [
            comfy.patcher_extension.PatcherInjection(
                inject=lambda patcher: action.injector.attach(unet_of(patcher)),
                eject=lambda patcher: action.injector.detach(unet_of(patcher)),
            )
        ],
    )
    # A patcher dropped while loaded (a workflow edit discards the cached output) is never ejected; the hooks
    # then leave with it instead of piling up on the shared module.
    weakref.finalize(mp, action.injector.detach)
    add_dual_model_support(mp)
    if not mp.get_wrappers(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, ROWS_AND_NOTICE_KEY):
        mp.add_wrapper_with_key(
            comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, ROWS_AND_NOTICE_KEY, _mark_unconditional_rows_and_notice
        )
    return mp


ROWS_AND_NOTICE_KEY = "npo_notices"
# The conds key of the unconditional prediction, for guiders whose key is not "negative". PerpNeg's
# "negative" is the prompt it projects out; its unconditional is the empty prompt.
UNCONDITIONAL_KEY = {"Guider_PerpNeg": "empty_negative_prompt"}
NO_CHUNK = -1  # a cond_or_uncond value no chunk has


def _mark_unconditional_rows_and_notice(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: tells the offsets which conds are this run's unconditional ones, and says once
    per sampling run, in the log, when Apply NPO's offset cannot act: cfg 1 (ComfyUI skips the negative
    pass), a start/end range that covers no step of the run, or a guider or sampler that never evaluated
    a negative batch."""
    guider = getattr(executor, "class_obj", None)
    actions = npo_actions(guider.model_patcher) if guider is not None else []
    if not actions:
        return executor(*args, **kwargs)
    sigmas = args[3] if len(args) > 3 else kwargs.get("sigmas")
    steps = [float(s) for s in sigmas[:-1]] if sigmas is not None else []
    # ``cfg`` is the guidance scale only for guiders that keep CFGGuider's set_cfg (DualCFGGuider, for one,
    # stores its scales elsewhere and leaves cfg at 1)
    standard = getattr(type(guider), "set_cfg", None) is comfy.samplers.CFGGuider.set_cfg
    cfg = getattr(guider, "cfg", None) if standard else None
    reason = None
    if isinstance(cfg, (int, float)) and math.isclose(cfg, 1.0) and not guider.model_options.get(
        "disable_cfg1_optimization", False
    ):
        reason = (
            "cfg is 1, so ComfyUI skips the negative pass (as turbo, LCM and Lightning workflows do) and the "
            "NPO offset cannot act. Raise cfg (the authors used 7.5 for SD1.5, 5 for SDXL) to use NPO."
        )
    elif steps and not any(a.covers(s) for a in actions for s in steps):
        reason = (
            f"Apply NPO's start_percent/end_percent covers none of this run's {len(steps)} steps "
            f"(σ {steps[0]:.3g} … {steps[-1]:.3g}), so the offset changes nothing. Widen the range."
        )
    if reason:
        log.warning("NPO: %s", reason)
    key = UNCONDITIONAL_KEY.get(type(guider).__name__, "negative")
    uuids = {c.get("uuid") for c in (getattr(guider, "conds", None) or {}).get(key) or [] if c.get("uuid")}
    # Dual Model CFG Guider runs the negative pass on its model_negative (NegativePassModel does the offset
    # there); this model's own calls then have no unconditional chunk, though they carry the negative uuids.
    dual = getattr(guider, "uncond_model_patcher", None) is not None
    for a in actions:
        a.negative_calls, a.negative_uuids, a.negative_index = 0, set() if dual else uuids, NO_CHUNK if dual else None
    out = executor(*args, **kwargs)
    if reason is None and not any(a.negative_calls for a in actions):
        log.warning(
            "NPO: this sampling run never evaluated a negative/unconditional batch, so the NPO offset changed "
            "nothing. The guider or sampler in use does not run CFG's negative pass (e.g. BasicGuider); "
            "sample with KSampler, CFGGuider or NPO CFG Guider."
        )
    return out


def add_offset_patches(model, offset: NPOOffset, strength: float):
    """A clone of ``model`` with θ + strength·δ as ComfyUI weight patches (resolved offset)."""
    sd = formats.to_comfy_state_dict(offset)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = (
        comfy.lora.load_lora(sd, key_map, log_missing=False)
        if _accepts_log_missing()
        else comfy.lora.load_lora(sd, key_map)
    )
    expected = {PREFIX + k for k in offset.entries}
    landed = {k if isinstance(k, str) else k[0] for k in patches}
    missing = sorted(expected - landed)
    if missing:
        raise NPOError(f"npo_offset: {len(missing)} offset tensors did not land as weight patches, e.g. {missing[:3]}")
    mp = model.clone()
    mp.add_patches(patches, strength)
    add_dual_model_support(mp)
    return mp


def _accepts_log_missing() -> bool:
    import inspect

    return "log_missing" in inspect.signature(comfy.lora.load_lora).parameters


class NegativePassCFGGuider(comfy.samplers.CFGGuider):
    """CFGGuider whose negative pass runs NPO weights.

    - an offset (or a ``negative_model`` that shares weights with ``model``): the model is wrapped by
      ``apply_offset``, so cond and uncond stay in one batch;
    - an independent ``negative_model``: the uncond pass runs on it, the cond pass on ``model``
      (two UNet calls per step), with pre-/post-CFG functions applied as ComfyUI does.
    """

    def __init__(self, model_patcher, negative_patcher=None):
        if negative_patcher is not None:
            model_patcher = model_patcher.clone()
            model_patcher.set_additional_models("npo_negative_model", [negative_patcher])
        super().__init__(model_patcher)
        self.negative_patcher = negative_patcher

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
        if self.negative_patcher is None:
            return super().predict_noise(x, timestep, model_options=model_options, seed=seed)
        pos = self.conds.get("positive", None)
        neg = self.conds.get("negative", None)
        if math.isclose(self.cfg, 1.0) and not model_options.get("disable_cfg1_optimization", False):
            neg = None
        cond_out = _calc_cond_batch(self.inner_model, [pos, None], x, timestep, model_options)[0]
        # like sampling_function: a skipped uncond (cfg 1) is a zero prediction, never None
        out = [cond_out, torch.zeros_like(cond_out)]
        if neg is not None:
            neg_model = self.negative_patcher.model
            if hasattr(neg_model, "current_patcher"):
                neg_model.current_patcher = self.negative_patcher
            out[1] = _calc_cond_batch(neg_model, [None, neg], x, timestep, model_options)[1]
        conds = [pos, neg]
        for fn in model_options.get("sampler_pre_cfg_function", []):
            args = {
                "conds": conds,
                "conds_out": out,
                "cond_scale": self.cfg,
                "timestep": timestep,
                "input": x,
                "sigma": timestep,
                "model": self.inner_model,
                "model_options": model_options,
            }
            out = fn(args)
        return comfy.samplers.cfg_function(
            self.inner_model, out[0], out[1], self.cfg, x, timestep, model_options=model_options, cond=pos, uncond=neg
        )


def _calc_cond_batch(model, conds: list, x, timestep, model_options: dict) -> list:
    """``calc_cond_batch`` as ``sampling_function`` calls it: through the model's
    ``sampler_calc_cond_batch_function`` when one is set. ``conds`` keeps the [cond, uncond] slots (the
    slot this model does not compute is None), so a hook sees the layout it expects."""
    hook = model_options.get("sampler_calc_cond_batch_function")
    if hook is not None:
        return hook({"conds": conds, "input": x, "sigma": timestep, "model": model, "model_options": model_options})
    return comfy.samplers.calc_cond_batch(model, conds, x, timestep, model_options)


def make_guider(
    model, positive, negative, cfg: float, offset: NPOOffset | None = None, strength: float = 1.0, negative_model=None
) -> NegativePassCFGGuider:
    if (offset is None) == (negative_model is None):
        raise NPOError("NPO CFG Guider: connect exactly one of npo_offset or negative_model.")
    if offset is not None:
        guider = NegativePassCFGGuider(apply_offset(model, offset, strength))
    elif negative_model.is_clone(model):
        # Two clones of one module cannot both hold their weights in one sampling step: express the negative
        # model as an offset over ``model`` and inject it on the uncond rows instead.
        diff = patch_difference(model, negative_model)
        guider = NegativePassCFGGuider(apply_offset(model, diff, 1.0) if diff.entries else model)
    else:
        check_supported_model(negative_model, "negative_model")
        if model_arch(negative_model) != model_arch(model):
            raise NPOError(
                f"negative_model is {model_arch(negative_model)} but model is {model_arch(model)}; they must "
                "be the same architecture."
            )
        guider = NegativePassCFGGuider(model, negative_model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider
