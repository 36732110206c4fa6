"""Core's Dual Model CFG Guider (ComfyUI ≥ 0.33) with NPO models on its negative input.

That guider loads its negative model, then its positive model, and runs the negative pass on the
negative model's BaseModel with the positive model's options. An NPO model that is a clone of the
positive's module (NPO Negative Model, Apply NPO on the same checkpoint) would then run the positive's
weights: plain CFG, silently. Every result here is compared with NPO CFG Guider and with the guider run
on an independently built, hand-merged negative model (which needs no help from the pack).
"""

from __future__ import annotations

import comfy.sd
import npo_hostkit as kit
import pytest
import torch

from comfyui_npo.nodes.guider import NPOCFGGuider
from comfyui_npo.nodes.models import NPOApply, NPONegativeModel
from comfyui_npo.npo_core.errors import NPOError

custom_sampler = pytest.importorskip("comfy_extras.nodes_custom_sampler")
if not hasattr(custom_sampler, "DualModelGuider"):
    pytest.skip("this ComfyUI has no Dual Model CFG Guider (it arrived in v0.33)", allow_module_level=True)

CFG = 5.0


def _dual(model, model_negative, pos, neg, cfg=CFG):
    with torch.inference_mode():
        return custom_sampler.DualModelGuider.execute(
            model=model, positive=pos, cfg=cfg, model_negative=model_negative, negative=neg
        ).result[0]


def _npo_guider(model, offset, pos, neg, strength=1.0):
    with torch.inference_mode():
        return NPOCFGGuider.execute(
            model=model, positive=pos, negative=neg, cfg=CFG, npo_offset=offset, strength=strength
        ).result[0]


def _node(cls, **kw):
    with torch.inference_mode():
        return cls.execute(**kw).result[0]


def _assert_npo(out, reference, plain, what):
    scale = float(reference.abs().max())
    assert kit.max_err(reference, plain) > 100 * (1e-4 + 1e-4 * scale), f"{what}: the offset changes nothing"
    assert kit.close(out, reference), f"{what}: max |out − reference| = {kit.max_err(out, reference):.3g}"


@pytest.mark.parametrize("batch,variant", [(1, "plain"), (2, "plain"), (2, "regional")])
def test_npo_negative_model_in_dual_model_guider(tiny, load_offset, batch, variant):
    kind, s = "sd15", 1.3
    base = tiny(kind)
    sd, delta = kit.make_lora(kind, "peft", rank=4, seed=3)
    offset = load_offset(sd)
    neg_model = _node(NPONegativeModel, model=base, npo_offset=offset, strength=s)
    assert neg_model.is_clone(base)
    pos, neg = kit.make_conds(kind, variant)

    out = kit.guider_sample(_dual(base, neg_model, pos, neg), batch)
    merged = tiny.from_weights(kind, kit.merged(tiny.weights(kind), (s, delta)))
    hand = kit.guider_sample(_dual(base, merged, pos, neg), batch)
    plain = kit.ksample(base, pos, neg, CFG, batch)
    _assert_npo(out, hand, plain, "NPO Negative Model vs hand-merged model")
    if variant == "plain":
        # With area or mask prompts the core guider itself differs from CFG: it prepares the negative conds
        # alone, so the same-area negatives that CFG adds for each positive area are missing.
        npo = kit.guider_sample(_npo_guider(base, offset, pos, neg, strength=s), batch)
        _assert_npo(out, npo, plain, "NPO Negative Model in Dual Model CFG Guider vs NPO CFG Guider")
    assert kit.state_hash(base.model) == kit.state_hash(tiny.from_weights(kind, tiny.weights(kind)).model)


