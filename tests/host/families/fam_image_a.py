"""Tiny image DiT families: SD3/SD3.5 (MMDiT-X), AuraFlow, PixArt Sigma, HunyuanDiT, Stable Cascade stage C.

Every model is built from ComfyUI's own classes (the config class ComfyUI detects for the checkpoint family)
with a tiny ``unet_config``; the model code and config keys of these families are the same in ComfyUI
v0.3.64, v0.14.1 and v0.33.0, so no branching is needed.
"""

from __future__ import annotations

import torch

from . import TinyFamily

_TXT = 8  # text tokens in every tiny conditioning


def _rand(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=g)


def _pair(seed: int, one) -> tuple[list, list]:
    """(positive, negative): two different random conditionings from ``one(generator)``."""
    g = torch.Generator().manual_seed(seed)
    return [one(g)], [one(g)]


def _build(config_class: str, unet_config: dict):
    def build():
        import comfy.supported_models

        cfg = getattr(comfy.supported_models, config_class)(dict(unet_config))
        return cfg.get_model({})

    return build


# ---------------------------------------------------------------------------------------------
# SD3 / SD3.5: MMDiT(-X). hidden = 64·depth and heads = depth are hard-wired in ComfyUI's MMDiT.
# qk_norm="rms" and x_block attn2 in block 0 make it an SD3.5-medium-like model (SD3.5 large: no attn2).
# ---------------------------------------------------------------------------------------------
_SD3_DEPTH = 2
_SD3_HIDDEN = 64 * _SD3_DEPTH
_SD3_CTX = 32  # context_embedder in_features (real: 4096)
_SD3_ADM = 32  # pooled width (real: 2048)
_SD3_POS = 8  # pos_embed_max_size (real: 192 / 384); latents up to 16x16
_SD3_CONFIG = {
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": 2,
    "depth": _SD3_DEPTH,
    "input_size": None,
    "adm_in_channels": _SD3_ADM,
    "context_embedder_config": {
        "target": "torch.nn.Linear",
        "params": {"in_features": _SD3_CTX, "out_features": _SD3_HIDDEN},
    },
    "num_patches": _SD3_POS * _SD3_POS,
    "pos_embed_max_size": _SD3_POS,
    "qk_norm": "rms",
    "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [0],
}


def _sd3_conds(seed: int) -> tuple[list, list]:
    return _pair(seed, lambda g: [_rand(g, 1, _TXT, _SD3_CTX), {"pooled_output": _rand(g, 1, _SD3_ADM)}])


def _sd3_fix_buffers(model) -> None:
    """pos_embed is a torch.empty buffer: fill it with the 2-D sin-cos table SD3 checkpoints ship."""
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed_torch

    dm = model.diffusion_model
    with torch.no_grad():
        pe = get_2d_sincos_pos_embed_torch(_SD3_HIDDEN, _SD3_POS, _SD3_POS)
        dm.pos_embed.copy_(pe.reshape(dm.pos_embed.shape).to(dm.pos_embed.dtype))


def _sd3_attn() -> list[str]:
    out = []
    for i in range(_SD3_DEPTH):
        b = f"joint_blocks.{i}"
        out.append(f"{b}.context_block.attn.qkv")
        if i < _SD3_DEPTH - 1:  # the last context block is pre_only: no proj
            out.append(f"{b}.context_block.attn.proj")
        out += [f"{b}.x_block.attn.qkv", f"{b}.x_block.attn.proj"]
        if i in _SD3_CONFIG["x_block_self_attn_layers"]:
            out += [f"{b}.x_block.attn2.qkv", f"{b}.x_block.attn2.proj"]
    return out


# ---------------------------------------------------------------------------------------------
# AuraFlow: 1 double (MMDiT) layer + 1 single (DiT) layer. n_layers must exceed n_double_layers
# (a last double layer is built with 2 modulations but run with 6).
# ---------------------------------------------------------------------------------------------
_AURA_DIM = 32
_AURA_CTX = 32  # cond_seq_dim (real: 2048)
_AURA_CONFIG = {
    "in_channels": 4,
    "out_channels": 4,
    "patch_size": 2,
    "dim": _AURA_DIM,
    "n_heads": 2,
    "global_conddim": _AURA_DIM,
    "cond_seq_dim": _AURA_CTX,
    "max_seq": 16,  # a square: 4x4 patches (real: 1024)
    "n_double_layers": 1,
    "n_layers": 2,
}


