"""What the pack reads off a ComfyUI model: its diffusion model, family, parameter names and weights.

Parameter names passed to ``npo_core`` are relative to the diffusion model (``input_blocks.1.1...weight``
for SD UNets, ``blocks.0.self_attn.q.weight`` for Wan); ComfyUI's own keys carry ``diffusion_model.``
(``PREFIX``). The family is the ComfyUI model config ComfyUI detected (``SD3``, ``WAN21_T2V``, ...).
"""

from __future__ import annotations

import logging

import comfy.lora
import comfy.utils
import torch

from ...npo_core import formats
from ...npo_core.errors import NPOError
from ...npo_core.keymap import resolve_with_key_map
from ...npo_core.offset import Dense, FullWeight, NPOOffset

PREFIX = "diffusion_model."
log = logging.getLogger("comfyui-npo")


def unet_of(mp) -> torch.nn.Module:
    return mp.model.diffusion_model


def model_arch(mp) -> str:
    """The model family: the name of the ComfyUI model config detected for the checkpoint."""
    return type(mp.model.model_config).__name__


# unet_config entries that tell variants of one family apart (widths, depths, channels)
_VARIANT_KEYS = (
    "model_channels",
    "context_dim",
    "hidden_size",
    "dim",
    "depth",
    "num_layers",
    "n_layers",
    "depth_single_blocks",
    "num_single_layers",
    "in_channels",
    "in_dim",
    "out_dim",
    "num_heads",
    "n_heads",
    "ffn_dim",
    "model_type",
)


def model_variant(mp) -> str:
    """The architecture's size within its family: the config's widths and depths and the parameter count,
    e.g. ``dim=1536 in_dim=16 num_layers=30 params=1418996800`` (Wan 2.1 1.3B)."""
    cfg = mp.model.model_config.unet_config
    sizes = [f"{k}={cfg[k]}" for k in _VARIANT_KEYS if isinstance(cfg.get(k), (int, str))]
    params = sum(p.numel() for p in unet_of(mp).parameters())
    return " ".join([*sizes, f"params={params}"])


def is_unet(mp) -> bool:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return isinstance(getattr(mp.model, "diffusion_model", None), UNetModel)


# BaseModel classes the per-row negative pass cannot act on, and why
UNSUPPORTED = {
    "CosmosVideo": "Cosmos Predict1 keeps the batch off dim 0 inside its blocks (tensors are T·H·W·B·D), so the "
    "negative rows cannot be told apart per layer",
}


# per BaseModel class: module-name parts of layers whose input is the batch folded into dim 0, [B·L, ...]:
# HunyuanDiT's mlp_t5 gets [B·L, C]; CogVideoX 1.0's patch_embed.proj (Conv2d) gets [B·T, C, H, W]
FOLDED_ROWS = {"HunyuanDiT": ("mlp_t5.",), "CogVideoX": ("patch_embed.proj.",)}
# per BaseModel class: module-name parts of layers that see tokens of every row mixed, and why
MIXED_ROWS = {
    "HiDream": (
        (".experts.",),
        "HiDream's routed mixture-of-experts layers (…ff_i.experts.N) each see the tokens routed to them from every "
        "row at once, so an offset there cannot act on the negative rows only",
    )
}


def folded_layers(mp, offset: NPOOffset) -> frozenset[str]:
    """The offset's modules (names relative to the diffusion model) whose input folds the batch into dim 0."""
    parts = FOLDED_ROWS.get(type(mp.model).__name__, ())
    return frozenset(m for m in offset.modules() if any(p in f".{m}." for p in parts))


def check_rows(offset: NPOOffset, mp, input_name: str = "npo_offset") -> None:
    """Refuse an offset on layers whose rows mix the batch, naming the layers."""
    parts, reason = MIXED_ROWS.get(type(mp.model).__name__, ((), ""))
    bad = [m for m in offset.modules() if any(p in f".{m}." for p in parts)]
    if bad:
        raise NPOError(
            f"{input_name}: {len(bad)} layers of the offset, e.g. '{bad[0]}', cannot take it: {reason}. Use an "
            "offset without those layers (attention and shared-expert layers work)."
        )


def check_supported_model(mp, input_name: str = "model") -> None:
    """Refuse families the per-row negative pass cannot act on, naming the family and the reason."""
    base = type(mp.model).__name__
    reason = UNSUPPORTED.get(base)
    if reason is None and getattr(mp.model, "diffusion_model", None) is None:
        reason = "it has no diffusion model"
    if reason is not None:
        raise NPOError(f"{input_name}: {model_arch(mp)} is not supported by NPO: {reason}.")


def check_unet_model(mp, input_name: str = "model") -> None:
    """Self-NPO training is built for SD1.x/SD2.x/SDXL-class UNets; refuse other architectures clearly."""
    if not is_unet(mp):
        raise NPOError(
            f"{input_name}: {model_arch(mp)} is not a UNet model (SD1.5/SD2/SDXL family). Self-NPO Train supports "
            "those UNets only so far; Apply NPO, NPO Negative Model and NPO CFG Guider take offsets for this "
            "family."
        )


