"""Extra single-cond guidance passes on an SD UNet: PerturbedAttentionGuidance runs the positive cond once
more (with perturbed self-attention) after CFG; that pass must keep θ, while CFG's negative runs θ + δ.

Reference: the uncond chunk of the CFG batch computed on a separately built, hand-merged model (ComfyUI's
sampler_calc_cond_batch_function); PAG's own pass then runs on the plain model, as it should.
"""

from __future__ import annotations

import npo_familykit as fk
import npo_hostkit as kit
from comfy_extras.nodes_pag import PerturbedAttentionGuidance

from comfyui_npo.nodes.host import sampling

KIND = "sd15"


def _pag(m):
    out = PerturbedAttentionGuidance.execute(model=m, scale=3.0)
    return (out.result if hasattr(out, "result") else out)[0]


def test_pag_pass_keeps_the_positive_weights(tiny, load_offset):
    base = tiny(KIND)
    sd, delta = kit.make_lora(KIND, "peft", rank=4, seed=5)
    offset = load_offset(sd)
    merged = tiny.from_weights(KIND, kit.merged(tiny.weights(KIND), (1.0, delta)))
    pos, neg = kit.make_conds(KIND)
    got = kit.ksample(_pag(sampling.apply_offset(base, offset, 1.0)), pos, neg, 5.0, 2)
    want = kit.ksample(_pag(fk.with_reference_batch(tiny(KIND), merged)), pos, neg, 5.0, 2)
    plain = kit.ksample(_pag(tiny(KIND)), pos, neg, 5.0, 2)
    assert kit.max_err(plain, want) > 1e-2
    assert kit.close(got, want), f"PAG + NPO vs reference: {kit.max_err(got, want):.3g}"
