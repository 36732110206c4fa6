"""NPO CFG Guider with a negative_model input, against the hand-written two-network reference
(see test_host_sampling.py). Two clones of one loaded module cannot both hold
their weights in one sampling step, so the naive guider is silently wrong; these tests catch it."""

from __future__ import annotations

import comfy.samplers
import comfy.sd
import npo_hostkit as kit
import pytest
import torch

from comfyui_npo.nodes.guider import NPOCFGGuider
from comfyui_npo.nodes.host import sampling
from comfyui_npo.nodes.models import NPONegativeModel
from comfyui_npo.npo_core.errors import NPOError

CFG = 5.0


def _guider(**kw):
    with torch.inference_mode():
        return NPOCFGGuider.execute(**kw).result[0]


def _check(out, ref_out, plain_out, what):
    scale = float(ref_out.abs().max())
    assert kit.max_err(ref_out, plain_out) > 100 * (1e-4 + 1e-4 * scale), f"{what}: the negative model changes nothing"
    err = kit.max_err(out, ref_out)
    assert kit.close(out, ref_out), f"{what}: max |guider − reference| = {err:.3g} (scale {scale:.3g})"


def _reference(tiny, kind, pos_model, neg_weights, pos, neg, batch):
    ref = tiny.from_weights(kind, neg_weights)
    return kit.ksample(kit.with_reference_cfg(pos_model, ref), pos, neg, CFG, batch)


def test_negative_model_from_npo_negative_model_node(tiny, load_offset):
    """(a) NPO Negative Model output = a clone sharing the base's module."""
    kind, batch = "sd15", 2
    base = tiny(kind)
    sd, delta = kit.make_lora(kind, "peft", rank=4, seed=3)
    with torch.inference_mode():
        neg_model = NPONegativeModel.execute(model=base, npo_offset=load_offset(sd), strength=1.0).result[0]
    assert neg_model.is_clone(base)
    pos, neg = kit.make_conds(kind, "regional")
    ref_out = _reference(tiny, kind, base, kit.merged(tiny.weights(kind), (1.0, delta)), pos, neg, batch)
    plain_out = kit.ksample(base, pos, neg, CFG, batch)

    out = kit.guider_sample(_guider(model=base, positive=pos, negative=neg, cfg=CFG, negative_model=neg_model), batch)
    _check(out, ref_out, plain_out, "negative_model = NPO Negative Model")

    # The naive way (row D: a guider that runs the clone as a second model) must be caught by this comparison.
    naive = sampling.NegativePassCFGGuider(base, neg_model)
    naive.set_conds(pos, neg)
    naive.set_cfg(CFG)
    naive_out = kit.guider_sample(naive, batch)
    assert not kit.close(naive_out, ref_out), "two clones of one module gave the right result: row D no longer holds"


@pytest.mark.parametrize("m", [0.0, 0.5])
def test_negative_model_with_merge_weight_on_lora_finetune(tiny, load_offset, m):
    """(a') θ_pos = base + stock LoRA; negative = NPO Negative Model(θ_pos, base, m).
    Every model here is a clone of one module."""
    kind, batch = "sdxl", 1
    base = tiny(kind)
    lora_sd, lora_delta = kit.make_lora(kind, "kohya_ldm", rank=4, seed=21, alpha=4.0)
    pos_model = comfy.sd.load_lora_for_models(base, None, lora_sd, 0.8, 0.0)[0]
    sd, delta = kit.make_lora(kind, "peft", rank=4, seed=3)
    with torch.inference_mode():
        neg_model = NPONegativeModel.execute(
            model=pos_model, npo_offset=load_offset(sd), strength=1.0, base_model=base, merge_weight=m
        ).result[0]
    pos, neg = kit.make_conds(kind)
    neg_weights = kit.merged(tiny.weights(kind), (1.0, delta), ((1 - m) * 0.8, lora_delta))
    ref_out = _reference(tiny, kind, pos_model, neg_weights, pos, neg, batch)
    plain_out = kit.ksample(pos_model, pos, neg, CFG, batch)
    guider = _guider(model=pos_model, positive=pos, negative=neg, cfg=CFG, negative_model=neg_model)
    out = kit.guider_sample(guider, batch)
    _check(out, ref_out, plain_out, f"LoRA fine-tune, merge_weight {m}")


def test_negative_model_from_stock_lora_loader(tiny):
    """(b) negative_model = base through the stock LoRA loader (LoraLoaderModelOnly's code path)."""
    kind, batch = "sdxl_v", 2
    base = tiny(kind)
    lora_sd, lora_delta = kit.make_lora(kind, "kohya_ldm", rank=4, seed=8, alpha=2.0)
    neg_model = comfy.sd.load_lora_for_models(base, None, lora_sd, 0.7, 0.0)[0]
    pos, neg = kit.make_conds(kind, "regional")
    ref_out = _reference(tiny, kind, base, kit.merged(tiny.weights(kind), (0.7, lora_delta)), pos, neg, batch)
    plain_out = kit.ksample(base, pos, neg, CFG, batch)
    out = kit.guider_sample(_guider(model=base, positive=pos, negative=neg, cfg=CFG, negative_model=neg_model), batch)
    _check(out, ref_out, plain_out, "stock LoRA loader clone")


