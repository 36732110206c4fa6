"""DiT families with the guiders and workflows built around them: DualCFGGuider (HiDream E1, OmniGen2 use
it: [negative, middle, positive]), the Wan 2.2 14B two-expert split (one offset per expert), and cfg 1.

References run each chunk (or expert) on a separately built model with hand-merged weights.
"""

from __future__ import annotations

import logging

import comfy.sample
import comfy.samplers
import npo_familykit as fk
import npo_hostkit as kit
import pytest
import torch
from comfy_extras.nodes_custom_sampler import Guider_DualCFG
from test_host_families import _family  # every family used here is in every ComfyUI of the matrix
from test_host_three_cond import _chunk_reference

from comfyui_npo.nodes.host import sampling


def _guider_sample(guider, fam, batch):
    latent, noise = fk.noise_and_latent(fam, batch)
    with torch.inference_mode():
        sig = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), "simple", 2)
        return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sig, disable_pbar=True, seed=0)


@pytest.mark.parametrize("name", ["hidream_full", "wan21", "qwen_image"])
def test_dual_cfg_guider_on_a_dit_puts_the_offset_on_its_negative(name, load_offset):
    fam = _family(name)
    model = fk.tiny_model(fam)
    factors = fk.attention_lora(fam, model)
    npo = sampling.apply_offset(model, load_offset(fk.comfy_lora_file(factors), f"{name}.safetensors"), 1.0)
    merged = fk.model_from(fam, fk.merged(fk.pristine(fam), fk.dense_truth(factors), 1.0))
    pos, neg = fam.conds(1)
    middle, _ = fam.conds(11)

    def dual(m):
        g = Guider_DualCFG(m)
        g.set_conds(pos, middle, neg)
        g.set_cfg(4.0, 2.0)
        return g

    out = _guider_sample(dual(npo), fam, 2)
    reference = _guider_sample(dual(_chunk_reference(fk.tiny_model(fam), merged, 0)), fam, 2)
    on_middle = _guider_sample(dual(_chunk_reference(fk.tiny_model(fam), merged, 1)), fam, 2)
    assert fk.max_err(reference, on_middle) > 1e-3
    assert fk.close(out, reference), f"{name}: {fk.max_err(out, reference):.2e}"


def _advanced(model, fam, noise, latent, start, last, add_noise: bool):
    """KSamplerAdvanced's call: a step range of one schedule, the second half without new noise."""
    pos, neg = fam.conds(1)
    with torch.inference_mode():
        return comfy.sample.sample(
            model,
            noise if add_noise else torch.zeros_like(noise),
            4,
            fam.cfg,
            "euler",
            "simple",
            pos,
            neg,
            latent,
            start_step=start,
            last_step=last,
            force_full_denoise=last >= 4,
            disable_noise=not add_noise,
            disable_pbar=True,
            seed=0,
        )


def test_wan22_two_experts_take_one_offset_each(load_offset):
    """Wan 2.2 14B runs a high-noise expert for the first steps and a low-noise one for the rest (ComfyUI
    detects both as WAN21_T2V). Each Apply NPO carries the offset made for its expert."""
    fam = _family("wan21")
    high, low = fk.tiny_model(fam, seed=0), fk.tiny_model(fam, seed=1)
    f_high, f_low = fk.attention_lora(fam, high, seed=3), fk.attention_lora(fam, low, seed=4)
    o_high = load_offset(fk.comfy_lora_file(f_high), "high.safetensors")
    o_low = load_offset(fk.comfy_lora_file(f_low), "low.safetensors")
    latent, noise = fk.noise_and_latent(fam, 1)

    def run(m_high, m_low):
        mid = _advanced(m_high, fam, noise, latent, 0, 2, True)
        return _advanced(m_low, fam, noise, mid, 2, 4, False)

    got = run(sampling.apply_offset(high, o_high, 1.0), sampling.apply_offset(low, o_low, 1.0))
    ref_high = fk.model_from(fam, fk.merged(fk.pristine(fam, 0), fk.dense_truth(f_high), 1.0))
    ref_low = fk.model_from(fam, fk.merged(fk.pristine(fam, 1), fk.dense_truth(f_low), 1.0))
    want = run(
        kit.with_reference_cfg(fk.tiny_model(fam, 0), ref_high), kit.with_reference_cfg(fk.tiny_model(fam, 1), ref_low)
    )
    swapped = run(
        kit.with_reference_cfg(fk.tiny_model(fam, 0), ref_low), kit.with_reference_cfg(fk.tiny_model(fam, 1), ref_high)
    )
    assert fk.max_err(want, swapped) > 1e-3
    assert fk.close(got, want), f"two experts: {fk.max_err(got, want):.2e}"


def test_cfg_1_on_a_dit_says_npo_cannot_act(load_offset, caplog):
    fam = _family("chroma")
    model = fk.tiny_model(fam)
    npo = sampling.apply_offset(model, load_offset(fk.comfy_lora_file(fk.attention_lora(fam, model))), 1.0)
    with caplog.at_level(logging.WARNING, logger="comfyui-npo"):
        out = fk.sample(npo, fam, 1, cfg=1.0)
    assert torch.equal(out, fk.sample(fk.tiny_model(fam), fam, 1, cfg=1.0))
    notes = [r.getMessage() for r in caplog.records if "cfg is 1" in r.getMessage()]
    assert len(notes) == 1, notes