def test_npo_negative_model_of_the_base_with_a_lora_positive(tiny, load_offset):
    """positive = base + stock LoRA; negative = NPO Negative Model(base): the negative pass runs θ_base + δ,
    without the positive's LoRA, although the module holds the positive's weights at that moment."""
    kind, batch = "sdxl", 2
    base = tiny(kind)
    lora_sd, _ = kit.make_lora(kind, "kohya_ldm", rank=4, seed=21, alpha=4.0)
    pos_model = comfy.sd.load_lora_for_models(base, None, lora_sd, 0.8, 0.0)[0]
    sd, delta = kit.make_lora(kind, "comfy", rank=4, seed=3, alpha=4.0, extras=True)
    neg_model = _node(NPONegativeModel, model=base, npo_offset=load_offset(sd), strength=1.0)
    pos, neg = kit.make_conds(kind)
    out = kit.guider_sample(_dual(pos_model, neg_model, pos, neg), batch)
    merged = tiny.from_weights(kind, kit.merged(tiny.weights(kind), (1.0, delta)))
    hand = kit.guider_sample(_dual(pos_model, merged, pos, neg), batch)
    _assert_npo(out, hand, kit.ksample(pos_model, pos, neg, CFG, batch), "LoRA positive")


@pytest.mark.parametrize("both", [False, True])
def test_apply_npo_as_the_negative_model(tiny, load_offset, both):
    """Apply NPO's output on model_negative (and, with ``both``, on model too): the negative pass runs
    θ + s·δ on every row of it (its rows are not tagged uncond there), the positive pass runs θ."""
    kind, batch, s = "sd15", 2, 0.8
    base = tiny(kind)
    sd, _ = kit.make_lora(kind, "kohya_ldm", rank=4, seed=5, alpha=4.0)
    offset = load_offset(sd)
    npo_model = _node(NPOApply, model=base, npo_offset=offset, strength=s)
    pos, neg = kit.make_conds(kind)
    out = kit.guider_sample(_dual(npo_model if both else base, npo_model, pos, neg), batch)
    npo = kit.guider_sample(_npo_guider(base, offset, pos, neg, strength=s), batch)
    _assert_npo(out, npo, kit.ksample(base, pos, neg, CFG, batch), f"Apply NPO on model_negative (both={both})")


def test_apply_npo_with_a_sigma_range_as_the_negative_model(tiny, load_offset):
    kind, batch = "sd15", 1
    base = tiny(kind)
    sd, _ = kit.make_lora(kind, "peft", rank=4, seed=5)
    offset = load_offset(sd)
    kw = dict(npo_offset=offset, strength=1.0, start_percent=0.3, end_percent=0.7)
    pos, neg = kit.make_conds(kind)
    out = kit.guider_sample(_dual(base, _node(NPOApply, model=base, **kw), pos, neg), batch)
    ksampler = kit.ksample(_node(NPOApply, model=base, **kw), pos, neg, CFG, batch)
    _assert_npo(out, ksampler, kit.ksample(base, pos, neg, CFG, batch), "sigma range")


@pytest.mark.fault(
    "Apply NPO's model as the positive of Dual Model CFG Guider, a plain model_negative",
    "NPOError: the offset would act on nothing; connect it to model_negative or use NPO CFG Guider",
)
def test_apply_npo_only_on_the_positive_is_refused(tiny, load_offset):
    base = tiny("sd15")
    offset = load_offset(kit.make_lora("sd15", "peft", rank=4)[0])
    npo_model = _node(NPOApply, model=base, npo_offset=offset, strength=1.0)
    pos, neg = kit.make_conds("sd15")
    with pytest.raises(NPOError, match="model_negative"):
        kit.guider_sample(_dual(npo_model, base, pos, neg), 1)
    # at cfg 1 the guider never runs a negative pass: nothing to refuse
    kit.guider_sample(_dual(npo_model, base, pos, neg, cfg=1.0), 1)


def test_plain_models_in_dual_model_guider_are_untouched(tiny):
    """A model the pack never touched behaves as before: the guider with the same model twice is plain CFG."""
    base = tiny("sd15")
    pos, neg = kit.make_conds("sd15")
    out = kit.guider_sample(_dual(base, base, pos, neg), 2)
    assert kit.close(out, kit.ksample(base, pos, neg, CFG, 2), 1e-5, 1e-5)
