"""Guiders that send three conds per step: Apply NPO's offset runs on the unconditional chunk only.

DualCFGGuider lists [negative, middle, positive]; its negative gets θ + δ, the middle cond keeps θ.
PerpNeg lists [positive, negative, empty]; its unconditional is the empty prompt, which gets θ + δ,
while the negative prompt it projects out keeps θ. The reference runs each chunk separately and sends
the unconditional one through a separately built model with hand-merged weights.
"""

from __future__ import annotations

import npo_hostkit as kit
import pytest
import torch
from comfy_extras.nodes_custom_sampler import Guider_DualCFG
from comfy_extras.nodes_perpneg import Guider_PerpNeg

from comfyui_npo.nodes.models import NPOApply

KIND = "sd15"


def _chunk_reference(base, negative_model, negative_index: int):
    """``base`` whose UNet calls run chunk by chunk, the chunk at ``negative_index`` of the guider's cond
    list on ``negative_model`` (a model_function_wrapper written here, independent of the pack)."""

    def wrapper(apply_model, args):
        x, t, c, kinds = args["input"], args["timestep"], args["c"], args["cond_or_uncond"]
        size = x.shape[0] // len(kinds)
        out = []
        for i, kind in enumerate(kinds):
            rows = slice(i * size, (i + 1) * size)
            ci = {k: v[rows] if torch.is_tensor(v) and v.shape[:1] == x.shape[:1] else v for k, v in c.items()}
            run = negative_model.model.apply_model if kind == negative_index else apply_model
            out.append(run(x[rows], t[rows], **ci))
        return torch.cat(out)

    m = base.clone()
    m.set_model_unet_function_wrapper(wrapper)
    return m


def _models(tiny, load_offset, strength=1.0):
    base = tiny(KIND)
    sd, delta = kit.make_lora(KIND, "peft", rank=4, seed=7)
    with torch.inference_mode():
        npo = NPOApply.execute(model=base, npo_offset=load_offset(sd), strength=strength).result[0]
    merged = tiny.from_weights(KIND, kit.merged(tiny.weights(KIND), (strength, delta)))
    return base, npo, merged


def _three_conds(seed=1):
    pos, neg = kit.make_conds(KIND, seed=seed)
    middle, _ = kit.make_conds(KIND, seed=seed + 10)
    return pos, middle, neg


def _dual_cfg(model, pos, middle, neg):
    g = Guider_DualCFG(model)
    g.set_conds(pos, middle, neg)
    g.set_cfg(5.0, 3.0)
    return g


def _perp_neg(model, pos, neg, empty):
    g = Guider_PerpNeg(model)
    g.set_conds(pos, neg, empty)
    g.set_cfg(5.0, 1.0)
    return g


@pytest.mark.parametrize("batch", [1, 2])
def test_dual_cfg_guider_npo_on_its_negative_not_its_middle(tiny, load_offset, batch):
    base, npo, merged = _models(tiny, load_offset)
    pos, middle, neg = _three_conds()
    out = kit.guider_sample(_dual_cfg(npo, pos, middle, neg), batch)
    reference = kit.guider_sample(_dual_cfg(_chunk_reference(base, merged, 0), pos, middle, neg), batch)
    on_middle = kit.guider_sample(_dual_cfg(_chunk_reference(base, merged, 1), pos, middle, neg), batch)
    plain = kit.guider_sample(_dual_cfg(base, pos, middle, neg), batch)
    assert kit.max_err(reference, plain) > 1e-2 and kit.max_err(reference, on_middle) > 1e-2
    assert kit.close(out, reference), f"max |NPO − reference| = {kit.max_err(out, reference):.3g}"


def test_perp_neg_npo_on_the_empty_prompt_not_the_negative(tiny, load_offset):
    base, npo, merged = _models(tiny, load_offset)
    pos, neg, empty = _three_conds(seed=3)
    out = kit.guider_sample(_perp_neg(npo, pos, neg, empty), 2)
    reference = kit.guider_sample(_perp_neg(_chunk_reference(base, merged, 2), pos, neg, empty), 2)
    on_negative = kit.guider_sample(_perp_neg(_chunk_reference(base, merged, 1), pos, neg, empty), 2)
    assert kit.max_err(reference, on_negative) > 1e-2
    assert kit.close(out, reference), f"max |NPO − reference| = {kit.max_err(out, reference):.3g}"


def test_plain_cfg_still_gets_npo_on_the_uncond_chunk(tiny, load_offset):
    """The reference machinery agrees with the two-cond case the rest of the suite checks."""
    base, npo, merged = _models(tiny, load_offset)
    pos, neg = kit.make_conds(KIND)
    out = kit.guider_sample(kit.cfg_guider(npo, pos, neg, 5.0), 2)
    reference = kit.guider_sample(kit.cfg_guider(_chunk_reference(base, merged, 1), pos, neg, 5.0), 2)
    assert kit.close(out, reference)
