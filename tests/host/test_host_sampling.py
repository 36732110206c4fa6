"""Issue requirement: NPO sampling equals a hand-written two-network CFG.

Reference: a SEPARATELY BUILT UNet (new get_model, the base weights loaded, θ + s·δ merged by hand in
torch) supplies the uncond prediction inside a hand-written ``sampler_cfg_function``
(denoised = u + s·(c − u)); conds, areas and masks go through ComfyUI's own calc_cond_batch. The pack
(Apply NPO → KSampler / CFGGuider, and the NPO CFG Guider node) must reproduce it to float tolerance.
"""

from __future__ import annotations

import logging

import npo_hostkit as kit
import pytest
import torch
from comfy_extras.nodes_custom_sampler import Guider_Basic

from comfyui_npo.nodes.guider import NPOCFGGuider
from comfyui_npo.nodes.models import NPOApply

RTOL = ATOL = 1e-4
CASES = [  # kind, LoRA file format, strength, cfg
    ("sd15", "peft", 1.0, 5.0),
    ("sdxl", "peft_ab", 1.0, 4.0),
    ("sdxl_v", "kohya_diffusers", 0.7, 4.0),
]


def _setup(tiny, load_offset, kind, fmt, strength, alpha=None, extras=False):
    sd, truth = kit.make_lora(kind, fmt, rank=4, seed=11, alpha=alpha, extras=extras)
    offset = load_offset(sd, f"{kind}_{fmt}.safetensors")
    base = tiny(kind)
    ref = tiny.from_weights(kind, kit.merged(tiny.weights(kind), (strength, truth)))
    return base, ref, offset


def _assert_matches(out, ref_out, plain_out, what):
    err = kit.max_err(out, ref_out)
    effect = kit.max_err(ref_out, plain_out)
    assert torch.isfinite(out).all(), what
    # the comparison must be able to fail: NPO moves the result by far more than the tolerance
    assert effect > 100 * (ATOL + RTOL * float(ref_out.abs().max())), f"{what}: NPO has no visible effect ({effect})"
    assert kit.close(out, ref_out, RTOL, ATOL), f"{what}: max |NPO − reference| = {err:.3g} (NPO effect {effect:.3g})"


MATRIX = [
    (*c, b, v)
    for c in CASES
    for b, v in ((1, "plain"), (2, "plain"), (2, "regional"))
    if not (b == 2 and v == "plain" and c[0] != "sd15")
]


@pytest.mark.parametrize(
    "kind,fmt,strength,cfg,batch,variant", MATRIX, ids=[f"{m[0]}-batch{m[4]}-{m[5]}" for m in MATRIX]
)
def test_npo_equals_two_network_reference(tiny, load_offset, kind, fmt, strength, cfg, batch, variant):
    alpha = 2.0 if fmt.startswith("kohya") else None
    base, ref, offset = _setup(tiny, load_offset, kind, fmt, strength, alpha=alpha)
    pos, neg = kit.make_conds(kind, variant)

    ref_out = kit.ksample(kit.with_reference_cfg(base, ref), pos, neg, cfg, batch)
    plain_out = kit.ksample(base, pos, neg, cfg, batch)
    with torch.inference_mode():
        npo_model = NPOApply.execute(model=base, npo_offset=offset, strength=strength).result[0]

    # KSampler path (comfy.sample.sample)
    _assert_matches(kit.ksample(npo_model, pos, neg, cfg, batch), ref_out, plain_out, "Apply NPO + KSampler")
    # stock CFGGuider (SamplerCustomAdvanced + CFGGuider)
    _assert_matches(
        kit.guider_sample(kit.cfg_guider(npo_model, pos, neg, cfg), batch), ref_out, plain_out, "Apply NPO + CFGGuider"
    )
    # our guider node, offset input
    with torch.inference_mode():
        guider = NPOCFGGuider.execute(
            model=base, positive=pos, negative=neg, cfg=cfg, strength=strength, npo_offset=offset
        ).result[0]
    _assert_matches(kit.guider_sample(guider, batch), ref_out, plain_out, "NPO CFG Guider")


