"""Bad input ends in an NPOError that names the problem, before any weight is touched."""

from __future__ import annotations

import dataclasses

import comfy.supported_models
import npo_hostkit as kit
import pytest
import torch
from comfy.ldm.flux.model import FluxParams

from comfyui_npo.nodes.guider import NPOCFGGuider
from comfyui_npo.nodes.host import sampling
from comfyui_npo.nodes.models import NPOApply, NPONegativeModel
from comfyui_npo.npo_core import formats
from comfyui_npo.npo_core.errors import NPOError


def _apply(model, offset, **kw):
    kw.setdefault("strength", 1.0)
    with torch.inference_mode():
        return NPOApply.execute(model=model, npo_offset=offset, **kw).result[0]


@pytest.mark.parametrize(
    "offset_kind,model_kind,want",
    [("sdxl_full", "sd15_full", r"SDXL.*SD15"), ("sd15_full", "sdxl_full", r"SD15.*SDXL")],
)
@pytest.mark.fault(
    "an SDXL offset on an SD1.5 model and the reverse (full-size UNets)",
    "NPOError naming both architectures and the file",
)
def test_offset_for_another_architecture(full_models, offset_kind, model_kind, want):
    sd, _ = kit.make_lora(offset_kind, "peft", rank=8, values="tag")
    offset = formats.parse_state_dict(sd, {}, f"{offset_kind}.safetensors")
    model = full_models[model_kind]
    for call in (
        lambda: _apply(model, offset),
        lambda: NPONegativeModel.execute(model=model, npo_offset=offset, strength=1.0),
    ):
        with pytest.raises(NPOError, match=want) as info:
            call()
        assert f"{offset_kind}.safetensors" in str(info.value)


@pytest.mark.fault(
    "an offset whose keys partly miss the model (other block layout)",
    "NPOError listing the stray keys; never applied half-way",
)
def test_offset_keys_that_do_not_land(tiny, load_offset):
    """Same text width, other block layout (tiny SD1.5 file on tiny SDXL, which has no attention at level 0):
    the stray keys are listed, never skipped."""
    offset = load_offset(kit.make_lora("sd15", "peft", rank=4)[0], "other.safetensors")
    with pytest.raises(NPOError, match=r"do not land on the model \(SDXL\)") as info:
        _apply(tiny("sdxl"), offset)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q (weight)" in str(info.value)


@pytest.mark.parametrize(
    "sd,want",
    [
        (
            {
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight": torch.ones(32, 4),
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.oft_blocks": torch.ones(4, 4),
            },
            "not supported as an NPO offset",
        ),
    ],
)
@pytest.mark.fault("unknown key names or unsupported adapter kinds (OFT) in a file", "NPOError naming the file")
def test_unknown_key_format(load_offset, sd, want):
    with pytest.raises(NPOError, match=want) as info:
        load_offset(sd, "weird.safetensors")
    assert "weird.safetensors" in str(info.value)


@pytest.mark.parametrize(
    "sd,listed",
    [
        (
            {"foo.bar.lora_up.weight": torch.ones(4, 2), "foo.bar.lora_down.weight": torch.ones(2, 4)},
            "foo.bar (weight)",
        ),
        ({"some_model.layer.weight": torch.ones(4, 4)}, "some_model.layer (weight)"),
    ],
)
@pytest.mark.fault("key names no model layout knows", "NPOError when applied, listing the file's keys that do not land")
def test_unknown_keys_are_listed_when_applied(load_offset, tiny, sd, listed):
    offset = load_offset(sd, "weird.safetensors")
    with pytest.raises(NPOError, match="do not land") as info:
        _apply(tiny("sd15"), offset)
    assert "weird.safetensors" in str(info.value) and listed in str(info.value)


@pytest.mark.fault(
    "a NaN inside an otherwise valid offset file, through Load NPO Offset",
    "NPOError naming the file and the tensor",
)
def test_nan_tensor_file(load_offset):
    sd, _ = kit.make_lora("sd15", "peft", rank=4)
    key = sorted(sd)[3]
    sd[key] = sd[key].clone()
    sd[key][0, 0] = float("nan")
    with pytest.raises(NPOError, match="NaN") as info:
        load_offset(sd, "broken.safetensors")
    assert key in str(info.value) and "broken.safetensors" in str(info.value)


