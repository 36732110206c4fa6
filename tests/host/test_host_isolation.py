"""Isolation: NPO never leaks into the base model, not even after a run that failed mid-way.

After each run: the base UNet's state dict is bit-identical (hash of every tensor), plain sampling
gives exactly the pre-run result, and once ComfyUI unloads everything no forward hook is left on any
UNet module."""

from __future__ import annotations

import comfy.model_management
import comfy.sd
import npo_hostkit as kit
import pytest
import torch

from comfyui_npo.nodes.guider import NPOCFGGuider
from comfyui_npo.nodes.models import NPOApply, NPONegativeModel

KIND, CFG, BATCH = "sd15", 5.0, 2


class Boom(RuntimeError):
    pass


def _raise_at(step):
    def cb(i, x0, x, n):
        if i == step:
            raise Boom(f"interrupted at step {i}")

    return cb


def _runs(base, offset, lora_sd, pos, neg, tiny):
    """Every way the pack runs NPO weights, as (name, run(callback))."""

    def apply_npo(cb):
        with torch.inference_mode():
            m = NPOApply.execute(model=base, npo_offset=offset, strength=1.0, start_percent=0.2).result[0]
        return kit.ksample(m, pos, neg, CFG, BATCH, callback=cb)

    def guider_offset(cb):
        with torch.inference_mode():
            g = NPOCFGGuider.execute(
                model=base, positive=pos, negative=neg, cfg=CFG, strength=1.0, npo_offset=offset
            ).result[0]
        return kit.guider_sample(g, BATCH, callback=cb)

    def guider_negative_clone(cb):
        with torch.inference_mode():
            nm = NPONegativeModel.execute(model=base, npo_offset=offset, strength=1.0).result[0]
            g = NPOCFGGuider.execute(model=base, positive=pos, negative=neg, cfg=CFG, negative_model=nm).result[0]
        return kit.guider_sample(g, BATCH, callback=cb)

    def guider_independent(cb):
        other = comfy.sd.load_lora_for_models(tiny(KIND), None, lora_sd, 1.0, 0.0)[0]
        with torch.inference_mode():
            g = NPOCFGGuider.execute(model=base, positive=pos, negative=neg, cfg=CFG, negative_model=other).result[0]
        return kit.guider_sample(g, BATCH, callback=cb)

    def negative_model_alone(cb):  # sampling the "bad" model itself (preview), patches written in place
        with torch.inference_mode():
            nm = NPONegativeModel.execute(model=base, npo_offset=offset, strength=1.0).result[0]
        return kit.ksample(nm, pos, neg, CFG, BATCH, callback=cb)

    return {
        f.__name__: f
        for f in (apply_npo, guider_offset, guider_negative_clone, guider_independent, negative_model_alone)
    }


RUNS = ["apply_npo", "guider_offset", "guider_negative_clone", "guider_independent", "negative_model_alone"]


@pytest.mark.fault(
    "NPO sampling in 5 ways (Apply NPO, guider with offset, negative clone, independent negative, the negative "
    "model alone), completed or raising half-way",
    "the base model's weights stay bit-identical (hash), plain sampling is unchanged, no hook is left",
)
@pytest.mark.parametrize("crash", [False, True], ids=["completed", "raised_at_step_2"])
@pytest.mark.parametrize("run", RUNS)
def test_base_model_untouched(tiny, load_offset, run, crash):
    base = tiny(KIND)
    unet = base.model.diffusion_model
    pos, neg = kit.make_conds(KIND)
    offset = load_offset(kit.make_lora(KIND, "comfy", rank=4, seed=3, alpha=4.0, extras=True)[0])
    lora_sd = kit.make_lora(KIND, "kohya_ldm", rank=4, seed=5, alpha=4.0)[0]
    before = kit.state_hash(base.model)
    plain_before = kit.ksample(base, pos, neg, CFG, BATCH)

    fn = _runs(base, offset, lora_sd, pos, neg, tiny)[run]
    if crash:
        with pytest.raises(Boom):
            fn(_raise_at(2))
    else:
        out = fn(None)
        assert not kit.close(out, plain_before), "the NPO run had no effect, so isolation is not tested"

    # Still loaded (no unload yet): plain sampling of the base is exactly as before.
    assert torch.equal(kit.ksample(base, pos, neg, CFG, BATCH), plain_before)
    comfy.model_management.unload_all_models()
    assert kit.state_hash(base.model) == before
    assert kit.hooked_modules(unet) == []
    assert torch.equal(kit.ksample(base, pos, neg, CFG, BATCH), plain_before)


@pytest.mark.fault(
    "an Apply NPO run that raises, then ComfyUI unloads the model",
    "no forward hook is left on any UNet module; weights bit-identical",
)
def test_hooks_gone_after_unload_without_other_sampling(tiny, load_offset):
    """Apply NPO's hooks live only while its model is loaded: after the NPO run and an unload, none remain,
    without relying on a later load of the base to push them out."""
    base = tiny(KIND)
    unet = base.model.diffusion_model
    pos, neg = kit.make_conds(KIND)
    offset = load_offset(kit.make_lora(KIND, "peft", rank=4, seed=3)[0])
    before = kit.state_hash(base.model)
    with torch.inference_mode():
        m = NPOApply.execute(model=base, npo_offset=offset, strength=1.0).result[0]
    with pytest.raises(Boom):
        kit.ksample(m, pos, neg, CFG, BATCH, callback=_raise_at(1))
    seen = []
    kit.ksample(m, pos, neg, CFG, BATCH, callback=lambda i, x0, x, n: seen.append(len(kit.hooked_modules(unet))))
    assert min(seen) > 0, "no hooks while sampling: the 'none left' check below would be vacuous"
    comfy.model_management.unload_all_models()
    assert kit.hooked_modules(unet) == []
    assert kit.state_hash(base.model) == before
