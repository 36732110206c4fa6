"""Tiny video families: Wan 2.1, Wan 2.2 5B, HunyuanVideo 1.5, LTX-Video, Kandinsky 5 (video and image), Cosmos 1,
CogVideoX.

Every model is built from ComfyUI's own config class (``comfy.supported_models``) with a tiny unet_config:
hidden 64, 2 heads of 32, one block per stack. Latents are 1 frame of 8x8 (4x4 where the family patchifies
by 1; 2 frames for Cosmos and CogVideoX, whose layers fold or move the batch with T), so a 2-step batch-2
sample stays well under a second on one CPU thread.
"""

from __future__ import annotations

import torch

from . import TinyFamily

_L = 8  # text tokens


def _build(config_class: str, unet_config: dict):
    def build():
        import comfy.supported_models

        cfg = getattr(comfy.supported_models, config_class)(dict(unet_config))
        return cfg.get_model({})

    return build


def _text_pair(seed: int, dim: int, tokens: int = _L) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, dim, generator=g), torch.randn(1, tokens, dim, generator=g)


def _plain_conds(dim: int):
    def conds(seed: int):
        pos, neg = _text_pair(seed, dim)
        return [[pos, {}]], [[neg, {}]]

    return conds


def _masked_conds(dim: int, pad: int = 2):
    """T5-style conditioning with an attention_mask of ones and ``pad`` trailing padding zeros."""

    def conds(seed: int):
        pos, neg = _text_pair(seed, dim)
        mask = torch.ones(1, _L, dtype=torch.long)
        mask[:, _L - pad :] = 0
        return [[pos, {"attention_mask": mask.clone()}]], [[neg, {"attention_mask": mask.clone()}]]

    return conds


def _none_pooled_conds(dim: int):
    """LLM text encoders (Qwen 2.5 VL) give pooled_output None; the HunyuanVideo encode_adm still reads the key."""

    def conds(seed: int):
        pos, neg = _text_pair(seed, dim)
        return [[pos, {"pooled_output": None}]], [[neg, {"pooled_output": None}]]

    return conds


def _pooled_conds(dim: int, pooled_dim: int):
    def conds(seed: int):
        pos, neg = _text_pair(seed, dim)
        g = torch.Generator().manual_seed(seed + 1000)
        pp, pn = torch.randn(1, pooled_dim, generator=g), torch.randn(1, pooled_dim, generator=g)
        return [[pos, {"pooled_output": pp}]], [[neg, {"pooled_output": pn}]]

    return conds


# ---------------------------------------------------------------- Wan 2.1 / 2.2 (comfy.ldm.wan.model.WanModel)

_WAN_BASE = {
    "image_model": "wan2.1",
    "model_type": "t2v",
    "patch_size": (1, 2, 2),
    "text_len": 512,
    "dim": 64,
    "ffn_dim": 128,
    "freq_dim": 32,
    "text_dim": 64,
    "num_heads": 2,
    "num_layers": 1,
    "window_size": (-1, -1),
    "qk_norm": True,
    "cross_attn_norm": True,
    "eps": 1e-6,
}
_WAN_ATTN = [f"blocks.0.{a}.{p}" for a in ("self_attn", "cross_attn") for p in ("q", "k", "v", "o")]

WAN21 = TinyFamily(
    name="wan21",
    config_class="WAN21_T2V",
    build_model=_build("WAN21_T2V", {**_WAN_BASE, "in_dim": 16, "out_dim": 16}),
    conds=_plain_conds(64),
    latent_shape=lambda b: (b, 16, 1, 8, 8),
    cfg=6.0,
    attention_linears=list(_WAN_ATTN),
    notes="model_base.WAN21, ModelSamplingDiscreteFlow (FLOW, shift 8); Wan21 latent [B,16,T,H/8,W/8] "
    "(EmptyHunyuanLatentVideo); patch (1,2,2) "
    "conv3d. Wan 2.2 14B (T2V/I2V) is this same class (out_dim 16): detection cannot tell it from 2.1; its two "
    "experts load as two separate models (high/low noise). Only generic key-map styles (no Wan-specific branch).",
)

WAN22_5B = TinyFamily(
    name="wan22_5b",
    config_class="WAN22_T2V",
    build_model=_build("WAN22_T2V", {**_WAN_BASE, "in_dim": 48, "out_dim": 48}),
    conds=_plain_conds(64),
    latent_shape=lambda b: (b, 48, 1, 8, 8),
    cfg=5.0,
    attention_linears=list(_WAN_ATTN),
    notes="Wan 2.2 TI2V-5B: WAN22_T2V (detected by out_dim 48), model_base.WAN22(image_to_video=True), FLOW shift 8; "
    "Wan22 latent [B,48,T,H/16,W/16] (Wan22ImageToVideoLatent); in_dim 48 so concat_cond adds nothing; "
    "with a denoise_mask the timestep becomes per-token [B, T*H*W/4].",
)

