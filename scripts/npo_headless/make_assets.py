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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args()
    print(json.dumps(build(a.comfyui.resolve(), a.out.resolve())))


if __name__ == "__main__":
    main()
