"""Tiny SD-UNet models of every SD-UNet config class in ``comfy.supported_models`` (host tier).

``tiny_unet(name, seed)`` builds the real ComfyUI config class ``name`` (so the pack sees that family:
``type(mp.model.model_config).__name__ == name``) around a CPU-fast UNet: model_channels 32, two levels,
one res block per level, transformer depth ≤ 1, 8-channel (or 8 per level) heads. What tells the classes apart
is kept: the text-context width (768 / 1024 / 1280 / 2048), ``adm_in_channels`` with ``num_classes`` for the
``y`` vector (SDXL micro-conditioning, the refiner's aesthetic score, unCLIP image embeddings, Lotus' task
embedding, SVD's fps/motion ids, SV3D's camera), the noise-level class embedding of the x4 upscaler, the
input channels (InstructPix2Pix 8, x4 upscaler 7, SVD / SV3D / Zero123 8), SVD's temporal res blocks and
attention, the x4 upscaler's disabled self-attention, the SSD-1B / Vega middle block without a transformer,
KOALA-700M's missing middle block, Zero123's ``cc_projection`` (772 → 768).

The shapes follow what ``comfy.model_detection`` reads off real checkpoints (its diffusers table lists the
depths: SSD-1B/Vega transformer_depth_middle -1, KOALA-700M -2); the config class then adds its
``unet_extra_config``. The model-config classes and ``model_base`` classes used here are the same in ComfyUI
v0.3.64, v0.14.1 and v0.33.0 (checked in the three trees).

``tiny_conds(mp, seed)`` gives (positive, negative) CONDITIONING as ComfyUI's own nodes make it for the class
(SDXL: pooled output + sizes, zeroed negative; SVD / SV3D / Zero123: the image-conditioning node's layout with
a blank ``concat_latent_image``); ``tiny_latent(mp, batch)`` a LATENT of the model's channels (for SVD / SV3D
the batch is the frame count). Together they sample with ``comfy.sample.sample`` at cfg > 1.

A name this kit cannot build raises ``NotTiny(reason)`` (a test turns it into a skip with that reason).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import comfy.model_patcher
import comfy.supported_models
import torch
from families import seeded_init

CPU = torch.device("cpu")
LATENT = 8  # latent side: 64 px
TOKENS = 8  # text tokens per prompt
HEAD_CHANNELS = 8  # classes whose real heads are 64 channels wide get 8-channel heads


class NotTiny(Exception):
    """This kit cannot build (or sample) a tiny model of the class; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Spec:
    """The tiny unet_config of one class and how its conditioning looks."""

    context: int  # the real text-context width (cross-attention k/v in_features)
    linear: bool  # use_linear_in_transformer (SD2/SDXL: Linear proj_in/out; SD1: 1x1 conv)
    conds: str  # tiny_conds layout: text, sdxl, refiner, zero123, svd, sv3d_u, sv3d_p
    depth: tuple[int, int] = (1, 1)  # transformer depth of the one res block of level 0, 1
    depth_output: tuple[int, int, int, int] = (1, 1, 1, 1)  # per output block (consumed from the end)
    middle: int = 1  # transformer_depth_middle: -2 no middle block, -1 res blocks only
    in_channels: int = 4
    adm: int | None = None  # adm_in_channels (with num_classes "sequential")
    heads_by_count: bool = False  # the class sets num_heads 8 (SD1 style); else 8-channel heads
    video: bool = False  # SVD's temporal res blocks and attention
    extra: dict = field(default_factory=dict)  # further unet_config entries (set after the class's own)