# ---------------------------------------------------------------- HunyuanVideo 1.5 (comfy.ldm.hunyuan_video.model)

_HY15 = {
    "image_model": "hunyuan_video",
    "in_channels": 65,  # 32 noise + 32 concat image + 1 mask, like the real 1.5 T2V/I2V checkpoint
    "out_channels": 32,
    "patch_size": [1, 1, 1],
    "vec_in_dim": None,
    "context_in_dim": 64,
    "hidden_size": 64,
    "mlp_ratio": 4.0,
    "num_heads": 2,
    "depth": 1,
    "depth_single_blocks": 1,
    "axes_dim": [8, 12, 12],
    "theta": 256,
    "qkv_bias": True,
    "guidance_embed": False,
    "byt5": False,  # the real one has byt5_in (1472->2048->2048), only used with quoted text; left out (size)
    "meanflow": False,
    "use_cond_type_embedding": True,
    "vision_in_dim": 1152,
    "meanflow_sum": True,
}


def _build_hy15():
    import comfy.ldm.hunyuan_video.model as hv
    import comfy.supported_models

    known = set(hv.HunyuanVideoParams.__dataclass_fields__) | {"image_model"}  # keys differ across versions
    cfg = comfy.supported_models.HunyuanVideo15({k: v for k, v in _HY15.items() if k in known})
    return cfg.get_model({})


HUNYUAN_VIDEO15 = TinyFamily(
    name="hunyuan_video15",
    config_class="HunyuanVideo15",
    build_model=_build_hy15,
    conds=_none_pooled_conds(64),
    latent_shape=lambda b: (b, 32, 1, 4, 4),
    cfg=6.0,
    attention_linears=[
        "double_blocks.0.img_attn.qkv",
        "double_blocks.0.img_attn.proj",
        "double_blocks.0.txt_attn.qkv",
        "double_blocks.0.txt_attn.proj",
        "single_blocks.0.linear1",
        "single_blocks.0.linear2",
        "txt_in.individual_token_refiner.blocks.0.self_attn.qkv",
        "txt_in.individual_token_refiner.blocks.0.self_attn.proj",
        "txt_in.individual_token_refiner.blocks.1.self_attn.qkv",
        "txt_in.individual_token_refiner.blocks.1.self_attn.proj",
    ],
    notes="model_base.HunyuanVideo15, FLOW shift 7; HunyuanVideo15 latent [B,32,T,H/16,W/16] "
    "(EmptyHunyuanVideo15Latent); patch 1; fused qkv (double img/txt attn, token refiner: always 2 blocks); "
    "single_blocks.linear1 = qkv+mlp_in fused, linear2 = proj+mlp_out fused; not guidance-distilled "
    "(guidance_embed False). The 1.5 TE drops attention_mask unless it has zeros; with a padded mask and >1 row "
    "per call ComfyUI's own forward fails (attn_mask[:, 0, :L] = txt_mask: [1,L] vs [rows,L]): conds carry none.",
)

# ---------------------------------------------------------------- LTX-Video (comfy.ldm.lightricks.model.LTXVModel)

LTXV = TinyFamily(
    name="ltxv",
    config_class="LTXV",
    build_model=_build(
        "LTXV",
        {
            "image_model": "ltxv",
            "in_channels": 128,
            "num_layers": 1,
            "attention_head_dim": 32,
            "num_attention_heads": 2,
            "cross_attention_dim": 64,
            "caption_channels": 64,
        },
    ),
    conds=_masked_conds(64),
    latent_shape=lambda b: (b, 128, 1, 4, 4),
    cfg=3.0,
    attention_linears=[
        f"transformer_blocks.0.{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")
    ],
    notes="model_base.LTXV, ModelType.FLUX -> ModelSamplingFlux (shift 2.37; LTXVScheduler in real workflows); LTXV "
    "latent [B,128,(F-1)/8+1,H/32,W/32] (EmptyLTXVLatentVideo); patch 1 (patchify_proj Linear); T5 attention_mask "
    "used for cross-attn; frame_rate cond constant 25.",
)

# ---------------------------------------------------------------- Kandinsky 5 (comfy.ldm.kandinsky5.model)

