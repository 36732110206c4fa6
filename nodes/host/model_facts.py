"""What the pack reads off a ComfyUI model: its diffusion model, family, parameter names and weights.

Parameter names passed to ``npo_core`` are relative to the diffusion model (``input_blocks.1.1...weight``
for SD UNets, ``blocks.0.self_attn.q.weight`` for Wan); ComfyUI's own keys carry ``diffusion_model.``
(``PREFIX``). The family is the ComfyUI model config ComfyUI detected (``SD3``, ``WAN21_T2V``, ...).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.lora
import comfy.utils
import torch

from ...npo_core import families, formats
from ...npo_core.errors import NPOError
from ...npo_core.families import Family
from ...npo_core.keymap import resolve_with_key_map
from ...npo_core.offset import Dense, Factored, FullWeight, NPOOffset
from . import adapters

PREFIX = "diffusion_model."
log = logging.getLogger("comfyui-npo")


def unet_of(mp) -> torch.nn.Module:
    return mp.model.diffusion_model


def model_arch(mp) -> str:
    """The model family: the name of the ComfyUI model config detected for the checkpoint."""
    return type(mp.model.model_config).__name__


def family(mp) -> Family:
    """The pack's record of the model's family, found through the MRO of its ComfyUI model-config class."""
    mro = [c.__name__ for c in type(mp.model.model_config).__mro__]
    return families.family_for(mro, unet=is_unet(mp))


def model_variant(mp) -> str:
    """The architecture's size within its family: the config's widths and depths and the parameter count,
    e.g. ``dim=1536 in_dim=16 num_layers=30 params=1418996800`` (Wan 2.1 1.3B)."""
    cfg = mp.model.model_config.unet_config
    sizes = [f"{k}={cfg[k]}" for k in family(mp).variant_keys if isinstance(cfg.get(k), (int, str))]
    params = sum(p.numel() for p in unet_of(mp).parameters())
    return " ".join([*sizes, f"params={params}"])


def is_unet(mp) -> bool:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return isinstance(getattr(mp.model, "diffusion_model", None), UNetModel)


def folded_layers(mp, offset: NPOOffset) -> frozenset[str]:
    """The offset's modules (names relative to the diffusion model) whose input folds the batch into dim 0."""
    parts = family(mp).folded_rows
    return frozenset(m for m in offset.modules() if any(p in f".{m}." for p in parts))


def check_rows(offset: NPOOffset, mp, input_name: str = "npo_offset", fam: Family | None = None) -> None:
    """Refuse an offset on layers whose rows mix the batch, naming the layers."""
    fam = fam or family(mp)
    bad = [m for m in offset.modules() if any(p in f".{m}." for p in fam.mixed_rows)]
    if bad:
        raise NPOError(
            f"{input_name}: {len(bad)} layers of the offset, e.g. '{bad[0]}', cannot take it: {fam.mixed_reason}. "
            "Use an offset without those layers (attention and shared-expert layers work)."
        )


def check_supported_model(mp, input_name: str = "model", fam: Family | None = None) -> None:
    """Refuse families the per-row negative pass cannot act on, naming the family and the reason."""
    if getattr(mp.model, "diffusion_model", None) is None:
        raise NPOError(f"{input_name}: {model_arch(mp)} is not supported by NPO: it has no diffusion model.")
    fam = fam or family(mp)
    if fam.unsupported is not None:
        raise NPOError(f"{input_name}: {fam.name} is not supported by NPO: {fam.unsupported}.")


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