@pytest.mark.parametrize("kind,with_patches", [("sd15", False), ("sdxl", True)])
def test_independent_negative_model(tiny, kind, with_patches):
    """(c) a separately built model: merged weights in its parameters, or base weights + LoRA patches."""
    batch = 2
    base = tiny(kind)
    lora_sd, lora_delta = kit.make_lora(kind, "kohya_diffusers", rank=4, seed=4, alpha=4.0)
    neg_weights = kit.merged(tiny.weights(kind), (1.0, lora_delta))
    if with_patches:
        neg_model = comfy.sd.load_lora_for_models(tiny(kind), None, lora_sd, 1.0, 0.0)[0]
    else:
        neg_model = tiny.from_weights(kind, neg_weights)
    assert not neg_model.is_clone(base)
    pos, neg = kit.make_conds(kind, "regional")
    ref_out = _reference(tiny, kind, base, neg_weights, pos, neg, batch)
    plain_out = kit.ksample(base, pos, neg, CFG, batch)
    out = kit.guider_sample(_guider(model=base, positive=pos, negative=neg, cfg=CFG, negative_model=neg_model), batch)
    _check(out, ref_out, plain_out, "independent negative model")
    # cfg 1: the negative model is never run
    basic = kit.guider_sample(_guider(model=base, positive=pos, negative=neg, cfg=1.0, negative_model=neg_model), batch)
    assert kit.close(basic, kit.ksample(base, pos, neg, 1.0, batch), 1e-6, 1e-6)


@pytest.mark.fault(
    "NPO CFG Guider with neither or both of npo_offset and negative_model",
    "NPOError saying exactly one is needed",
)
def test_exactly_one_of_offset_or_negative_model(tiny, load_offset):
    """(d)"""
    base = tiny("sd15")
    pos, neg = kit.make_conds("sd15")
    offset = load_offset(kit.make_lora("sd15", "peft", rank=4)[0])
    with pytest.raises(NPOError, match="exactly one of npo_offset or negative_model"):
        _guider(model=base, positive=pos, negative=neg, cfg=CFG)
    with pytest.raises(NPOError, match="exactly one of npo_offset or negative_model"):
        _guider(model=base, positive=pos, negative=neg, cfg=CFG, npo_offset=offset, negative_model=base.clone())


@pytest.mark.fault("a negative_model of another architecture than model", "NPOError naming both architectures")
def test_negative_model_of_another_architecture(tiny):
    with pytest.raises(NPOError, match="SDXL.*SD15|SD15.*SDXL"):
        _guider(
            model=tiny("sd15"),
            positive=kit.make_conds("sd15")[0],
            negative=kit.make_conds("sd15")[1],
            cfg=CFG,
            negative_model=tiny("sdxl"),
        )


def test_negative_clone_of_the_base_with_lora_positive(tiny, load_offset):
    """(a'') positive = base + LoRA, negative = NPO Negative Model(base): both clones of one module whose patch
    lists share no prefix; the negative pass must run θ_base + δ (the positive's LoRA is NOT in it)."""
    kind, batch = "sd15", 2
    base = tiny(kind)
    lora_sd, lora_delta = kit.make_lora(kind, "kohya_ldm", rank=4, seed=21, alpha=4.0)
    pos_model = comfy.sd.load_lora_for_models(base, None, lora_sd, 1.0, 0.0)[0]
    sd, delta = kit.make_lora(kind, "comfy", rank=4, seed=3, alpha=4.0, extras=True)
    with torch.inference_mode():
        neg_model = NPONegativeModel.execute(model=base, npo_offset=load_offset(sd), strength=1.0).result[0]
    pos, neg = kit.make_conds(kind, "regional")
    ref_out = _reference(tiny, kind, pos_model, kit.merged(tiny.weights(kind), (1.0, delta)), pos, neg, batch)
    plain_out = kit.ksample(pos_model, pos, neg, CFG, batch)
    guider = _guider(model=pos_model, positive=pos, negative=neg, cfg=CFG, negative_model=neg_model)
    _check(kit.guider_sample(guider, batch), ref_out, plain_out, "LoRA positive, NPO Negative Model of the base")


def test_negative_model_equal_to_model_is_plain_cfg(tiny):
    base = tiny("sd15")
    pos, neg = kit.make_conds("sd15")
    guider = _guider(model=base, positive=pos, negative=neg, cfg=CFG, negative_model=base.clone())
    assert torch.equal(kit.guider_sample(guider, 2), kit.ksample(base, pos, neg, CFG, 2))


def test_independent_negative_model_goes_through_the_calc_cond_batch_hook(tiny):
    """A model's sampler_calc_cond_batch_function (what sampling_function calls instead of calc_cond_batch)
    is called for both passes, each with the [cond, uncond] layout and the model that computes it."""
    kind, batch = "sd15", 1
    base = tiny(kind)
    neg_model = tiny.from_weights(kind, kit.merged(tiny.weights(kind), (1.0, kit.make_lora(kind, "peft", seed=4)[1])))
    pos, neg = kit.make_conds(kind)
    seen = []

    def hook(args):
        slots = tuple(c is not None for c in args["conds"])
        seen.append((args["model"] is neg_model.model, slots))
        out = comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"],
                                             args["model_options"])
        return [o * 0.5 for o in out]  # visible in the result

    hooked = base.clone()
    hooked.model_options["sampler_calc_cond_batch_function"] = hook
    out = kit.guider_sample(_guider(model=hooked, positive=pos, negative=neg, cfg=CFG, negative_model=neg_model),
                            batch, steps=2)
    assert seen == [(False, (True, False)), (True, (False, True))] * 2
    plain = kit.guider_sample(_guider(model=base, positive=pos, negative=neg, cfg=CFG, negative_model=neg_model),
                              batch, steps=2)
    assert not kit.close(out, plain)