@pytest.mark.parametrize("fmt", ["comfy", "kohya_ldm"])
def test_dense_conv_and_norm_offsets(tiny, load_offset, fmt):
    """Dense .diff/.diff_b on a conv, a Linear, a GroupNorm and a LayerNorm; a conv LoRA (kohya) with alpha."""
    base, ref, offset = _setup(tiny, load_offset, "sd15", fmt, 1.3, alpha=3.0, extras=True)
    pos, neg = kit.make_conds("sd15", "regional")
    ref_out = kit.ksample(kit.with_reference_cfg(base, ref), pos, neg, 5.0, 2)
    plain_out = kit.ksample(base, pos, neg, 5.0, 2)
    with torch.inference_mode():
        npo_model = NPOApply.execute(model=base, npo_offset=offset, strength=1.3).result[0]
    _assert_matches(kit.ksample(npo_model, pos, neg, 5.0, 2), ref_out, plain_out, f"{fmt} extras")


def test_multistep_sampler(tiny, load_offset):
    """A multistep solver (DPM++ 2M, the authors used DPMSolver++) and the karras schedule."""
    base, ref, offset = _setup(tiny, load_offset, "sd15", "peft", 1.0)
    pos, neg = kit.make_conds("sd15")
    kw = dict(batch=2, steps=5, sampler="dpmpp_2m", scheduler="karras")
    ref_out = kit.ksample(kit.with_reference_cfg(base, ref), pos, neg, 7.5, **kw)
    plain_out = kit.ksample(base, pos, neg, 7.5, **kw)
    with torch.inference_mode():
        npo_model = NPOApply.execute(model=base, npo_offset=offset, strength=1.0).result[0]
    _assert_matches(kit.ksample(npo_model, pos, neg, 7.5, **kw), ref_out, plain_out, "dpmpp_2m")


def test_strength_zero_is_plain_cfg(tiny, load_offset):
    base, _, offset = _setup(tiny, load_offset, "sd15", "peft", 1.0)
    pos, neg = kit.make_conds("sd15", "regional")
    plain = kit.ksample(base, pos, neg, 5.0, 2)
    with torch.inference_mode():
        m0 = NPOApply.execute(model=base, npo_offset=offset, strength=0.0).result[0]
        g0 = NPOCFGGuider.execute(
            model=base, positive=pos, negative=neg, cfg=5.0, strength=0.0, npo_offset=offset
        ).result[0]
    assert torch.equal(kit.ksample(m0, pos, neg, 5.0, 2), plain)
    assert torch.equal(kit.guider_sample(g0, 2), plain)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_cfg_one_is_positive_only(tiny, load_offset, kind):
    """cfg 1: no guidance, NPO does nothing (ComfyUI skips the uncond pass): equals sampling the positive alone."""
    base, _, offset = _setup(tiny, load_offset, kind, "peft", 1.0)
    pos, neg = kit.make_conds(kind)
    basic = Guider_Basic(base)
    basic.set_conds(pos)
    positive_only = kit.guider_sample(basic, 2)
    with torch.inference_mode():
        npo_model = NPOApply.execute(model=base, npo_offset=offset, strength=1.0).result[0]
        guider = NPOCFGGuider.execute(
            model=base, positive=pos, negative=neg, cfg=1.0, strength=1.0, npo_offset=offset
        ).result[0]
    assert kit.close(kit.ksample(npo_model, pos, neg, 1.0, 2), positive_only, 1e-6, 1e-6)
    assert kit.close(kit.guider_sample(guider, 2), positive_only, 1e-6, 1e-6)