def compute_dtype(mp) -> torch.dtype:
    """The dtype the model's forward runs in (ComfyUI picks float16 for SD1.5/SDXL on most GPUs)."""
    return mp.model.get_dtype()


def context_dim(mp) -> int | None:
    ctx = mp.model.model_config.unet_config.get("context_dim")
    return int(ctx) if ctx is not None else None


def param_shapes(mp) -> dict[str, tuple[int, ...]]:
    """Parameter name → the shape the layer computes with. Quantized layers may save another layout than
    they compute with (ComfyUI-GGUF's state dict holds raw Q-blocks), so parameters win over saved tensors."""
    unet = unet_of(mp)
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    shapes.update({k: tuple(p.shape) for k, p in unet.named_parameters()})
    return shapes


def diffusers_to_ldm(mp) -> dict[str, str]:
    return comfy.utils.unet_to_diffusers(mp.model.model_config.unet_config)


def original_weight(mp, name: str) -> torch.Tensor:
    """The parameter without any patcher's weight patches (from the shared backup if patched now)."""
    key = PREFIX + name
    bk = mp.backup.get(key)
    if bk is not None:
        return bk.weight
    return comfy.utils.get_attr(mp.model, key)


def dequantized(mp, name: str, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in float32 as ComfyUI's patcher reads it before patching: a layer's ``convert_<param>``
    dequantizes (scaled fp8: × scale_weight); mixed-precision weights dequantize on ``.float()``. Detached:
    the fp8 weights of ComfyUI 0.3.x require grad."""
    import comfy.model_patcher

    _, _, convert = comfy.model_patcher.get_key_weight(mp.model, PREFIX + name)
    w = weight.detach().to(dtype=torch.float32, copy=True)
    if convert is not None:
        w = convert(w, inplace=True).float()
    return w


def patched_weight(mp, name: str) -> torch.Tensor:
    """The parameter as ``mp`` would have it: original weight + ``mp``'s weight patches (fp32)."""
    key = PREFIX + name
    w = dequantized(mp, name, original_weight(mp, name))
    patches = mp.patches.get(key)
    if not patches:
        return w
    return comfy.lora.calculate_weight(patches, w, key)


# the pack's names for the SD UNet families an offset file can be detected as (formats.detect_base_arch)
UNET_ARCHS = ("SD15", "SD2", "SDXL")


def check_family(offset: NPOOffset, mp, input_name: str = "npo_offset") -> None:
    """An offset recorded (or detected) as made for one family, applied to another, is an error naming both."""
    made_for = offset.base_arch or "unknown"
    if made_for.startswith("unknown"):
        return
    family = model_arch(mp)
    unet_offset = made_for in UNET_ARCHS
    if unet_offset == is_unet(mp) and (unet_offset or made_for == family):
        variant = offset.metadata.get("npo.base_variant")
        if variant and not unet_offset and variant != model_variant(mp):
            raise NPOError(
                f"{input_name}: {offset.source or 'the offset'} was made for {made_for} ({variant}) but the model is "
                f"{family} ({model_variant(mp)}): another size of the family. Use an offset made for this model."
            )
        return
    raise NPOError(
        f"{input_name}: {offset.source or 'the offset'} was made for {made_for} but the model is {family}. An NPO "
        "offset works only on the family it was made for; load one made for this model, or train one with "
        "Self-NPO Train."
    )


def resolve_for_model(offset: NPOOffset, mp, reference=None, input_name: str = "npo_offset") -> NPOOffset:
    """Map the offset's keys onto ``mp``'s diffusion model (error on any key that does not land) and turn
    full weights into δ = file − reference (``reference`` defaults to ``mp`` with its patches).

    SD UNets map LDM, diffusers and kohya names (``comfy.utils.unet_to_diffusers``); every other family maps
    through ComfyUI's LoRA key map (``comfy.lora.model_lora_keys_unet``), slices of fused weights included."""
    check_supported_model(mp)
    check_family(offset, mp, input_name)
    try:
        if is_unet(mp):
            out = formats.resolve(offset, param_shapes(mp), diffusers_to_ldm(mp), model_arch(mp), context_dim(mp))
        else:
            key_map = comfy.lora.model_lora_keys_unet(mp.model, {})
            out = resolve_with_key_map(offset, key_map, param_shapes(mp), PREFIX, model_arch(mp))
            if out.base_arch.startswith("unknown"):
                out = out.replace(base_arch=model_arch(mp))
            if "npo.base_variant" not in out.metadata:
                out = out.replace(metadata={**out.metadata, "npo.base_variant": model_variant(mp)})
    except NPOError as e:
        raise NPOError(f"{input_name}: {e}") from None
    check_rows(out, mp, input_name)
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