_SDXL = dict(context=2048, linear=True, conds="sdxl", depth=(0, 1), depth_output=(0, 0, 1, 1), adm=2816)
SPECS: dict[str, Spec] = {
    "SD15": Spec(context=768, linear=False, conds="text", heads_by_count=True),
    "SD15_instructpix2pix": Spec(context=768, linear=False, conds="text", in_channels=8, heads_by_count=True),
    "Stable_Zero123": Spec(context=768, linear=False, conds="zero123", in_channels=8, heads_by_count=True),
    "SD20": Spec(context=1024, linear=True, conds="text"),
    "SD21UnclipL": Spec(context=1024, linear=True, conds="text", adm=1536),
    "SD21UnclipH": Spec(context=1024, linear=True, conds="text", adm=2048),
    "LotusD": Spec(context=1024, linear=True, conds="text", adm=4),
    # x4 upscaler: 4 latent + 3 image channels in, the noise level as a class label (Embedding of 1000),
    # no self-attention on the outer levels (real: [True, True, True, False])
    "SD_X4Upscaler": Spec(
        context=1024,
        linear=True,
        conds="text",
        in_channels=7,
        heads_by_count=True,
        extra={"disable_self_attentions": [True, False], "num_classes": 1000},
    ),
    "SDXL": Spec(**_SDXL),
    "SDXL_instructpix2pix": Spec(**{**_SDXL, "in_channels": 8}),
    # SSD-1B: the middle block keeps its res blocks but no transformer; the up path is thinner than the down path
    "SSD1B": Spec(**{**_SDXL, "middle": -1, "depth_output": (0, 0, 1, 0)}),
    "Segmind_Vega": Spec(**{**_SDXL, "middle": -1}),
    "KOALA_700M": Spec(**{**_SDXL, "middle": -2}),  # no middle block at all
    "KOALA_1B": Spec(**_SDXL),
    "SDXLRefiner": Spec(context=1280, linear=True, conds="refiner", depth=(0, 1), depth_output=(0, 0, 1, 1), adm=2560),
    "SVD_img2vid": Spec(context=1024, linear=True, conds="svd", in_channels=8, adm=768, video=True),
    "SV3D_u": Spec(context=1024, linear=True, conds="sv3d_u", in_channels=8, adm=256, video=True),
    "SV3D_p": Spec(context=1024, linear=True, conds="sv3d_p", in_channels=8, adm=1280, video=True),
}

# what comfy.model_detection sets for a checkpoint with temporal blocks (SVD / SV3D)
_VIDEO = {
    "extra_ff_mix_layer": True,
    "use_spatial_context": True,
    "merge_strategy": "learned_with_images",
    "merge_factor": 0.0,
    "video_kernel_size": [3, 1, 1],
    "use_temporal_resblock": True,
    "use_temporal_attention": True,
    "disable_temporal_crossattention": False,
}


def unet_classes() -> list[str]:
    """The SD-UNet config classes this kit builds that the running ComfyUI has."""
    return [n for n in SPECS if hasattr(comfy.supported_models, n)]


def unet_config(name: str) -> dict:
    """The tiny unet_config given to the config class (before its unet_extra_config)."""
    s = SPECS[name]
    cfg = {
        "use_checkpoint": False,
        "image_size": 32,
        "use_spatial_transformer": True,
        "legacy": False,
        "in_channels": s.in_channels,
        "out_channels": 4,
        "model_channels": 32,
        "num_res_blocks": [1, 1],
        "channel_mult": [1, 2],
        "transformer_depth": list(s.depth),
        "transformer_depth_output": list(s.depth_output),
        "transformer_depth_middle": s.middle,
        "use_linear_in_transformer": s.linear,
        "context_dim": s.context,
        "adm_in_channels": s.adm,
        "use_temporal_resblock": False,
        "use_temporal_attention": False,
    }
    if s.adm is not None:
        cfg["num_classes"] = "sequential"
    if s.video:
        cfg.update(_VIDEO)
    return cfg


def model_config(name: str):
    """The config class ``name`` holding the tiny unet_config (heads narrowed after the class's own extras)."""
    if name not in SPECS:
        raise NotTiny(f"{name} is not an SD-UNet config class this kit builds")
    cls = getattr(comfy.supported_models, name, None)
    if cls is None:
        raise NotTiny(f"{name} is not in this ComfyUI")
    s = SPECS[name]
    cfg = cls(unet_config(name))
    if not s.heads_by_count:  # SD2 / SDXL / SVD / Lotus force 64-channel heads; the tiny model is narrower
        cfg.unet_config["num_heads"] = -1
        cfg.unet_config["num_head_channels"] = HEAD_CHANNELS
    cfg.unet_config.update(s.extra)
    return cfg


def _checkpoint_extras(name: str, seed: int) -> dict[str, torch.Tensor]:
    """Weights that ``get_model`` takes from the checkpoint rather than the UNet (Zero123's cc_projection:
    CLIP image embedding 768 + 4 camera values → 768)."""
    if name != "Stable_Zero123":
        return {}
    g = torch.Generator().manual_seed(10_000 + seed)
    return {
        "cc_projection.weight": torch.randn(768, 772, generator=g) / 772**0.5,
        "cc_projection.bias": 0.02 * torch.randn(768, generator=g),
    }