_K5 = {
    "image_model": "kandinsky5",
    "in_visual_dim": 16,
    "out_visual_dim": 16,
    "in_text_dim": 64,
    "in_text_dim2": 32,
    "time_dim": 32,
    "model_dim": 64,
    "ff_dim": 128,
    "patch_size": (1, 2, 2),
    "num_text_blocks": 1,
    "num_visual_blocks": 1,
    "axes_dims": (8, 12, 12),
}
_K5_ATTN = [
    f"{blk}.{a}.{p}"
    for blk, attns in (
        ("text_transformer_blocks.0", ("self_attention",)),
        ("visual_transformer_blocks.0", ("self_attention", "cross_attention")),
    )
    for a in attns
    for p in ("to_query", "to_key", "to_value", "out_layer")
]

KANDINSKY5 = TinyFamily(
    name="kandinsky5",
    config_class="Kandinsky5",
    build_model=_build(
        "Kandinsky5", {**_K5, "visual_embed_dim": (16 + 16 + 1) * 4, "rope_scale_factor": (1.0, 2.0, 2.0)}
    ),
    conds=_pooled_conds(64, 32),
    latent_shape=lambda b: (b, 16, 1, 8, 8),
    cfg=5.0,
    attention_linears=list(_K5_ATTN),
    notes="model_base.Kandinsky5 (video), FLOW shift 10; HunyuanVideo latent format [B,16,T,H/8,W/8] "
    "(EmptyHunyuanLatentVideo); concat_cond always adds a zeros image + mask (visual_embed_dim (16+16+1)*4, as real); "
    "needs pooled_output (CLIP-L 768 real) for encode_adm -> y; text stream has its own blocks (self-attn only).",
)

KANDINSKY5_IMAGE = TinyFamily(
    name="kandinsky5_image",
    config_class="Kandinsky5Image",
    build_model=_build("Kandinsky5Image", {**_K5, "visual_embed_dim": 16 * 4, "rope_scale_factor": (1.0, 1.0, 1.0)}),
    conds=_pooled_conds(64, 32),
    latent_shape=lambda b: (b, 16, 8, 8),
    cfg=3.5,
    attention_linears=list(_K5_ATTN),
    notes="model_base.Kandinsky5Image, FLOW shift 3; Flux latent format, 4-D [B,16,H/8,W/8] (the model unsqueezes "
    "a T=1 axis); no concat_cond; real one is model_dim 2560 (detection keys: model_dim 2560, visual_embed_dim 64).",
)

# ---------------------------------------------------------------- Cosmos Predict1 (comfy.ldm.cosmos.model.GeneralDIT)

_COSMOS = {
    "image_model": "cosmos",
    "max_img_h": 240,
    "max_img_w": 240,
    "max_frames": 128,
    "in_channels": 16,
    "out_channels": 16,
    "patch_spatial": 2,
    "patch_temporal": 1,
    "model_channels": 64,
    "block_config": "FA-CA-MLP",
    "concat_padding_mask": True,
    "pos_emb_cls": "rope3d",
    "pos_emb_learnable": False,
    "pos_emb_interpolation": "crop",
    "block_x_format": "THWBD",
    "affline_emb_norm": True,
    "use_adaln_lora": True,
    "adaln_lora_dim": 16,
    "num_blocks": 1,
    "num_heads": 2,
    "crossattn_emb_channels": 64,
    "extra_per_block_abs_pos_emb": True,
    "rope_h_extrapolation_ratio": 1.0,
    "rope_w_extrapolation_ratio": 1.0,
    "rope_t_extrapolation_ratio": 2.0,
    "extra_per_block_abs_pos_emb_type": "learnable",
}

COSMOS_T2V = TinyFamily(
    name="cosmos1_t2v",
    config_class="CosmosT2V",
    build_model=_build("CosmosT2V", _COSMOS),
    conds=_masked_conds(64),
    latent_shape=lambda b: (b, 16, 2, 12, 16),  # T, H/2, W/2 (2, 6, 8) all differ from the rows, to tell axes apart
    cfg=7.0,
    attention_linears=[
        f"blocks.block0.blocks.{i}.block.attn.{p}" for i in (0, 1) for p in ("to_q.0", "to_k.0", "to_v.0", "to_out.0")
    ],
    notes="model_base.CosmosVideo, ModelType.EDM (ModelSamplingContinuousEDM, sigma_data 0.5, sigma 0.002-80); "
    "Cosmos1CV8x8x8 latent [B,16,(F-1)/8+1,H/8,W/8] (EmptyCosmosLatentVideo). block_x_format THWBD, so no block "
    "Linear has the batch on dim 0: attn q/k/v/out get [T*H*W, B, D], cross-attn k/v get context [M, B, D], "
    "mlp layer1/layer2 get [T, H, W, B, D] (batch on dim -2 everywhere); final_layer.linear gets [B*T, H*W, D] "
    "(batch folded with T on dim 0); t_embedder / adaLN_modulation get [B, D].",
)

