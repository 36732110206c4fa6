"""Apply NPO with the passes users chain after KSampler, on a tiny SD1.5: a second KSampler on the same MODEL at
denoise < 1 on the first pass's latent (img2img / hires fix), the same after LatentUpscaleBy, a detailer-style
re-sample of a masked region (SetLatentNoiseMask), and a tiled re-sample of the upscaled latent (LatentCrop →
KSampler per tile → LatentComposite), all through ComfyUI's own nodes.

Each second pass is a new sampling run on the same patched MODEL, so what the offsets learnt about the first run's
conds must not carry over. Two independent references:
- per UNet call: a recording ``model_function_wrapper`` gets every batch the UNet computes (rows, sigma, conds,
  ``cond_or_uncond``) and the pack's output for it; each positive chunk must equal a separately built plain model on
  the same rows, each negative chunk a separately built model with θ + s·ΔW merged by hand;
- end to end: the same two passes with the negative chunk computed on the hand-merged model
  (``sampler_calc_cond_batch_function``) give the same latent.
"""

from __future__ import annotations

import comfy.model_management
import npo_familykit as fk
import npo_hostkit as kit
import pytest
import torch

import nodes  # ComfyUI's nodes.py (conftest loads it first), not the pack's nodes/
from comfyui_npo.nodes.models import NPOApply

KIND = "sd15"
STRENGTH = 0.8
CFG = 5.0
STEPS = 4


def _ksampler(model, pos, neg, latent, seed, denoise):
    """The KSampler node (common_ksampler: its noise, denoise schedule and noise mask), euler / normal."""
    with torch.inference_mode():
        return nodes.KSampler().sample(model, seed, STEPS, CFG, "euler", "normal", pos, neg, latent, denoise)[0]


def _between(latent: dict, how: str) -> dict:
    """What the user puts between the passes: nothing, LatentUpscaleBy ×1.5, or a detailer's noise mask."""
    if how == "upscale":
        with torch.inference_mode():
            return nodes.LatentUpscaleBy().upscale(latent, "bilinear", 1.5)[0]
    if how == "detailer":
        mask = torch.zeros(1, kit.LATENT * 8, kit.LATENT * 8)
        mask[:, 16:48, 8:40] = 1.0  # a region of the image, as a detailer's crop mask
        return nodes.SetLatentNoiseMask().set_mask(latent, mask)[0]
    return latent


def _tiled(model, pos, neg, latent: dict) -> dict:
    """A tiled re-sample as tiled-upscale workflows build it from core nodes: LatentCrop two overlapping tiles,
    KSampler each at denoise 0.5, LatentComposite them back with a feathered seam."""
    out = latent
    width = latent["samples"].shape[-1] * 8
    tile = width * 2 // 3 // 8 * 8  # 64 px of the 96 px upscaled latent: the tiles overlap by 32 px
    with torch.inference_mode():
        for i, x in enumerate((0, width - tile)):
            crop = nodes.LatentCrop().crop(latent, tile, width, x, 0)[0]
            assert crop["samples"].shape[-2:] == (width // 8, tile // 8), crop["samples"].shape
            done = _ksampler(model, pos, neg, crop, 2 + i, 0.5)
            out = nodes.LatentComposite().composite(out, done, x, 0, feather=8 if x else 0)[0]
    return out


def _two_passes(model, pos, neg, batch, how, probe=None):
    """First pass (denoise 1) → ``how`` → second pass (denoise 0.5) on the same MODEL; the final samples."""
    first = _ksampler(model, pos, neg, {"samples": torch.zeros(batch, 4, kit.LATENT, kit.LATENT)}, 0, 1.0)
    if probe is not None:
        probe.append("second")
    if how == "tiled":
        return _tiled(model, pos, neg, _between(first, "upscale"))["samples"]
    return _ksampler(model, pos, neg, _between(first, how), 1, 0.5)["samples"]


def _row_probe(npo_model, plain, merged):
    """A clone of ``npo_model`` that records, per UNet call, (pass, chunk kind, max |out − plain|, max |out − merged|,
    max |plain − merged|) for every chunk; the references run on the same rows with no transformer options."""
    calls: list = ["first"]
    rows: list[tuple] = []

    def wrapper(apply_model, args):
        x, t, c, kinds = args["input"], args["timestep"], args["c"], args["cond_or_uncond"]
        out = apply_model(x, t, **c)
        bare = {k: v for k, v in c.items() if k != "transformer_options"}
        for ref in (plain, merged):
            ref.model.current_patcher = ref
        want_plain = plain.model.apply_model(x, t, **bare)
        want_merged = merged.model.apply_model(x, t, **bare)
        n = len(kinds)
        for kind, o, p, m in zip(kinds, out.chunk(n), want_plain.chunk(n), want_merged.chunk(n), strict=True):
            errs = (kit.max_err(o, p), kit.max_err(o, m), kit.max_err(p, m))
            rows.append((calls[-1], kind, *errs, float(o.abs().max())))
        return out

    probe = npo_model.clone()
    probe.set_model_unet_function_wrapper(wrapper)
    return probe, calls, rows


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("how", ["img2img", "upscale", "detailer", "tiled"])
def test_a_second_pass_keeps_the_offset_on_the_negative_rows_only(tiny, load_offset, how, batch):
    sd, truth = kit.make_lora(KIND, "peft", rank=4, seed=13)
    offset = load_offset(sd, "second_pass.safetensors")
    base = tiny(KIND)
    before = kit.state_hash(base.model.diffusion_model)
    merged_weights = kit.merged(tiny.weights(KIND), (STRENGTH, truth))
    pos, neg = kit.make_conds(KIND)
    with torch.inference_mode():
        npo_model = NPOApply.execute(model=base, npo_offset=offset, strength=STRENGTH).result[0]

    probe, calls, rows = _row_probe(npo_model, tiny(KIND), tiny.from_weights(KIND, merged_weights))
    got = _two_passes(probe, pos, neg, batch, how, probe=calls)
    reference = fk.with_reference_batch(tiny(KIND), tiny.from_weights(KIND, merged_weights))
    want = _two_passes(reference, pos, neg, batch, how)
    plain = _two_passes(tiny(KIND), pos, neg, batch, how)

    if how in ("upscale", "tiled"):
        assert got.shape[-1] == got.shape[-2] == int(kit.LATENT * 1.5), got.shape
    effect = kit.max_err(plain, want)
    assert effect > 1e-2, f"{how}: the offset should change the result (plain vs reference {effect:.3g})"
    err = kit.max_err(got, want)
    assert kit.close(got, want), f"{how} batch {batch}: NPO vs reference {err:.3g} (effect {effect:.3g})"

    for stage in ("first", "second"):
        here = [r for r in rows if r[0] == stage]
        assert {r[1] for r in here} == {0, 1}, f"{how}, {stage} pass: the UNet never saw both chunks"
        for _, kind, vs_plain, vs_merged, _, scale in here:
            tol = 1e-4 + 1e-4 * scale
            if kind == 0:
                assert vs_plain <= tol, f"{how}, {stage} pass: a positive chunk is {vs_plain:.3g} off the plain model"
            else:
                assert vs_merged <= tol, f"{how}, {stage} pass: a negative chunk is {vs_merged:.3g} off θ + s·ΔW"
        assert max(r[4] for r in here if r[1] == 1) > 1e-2, f"{how}, {stage} pass: the offset had no effect there"

    comfy.model_management.unload_all_models()
    assert kit.state_hash(base.model.diffusion_model) == before
    assert not kit.hooked_modules(base.model.diffusion_model)
