"""What the pack reads off a ComfyUI model: its UNet, architecture, parameter names and weights.

Parameter names passed to ``npo_core`` are relative to the UNet (``input_blocks.1.1...weight``);
ComfyUI's own keys carry ``diffusion_model.`` (``PREFIX``).
"""

from __future__ import annotations

import logging

import comfy.lora
import comfy.utils
import torch

from ...npo_core import formats
from ...npo_core.errors import NPOError
from ...npo_core.offset import Dense, FullWeight, NPOOffset

PREFIX = "diffusion_model."
log = logging.getLogger("comfyui-npo")


def unet_of(mp) -> torch.nn.Module:
    return mp.model.diffusion_model


def model_arch(mp) -> str:
    return type(mp.model.model_config).__name__


def check_unet_model(mp, input_name: str = "model") -> None:
    """NPO offsets exist for SD1.x/SD2.x/SDXL-class UNets; refuse other architectures clearly."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    if not isinstance(getattr(mp.model, "diffusion_model", None), UNetModel):
        raise NPOError(
            f"{input_name}: {model_arch(mp)} is not a UNet model (SD1.5/SD2/SDXL family). NPO offsets are "
            "defined for those UNets only; this architecture is not supported."
        )


def compute_dtype(mp) -> torch.dtype:
    """The dtype the model's forward runs in (ComfyUI picks float16 for SD1.5/SDXL on most GPUs)."""
    return mp.model.get_dtype()


def context_dim(mp) -> int | None:
    ctx = mp.model.model_config.unet_config.get("context_dim")
    return int(ctx) if ctx is not None else None


def param_shapes(mp) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in unet_of(mp).state_dict().items()}


def diffusers_to_ldm(mp) -> dict[str, str]:
    return comfy.utils.unet_to_diffusers(mp.model.model_config.unet_config)


def original_weight(mp, name: str) -> torch.Tensor:
    """The parameter without any patcher's weight patches (from the shared backup if patched now)."""
    key = PREFIX + name
    bk = mp.backup.get(key)
    if bk is not None:
        return bk.weight
    return comfy.utils.get_attr(mp.model, key)


def patched_weight(mp, name: str) -> torch.Tensor:
    """The parameter as ``mp`` would have it: original weight + ``mp``'s weight patches (fp32)."""
    key = PREFIX + name
    w = original_weight(mp, name).float().clone()
    patches = mp.patches.get(key)
    if not patches:
        return w
    return comfy.lora.calculate_weight(patches, w, key)


def resolve_for_model(offset: NPOOffset, mp, reference=None, input_name: str = "npo_offset") -> NPOOffset:
    """Map the offset's keys onto ``mp``'s UNet (error on any key that does not land) and turn full
    weights into δ = file − reference (``reference`` defaults to ``mp`` with its patches)."""
    check_unet_model(mp)
    try:
        out = formats.resolve(offset, param_shapes(mp), diffusers_to_ldm(mp), model_arch(mp), context_dim(mp))
    except NPOError as e:
        raise NPOError(f"{input_name}: {e}") from None
    if any(isinstance(e, FullWeight) for e in out.entries.values()):
        ref = reference if reference is not None else mp
        full = [k for k, e in out.entries.items() if isinstance(e, FullWeight)]
        out = out.resolved_full_weights(lambda k: patched_weight(ref, k))
        if reference is None:
            _warn_if_far(out, full, ref, input_name)
        out = out.replace(
            entries={
                k: e for k, e in out.entries.items() if not (isinstance(e, Dense) and not torch.count_nonzero(e.delta))
            }
        )
    return out


# Self-NPO and Diffusion-NPO move a UNet by well under this (relative L2 over the file's weights); a
# fine-tune differs from its base by more. A heuristic: the message gives the measured value.
FAR_FROM_MODEL = 0.05


def _warn_if_far(resolved: NPOOffset, names: list[str], model, input_name: str) -> None:
    """Log when a full-weight file applied without base_model differs from the model by much more than
    an NPO offset would (a fine-tune: δ = file − fine-tune would then also undo the fine-tune)."""
    diff = sum(float(resolved.entries[k].delta.float().pow(2).sum()) for k in names if k in resolved.entries)
    norm = sum(float(patched_weight(model, k).float().pow(2).sum()) for k in names)
    rel = (diff / norm) ** 0.5 if norm > 0 else 0.0
    if rel > FAR_FROM_MODEL:
        log.warning(
            "NPO: %s is a full-weight NPO UNet that differs from the model it is applied to by %.1f%% (relative "
            "L2), much more than an NPO offset moves a model. If the model is a fine-tune, connect base_model on "
            "Load NPO Offset (the base the NPO UNet was trained from): δ is then file − base, and the fine-tune "
            "keeps its own weights in the negative pass.",
            input_name,
            100 * rel,
        )


def model_weights(mp, names) -> dict[str, torch.Tensor]:
    return {n: patched_weight(mp, n) for n in names}
