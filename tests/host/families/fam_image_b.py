"""Tiny image DiT families, part B: Chroma, Flux.2 klein (base), Qwen-Image, HiDream I1 full, Lumina 2, Z-Image.

Each ``build_model`` builds the config class ComfyUI itself detects for the checkpoint family, with a tiny
``unet_config`` (hidden 64 in 2 heads of 32, Z-Image 256 in 2 heads of 128; one block of each kind), and adapts
to the constructor of the running ComfyUI by what it accepts (dataclass fields, keyword parameters), never by version.
"""

from __future__ import annotations

import torch

from . import TinyFamily

_TXT = 8  # text tokens per prompt
_LAT = 8  # latent side


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _pos_neg(seed: int, make) -> tuple[list, list]:
    """(positive, negative): ``make(seed)`` -> [tensor, dict]; the negative from another seed."""
    return [make(seed)], [make(seed + 7919)]


def _accepted(fn) -> tuple[set[str], bool]:
    """(named parameters, takes **kwargs) of a plain Python function."""
    code = fn.__code__
    return set(code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]), bool(code.co_flags & 0x08)


def _dataclass_fields(cls) -> set[str]:
    return set(cls.__dataclass_fields__)


def _build(config_class: str, unet_config: dict):
    import comfy.supported_models

    return getattr(comfy.supported_models, config_class)(unet_config).get_model({})


# ---------------------------------------------------------------------------------------------
# Chroma (Flux architecture without guidance/vector input; a distilled "approximator" makes the modulations)
# ---------------------------------------------------------------------------------------------
def _chroma_model():
    import comfy.ldm.chroma.model

    fields = _dataclass_fields(comfy.ldm.chroma.model.ChromaParams)
    cfg = dict(
        image_model="chroma",
        in_channels=64,  # 16 latent channels x 2x2 patch, as model_detection sets it
        out_channels=64,
        context_in_dim=64,  # T5-XXL: 4096
        hidden_size=64,
        mlp_ratio=4.0,
        num_heads=2,
        depth=1,
        depth_single_blocks=1,
        axes_dim=[4, 14, 14],  # real: [16, 56, 56] (head dim 128)
        theta=10000,
        patch_size=2,
        qkv_bias=True,
        in_dim=64,  # fixed by the model: 16 + 16 + 32 (timestep, guidance, modulation-index embeddings)
        out_dim=64,  # = hidden_size
        hidden_dim=64,  # real: 5120
        n_layers=1,  # real: 5
    )
    if "txt_ids_dims" in fields:
        cfg["txt_ids_dims"] = []
    if "vec_in_dim" in fields:
        cfg["vec_in_dim"] = None
    return _build("Chroma", cfg)


def _chroma_conds(seed: int):
    # T5 only: no pooled output (Chroma.encode_adm would turn one into a "y" the model ignores)
    return _pos_neg(seed, lambda s: [_randn(s, 1, _TXT, 64), {"pooled_output": None}])


_FLUX_ATTN = [
    "double_blocks.0.img_attn.qkv",
    "double_blocks.0.img_attn.proj",
    "double_blocks.0.txt_attn.qkv",
    "double_blocks.0.txt_attn.proj",
    "single_blocks.0.linear1",  # fused qkv + MLP-in
    "single_blocks.0.linear2",  # fused attention-out + MLP-out
]

CHROMA = TinyFamily(
    name="chroma",
    config_class="Chroma",
    build_model=_chroma_model,
    conds=_chroma_conds,
    latent_shape=lambda b: (b, 16, _LAT, _LAT),
    cfg=4.0,
    attention_linears=list(_FLUX_ATTN),
    notes="ModelSamplingFlux (ModelType.FLUX, shift 1.15), latent_formats.Flux 16ch 4-D (EmptySD3LatentImage); "
    "guidance cond fixed to 0; modulations come from distilled_guidance_layer (in_dim 64, 344 vectors per row). "
    "Key map is Flux's: fused-qkv slices, norm_out 3-tuples (key, None, swap_scale_shift), targets Chroma lacks.",
)


