"""What a model family is, said once: one frozen record per ComfyUI model-config class the pack knows.

A family is keyed by the name of its ComfyUI model-config class (``comfy.supported_models.SDXL``, ``WAN21_T2V``,
...) and found through that class's MRO (``family_for``): ``SSD1B(SDXL)`` has a record of its own; a config class
without one takes its nearest ancestor's record under its own name. Pure data: no ComfyUI import.

``name`` is what Self-NPO Train writes into an offset file as ``npo.base_arch`` and what messages call the
family; ``lineage`` is the SD base a third-party UNet offset is detected as from its text-context width
(``SD15``, ``SD2``, ``SDXL``), whose offsets the family also takes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

# LoRA target presets (module-name regexes under the diffusion model): the authors' UNet attention projections
UNET_PRESETS = {
    "attention": r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
    "attention+ff": r"(\.attn[12]\.(to_q|to_k|to_v|to_out\.0)|\.ff\.net\.(0\.proj|2))$",
    "all": r".*",
}
# a DiT's attention linears (children of a module named *attn* / *attention*) and its feed-forward linears
_DIT_ATTENTION = r"(^|\.)[a-z0-9_]*(attn|attention)[a-z0-9_]*\.[a-z0-9_]+(\.0)?$"
_DIT_FF = r"(^|\.)(mlp|ff|ffn|feed_forward|ff_[a-z]+|[a-z_]*_mlp)(\.[a-z0-9_]+)+$"
DIT_PRESETS = {"attention": _DIT_ATTENTION, "attention+ff": f"({_DIT_ATTENTION})|({_DIT_FF})", "all": r".*"}
PRESET_NAMES = tuple(UNET_PRESETS)

# unet_config entries that tell variants of one family apart (widths, depths, channels)
VARIANT_KEYS = (
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


@dataclass(frozen=True)
class LearningRates:
    """Self-NPO Train's learning_rate "auto": full mode (the authors' values) and lora mode (a starting point)."""

    full: float
    lora: float
    full_weight_decay: float


LEARNING_RATES = {
    "sd": LearningRates(full=1e-6, lora=1e-4, full_weight_decay=1e-3),  # SD1.5 (the authors), SD2, DiTs
    "sdxl": LearningRates(full=1e-7, lora=2e-5, full_weight_decay=0.0),  # SDXL (the authors)
}


@dataclass(frozen=True)
class Family:
    """One ComfyUI model-config class: how the pack names it, whether it is a UNet, and what NPO must know."""

    config: str  # the ComfyUI model-config class
    name: str  # written into files (npo.base_arch) and named in messages
    unet: bool  # an SD-style UNet (comfy's UNetModel) rather than a DiT
    lineage: str | None = None  # UNet: the SD base detected from a file's text context (SD15, SD2, SDXL)
    text_context: int | None = None  # a file whose cross-attention is this wide is detected as this family
    unsupported: str | None = None  # why the per-row negative pass cannot act on it
    folded_rows: tuple[str, ...] = ()  # module-name parts of layers whose input folds the batch into dim 0
    mixed_rows: tuple[str, ...] = ()  # module-name parts of layers that see the tokens of every row mixed
    mixed_reason: str = ""
    lora_presets: tuple[tuple[str, str], ...] = ()  # presets of its own, over the kind's defaults
    guidance_distilled: bool = False  # samples at cfg 1
    lr_group: str = "sd"  # LEARNING_RATES key
    modelspec: str | None = None  # SAI model-spec architecture id of its LoRAs
    variant_keys: tuple[str, ...] = field(default=VARIANT_KEYS)

    def preset(self, name: str) -> str:
        """The module-name regex of a lora_layers preset (a name not a preset is taken as a regex)."""
        own = dict(self.lora_presets)
        if name in own:
            return own[name]
        return (UNET_PRESETS if self.unet else DIT_PRESETS).get(name, name)

    @property
    def learning_rates(self) -> LearningRates:
        return LEARNING_RATES[self.lr_group]

    @property
    def modelspec_architecture(self) -> str:
        return self.modelspec or f"{self.name}/lora"

    def takes_offsets_made_for(self, made_for: str) -> bool:
        """Whether an offset recorded (or detected) as made for ``made_for`` may be applied to this family:
        its own name, or (UNets) the SD base it descends from; "unknown..." is left to the key checks."""
        if not made_for or made_for.startswith("unknown"):
            return True
        return made_for == self.name or (self.unet and self.lineage is not None and made_for == self.lineage)


def _sd(config: str, name: str | None = None, lineage: str | None = None, **kw) -> Family:
    return Family(config=config, name=name or config, unet=True, lineage=lineage, **kw)


def _dit(config: str, **kw) -> Family:
    return Family(config=config, name=config, unet=False, **kw)


_COSMOS1 = (
    "Cosmos Predict1 keeps the batch off dim 0 inside its blocks (tensors are T·H·W·B·D), so the negative rows "
    "cannot be told apart per layer"
)
_HIDREAM_EXPERTS = (
    "HiDream's routed mixture-of-experts layers (…ff_i.experts.N) each see the tokens routed to them from every "
    "row at once, so an offset there cannot act on the negative rows only"
)
# CogVideoX (comfy.ldm.cogvideo.model.CogVideoXBlock) holds its linears directly on the block: blocks.N.q / k / v /
# attn_out (the joint text+video self-attention; diffusers' attn1.to_q / to_k / to_v / to_out.0), ff_proj / ff_out
_COGVIDEOX_ATTENTION = r"(^|\.)blocks\.[0-9]+\.(q|k|v|attn_out)$"

RECORDS: tuple[Family, ...] = (
    # SD UNets: the names written into files are those the pack wrote before this table existed
    _sd("SD15", lineage="SD15", text_context=768, modelspec="stable-diffusion-v1/lora"),
    _sd("SD15_instructpix2pix", lineage="SD15"),
    _sd("SD20", name="SD2", lineage="SD2", text_context=1024, modelspec="stable-diffusion-v2/lora"),
    _sd("SD21UnclipL", name="SD2", lineage="SD2", modelspec="stable-diffusion-v2/lora"),
    _sd("SD21UnclipH", lineage="SD2"),
    _sd("LotusD", lineage="SD2"),
    _sd("SD_X4Upscaler"),
    _sd("SDXL", lineage="SDXL", text_context=2048, lr_group="sdxl", modelspec="stable-diffusion-xl-v1-base/lora"),
    _sd("SDXL_instructpix2pix", lineage="SDXL", lr_group="sdxl"),
    _sd("SSD1B", lineage="SDXL", lr_group="sdxl"),
    _sd("Segmind_Vega", lineage="SDXL", lr_group="sdxl"),
    _sd("KOALA_700M", lineage="SDXL", lr_group="sdxl"),
    _sd("KOALA_1B", lineage="SDXL", lr_group="sdxl"),
    _sd("SDXLRefiner", text_context=1280, lr_group="sdxl"),
    _sd("SVD_img2vid"),
    _sd("Stable_Zero123"),
    # DiT / flow families
    _dit("SD3"),
    _dit("AuraFlow"),
    _dit("PixArtAlpha"),
    _dit("PixArtSigma"),
    _dit("HunyuanDiT", folded_rows=("mlp_t5.",)),  # mlp_t5 gets [B·L, C]
    _dit("Stable_Cascade_C"),
    _dit("Flux"),  # Flux.1 dev says guidance_embed in its unet_config (checked on the model)
    _dit("FluxSchnell", guidance_distilled=True),
    _dit("Flux2"),
    _dit("Chroma"),
    _dit("QwenImage"),
    _dit("HiDream", mixed_rows=(".experts.",), mixed_reason=_HIDREAM_EXPERTS),
    _dit("Lumina2"),
    _dit("ZImage"),
    _dit("WAN21_T2V"),
    _dit("WAN22_T2V"),
    _dit("HunyuanVideo"),
    _dit("HunyuanVideo15"),
    _dit("LTXV"),
    _dit("Kandinsky5"),
    _dit("Kandinsky5Image"),
    _dit("CosmosT2V", unsupported=_COSMOS1),
    _dit(
        "CogVideoX_T2V",
        folded_rows=("patch_embed.proj.",),  # the patch-embedding Conv2d gets [B·T, C, H, W]
        lora_presets=(
            ("attention", _COGVIDEOX_ATTENTION),
            ("attention+ff", rf"({_COGVIDEOX_ATTENTION})|((^|\.)blocks\.[0-9]+\.(ff_proj|ff_out)$)"),
        ),
    ),
)
BY_CONFIG = {r.config: r for r in RECORDS}
BY_NAME: dict[str, Family] = {}
for _r in RECORDS:
    BY_NAME.setdefault(_r.name, _r)
SD_LINEAGES = tuple(dict.fromkeys(r.lineage for r in RECORDS if r.lineage))


def family_for(config_mro: Sequence[str], unet: bool) -> Family:
    """The record of a model-config class, given the names of its MRO (the class first): its own, else its
    nearest ancestor's under the class's own name (modelspec id dropped), else a plain record of the kind
    ``unet`` says."""
    if not config_mro:
        raise ValueError("config_mro: empty")
    own = config_mro[0]
    for name in config_mro:
        record = BY_CONFIG.get(name)
        if record is not None:
            if name == own:
                return record
            return replace(record, config=own, name=own, text_context=None, modelspec=None)
    return Family(config=own, name=own, unet=unet)


# What a file's module names look like when they do not land (no npo.base_arch to say): a regex over the
# name with dots written as underscores (kohya style), and the families it suggests; the first that most
# keys match wins. Names come from ComfyUI's model classes and the diffusers layouts its LoRA key maps read.
KEY_MARKS: tuple[tuple[str, str], ...] = (
    (r"(^|_)(input_blocks|output_blocks|middle_block|down_blocks|up_blocks|mid_block)_", "SD UNets (SD15, SD2, SDXL)"),
    (r"(^|_)(double_stream_blocks|single_stream_blocks)_", "HiDream"),
    (r"(^|_)joint_blocks_", "SD3 / SD3.5 (MMDiT)"),
    (r"(^|_)(double_layers|single_layers)_", "AuraFlow"),
    (r"(^|_)(double_blocks|single_blocks|single_transformer_blocks)_", "Flux, Chroma or HunyuanVideo"),
    (r"(^|_)transformer_blocks_\d+_(img_mod|txt_mod|img_mlp|txt_mlp)", "QwenImage"),
    (r"(^|_)blocks_\d+_(self_attn|cross_attn)_(q|k|v|o)(_|$)", "Wan 2.x (WAN21_T2V, WAN22_T2V)"),
    (r"(^|_)(noise_refiner|context_refiner)_", "Lumina2 / ZImage"),
)


def looks_like(module_names: Sequence[str]) -> str | None:
    """The family description of ``KEY_MARKS`` that most of ``module_names`` match, or None."""
    best, count = None, 0
    flat = [n.split(" ", 1)[0].replace(".", "_") for n in module_names]  # "module (weight)" → module
    for pattern, what in KEY_MARKS:
        rx = re.compile(pattern)
        n = sum(1 for name in flat if rx.search(name))
        if n > count:
            best, count = what, n
    return best


def detected_from_context(context: int) -> str | None:
    """The family name a UNet offset file is detected as from its cross-attention width, or None."""
    return next((r.name for r in RECORDS if r.text_context == context), None)


def modelspec_architecture(name: str) -> str:
    """The SAI model-spec architecture id for an offset made for the family named ``name``."""
    record = BY_NAME.get(name)
    return record.modelspec_architecture if record is not None else f"{name or 'unknown'}/lora"