# ------------------------------------------ CogVideoX 1.0 (comfy.ldm.cogvideo.model.CogVideoXTransformer3DModel)

COGVIDEOX = TinyFamily(
    name="cogvideox",
    config_class="CogVideoX_T2V",
    build_model=_build(
        "CogVideoX_T2V",
        {
            "image_model": "cogvideox",
            "num_attention_heads": 2,
            "attention_head_dim": 32,
            "time_embed_dim": 32,
            "text_embed_dim": 64,
            "num_layers": 1,
            "in_channels": 16,
            "patch_size": 2,
            "use_rotary_positional_embeddings": True,
            "use_learned_positional_embeddings": False,
        },
    ),
    conds=_plain_conds(64),
    latent_shape=lambda b: (b, 16, 2, 8, 12),  # T 2, so patch_embed.proj's input [B*T, ...] differs from [B, ...]
    cfg=6.0,
    attention_linears=[f"blocks.0.{p}" for p in ("q", "k", "v", "attn_out")],
    notes="model_base.CogVideoX (ComfyUI 0.33.0 on), ModelType.V_PREDICTION_DDPM on ModelSamplingDiscrete: linear "
    "betas 0.00085-0.012 rescaled to zero terminal SNR, last sigma 4518.76 (finite: ComfyUI sets the last "
    "alphas_cumprod to 4.897e-8); the model gets x unscaled (calculate_input returns it), Self-NPO kind vp_zsnr. "
    "CogVideoX latent format [B,16,(F-1)/4+1,H/8,W/8] (scale 1.15258426; 0.7, CogVideoX1_5, from 48 heads on). "
    "Rotary positions (what model_detection sets when the file has no patch_embed.pos_embedding); real 2b/5b: "
    "head dim 64, time_embed_dim 512, text_embed_dim 4096 (T5-XXL); context width is free (patch_embed.text_proj). "
    "1.0's patch_embed.proj is a Conv2d run per frame on [B*T,16,H,W] (batch folded with T on dim 0, declared in "
    "model_facts.FOLDED_ROWS); every Linear has the batch on dim 0: q/k/v/attn_out and ff_proj/ff_out are direct "
    "children of the block and see the text and video tokens concatenated [B, L_text+L_video, D] (no "
    "cross-attention). comfy.lora's key map has no CogVideoX branch: only generic key styles.",
)

# ---------------------------------------------------------------- LTX-2 (LTXAV): tiny works, but not as a TinyFamily
# Its latent is a comfy.nested_tensor.NestedTensor((video [B,128,F,H,W], audio [B,8,N,16])) (LTXVConcatAVLatent),
# which latent_shape cannot describe; the sampler hands the model a packed flat tensor plus latent_shapes.
# Context of width caption_channels*2 is taken as already connector-processed (video half, audio half).
LTXAV_UNET_CONFIG = {
    "image_model": "ltxav",
    "in_channels": 128,
    "audio_in_channels": 128,  # audio latent channels x frequency bins (8 x 16)
    "cross_attention_dim": 64,
    "audio_cross_attention_dim": 32,
    "attention_head_dim": 32,
    "audio_attention_head_dim": 16,
    "num_attention_heads": 2,
    "audio_num_attention_heads": 2,
    "caption_channels": 32,
    "num_layers": 1,
    "connector_attention_head_dim": 16,
    "connector_num_attention_heads": 2,
    "connector_num_layers": 1,
}


def build_ltxav():
    """Tiny LTX-2 BaseModel (config class LTXAV: absent in ComfyUI 0.3.64, present in 0.14.1 and 0.33.0)."""
    return _build("LTXAV", LTXAV_UNET_CONFIG)()


def ltxav_latent(batch: int):
    import comfy.nested_tensor

    return comfy.nested_tensor.NestedTensor((torch.zeros(batch, 128, 1, 4, 4), torch.zeros(batch, 8, 4, 16)))


def ltxav_conds(seed: int):
    pos, neg = _text_pair(seed, 64)  # 64 = caption_channels * 2: processed video + audio context
    return [[pos, {}]], [[neg, {}]]


FAMILIES: list[TinyFamily] = [
    WAN21,
    WAN22_5B,
    HUNYUAN_VIDEO15,
    LTXV,
    KANDINSKY5,
    KANDINSKY5_IMAGE,
    COSMOS_T2V,
    COGVIDEOX,
]