# ---------------------------------------------------------------------------------------------
# Flux.2 [klein] base: Flux.2 layout (global modulation, no biases, SiLU-gated MLP, 4 rope axes), no guidance embed
# ---------------------------------------------------------------------------------------------
def _flux2_model():
    cfg = dict(
        image_model="flux2",
        in_channels=128,  # Flux2 latent (128 ch, /16), patch size 1
        out_channels=128,
        vec_in_dim=None,
        context_in_dim=64,  # klein 4B: 7680 (3 Qwen3-4B layers)
        hidden_size=64,  # klein 4B: 3072
        mlp_ratio=3.0,
        num_heads=2,
        depth=1,
        depth_single_blocks=1,
        axes_dim=[8, 8, 8, 8],  # real: [32, 32, 32, 32]
        theta=2000,
        patch_size=1,
        qkv_bias=False,
        guidance_embed=False,  # klein (base and distilled) has no guidance_in
        txt_ids_dims=[3],
        global_modulation=True,
        mlp_silu_act=True,
        ops_bias=False,
        default_ref_method="index",
        ref_index_scale=10.0,
    )
    import comfy.ldm.flux.model

    fields = _dataclass_fields(comfy.ldm.flux.model.FluxParams)
    for k in ("yak_mlp", "txt_norm"):
        if k in fields:
            cfg[k] = False
    return _build("Flux2", cfg)


def _flux2_conds(seed: int):
    # Flux2.extra_conds left-pads the text to 512 tokens
    return _pos_neg(seed, lambda s: [_randn(s, 1, _TXT, 64), {"pooled_output": None}])


FLUX2_KLEIN = TinyFamily(
    name="flux2_klein",
    config_class="Flux2",
    build_model=_flux2_model,
    conds=_flux2_conds,
    latent_shape=lambda b: (b, 128, _LAT, _LAT),
    cfg=5.0,
    attention_linears=list(_FLUX_ATTN),
    notes="ModelSamplingFlux (ModelType.FLUX, shift 2.02), latent_formats.Flux2 128ch 4-D (EmptyFlux2LatentImage, "
    "/16), patch 1; Flux2.extra_conds left-pads the context to 512 tokens; guidance cond passed but unused. "
    "Config class only on ComfyUI versions with Flux2 (not 0.3.64).",
)


# ---------------------------------------------------------------------------------------------
# Qwen-Image (MMDiT, separate q/k/v per stream)
# ---------------------------------------------------------------------------------------------
def _qwen_model():
    cfg = dict(
        image_model="qwen_image",
        patch_size=2,
        in_channels=64,  # 16 x 2x2, as model_detection reads it from img_in
        out_channels=16,
        num_layers=1,  # real: 60
        attention_head_dim=32,  # real: 128
        num_attention_heads=2,  # real: 24
        joint_attention_dim=64,  # Qwen2.5-VL 7B: 3584
        axes_dims_rope=[8, 12, 12],  # real: (16, 56, 56)
    )
    return _build("QwenImage", cfg)


def _qwen_conds(seed: int):
    # the Qwen TE drops attention_mask when nothing is masked (a single prompt)
    return _pos_neg(seed, lambda s: [_randn(s, 1, _TXT, 64), {}])


QWEN_IMAGE = TinyFamily(
    name="qwen_image",
    config_class="QwenImage",
    build_model=_qwen_model,
    conds=_qwen_conds,
    latent_shape=lambda b: (b, 16, 1, _LAT, _LAT),
    cfg=2.5,
    attention_linears=[
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.to_k",
        "transformer_blocks.0.attn.to_v",
        "transformer_blocks.0.attn.to_out.0",
        "transformer_blocks.0.attn.add_q_proj",
        "transformer_blocks.0.attn.add_k_proj",
        "transformer_blocks.0.attn.add_v_proj",
        "transformer_blocks.0.attn.to_add_out",
    ],
    notes="ModelSamplingFlux (ModelType.FLUX, shift 1.15), latent_formats.Wan21 (16ch, latent_dimensions 3): "
    "EmptySD3LatentImage gives 4-D [B,16,H,W], the KSampler node (common_ksampler -> fix_empty_latent_channels) "
    "unsqueezes it to 5-D [B,16,1,H,W] before comfy.sample.sample; the model needs 5-D.",
)