def _aura_conds(seed: int) -> tuple[list, list]:
    return _pair(seed, lambda g: [_rand(g, 1, _TXT, _AURA_CTX), {}])


_AURA_ATTN = [f"double_layers.0.attn.{n}" for n in ("w1q", "w1k", "w1v", "w1o", "w2q", "w2k", "w2v", "w2o")] + [
    f"single_layers.0.attn.{n}" for n in ("w1q", "w1k", "w1v", "w1o")
]


# ---------------------------------------------------------------------------------------------
# PixArt Sigma. The position embedding's base_size is round(((H + W) // 2) / 64) * 64 // patch: a latent
# side under 33 makes it 0 and divides by zero, hence 36x36.
# ---------------------------------------------------------------------------------------------
_PIX_HIDDEN = 32
_PIX_CTX = 32  # caption_channels (real: 4096, T5-XXL)
_PIX_DEPTH = 2
_PIX_CONFIG = {
    "image_model": "pixart_sigma",
    "patch_size": 2,
    "in_channels": 4,
    "hidden_size": _PIX_HIDDEN,
    "num_heads": 2,
    "depth": _PIX_DEPTH,
    "caption_channels": _PIX_CTX,
    "model_max_length": _TXT,
    "micro_condition": False,
}


def _pix_conds(seed: int) -> tuple[list, list]:
    return _pair(seed, lambda g: [_rand(g, 1, _TXT, _PIX_CTX), {}])


def _pix_fix_buffers(model) -> None:
    """y_embedder.y_embedding (the learned null caption, unused at inference) is a buffer drawn from the global
    RNG at construction: make it deterministic so state dicts of two builds match."""
    emb = model.diffusion_model.y_embedder.y_embedding
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        emb.copy_(torch.randn(emb.shape, generator=g) / emb.shape[-1] ** 0.5)


_PIX_ATTN = [
    f"blocks.{i}.{n}"
    for i in range(_PIX_DEPTH)
    for n in ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj")
]


# ---------------------------------------------------------------------------------------------
# HunyuanDiT (v1.1/1.2, "hydit"). depth 4 so that block 3 has the long-skip skip_linear.
# The attention pooler's widths are fixed (8 heads, 1024 out): text_states_dim_t5 must divide by 8.
# ---------------------------------------------------------------------------------------------
_HY_HIDDEN = 32
_HY_DEPTH = 4
_HY_CLIP = 32  # BERT width (real: 1024)
_HY_T5 = 32  # mT5 width (real: 2048)
_HY_CONFIG = {
    "image_model": "hydit",
    "patch_size": 2,
    "in_channels": 4,
    "hidden_size": _HY_HIDDEN,
    "depth": _HY_DEPTH,
    "num_heads": 2,
    "text_states_dim": _HY_CLIP,
    "text_states_dim_t5": _HY_T5,
    "text_len": _TXT,
    "text_len_t5": _TXT,
}


def _hy_one(g: torch.Generator) -> list:
    mask = torch.ones(1, _TXT, dtype=torch.long)
    mask[:, -2:] = 0  # padded tail: exercises the text_embedding_padding path
    return [
        _rand(g, 1, _TXT, _HY_CLIP),
        {
            "pooled_output": _rand(g, 1, _HY_CLIP),
            "attention_mask": mask,
            "conditioning_mt5xl": _rand(g, 1, _TXT, _HY_T5),
            "attention_mask_mt5xl": mask.clone(),
        },
    ]


def _hy_conds(seed: int) -> tuple[list, list]:
    return _pair(seed, _hy_one)


_HY_ATTN = [
    f"blocks.{i}.{n}"
    for i in range(_HY_DEPTH)
    for n in ("attn1.Wqkv", "attn1.out_proj", "attn2.q_proj", "attn2.kv_proj", "attn2.out_proj")
]


# ---------------------------------------------------------------------------------------------
# Stable Cascade stage C: a UNet-like stack of Res/Timestep/Attn blocks ("CTA") on two levels of equal
# resolution. c_clip_img stays 768: extra_conds feeds zeros (1, 1, 768) when there is no image prompt.
# ---------------------------------------------------------------------------------------------
_SC_C = 32
_SC_CTX = 32  # c_clip_text / c_clip_text_pooled (real: 1280)
_SC_CONFIG = {
    "stable_cascade_stage": "c",
    "c_cond": _SC_C,
    "c_hidden": [_SC_C, _SC_C],
    "nhead": [2, 2],
    "blocks": [[1, 1], [1, 1]],
    "block_repeat": [[1, 1], [1, 1]],
    "c_clip_text": _SC_CTX,
    "c_clip_text_pooled": _SC_CTX,
}