@pytest.mark.parametrize("start,end", [(0.5, 1.0), (0.0, 0.5), (0.3, 0.8)])
def test_start_end_percent_restricts_npo(tiny, load_offset, start, end):
    base, ref, offset = _setup(tiny, load_offset, "sd15", "peft", 1.0)
    pos, neg = kit.make_conds("sd15")
    ms = base.get_model_object("model_sampling")
    hi, lo = ms.percent_to_sigma(start), ms.percent_to_sigma(end)
    sigmas = kit.sigmas_for(base, 6)
    active_steps = [lo <= float(s) <= hi for s in sigmas[:-1]]
    assert any(active_steps) and not all(active_steps), "schedule does not exercise the window"

    def run(model):
        x0s = []
        out = kit.ksample(model, pos, neg, 5.0, 2, steps=6, callback=lambda i, x0, x, n: x0s.append(x0.clone()))
        return out, x0s

    plain_out, plain_x0 = run(base)
    ref_out, ref_x0 = run(kit.with_reference_cfg(base, ref, active=lambda s: lo <= s <= hi))
    with torch.inference_mode():
        npo_model = NPOApply.execute(
            model=base, npo_offset=offset, strength=1.0, start_percent=start, end_percent=end
        ).result[0]
    npo_out, npo_x0 = run(npo_model)
    first = active_steps.index(True)
    for i in range(first):  # before the window: bit-identical to plain CFG
        assert torch.equal(npo_x0[i], plain_x0[i]), f"step {i} (before start_percent) is not plain CFG"
    assert not kit.close(npo_x0[first], plain_x0[first]), "NPO did not switch on inside the window"
    for i, (a, b) in enumerate(zip(npo_x0, ref_x0, strict=True)):
        assert kit.close(a, b, RTOL, ATOL), f"step {i}: {kit.max_err(a, b)}"
    assert kit.close(npo_out, ref_out, RTOL, ATOL)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_full_weight_offset(tiny, load_offset, kind):
    """A full NPO UNet (every parameter moved: convs, norms, biases, embeddings), checkpoint key names:
    δ = file − θ, dense on every layer type of the UNet."""
    wb = tiny.weights(kind)
    g = torch.Generator().manual_seed(17)
    full = {k: v + 0.03 * v.abs().mean() * torch.randn(v.shape, generator=g) for k, v in wb.items()}
    offset = load_offset({f"model.diffusion_model.{k}": v for k, v in full.items()}, "npo_unet.safetensors")
    base = tiny(kind)
    ref = tiny.from_weights(kind, kit.merged(wb, (0.8, {k: full[k] - wb[k] for k in wb})))
    pos, neg = kit.make_conds(kind, "regional")
    ref_out = kit.ksample(kit.with_reference_cfg(base, ref), pos, neg, 4.0, 2)
    plain_out = kit.ksample(base, pos, neg, 4.0, 2)
    with torch.inference_mode():
        npo_model = NPOApply.execute(model=base, npo_offset=offset, strength=0.8).result[0]
    _assert_matches(kit.ksample(npo_model, pos, neg, 4.0, 2), ref_out, plain_out, f"{kind} full weights")


@pytest.mark.parametrize("order", ["lora_then_npo", "npo_then_lora"])
def test_npo_on_a_lora_finetune(tiny, load_offset, order):
    """θ_pos = base + a stock-loaded LoRA; the negative pass runs θ_pos + δ (a fine-tune keeps its own offset) whichever
    order the LoRA loader and Apply NPO are chained in."""
    import comfy.sd

    kind = "sd15"
    base = tiny(kind)
    sd, delta = kit.make_lora(kind, "peft", rank=4, seed=11)
    offset = load_offset(sd)
    lora_sd, lora_delta = kit.make_lora(kind, "kohya_ldm", rank=4, seed=12, alpha=4.0)
    pos_model = comfy.sd.load_lora_for_models(base, None, lora_sd, 0.9, 0.0)[0]
    ref = tiny.from_weights(kind, kit.merged(tiny.weights(kind), (0.9, lora_delta), (1.0, delta)))
    pos, neg = kit.make_conds(kind)
    ref_out = kit.ksample(kit.with_reference_cfg(pos_model, ref), pos, neg, 5.0, 2)
    plain_out = kit.ksample(pos_model, pos, neg, 5.0, 2)
    with torch.inference_mode():
        if order == "lora_then_npo":
            model = NPOApply.execute(model=pos_model, npo_offset=offset, strength=1.0).result[0]
        else:
            npo = NPOApply.execute(model=base, npo_offset=offset, strength=1.0).result[0]
            model = comfy.sd.load_lora_for_models(npo, None, lora_sd, 0.9, 0.0)[0]
    _assert_matches(kit.ksample(model, pos, neg, 5.0, 2), ref_out, plain_out, order)


