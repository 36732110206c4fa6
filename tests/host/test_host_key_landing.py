"""Released-file key formats land on full-size SD1.5 / SDXL UNets (meta device, standard configs).

The expected layer list is written from the published block layout (npo_hostkit.attention_blocks), not
from ComfyUI's or the pack's key maps, and checked against the real modules of the built UNet.
"""

from __future__ import annotations

import re

import comfy.lora
import npo_hostkit as kit
import pytest
import torch

from comfyui_npo.nodes.host import model_facts
from comfyui_npo.npo_core import formats
from comfyui_npo.npo_core.offset import LowRank

ATTN_RE = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
KINDS = ("sd15_full", "sdxl_full")
ARCH = {"sd15_full": "SD15", "sdxl_full": "SDXL"}


def test_released_file_sizes_match_the_published_layout():
    """The authors' SD1.5 release: rank 8 on attn1+attn2 q/k/v/out → 1,594,368 params (SD1.5, 6.41 MB fp32) and
    11.61 M (SDXL, 46.6 MB fp32); SDXL attn1 only at rank 64 → 42.6 M (170 MB, spo_npo_10ep)."""
    blocks = {k: sum(d for *_, d in kit.attention_blocks(k)) for k in KINDS}
    assert blocks == {"sd15_full": 16, "sdxl_full": 70}
    sd15 = kit.lora_param_count("sd15_full", 8)
    sdxl = kit.lora_param_count("sdxl_full", 8)
    assert sd15 == 1_594_368
    assert sdxl == 11_612_160 and round(sdxl / 1e6, 2) == 11.61
    assert abs(sd15 * 4 / 1e6 - 6.41) < 0.05 and abs(sdxl * 4 / 1e6 - 46.6) < 0.3  # fp32 bytes + header
    spo = sum(64 * (o + i) for _, _, o, i in kit.attention_linears("sdxl_full", ("attn1",)))
    assert round(spo / 1e6, 1) == 42.6


@pytest.mark.parametrize("kind", KINDS)
def test_layout_matches_the_built_unet(full_models, kind):
    """The hand-written layer list is exactly the set of attention Linear layers of the real UNet."""
    unet = full_models[kind].model.diffusion_model
    actual = {
        n: tuple(m.weight.shape)
        for n, m in unet.named_modules()
        if ATTN_RE.search(n) and isinstance(m, torch.nn.Linear)
    }
    expected = {lmod: (o, i) for _, lmod, o, i in kit.attention_linears(kind)}
    assert actual == expected