# ---------------------------------------------------------------------------------------------
# HiDream I1 full (double + single stream blocks, MoE feed-forward, T5 + per-block Llama-3.1 features)
# ---------------------------------------------------------------------------------------------
_HIDREAM_LLAMA_LAYERS = 2


def _hidream_model():
    cfg = dict(
        image_model="hidream",
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=1,  # real: 16
        num_single_layers=1,  # real: 32
        attention_head_dim=32,  # real: 128
        num_attention_heads=2,  # real: 20
        caption_channels=[64, 64],  # [T5, Llama]: real [4096, 4096]
        text_emb_dim=64,  # pooled CLIP-L + CLIP-G: real 2048
        num_routed_experts=4,
        num_activated_experts=2,
        axes_dims_rope=[16, 8, 8],  # real: [64, 32, 32]
        max_resolution=[128, 128],
        llama_layers=list(range(_HIDREAM_LLAMA_LAYERS)),  # one per block (real: 48 indices into 32 layers)
    )
    return _build("HiDream", cfg)


def _hidream_conds(seed: int):
    def make(s: int):
        return [
            _randn(s, 1, _TXT, 64),  # T5 -> c_crossattn
            {
                "pooled_output": _randn(s + 1, 1, 64),  # required: HiDream.encode_adm reads it unguarded
                "conditioning_llama3": _randn(s + 2, 1, _HIDREAM_LLAMA_LAYERS, _TXT, 64),
            },
        ]

    return _pos_neg(seed, make)


HIDREAM = TinyFamily(
    name="hidream_full",
    config_class="HiDream",
    build_model=_hidream_model,
    conds=_hidream_conds,
    latent_shape=lambda b: (b, 16, _LAT, _LAT),
    cfg=5.0,
    attention_linears=[
        "double_stream_blocks.0.block.attn1.to_q",
        "double_stream_blocks.0.block.attn1.to_k",
        "double_stream_blocks.0.block.attn1.to_v",
        "double_stream_blocks.0.block.attn1.to_out",
        "double_stream_blocks.0.block.attn1.to_q_t",
        "double_stream_blocks.0.block.attn1.to_k_t",
        "double_stream_blocks.0.block.attn1.to_v_t",
        "double_stream_blocks.0.block.attn1.to_out_t",
        "single_stream_blocks.0.block.attn1.to_q",
        "single_stream_blocks.0.block.attn1.to_k",
        "single_stream_blocks.0.block.attn1.to_v",
        "single_stream_blocks.0.block.attn1.to_out",
    ],
    notes="ModelSamplingDiscreteFlow (ModelType.FLOW, shift 1.0: sampling_settings is redefined empty; workflows add "
    "ModelSamplingSD3 shift 3), latent_formats.Flux "
    "16ch 4-D (EmptySD3LatentImage); conds: pooled_output (y), cross_attn (T5), conditioning_llama3 [B,layers,L,C]. "
    "MoE routed experts (ff_i.experts.N.w1/w2/w3) see 2-D [selected tokens of all rows, C]: no batch dim.",
)


