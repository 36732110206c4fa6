"""Generate the synthetic models the end-to-end tests serve (nothing is downloaded).

Run as a script with ComfyUI's Python: ``python make_assets.py --comfyui <ComfyUI root> --out <dir>``.
It imports ComfyUI's own model classes (on the ``meta`` device) only to learn the exact state-dict key
names and shapes, then fills seeded random tensors, so the files match what this ComfyUI expects.

Written to ``<dir>``:
- ``tiny_sd15.safetensors`` (fp16): a reduced SD1.5 UNet that ``CheckpointLoaderSimple`` detects as SD15
  (320 channels, ``channel_mult [1]``, 1 res block, 1 transformer + middle transformer, context 768;
  SD1.5 is detected from the UNet's shapes) under ``model.diffusion_model.``, a random CLIP-L under
  ``cond_stage_model.transformer.text_model.`` (so ``CLIPTextEncode`` works) and a random TAESD under
  ``first_stage_model.taesd_{encoder,decoder}.`` (ComfyUI's ``VAE`` recognises TAESD weights, so the
  checkpoint's own VAE output decodes and the example workflows run unmodified);
- ``taesd_encoder.safetensors`` / ``taesd_decoder.safetensors``: the same TAESD for ``models/vae_approx``
  (``VAELoader("taesd")``);
- ``tiny_npo_sd15.safetensors``: a rank-8 NPO LoRA in the authors' released key format
  (``unet.<diffusers module>.lora.{down,up}.weight``, fp32, no alpha) on every attention projection of the
  tiny UNet;
- ``tiny_npo_sdxl.safetensors``: an SDXL-shaped offset (``attn2.to_k`` with in-features 2048) for the
  wrong-architecture test;
- ``assets.json``: names, sizes and the generation time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

SEED = 20240507
RANK = 8

UNET_CONFIG = {
    "image_size": 32,
    "use_checkpoint": False,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1],
    "channel_mult": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1,
    "context_dim": 768,
    "use_linear_in_transformer": False,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
    "num_heads": 8,
    "num_head_channels": -1,
}


def _random_like(shapes: dict, gen, dtype, scale_by_fan_in: bool = True, std: float = 0.02) -> dict:
    """Seeded values for each (name → shape): 1-D weights (norms) = 1, biases = 0, the rest N(0, 1/fan_in)."""
    import torch

    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        if len(shape) <= 1:
            value = torch.ones(shape) if name.endswith("weight") and len(shape) == 1 else torch.zeros(shape)
        else:
            fan_in = math.prod(shape[1:])
            s = 1.0 / math.sqrt(fan_in) if scale_by_fan_in else std
            value = torch.randn(shape, generator=gen) * s
        out[name] = value.to(dtype).contiguous()
    return out


def _shapes(module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def build(comfyui: Path, out: Path) -> dict:
    sys.path.insert(0, str(comfyui))
    os.chdir(comfyui)
    from comfy.cli_args import args

    args.cpu = True
    import comfy.ops
    import comfy.sd1_clip
    import comfy.taesd.taesd
    import comfy.utils
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from safetensors.torch import save_file

    t0 = time.time()
    gen = torch.Generator().manual_seed(SEED)
    out.mkdir(parents=True, exist_ok=True)

    # UNet (detectable SD15)
    cfg = {k: v for k, v in UNET_CONFIG.items() if k != "in_channels"}
    with torch.device("meta"):
        unet = UNetModel(in_channels=4, dtype=torch.float16, device="meta",
                         operations=comfy.ops.disable_weight_init, **{k: v for k, v in cfg.items()})
    unet_sd = _random_like(_shapes(unet), gen, torch.float16)
    # small output layer so x0 predictions stay in a sane range
    for k in ("out.2.weight",):
        unet_sd[k] = (unet_sd[k].float() * 0.1).half()

    # CLIP-L text encoder (keys as ComfyUI's SD1ClipModel names them)
    with torch.device("meta"):
        clip = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float16)
    clip_shapes = {k: v for k, v in _shapes(clip).items() if k.startswith("transformer.text_model.")}
    clip_sd = _random_like(clip_shapes, gen, torch.float16, scale_by_fan_in=False, std=0.02)
    for k in list(clip_sd):
        if "position_ids" in k:
            clip_sd[k] = torch.arange(clip_sd[k].shape[-1]).reshape(clip_sd[k].shape)

    # TAESD (real init: kaiming-normal convs)
    taesd = comfy.taesd.taesd.TAESD()
    taesd_sd = {}
    for k, v in taesd.state_dict().items():
        if k.startswith("vae_"):
            continue
        if v.dim() > 1:
            fan_in = math.prod(v.shape[1:])
            taesd_sd[k] = (torch.randn(v.shape, generator=gen) * math.sqrt(2.0 / fan_in)).contiguous()
        else:
            taesd_sd[k] = torch.zeros(v.shape)
    enc = {k[len("taesd_encoder."):]: v for k, v in taesd_sd.items() if k.startswith("taesd_encoder.")}
    dec = {k[len("taesd_decoder."):]: v for k, v in taesd_sd.items() if k.startswith("taesd_decoder.")}

    ckpt = {f"model.diffusion_model.{k}": v for k, v in unet_sd.items()}
    ckpt.update({f"cond_stage_model.{k}": v for k, v in clip_sd.items()})
    ckpt.update({f"first_stage_model.{k}": v.half() for k, v in taesd_sd.items()})
    ckpt["first_stage_model.vae_scale"] = torch.tensor(0.18215)
    ckpt["first_stage_model.vae_shift"] = torch.tensor(0.0)
    save_file(ckpt, str(out / "tiny_sd15.safetensors"), metadata={"npo.e2e": "tiny random SD1.5 test checkpoint"})
    save_file(enc, str(out / "taesd_encoder.safetensors"))
    save_file(dec, str(out / "taesd_decoder.safetensors"))

    # NPO offset in the authors' format: unet.<diffusers attention module>.lora.{down,up}.weight
    d2l = comfy.utils.unet_to_diffusers(dict(UNET_CONFIG))
    shapes = _shapes(unet)
    lora = {}
    proj = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")
    for dname in sorted(d2l):
        if ".attentions." not in dname or not dname.endswith(proj) or ("attn1" not in dname and "attn2" not in dname):
            continue
        out_f, in_f = shapes[d2l[dname]][:2]
        module = dname[: -len(".weight")]
        down = torch.randn(RANK, in_f, generator=gen) / math.sqrt(in_f)
        up = torch.randn(out_f, RANK, generator=gen) * 0.5 / math.sqrt(RANK) / math.sqrt(in_f / 8)
        lora[f"unet.{module}.lora.down.weight"] = down.contiguous()
        lora[f"unet.{module}.lora.up.weight"] = up.contiguous()
    if not lora:
        raise RuntimeError("no attention modules found for the NPO offset")
    save_file(lora, str(out / "tiny_npo_sd15.safetensors"))

    # SDXL-shaped offset: cross-attention key projection with 2048 text features
    base = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    sdxl = {
        f"{base}.to_k.lora.down.weight": torch.randn(RANK, 2048, generator=gen) * 0.01,
        f"{base}.to_k.lora.up.weight": torch.randn(640, RANK, generator=gen) * 0.01,
        f"{base}.to_v.lora.down.weight": torch.randn(RANK, 2048, generator=gen) * 0.01,
        f"{base}.to_v.lora.up.weight": torch.randn(640, RANK, generator=gen) * 0.01,
    }
    save_file(sdxl, str(out / "tiny_npo_sdxl.safetensors"))

    info = {
        "seed": SEED,
        "seconds": round(time.time() - t0, 2),
        "unet_params": sum(v.numel() for v in unet_sd.values()),
        "clip_params": sum(v.numel() for v in clip_sd.values()),
        "npo_lora_modules": len(lora) // 2,
        "files": {p.name: p.stat().st_size for p in sorted(out.glob("*.safetensors"))},
    }
    (out / "assets.json").write_text(json.dumps(info, indent=1))
    return info



# ---------------------------------------------------------------------------------------------
# DiT / video assets (example workflows 5 and 6): a separate cache, written by ``build_dit``
# ---------------------------------------------------------------------------------------------
DIT_SEED = 20250611
DIT_RANK = 4

# What comfy/model_detection.py reads back from the tiny SD3 file (MMDiT branch): depth = hidden / 64, heads =
# depth, context_embedder 4096 → hidden and y_embedder 2048 → hidden (the widths of SD3's text encoders: a
# CLIP-L-only SD3ClipModel zero-pads its 768 features to 4096 and its pooled output to 768 + 1280), qk_norm
# "rms" and no x_block attn2, as SD3.5 Large. pos_embed_max_size 16: latents up to 32x32 (256x256 images).
SD35_DEPTH = 2
SD35_HIDDEN = 64 * SD35_DEPTH
SD35_POS = 16
SD35_DIT_CONFIG = {
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": 2,
    "depth": SD35_DEPTH,
    "input_size": None,
    "adm_in_channels": 2048,
    "context_embedder_config": {"target": "torch.nn.Linear",
                                "params": {"in_features": 4096, "out_features": SD35_HIDDEN}},
    "num_patches": SD35_POS * SD35_POS,
    "pos_embed_max_size": SD35_POS,
    "qk_norm": "rms",
    "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [],
}

# What model_detection.py reads back from the tiny Wan file: num_heads = dim // 128, freq_dim 256 and text_dim
# 4096 are fixed there (not read from the weights), so the smallest Wan is dim 128 with one head.
WAN21_DIT_CONFIG = {
    "image_model": "wan2.1",
    "model_type": "t2v",
    "patch_size": (1, 2, 2),
    "in_dim": 16,
    "out_dim": 16,
    "dim": 128,
    "ffn_dim": 256,
    "freq_dim": 256,
    "num_heads": 1,
    "num_layers": 1,
    "window_size": (-1, -1),
    "qk_norm": True,
    "cross_attn_norm": True,
    "eps": 1e-6,
}
# ComfyUI v0.3.64 builds the Wan 2.1 VAE with dim 96 whatever the file holds (later versions read the dim
# from decoder.head.0.gamma), so the tiny Wan VAE is the real architecture (127 M parameters) with random weights.
WAN21_VAE_CONFIG = {"dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
                    "temperal_downsample": [False, True, True], "dropout": 0.0}
TAESD3_SCALE, TAESD3_SHIFT = 1.5305, 0.0609  # comfy.latent_formats.SD3


def _dit_shapes(config_class: str, unet_config: dict) -> dict:
    """Parameter names and shapes of the diffusion model ComfyUI builds for ``config_class`` (on ``meta``)."""
    import comfy.supported_models
    import torch

    cfg = getattr(comfy.supported_models, config_class)(dict(unet_config))
    with torch.device("meta"):
        model = cfg.get_model({}, device="meta")
    return _shapes(model.diffusion_model)


def _lora(shapes: dict, modules: list[str], gen, rank: int = DIT_RANK) -> dict:
    """A ComfyUI-format LoRA (``diffusion_model.<module>.lora_{up,down}.weight`` + ``alpha`` = rank, so scale 1)
    on ``modules``, with ΔW about half the size of the tiny model's own weights (a visible effect)."""
    import torch

    out = {}
    for m in modules:
        out_f, in_f = shapes[f"{m}.weight"][:2]
        out[f"diffusion_model.{m}.lora_down.weight"] = (torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f))
        out[f"diffusion_model.{m}.lora_up.weight"] = torch.randn(out_f, rank, generator=gen) * 0.5 / math.sqrt(rank)
        out[f"diffusion_model.{m}.alpha"] = torch.tensor(float(rank))
    return {k: v.contiguous() for k, v in out.items()}