def check_family(offset: NPOOffset, mp, input_name: str = "npo_offset", fam: Family | None = None) -> None:
    """An offset recorded (or detected) as made for one family, applied to another, is an error naming both."""
    made_for = offset.base_arch or "unknown"
    fam = fam or family(mp)
    if not fam.takes_offsets_made_for(made_for):
        raise NPOError(
            f"{input_name}: {offset.source or 'the offset'} was made for {made_for} but the model is {fam.name}. "
            "An NPO offset works only on the family it was made for; load one made for this model, or train one "
            "with Self-NPO Train."
        )
    variant = offset.metadata.get("npo.base_variant")
    if variant and not fam.unet and variant != model_variant(mp):
        raise NPOError(
            f"{input_name}: {offset.source or 'the offset'} was made for {made_for} ({variant}) but the model is "
            f"{fam.name} ({model_variant(mp)}): another size of the family. Use an offset made for this model."
        )


def resolve_for_model(offset: NPOOffset, mp, reference=None, input_name: str = "npo_offset") -> NPOOffset:
    """Map the offset's keys onto ``mp``'s diffusion model (error on any key that does not land) and turn
    full weights into δ = file − reference (``reference`` defaults to ``mp`` with its patches).

    SD UNets map LDM, diffusers and kohya names (``comfy.utils.unet_to_diffusers``); every other family maps
    through ComfyUI's LoRA key map (``comfy.lora.model_lora_keys_unet``), slices of fused weights included."""
    fam = family(mp)
    check_supported_model(mp, fam=fam)
    check_family(offset, mp, input_name, fam)
    try:
        offset = adapters.expanded(offset)
        if is_unet(mp):
            out = formats.resolve(offset, param_shapes(mp), diffusers_to_ldm(mp), fam.name, context_dim(mp))
        else:
            key_map = comfy.lora.model_lora_keys_unet(mp.model, {})
            out = resolve_with_key_map(offset, key_map, param_shapes(mp), PREFIX, fam.name)
            if out.base_arch.startswith("unknown"):
                out = out.replace(base_arch=fam.name)
            if "npo.base_variant" not in out.metadata:
                out = out.replace(metadata={**out.metadata, "npo.base_variant": model_variant(mp)})
    except NPOError as e:
        raise NPOError(f"{input_name}: {e}") from None
    check_rows(out, mp, input_name, fam)
    ref = reference if reference is not None else mp
    if any(isinstance(e, Factored) for e in out.entries.values()):
        try:
            out = out.resolved_decompositions(lambda k: patched_weight(ref, k))
        except NPOError as e:
            raise NPOError(f"{input_name}: {e}") from None
    if any(isinstance(e, FullWeight) for e in out.entries.values()):
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