# ---------------------------------------------------------------------------------------------
# Lumina Image 2.0 and Z-Image (both NextDiT, comfy.ldm.lumina.model; fused qkv)
# ---------------------------------------------------------------------------------------------
def _nextdit_config(**extra) -> dict:
    import comfy.ldm.lumina.model

    cfg = dict(
        image_model="lumina2",
        patch_size=2,
        in_channels=16,
        dim=64,
        cap_feat_dim=64,
        n_layers=1,
        n_refiner_layers=1,  # real: 2
        qk_norm=True,
    )
    cfg.update(extra)
    accepted, var_kw = _accepted(comfy.ldm.lumina.model.NextDiT.__init__)
    if not var_kw:
        cfg = {k: v for k, v in cfg.items() if k in accepted}
    return cfg


def _lumina2_model():
    cfg = _nextdit_config(
        n_heads=2,
        n_kv_heads=1,  # grouped-query attention (real: 24 / 8)
        axes_dims=[8, 12, 12],  # real: [32, 32, 32]
        axes_lens=[300, 512, 512],
        rope_theta=10000.0,
        ffn_dim_multiplier=4.0,
    )
    return _build("Lumina2", cfg)


def _zimage_model():
    cfg = _nextdit_config(
        dim=256,  # z_image_modulation needs dim >= 256 (adaLN input min(dim, 256) vs the 256-wide t_embedder)
        n_heads=2,  # real: 30 heads of 128 (dim 3840)
        n_kv_heads=2,
        axes_dims=[32, 48, 48],
        axes_lens=[1536, 512, 512],
        rope_theta=256.0,
        ffn_dim_multiplier=8.0 / 3.0,
        z_image_modulation=True,
        time_scale=1000.0,
        pad_tokens_multiple=32,  # real checkpoints have cap_pad_token / x_pad_token
    )
    return _build("ZImage", cfg)


def _nextdit_conds(seed: int):
    # the Gemma / Qwen3 TEs return a long attention mask, all ones for one prompt (extra_conds -> num_tokens only;
    # a float mask breaks older NextDiT, which sizes tensors with num_tokens)
    def make(s: int):
        return [_randn(s, 1, _TXT, 64), {"attention_mask": torch.ones(1, _TXT, dtype=torch.long)}]

    return _pos_neg(seed, make)


_NEXTDIT_ATTN = [
    "noise_refiner.0.attention.qkv",
    "noise_refiner.0.attention.out",
    "context_refiner.0.attention.qkv",
    "context_refiner.0.attention.out",
    "layers.0.attention.qkv",
    "layers.0.attention.out",
]

LUMINA2 = TinyFamily(
    name="lumina2",
    config_class="Lumina2",
    build_model=_lumina2_model,
    conds=_nextdit_conds,
    latent_shape=lambda b: (b, 16, _LAT, _LAT),
    cfg=4.0,
    attention_linears=list(_NEXTDIT_ATTN),
    notes="ModelSamplingDiscreteFlow (ModelType.FLOW, shift 6), latent_formats.Flux 16ch 4-D (EmptySD3LatentImage); "
    "fused qkv with GQA (q 64 + k 32 + v 32 rows); conds: cross_attn + attention_mask -> num_tokens. The diffusers "
    "key map (z_image_to_diffusers, where present) slices qkv as if k/v were dim wide: to_v out of range under GQA.",
)

ZIMAGE = TinyFamily(
    name="zimage",
    config_class="ZImage",
    build_model=_zimage_model,
    conds=_nextdit_conds,
    latent_shape=lambda b: (b, 16, _LAT, _LAT),
    cfg=4.0,
    attention_linears=list(_NEXTDIT_ATTN),
    notes="ModelSamplingDiscreteFlow (ModelType.FLOW, shift 3), latent_formats.Flux 16ch 4-D (EmptySD3LatentImage); "
    "NextDiT with z_image_modulation (tiny dim is 256: it cannot go lower), tokens padded to multiples of 32 "
    "(x_pad_token/cap_pad_token are parameters). Detection picks ZImage only for dim 3840; built directly here.",
)

FAMILIES: list[TinyFamily] = [CHROMA, FLUX2_KLEIN, QWEN_IMAGE, HIDREAM, LUMINA2, ZIMAGE]