def build_dit(comfyui: Path, out: Path) -> dict:
    """Write the DiT / video assets into ``out``:

    - ``tiny_sd35.safetensors`` (fp16): an SD3.5-Large-shaped checkpoint (SD35_DIT_CONFIG under
      ``model.diffusion_model.``, a random CLIP-L under ``text_encoders.clip_l.transformer.`` and no CLIP-G / T5,
      which SD3's clip_target then leaves out, a random 16-channel TAESD under ``first_stage_model.``);
    - ``tiny_clip_l.safetensors`` (fp16): the same CLIP-L as a text-encoder file (``text_model.*``);
    - ``tiny_wan21_t2v.safetensors`` (fp16): a Wan 2.1 T2V diffusion model (WAN21_DIT_CONFIG, no prefix);
    - ``tiny_wan21_vae.safetensors`` (fp16): a random Wan 2.1 VAE (WAN21_VAE_CONFIG);
    - ``tiny_npo_sd35.safetensors`` / ``tiny_npo_wan21.safetensors``: rank-4 ComfyUI-format LoRAs on every
      attention projection of the two tiny DiTs;
    - ``assets.json``.
    """
    sys.path.insert(0, str(comfyui))
    os.chdir(comfyui)
    from comfy.cli_args import args

    args.cpu = True
    import comfy.ldm.wan.vae
    import comfy.sd1_clip
    import comfy.taesd.taesd
    import torch
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed_torch
    from safetensors.torch import save_file

    t0 = time.time()
    gen = torch.Generator().manual_seed(DIT_SEED)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"npo.e2e": "tiny random test model (not a real model)"}

    # SD3.5 MMDiT
    sd3_shapes = _dit_shapes("SD3", SD35_DIT_CONFIG)
    sd3 = _random_like(sd3_shapes, gen, torch.float16)
    pe = get_2d_sincos_pos_embed_torch(SD35_HIDDEN, SD35_POS, SD35_POS)
    sd3["pos_embed"] = pe.reshape(sd3_shapes["pos_embed"]).to(torch.float16).contiguous()

    # CLIP-L (the real architecture: its config is fixed)
    with torch.device("meta"):
        clip = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float16)
    clip_shapes = {k[len("transformer."):]: v for k, v in _shapes(clip).items()
                   if k.startswith(("transformer.text_model.", "transformer.text_projection."))}
    clip_sd = _random_like(clip_shapes, gen, torch.float16, scale_by_fan_in=False, std=0.02)
    for k in list(clip_sd):
        if "position_ids" in k:
            clip_sd[k] = torch.arange(clip_sd[k].shape[-1]).reshape(clip_sd[k].shape)

    # 16-channel TAESD (kaiming-normal convs), the SD3 latent scale/shift
    taesd_sd = {}
    for k, v in comfy.taesd.taesd.TAESD(latent_channels=16).state_dict().items():
        if k.startswith("vae_"):
            continue
        fan_in = math.prod(v.shape[1:]) if v.dim() > 1 else 1
        taesd_sd[k] = (torch.randn(v.shape, generator=gen) * math.sqrt(2.0 / fan_in) if v.dim() > 1
                       else torch.zeros(v.shape)).half().contiguous()
    taesd_sd["vae_scale"] = torch.tensor(TAESD3_SCALE)
    taesd_sd["vae_shift"] = torch.tensor(TAESD3_SHIFT)

    ckpt = {f"model.diffusion_model.{k}": v for k, v in sd3.items()}
    ckpt.update({f"text_encoders.clip_l.transformer.{k}": v for k, v in clip_sd.items()})
    ckpt.update({f"first_stage_model.{k}": v for k, v in taesd_sd.items()})
    save_file(ckpt, str(out / "tiny_sd35.safetensors"), metadata=meta)
    save_file(clip_sd, str(out / "tiny_clip_l.safetensors"), metadata=meta)

    # Wan 2.1 T2V diffusion model
    wan_shapes = _dit_shapes("WAN21_T2V", WAN21_DIT_CONFIG)
    wan = _random_like(wan_shapes, gen, torch.float16)
    save_file(wan, str(out / "tiny_wan21_t2v.safetensors"), metadata=meta)

    # Wan 2.1 VAE: RMS-norm gammas 1, biases 0, convolutions kaiming-normal
    vae = {}
    for k, v in comfy.ldm.wan.vae.WanVAE(**WAN21_VAE_CONFIG).state_dict().items():
        if k.endswith("gamma"):
            vae[k] = torch.ones(v.shape)
        elif v.dim() > 1:
            vae[k] = torch.randn(v.shape, generator=gen) * math.sqrt(2.0 / math.prod(v.shape[1:]))
        else:
            vae[k] = torch.zeros(v.shape)
        vae[k] = vae[k].half().contiguous()
    save_file(vae, str(out / "tiny_wan21_vae.safetensors"), metadata=meta)

    # NPO offsets in ComfyUI's LoRA format, on every attention projection
    sd3_attn = sorted(k[: -len(".weight")] for k in sd3_shapes
                      if ".attn." in k and k.endswith((".qkv.weight", ".proj.weight")))
    wan_attn = sorted(k[: -len(".weight")] for k in wan_shapes
                      if "_attn." in k and k.endswith((".q.weight", ".k.weight", ".v.weight", ".o.weight")))
    if not sd3_attn or not wan_attn:
        raise RuntimeError(f"no attention modules found (sd3: {sd3_attn}, wan: {wan_attn})")
    save_file(_lora(sd3_shapes, sd3_attn, gen), str(out / "tiny_npo_sd35.safetensors"))
    save_file(_lora(wan_shapes, wan_attn, gen), str(out / "tiny_npo_wan21.safetensors"))

    info = {
        "seed": DIT_SEED,
        "seconds": round(time.time() - t0, 2),
        "sd35_params": sum(v.numel() for v in sd3.values()),
        "wan21_params": sum(v.numel() for v in wan.values()),
        "sd35_lora_modules": sd3_attn,
        "wan21_lora_modules": wan_attn,
        "files": {p.name: p.stat().st_size for p in sorted(out.glob("*.safetensors"))},
    }
    (out / "assets.json").write_text(json.dumps(info, indent=1))
    return info


def main_dit() -> None:
    """``python -c 'import make_assets; make_assets.main_dit()' --comfyui <root> --out <dir>``: ``build_dit``."""
    ap = argparse.ArgumentParser(description=build_dit.__doc__.splitlines()[0])
    ap.add_argument("--comfyui", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args()
    print(json.dumps(build_dit(a.comfyui.resolve(), a.out.resolve())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args()
    print(json.dumps(build(a.comfyui.resolve(), a.out.resolve())))


if __name__ == "__main__":
    main()