@pytest.mark.parametrize("fmt", kit.LORA_FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_key_lands(full_models, kind, fmt):
    mp = full_models[kind]
    alpha = 4.0 if fmt in ("kohya_diffusers", "kohya_ldm", "comfy") else None
    sd, tags = kit.make_lora(kind, fmt, rank=8, values="tag", alpha=alpha)
    if fmt == "peft":  # the released format: nothing but lora.down/lora.up, fp32, no alpha
        assert all(
            re.fullmatch(
                r"unet\.(down_blocks|mid_block|up_blocks)\..+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
                r"\.lora\.(down|up)\.weight",
                k,
            )
            for k in sd
        )
        assert all(v.dtype == torch.float32 for v in sd.values())
        assert sum(v.numel() for v in sd.values()) == kit.lora_param_count(kind, 8)
    dense = {}
    if fmt == "comfy":  # ComfyUI full offsets: .diff / .diff_b on a ResBlock conv and its GroupNorm
        c = kit.LAYOUT[kind]["ch"][0]
        dense = {
            "input_blocks.1.0.in_layers.2.weight": torch.full((c, c, 3, 3), 0.5),
            "input_blocks.1.0.in_layers.2.bias": torch.full((c,), 0.25),
            "input_blocks.1.0.in_layers.0.weight": torch.full((c,), 0.125),
        }
        for k, v in dense.items():
            module, leaf = k.rsplit(".", 1)
            sd[f"diffusion_model.{module}.{'diff' if leaf == 'weight' else 'diff_b'}"] = v
    offset = formats.parse_state_dict(sd, {}, f"{kind}_{fmt}.safetensors")
    assert offset.base_arch == ARCH[kind]
    resolved = model_facts.resolve_for_model(offset, mp)
    assert resolved.naming == "ldm"
    assert set(resolved.entries) == set(tags) | set(dense)  # every file module landed, on every attention layer
    assert len(resolved.entries) == len(kit.attention_linears(kind)) + len(dense)
    for name, value in dense.items():
        assert torch.equal(resolved.entries[name].delta, value), name
    for name, e in resolved.entries.items():
        if name in dense:
            continue
        assert isinstance(e, LowRank) and e.rank == 8, name
        tag = tags[name]  # the file module whose factors landed here is the one the layout predicts
        assert float(e.down.flatten()[0]) == tag and float(e.up.flatten()[0]) == -tag, name
        assert e.scale == (1.0 if alpha is None else alpha / 8)
    assert resolved.numel() == kit.lora_param_count(kind, 8) + sum(v.numel() for v in dense.values())


@pytest.mark.parametrize("kind", KINDS)
def test_known_diffusers_to_ldm_landmarks(full_models, kind):
    """Spot checks of the diffusers → LDM names, SD1.5 and SDXL."""
    sd, tags = kit.make_lora(kind, "peft", rank=8, values="tag")
    resolved = model_facts.resolve_for_model(formats.parse_state_dict(sd, {}, "f"), full_models[kind])
    landmarks = {
        "sd15_full": {
            "down_blocks.0.attentions.0": "input_blocks.1.1",
            "down_blocks.2.attentions.1": "input_blocks.8.1",
            "mid_block.attentions.0": "middle_block.1",
            "up_blocks.1.attentions.0": "output_blocks.3.1",
            "up_blocks.3.attentions.2": "output_blocks.11.1",
        },
        "sdxl_full": {
            "down_blocks.1.attentions.0": "input_blocks.4.1",
            "down_blocks.2.attentions.1": "input_blocks.8.1",
            "mid_block.attentions.0": "middle_block.1",
            "up_blocks.0.attentions.2": "output_blocks.2.1",
            "up_blocks.1.attentions.0": "output_blocks.3.1",
        },
    }[kind]
    for dblock, lblock in landmarks.items():
        key = f"unet.{dblock}.transformer_blocks.0.attn2.to_k.lora.down.weight"
        ldm = f"{lblock}.transformer_blocks.0.attn2.to_k.weight"
        assert torch.equal(resolved.entries[ldm].down, sd[key])


@pytest.mark.parametrize("kind", KINDS)
def test_stock_comfyui_loader_drops_peft_attention_keys(full_models, kind):
    """ComfyUI (checked on v0.14.1): the stock LoRA loader maps
    ZERO attention layers of the released PEFT-named files (its diffusers key map expects
    ``attn1.processor.to_q``), which is why the pack has its own converter. kohya/ComfyUI names load."""
    model = full_models[kind].model
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    for fmt in ("peft", "peft_ab"):
        sd, _ = kit.make_lora(kind, fmt, rank=8, values="tag")
        patches = comfy.lora.load_lora(sd, key_map, log_missing=False)
        attn = [k for k in patches if ATTN_RE.search((k if isinstance(k, str) else k[0]).rsplit(".", 1)[0])]
        assert attn == [], f"{fmt}: ComfyUI now maps {len(attn)} PEFT attention keys; update the docs"
    sd, tags = kit.make_lora(kind, "kohya_ldm", rank=8, values="tag")
    assert len(comfy.lora.load_lora(sd, key_map, log_missing=False)) == len(tags)


def test_released_format_file_through_the_load_node(full_models, load_offset):
    """The authors' SD1.5 file layout, written to disk and read by Load NPO Offset."""
    sd, tags = kit.make_lora("sd15_full", "peft", rank=8, values="tag")
    offset = load_offset(sd, "sd15_beta500_2kiter.safetensors")
    assert (offset.source_format, offset.naming, offset.base_arch) == ("diffusers-lora", "diffusers", "SD15")
    assert offset.numel() == 1_594_368
    resolved = model_facts.resolve_for_model(offset, full_models["sd15_full"])
    assert set(resolved.entries) == set(tags)