@dataclass(frozen=True)
class LatentLayout:
    """The latent the sampler gets: [B, C, h, w] (rank 4) or [B, C, t, h, w] (rank 5); pixels per latent
    cell in space and frames per latent frame in time."""

    channels: int
    rank: int
    spatial_factor: int
    temporal_factor: int

    @property
    def text(self) -> str:
        return "video [B, C, frames, h, w]" if self.rank == 5 else "image [B, C, h, w]"

    def takes(self, samples: torch.Tensor) -> bool:
        """A LATENT's samples fit (an image latent also fits a video model: the sampler adds the time axis)."""
        ok_rank = samples.dim() == self.rank or (self.rank == 5 and samples.dim() == 4)
        return ok_rank and samples.shape[1] == self.channels

    def pool_shape(self, width: int, height: int, frames: int) -> tuple[int, ...]:
        """A data-free pool sample's latent, as ComfyUI's empty-latent nodes make it for the family."""
        spatial = (height // self.spatial_factor, width // self.spatial_factor)
        if self.rank == 5:
            return (1, self.channels, (frames - 1) // self.temporal_factor + 1, *spatial)
        return (1, self.channels, *spatial)


# Latent factors for ComfyUI releases whose latent formats do not declare them: v0.3.64 has no
# ``spacial_downscale_ratio``, v0.14.1 and older no ``temporal_downscale_ratio``. The values are the ones later
# releases declare and the older releases' own empty-latent nodes already use (EmptyLTXVLatentVideo height // 32 and
# ((length − 1) // 8) + 1, EmptyHunyuanLatentVideo and the Wan nodes ((length − 1) // 4) + 1, Wan 2.2 5B's
# latent // 16, EmptyCosmosLatentVideo // 8, EmptyMochiLatentVideo // 6). Looked up along the format's class
# hierarchy (Wan22 is a Wan21).
SPATIAL_FACTORS = {"LTXV": 32, "Wan22": 16, "HunyuanImage21": 32, "HunyuanVideo15": 16, "Flux2": 16}
TEMPORAL_FACTORS = {"Wan21": 4, "HunyuanVideo": 4, "HunyuanVideo15": 4, "CogVideoX": 4, "Mochi": 6, "LTXV": 8,
                    "Cosmos1CV8x8x8": 8}


def _factor(fmt, attribute: str, known: dict[str, int], default: int) -> int:
    """The format's declared factor, else the value of ``known`` for the nearest class of its hierarchy."""
    declared = getattr(fmt, attribute, None)
    if declared is not None:
        return int(declared)
    for cls in type(fmt).__mro__:
        if cls.__name__ in known:
            return known[cls.__name__]
    return default


def latent_layout(mp) -> LatentLayout:
    fmt = mp.model.latent_format
    return LatentLayout(
        channels=int(fmt.latent_channels),
        rank=2 + int(getattr(fmt, "latent_dimensions", 2)),
        spatial_factor=_factor(fmt, "spacial_downscale_ratio", SPATIAL_FACTORS, 8),
        temporal_factor=_factor(fmt, "temporal_downscale_ratio", TEMPORAL_FACTORS, 1),
    )


def schedule_kind(mp) -> tuple[str | None, str]:
    """(the TDFT schedule kind, the model_sampling's name). Kinds: "vp" (discrete eps / v / x0 prediction),
    "vp_zsnr" (V_PREDICTION_DDPM, zero terminal SNR), "flow" (CONST: DiscreteFlow and Flux sampling, with the
    model's shift); None for a schedule the trainer does not know (e.g. continuous EDM). Judged on the
    model_sampling the model will really run with, so a ModelSampling* node counts."""
    import comfy.model_sampling as ms_types

    ms = mp.get_model_object("model_sampling")
    bases = type(ms).__bases__  # ModelSampling* nodes build a class from (schedule, prediction type)
    text = " + ".join(b.__name__ for b in bases) if len(bases) > 1 else type(ms).__name__
    table = getattr(ms, "sigmas", None)
    zsnr = getattr(ms_types, "V_PREDICTION_DDPM", None)
    if table is not None and table.dim() == 1 and table.shape[0] >= 100:
        if isinstance(ms, ms_types.CONST):
            return "flow", text
        if zsnr is not None and isinstance(ms, zsnr) and isinstance(ms, ms_types.ModelSamplingDiscrete):
            return "vp_zsnr", text
        if isinstance(ms, ms_types.ModelSamplingDiscrete) and isinstance(ms, ms_types.EPS):
            return "vp", text
    return None, text


def guidance_distilled(mp) -> bool:
    """Samples at cfg 1: a guidance-distilled family, or a config that embeds the guidance (Flux.1 dev)."""
    return family(mp).guidance_distilled or bool(mp.model.model_config.unet_config.get("guidance_embed"))


@dataclass(frozen=True)
class ModelFacts:
    """Everything the pack reads off a ComfyUI model once: family record, config class, latent, schedule."""

    family: Family
    config: str  # the ComfyUI model-config class
    latent: LatentLayout
    schedule_kind: str | None  # vp, vp_zsnr, flow; None: a schedule the trainer does not know
    sampling: str  # the model_sampling's class name(s), for messages
    guidance_distilled: bool


def describe(mp) -> ModelFacts:
    kind, text = schedule_kind(mp)
    return ModelFacts(family(mp), model_arch(mp), latent_layout(mp), kind, text, guidance_distilled(mp))