@pytest.mark.fault(
    "a corrupt file in models/npo, a file name that is not there",
    "NPOError naming offset_name or the file",
)
def test_corrupt_and_missing_files(npo_dir, load_offset):
    from comfyui_npo.nodes.offsets import NPOLoadOffset

    (npo_dir / "truncated.safetensors").write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')
    with pytest.raises(NPOError, match="truncated.safetensors"):
        NPOLoadOffset.execute(offset_name="truncated.safetensors")
    with pytest.raises(NPOError, match="offset_name"):
        NPOLoadOffset.execute(offset_name="not_there.safetensors")


@pytest.mark.fault("strength below 0, above 4, or NaN", "NPOError naming strength, in all three nodes")
@pytest.mark.parametrize("strength", [-0.5, 4.5, float("nan")])
def test_strength_out_of_range(tiny, load_offset, strength):
    model = tiny("sd15")
    offset = load_offset(kit.make_lora("sd15", "peft", rank=4)[0])
    pos, neg = kit.make_conds("sd15")
    calls = [
        lambda: _apply(model, offset, strength=strength),
        lambda: NPONegativeModel.execute(model=model, npo_offset=offset, strength=strength),
        lambda: NPOCFGGuider.execute(
            model=model, positive=pos, negative=neg, cfg=5.0, strength=strength, npo_offset=offset
        ),
    ]
    for call in calls:
        with pytest.raises(NPOError, match="strength"):
            call()


@pytest.mark.fault(
    "start_percent > end_percent, end_percent > 1, merge_weight without base_model or out of range, "
    "a base of another architecture",
    "NPOError naming the input",
)
def test_other_knobs_out_of_range(tiny, load_offset):
    model = tiny("sd15")
    offset = load_offset(kit.make_lora("sd15", "peft", rank=4)[0])
    with pytest.raises(NPOError, match="start_percent"):
        _apply(model, offset, start_percent=0.8, end_percent=0.2)
    with pytest.raises(NPOError, match="end_percent"):
        _apply(model, offset, end_percent=1.5)
    with pytest.raises(NPOError, match="merge_weight"):
        NPONegativeModel.execute(
            model=model, npo_offset=offset, strength=1.0, base_model=tiny("sd15"), merge_weight=2.0
        )
    with pytest.raises(NPOError, match="base_model"):
        NPONegativeModel.execute(model=model, npo_offset=offset, strength=1.0, merge_weight=0.5)
    for m in (0.5, 0.0):  # a base of another architecture is refused, not an AttributeError deep inside
        with pytest.raises(NPOError, match="base_model is SDXL"):
            NPONegativeModel.execute(
                model=model, npo_offset=offset, strength=1.0, base_model=tiny("sdxl"), merge_weight=m
            )


def _tiny_flux_on_meta():
    fields = {f.name for f in dataclasses.fields(FluxParams)}
    config = {
        "image_model": "flux",
        "in_channels": 16,
        "out_channels": 16,
        "vec_in_dim": 32,
        "context_in_dim": 32,
        "hidden_size": 64,
        "mlp_ratio": 2.0,
        "num_heads": 2,
        "depth": 1,
        "depth_single_blocks": 1,
        "axes_dim": [8, 12, 12],
        "theta": 10000,
        "patch_size": 2,
        "qkv_bias": True,
        "guidance_embed": False,
        "txt_ids_dims": [],
    }
    # keep only what this ComfyUI's FluxParams knows (v0.3.64 has no txt_ids_dims)
    cfg = comfy.supported_models.Flux({k: v for k, v in config.items() if k in fields or k == "image_model"})
    with torch.device("meta"):
        return kit.patcher(cfg.get_model({}))


@pytest.mark.fault(
    "an SD1.5 offset given with a Flux model to Apply NPO, NPO Negative Model or the guider; a Flux model as "
    "the guider's negative_model for an SD1.5 model",
    "NPOError naming both families",
)
def test_offset_of_another_family(load_offset, tiny):
    flux = _tiny_flux_on_meta()
    offset = load_offset(kit.make_lora("sd15", "peft", rank=4)[0], metadata={"npo.base_arch": "SD15"})
    with pytest.raises(NPOError, match="made for SD15 but the model is Flux"):
        _apply(flux, offset)
    with pytest.raises(NPOError, match="made for SD15 but the model is Flux"):
        NPONegativeModel.execute(model=flux, npo_offset=offset, strength=1.0)
    with pytest.raises(NPOError, match="negative_model is Flux but model is SD15"):
        sampling.make_guider(tiny("sd15"), *kit.make_conds("sd15"), 5.0, negative_model=flux)