def test_two_offsets_stack(tiny, load_offset):
    """Apply NPO twice: the negative pass runs θ + s1·δ1 + s2·δ2."""
    kind = "sdxl"
    base = tiny(kind)
    sd1, d1 = kit.make_lora(kind, "peft", rank=4, seed=1)
    sd2, d2 = kit.make_lora(kind, "comfy", rank=4, seed=2, alpha=2.0, extras=True)
    o1, o2 = load_offset(sd1, "a.safetensors"), load_offset(sd2, "b.safetensors")
    ref = tiny.from_weights(kind, kit.merged(tiny.weights(kind), (0.5, d1), (1.2, d2)))
    pos, neg = kit.make_conds(kind, "regional")
    ref_out = kit.ksample(kit.with_reference_cfg(base, ref), pos, neg, 4.0, 2)
    plain_out = kit.ksample(base, pos, neg, 4.0, 2)
    with torch.inference_mode():
        m = NPOApply.execute(model=base, npo_offset=o1, strength=0.5).result[0]
        m = NPOApply.execute(model=m, npo_offset=o2, strength=1.2).result[0]
    _assert_matches(kit.ksample(m, pos, neg, 4.0, 2), ref_out, plain_out, "two Apply NPO")


def _npo_warnings(caplog) -> list[str]:
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    return [m for m in messages if m.startswith("NPO:")]


@pytest.mark.fault(
    "Apply NPO where it cannot act: cfg 1, a start/end range covering no step, a guider without a negative pass",
    "one warning per sampling run naming the cause and the fix; the images are those of plain sampling",
)
def test_the_user_is_told_once_per_run_when_npo_cannot_act(tiny, load_offset, caplog):
    import comfy.samplers

    base, cfg = tiny("sd15"), 5.0
    offset = load_offset(kit.make_lora("sd15", "peft", rank=4)[0])
    pos, neg = kit.make_conds("sd15")
    with torch.inference_mode():
        npo = NPOApply.execute(model=base, npo_offset=offset, strength=1.0).result[0]
        narrow = NPOApply.execute(model=base, npo_offset=offset, strength=1.0, start_percent=0.9,
                                  end_percent=0.95).result[0]
    caplog.set_level(logging.WARNING)
    kit.ksample(npo, pos, neg, 1.0, steps=4)
    assert [w for w in _npo_warnings(caplog) if "cfg is 1" in w] == _npo_warnings(caplog) != []
    assert len(_npo_warnings(caplog)) == 1
    caplog.clear()
    kit.ksample(narrow, pos, neg, cfg, steps=4)  # 4 steps sit at 0, 25, 50 and 75 % of the schedule
    assert len(_npo_warnings(caplog)) == 1 and "covers none of this run's 4 steps" in _npo_warnings(caplog)[0]
    caplog.clear()
    basic = Guider_Basic(npo)
    basic.set_conds(pos)
    comfy.samplers.CFGGuider.set_cfg(basic, cfg)
    kit.guider_sample(basic, steps=3)
    assert len(_npo_warnings(caplog)) == 1 and "never evaluated a negative" in _npo_warnings(caplog)[0]
    caplog.clear()
    kit.ksample(npo, pos, neg, cfg, steps=3)  # NPO acts: nothing to say
    assert _npo_warnings(caplog) == []