def build_model(name: str, seed: int = 0):
    """A fresh BaseModel of class ``name`` (UNet weights are torch.empty garbage). Under no_grad: ComfyUI
    0.3.64 / 0.14.1 copy Zero123's cc_projection into a Parameter in place (ComfyUI loads under inference mode)."""
    with torch.no_grad():
        return model_config(name).get_model(_checkpoint_extras(name, seed))


_PRISTINE: dict[tuple[str, int], dict[str, torch.Tensor]] = {}


def pristine(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The seeded UNet state dict of the tiny ``name`` (cached)."""
    key = (name, seed)
    if key not in _PRISTINE:
        m = build_model(name, seed)
        seeded_init(m.diffusion_model, seed)
        _PRISTINE[key] = {k: v.detach().clone() for k, v in m.diffusion_model.state_dict().items()}
    return {k: v.clone() for k, v in _PRISTINE[key].items()}


def tiny_unet(config_class_name: str, seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """A new ModelPatcher on a newly built tiny model of ``config_class_name`` with the seeded weights.
    Raises NotTiny for a class this kit does not build or the running ComfyUI lacks."""
    m = build_model(config_class_name, seed)
    missing, unexpected = m.diffusion_model.load_state_dict(pristine(config_class_name, seed), strict=True)
    assert not missing and not unexpected
    assert type(m.model_config).__name__ == config_class_name
    return comfy.model_patcher.ModelPatcher(m, CPU, CPU)


def _name(mp) -> str:
    name = type(mp.model.model_config).__name__
    if name not in SPECS:
        raise NotTiny(f"{name} is not an SD-UNet config class this kit builds")
    return name


def tiny_latent(mp, batch: int = 1) -> dict:
    """An empty LATENT for ``mp``: [batch, latent channels, 8, 8] (SVD / SV3D: batch = video frames)."""
    return {"samples": torch.zeros(batch, int(mp.model.latent_format.latent_channels), LATENT, LATENT)}


def tiny_conds(mp, seed: int = 1) -> tuple[list, list]:
    """(positive, negative) CONDITIONING for ``mp`` in the layout ComfyUI's nodes give the class."""
    name = _name(mp)
    s = SPECS[name]
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g)

    blank = torch.zeros(1, 4, LATENT, LATENT)  # the encoded start image of the image-conditioned classes
    if s.conds == "text":  # CLIP Text Encode (unCLIP without unCLIPConditioning: ComfyUI feeds a zero y)
        return [[rand(1, TOKENS, s.context), {}]], [[rand(1, TOKENS, s.context), {}]]
    if s.conds in ("sdxl", "refiner"):  # CLIPTextEncodeSDXL(/Refiner): pooled output + sizes; negative zeroed
        sizes = {"width": 64, "height": 64}
        if s.conds == "sdxl":
            sizes.update(target_width=64, target_height=64, crop_w=0, crop_h=0)
        pos = [[rand(1, TOKENS, s.context), {"pooled_output": rand(1, 1280), **sizes}]]
        neg_sizes = dict(sizes, aesthetic_score=2.5) if s.conds == "refiner" else sizes
        if s.conds == "refiner":
            pos[0][1]["aesthetic_score"] = 6.0
        neg = [[torch.zeros(1, TOKENS, s.context), {"pooled_output": torch.zeros(1, 1280), **neg_sizes}]]
        return pos, neg
    if s.conds == "zero123":  # StableZero123_Conditioning: [CLIP image embed 768 | camera 4], zeroed negative
        pooled = torch.cat([rand(1, 1, 768), torch.tensor([[[0.3, 0.9, 0.2, 0.0]]])], dim=-1)
        return (
            [[pooled, {"concat_latent_image": blank}]],
            [[torch.zeros_like(pooled), {"concat_latent_image": torch.zeros_like(blank)}]],
        )
    if s.conds in ("svd", "sv3d_u", "sv3d_p"):  # SVD_img2vid_Conditioning / SV3D_Conditioning
        pooled = rand(1, 1, s.context)  # the CLIP vision image embedding
        extra = {"concat_latent_image": blank}
        if s.conds == "svd":
            extra.update(motion_bucket_id=127, fps=6, augmentation_level=0.0)
        elif s.conds == "sv3d_p":
            extra.update(elevation=10.0, azimuth=0.0)
        neg = {**extra, "concat_latent_image": torch.zeros_like(blank)}
        return [[pooled, extra]], [[torch.zeros_like(pooled), neg]]
    raise NotTiny(f"no conditioning layout '{s.conds}' for {name}")
