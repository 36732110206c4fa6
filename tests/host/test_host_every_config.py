"""Every model-config class of the running ComfyUI round-trips: Self-NPO Train → Save → Load → Apply NPO.

Parametrised over ``comfy.supported_models.models`` of the ComfyUI in use (collected at import). Each class gets a
tiny model of that very class (SD UNets from npo_unetkit, DiT / video families from the families kit, Flux.1
from a builder here); a class no kit builds is skipped with the reason. The family the pack sees is the
config class, so a class the pack names inconsistently (the SSD-1B bug: trained, saved, then "made for SSD1B
but the model is SSD1B" on the very model) fails here.

Per class:
- a class the pack refuses by design (Cosmos Predict1, guidance-distilled Flux.1 dev / schnell / Fill, a
  continuous EDM schedule such as SVD / SV3D): Self-NPO Train raises an NPOError naming ``model`` before any
  sampling (no latents connected, so a late refusal would show as a pool sample);
- any other: Self-NPO Train (lora, rank 2, 2 steps, truncation 2, batch 1, latents connected), Save NPO Offset,
  Load NPO Offset, Apply NPO on the same model and a 2-step sample (finite; ``npo.base_arch`` of the file
  and of the loaded offset is what training recorded), then Apply NPO on a tiny model of another family
  (SD1.5, or SDXL for a 768-context SD1.5-lineage class) must raise "was made for X but the model is Y"
  with X (the recorded family) ≠ Y.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import comfy.model_sampling
import comfy.sample
import comfy.supported_models
import npo_familykit as fk
import npo_hostkit as kit
import npo_unetkit as uk
import pytest
import torch
from families import seeded_init
from safetensors import safe_open

from comfyui_npo.nodes.models import NPOApply
from comfyui_npo.nodes.offsets import NPOLoadOffset, NPOSaveOffset
from comfyui_npo.npo_core.errors import NPOError

NAMES = [c.__name__ for c in comfy.supported_models.models]
KIT_FAMILIES = {f.config_class: f for f in fk.all_families()}
# the family check's "was made for X but the model is Y" (also the text-context check's "made for X (text context
# N) but the model is Y (...)"): X and Y are family names
MISMATCH = re.compile(r"(?:was )?made for ([A-Za-z0-9_\-]+)(?: \([^)]*\))? but the model is ([A-Za-z0-9_\-]+)")

# why no kit has a tiny model of a class (the skip reason says what the class is)
NOT_IN_KITS = {
    **dict.fromkeys(("StableAudio", "StableAudio3", "ACEStep", "ACEStep15", "MiniMaxMusic3"), "an audio model"),
    **dict.fromkeys(("Hunyuan3Dv2", "Hunyuan3Dv2mini", "Hunyuan3Dv2_1", "TripoSplat"), "a 3D-shape model"),
    **dict.fromkeys(("SeedVR2", "HunyuanVideo15_SR_Distilled"), "a video upscaler / restorer"),
    **dict.fromkeys(("RT_DETR_v4", "SAM3", "SAM31", "DepthAnything3"), "a detection / segmentation / depth model"),
    "Stable_Cascade_B": "Stable Cascade's decoder stage, conditioned on a stage-C latent",
    "LTXAV": "LTX-2: its video+audio NestedTensor latent has no TinyFamily (fam_video.build_ltxav builds the model)",
}


@dataclass
class Subject:
    """A tiny model of one config class and what samples it."""

    model: object
    conds: tuple[list, list]
    latent_shape: tuple[int, ...]
    cfg: float
    scheduler: str


# ---------------------------------------------------------------------------------------------
# Flux.1 dev / schnell / Fill: guidance- or step-distilled (cfg 1), built only to see the refusal
# ---------------------------------------------------------------------------------------------
_FLUX = {
    "image_model": "flux",
    "in_channels": 16,  # model_detection: img_in in_features / patch² (Fill: 16 + 16 masked image + 64 mask)
    "out_channels": 16,
    "vec_in_dim": 768,  # CLIP-L pooled
    "context_in_dim": 4096,  # T5-XXL
    "hidden_size": 64,
    "mlp_ratio": 4.0,
    "num_heads": 2,
    "depth": 1,
    "depth_single_blocks": 1,
    "axes_dim": [4, 14, 14],  # real: [16, 56, 56]
    "theta": 10000,
    "patch_size": 2,
    "qkv_bias": True,
    "txt_ids_dims": [],  # ComfyUI ≥ 0.14 (model_detection sets it for Flux.1)
}
FLUX_CLASSES = {"Flux": {"guidance_embed": True}, "FluxSchnell": {"guidance_embed": False}}
FLUX_CLASSES["FluxInpaint"] = {"guidance_embed": True, "in_channels": 96}


def _tiny_flux(name: str):
    import comfy.ldm.flux.model
    import comfy.model_patcher

    fields = set(comfy.ldm.flux.model.FluxParams.__dataclass_fields__) | {"image_model"}
    cfg = {k: v for k, v in {**_FLUX, **FLUX_CLASSES[name]}.items() if k in fields}
    base = getattr(comfy.supported_models, name)(cfg).get_model({})
    seeded_init(base.diffusion_model, 0)
    g = torch.Generator().manual_seed(1)

    def cond():
        return [[torch.randn(1, 8, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g)}]]

    pos, neg = cond(), cond()
    return Subject(comfy.model_patcher.ModelPatcher(base, fk.CPU, fk.CPU), (pos, neg), (1, 16, 8, 8), 3.5, "simple")


def _subject(name: str) -> Subject:
    """A tiny model of config class ``name``, or a skip saying why there is none."""
    if name in uk.SPECS:
        try:
            mp = uk.tiny_unet(name)
        except uk.NotTiny as e:
            pytest.skip(e.reason)
        return Subject(mp, uk.tiny_conds(mp, 1), tuple(uk.tiny_latent(mp, 1)["samples"].shape), 5.0, "normal")
    if name in KIT_FAMILIES:
        fam = KIT_FAMILIES[name]
        return Subject(fk.tiny_model(fam), fam.conds(1), tuple(fam.latent_shape(1)), fam.cfg, "simple")
    if name in FLUX_CLASSES:
        return _tiny_flux(name)
    what = NOT_IN_KITS.get(name)
    pytest.skip(f"no tiny {name} in the test kits" + (f" ({what})" if what else ""))


def _designed_refusal(mp) -> str | None:
    """A regex for the NPOError the pack gives a model it refuses by design, judged from ComfyUI's own facts
    about the model (never from the pack's tables), or None."""
    config = mp.model.model_config
    if type(mp.model).__name__ == "CosmosVideo":  # Cosmos Predict1: the batch is off dim 0 inside its blocks
        return r"not supported"
    if config.unet_config.get("guidance_embed") or type(config).__name__ == "FluxSchnell":
        return r"guidance-distilled"
    ms = mp.get_model_object("model_sampling")
    continuous = tuple(
        getattr(comfy.model_sampling, n)
        for n in ("ModelSamplingContinuousEDM", "ModelSamplingContinuousV")
        if hasattr(comfy.model_sampling, n)
    )
    if isinstance(ms, continuous):  # SVD / SV3D / Playground 2.5 / CosXL: no discrete table
        return r"schedule"
    return None


def _pool_size(subj: Subject) -> dict:
    """width / height / frames of a data-free pool sample with the subject's latent shape."""
    fmt = subj.model.model.latent_format
    f = int(getattr(fmt, "spacial_downscale_ratio", 8))
    out = {"width": max(64, subj.latent_shape[-1] * f), "height": max(64, subj.latent_shape[-2] * f)}
    if len(subj.latent_shape) == 5:
        out["frames"] = (subj.latent_shape[2] - 1) * int(getattr(fmt, "temporal_downscale_ratio", 1)) + 1
    return out


def _train(subj: Subject, name: str, latents: dict | None):
    pos, neg = subj.conds
    kw = dict(steps=2, batch_size=1, mode="lora", rank=2, truncation_steps=2, save_every=0)
    kw.update(filename_prefix=f"every_{name}", pool_size=1, pool_steps=1, pool_cfg=subj.cfg, **_pool_size(subj))
    if latents is not None:
        kw["latents"] = latents
    return kit.self_npo_train(subj.model, pos, neg, **kw)


def _sample(mp, subj: Subject) -> torch.Tensor:
    pos, neg = subj.conds
    noise = torch.randn(subj.latent_shape, generator=torch.Generator().manual_seed(7))
    latent, steps, quiet = torch.zeros(subj.latent_shape), 2, {"seed": 0, "disable_pbar": True}
    with torch.inference_mode():
        return comfy.sample.sample(mp, noise, steps, subj.cfg, "euler", subj.scheduler, pos, neg, latent, **quiet)


def _apply(mp, offset):
    with torch.inference_mode():
        return NPOApply.execute(model=mp, npo_offset=offset, strength=1.0).result[0]


def _other_family(mp) -> str:
    """SD1.5, or SDXL for a model with SD1.5's 768-wide text context (SD1.5 and its InstructPix2Pix / Zero123)."""
    return "SDXL" if mp.model.model_config.unet_config.get("context_dim") == 768 else "SD15"


@pytest.mark.parametrize("name", NAMES)
def test_config_class_round_trips(name, npo_dir, out_dir, monkeypatch):
    subj = _subject(name)
    model = subj.model
    assert type(model.model.model_config).__name__ == name

    refusal = _designed_refusal(model)
    if refusal is not None:
        assert torch.isfinite(_sample(model, subj)).all()  # the tiny model itself is sound
        sampled = []
        real_sample = comfy.sample.sample
        monkeypatch.setattr(comfy.sample, "sample", lambda *a, **k: sampled.append(1) or real_sample(*a, **k))
        with pytest.raises(NPOError) as refused:
            _train(subj, name, latents=None)
        msg = str(refused.value)
        assert msg.startswith("model: ") and re.search(refusal, msg), f"{name}: refused for another reason: {msg}"
        assert sampled == [], f"{name}: refused only after {len(sampled)} pool samples"
        return

    # a. Self-NPO Train, latents connected (no pool sampling)
    g = torch.Generator().manual_seed(3)
    latents = {"samples": torch.randn(subj.latent_shape, generator=g)}
    trained = _train(subj, name, latents).result[0]
    recorded = trained.base_arch
    assert trained.entries and recorded and not recorded.startswith("unknown"), f"{name}: recorded {recorded!r}"

    # b. Save NPO Offset → Load NPO Offset → Apply NPO on the same model, one short sample
    with torch.inference_mode():
        NPOSaveOffset.execute(npo_offset=trained, filename_prefix=f"every/{name}")
    (path,) = list(npo_dir.rglob(f"{name}_*.safetensors"))
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["npo.base_arch"] == recorded
    with torch.inference_mode():
        loaded = NPOLoadOffset.execute(offset_name=path.relative_to(npo_dir).as_posix()).result[0]
    assert loaded.base_arch == recorded
    try:
        applied = _apply(model, loaded)
    except NPOError as e:
        pytest.fail(f"{name}: Apply NPO refused the offset trained on this very model: {e}")
    assert torch.isfinite(_sample(applied, subj)).all()

    # c. the offset on a model of another family: refused, naming two different families
    other_name = _other_family(model)
    other = uk.tiny_unet(other_name)
    with pytest.raises(NPOError) as refused:
        _apply(other, loaded)
    msg = str(refused.value)
    m = MISMATCH.search(msg)
    assert m, f"{name} offset on {other_name}: no 'was made for X but the model is Y' in: {msg}"
    made_for, model_is = m.groups()
    assert made_for != model_is, f"{name} offset on {other_name}: the mismatch names {made_for} twice: {msg}"
    assert made_for == recorded, f"{name} offset on {other_name}: says made for {made_for}, recorded {recorded}"


def test_sd15_inpainting_checkpoint_trains_with_the_samplers_concat(out_dir, monkeypatch):
    """An SD1.5 inpainting checkpoint (config SD15 with in_channels 9, mask + masked image concatenated) trains
    on the c_concat ComfyUI's own sampler makes from an empty latent: training's model inputs carry the same
    tensor that a KSampler call on that model passes to ``apply_model``."""
    import comfy.model_base
    import comfy.model_patcher

    base = comfy.supported_models.SD15({**uk.unet_config("SD15"), "in_channels": 9}).get_model({})
    seeded_init(base.diffusion_model, 0)
    mp = comfy.model_patcher.ModelPatcher(base, fk.CPU, fk.CPU)
    assert base.concat_keys == ("mask", "masked_image")
    g = torch.Generator().manual_seed(1)
    pos, neg = [[torch.randn(1, uk.TOKENS, 768, generator=g), {}]], [[torch.randn(1, uk.TOKENS, 768, generator=g), {}]]
    concats = {"sample": [], "train": []}
    phase = ["sample"]
    real = comfy.model_base.BaseModel.apply_model

    def spy(self, x, t, c_concat=None, *args, **kwargs):
        concats[phase[0]].append(None if c_concat is None else c_concat.detach().clone())
        return real(self, x, t, c_concat, *args, **kwargs)

    monkeypatch.setattr(comfy.model_base.BaseModel, "apply_model", spy)
    subj = Subject(mp, (pos, neg), (1, 4, uk.LATENT, uk.LATENT), 5.0, "normal")
    assert torch.isfinite(_sample(mp, subj)).all()
    phase[0] = "train"
    latents = {"samples": torch.randn(2, 4, uk.LATENT, uk.LATENT, generator=g)}
    trained = _train(subj, "sd15_inpaint", latents).result[0]
    assert trained.base_arch == "SD15" and any(torch.count_nonzero(e.up) for e in trained.entries.values())
    want = concats["sample"][0][:1]  # the cond / uncond rows of one sampler call are alike
    assert want.shape == (1, 5, uk.LATENT, uk.LATENT)
    assert concats["train"] and all(c is not None for c in concats["train"])
    for c in concats["train"]:
        torch.testing.assert_close(c, want.expand_as(c), rtol=0, atol=0)