def _sc_conds(seed: int) -> tuple[list, list]:
    return _pair(seed, lambda g: [_rand(g, 1, _TXT, _SC_CTX), {"pooled_output": _rand(g, 1, _SC_CTX)}])


# level_config "CTA" with one block per level: index 2 of every level is the AttnBlock
_SC_ATTN = [
    f"{side}_blocks.{lvl}.2.attention.attn.{n}"
    for side in ("down", "up")
    for lvl in (0, 1)
    for n in ("to_q", "to_k", "to_v", "out_proj")
]


FAMILIES: list[TinyFamily] = [
    TinyFamily(
        name="sd3",
        config_class="SD3",
        build_model=_build("SD3", _SD3_CONFIG),
        conds=_sd3_conds,
        latent_shape=lambda b: (b, 16, 8, 8),
        cfg=4.5,
        fix_buffers=_sd3_fix_buffers,
        attention_linears=_sd3_attn(),
        notes="ModelSamplingDiscreteFlow (shift 3.0); latent SD3 16ch [B,16,H/8,W/8]. MMDiT-X: qk_norm rms, "
        "x_block.attn2 in block 0 (x_block_self_attn_layers). Fused qkv; joint attention over [txt, img].",
    ),
    TinyFamily(
        name="auraflow",
        config_class="AuraFlow",
        build_model=_build("AuraFlow", _AURA_CONFIG),
        conds=_aura_conds,
        latent_shape=lambda b: (b, 4, 8, 8),
        cfg=3.5,
        attention_linears=_AURA_ATTN,
        notes="ModelSamplingDiscreteFlow (shift 1.73, multiplier 1.0); latent SDXL 4ch. Separate q/k/v/o "
        "(w1* text stream, w2* image stream; single layers run w1* on [txt+8 register tokens, img]).",
    ),
    TinyFamily(
        name="pixart_sigma",
        config_class="PixArtSigma",
        build_model=_build("PixArtSigma", _PIX_CONFIG),
        conds=_pix_conds,
        latent_shape=lambda b: (b, 4, 36, 36),
        cfg=4.5,
        fix_buffers=_pix_fix_buffers,
        attention_linears=_PIX_ATTN,
        folded_batch_layers=[f"blocks.{i}.cross_attn.kv_linear" for i in range(_PIX_DEPTH)],
        notes="ModelSamplingDiscrete EPS (sqrt_linear betas); latent SDXL 4ch, side >= 33. cross_attn.kv_linear "
        "sees the text folded to [1, B*L, C]; y_embedder.y_proj sees 4-D [B, 1, L, C]. Output 8ch, sliced to 4.",
    ),
    TinyFamily(
        name="hunyuan_dit",
        config_class="HunyuanDiT",
        build_model=_build("HunyuanDiT", _HY_CONFIG),
        conds=_hy_conds,
        latent_shape=lambda b: (b, 4, 8, 8),
        cfg=6.0,
        attention_linears=_HY_ATTN,
        notes="ModelSamplingDiscrete V_PREDICTION (linear 0.00085-0.018); latent SDXL 4ch. mlp_t5.0/.2 see 2-D "
        "[B*L_t5, C]; pooler.q_proj/k_proj/v_proj see [L+1 or 1, B, C] (batch on dim 1), pooler.c_proj [1, B, C].",
    ),
    TinyFamily(
        name="stable_cascade_c",
        config_class="Stable_Cascade_C",
        build_model=_build("Stable_Cascade_C", _SC_CONFIG),
        conds=_sc_conds,
        latent_shape=lambda b: (b, 16, 8, 8),
        cfg=4.0,
        attention_linears=_SC_ATTN,
        notes="StableCascadeSampling (shift 2.0); latent SC_Prior 16ch [B,16,H/42,W/42]. ResBlock/FeedForward "
        "channelwise Linears see 4-D [B, H, W, C]; to_k/to_v see [B, HW+L, C] (self-attn concat).",
    ),
]
