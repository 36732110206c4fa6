"""NPO Negative Model: the weights ComfyUI materialises (load → patch) equal θ_neg computed by hand,

θ_neg = θ_base + s·δ + (1 − m)·(θ_pos − θ_base)     (the authors' merge; m = 0 → θ_pos + s·δ)
"""

from __future__ import annotations

import comfy.sd
import npo_hostkit as kit
import pytest
import torch

from comfyui_npo.nodes.models import NPONegativeModel

KIND = "sd15"


def _assert_weights(actual: dict, expected: dict):
    assert set(actual) == set(expected)
    for k in expected:
        assert kit.close(actual[k], expected[k], 1e-5, 1e-6), f"{k}: {kit.max_err(actual[k], expected[k])}"


def _negative(**kw):
    with torch.inference_mode():
        return NPONegativeModel.execute(**kw).result[0]


def _loaded(mp):
    with torch.inference_mode():
        return kit.loaded_weights(mp)


@pytest.mark.parametrize("fmt,strength", [("peft", 1.0), ("comfy", 0.6), ("kohya_ldm", 2.0)])
def test_weights_equal_hand_merge(tiny, load_offset, fmt, strength):
    sd, delta = kit.make_lora(KIND, fmt, rank=4, seed=3, alpha=None if fmt == "peft" else 2.0, extras=fmt != "peft")
    base = tiny(KIND)
    before = kit.state_hash(base.model)
    neg = _negative(model=base, npo_offset=load_offset(sd), strength=strength)
    _assert_weights(_loaded(neg), kit.merged(tiny.weights(KIND), (strength, delta)))
    assert kit.state_hash(base.model) == before  # unloaded: the shared module holds θ again


def _lora_patched(model, seed, strength):
    """θ_pos as a user gets it: the stock LoRA loader (kohya file) on top of the base."""
    sd, delta = kit.make_lora(KIND, "kohya_ldm", rank=4, seed=seed, alpha=4.0)
    return comfy.sd.load_lora_for_models(model, None, sd, strength, 0.0)[0], delta


@pytest.mark.parametrize("m", [0.0, 0.35, 1.0])
def test_merge_weight_with_lora_finetune(tiny, load_offset, m):
    """θ_pos = base + a stock-loaded LoRA (a clone sharing the base's module)."""
    base = tiny(KIND)
    pos, pos_delta = _lora_patched(base, seed=21, strength=0.9)
    sd, delta = kit.make_lora(KIND, "peft", rank=4, seed=3)
    s = 1.5
    neg = _negative(model=pos, npo_offset=load_offset(sd), strength=s, base_model=base, merge_weight=m)
    # θ_base + s·δ + (1 − m)·(θ_pos − θ_base), with θ_pos − θ_base = 0.9·Δ_lora, all by hand
    expected = kit.merged(tiny.weights(KIND), (s, delta), ((1 - m) * 0.9, pos_delta))
    _assert_weights(_loaded(neg), expected)


def test_merge_weight_with_independent_finetune(tiny, load_offset):
    """θ_pos and θ_base are two different (separately built) models: every parameter differs."""
    base = tiny(KIND, seed=0)
    pos = tiny(KIND, seed=5)
    sd, delta = kit.make_lora(KIND, "comfy", rank=4, seed=3, alpha=4.0, extras=True)
    m, s = 0.6, 0.8
    neg = _negative(model=pos, npo_offset=load_offset(sd), strength=s, base_model=base, merge_weight=m)
    wb, wp = tiny.weights(KIND, 0), tiny.weights(KIND, 5)
    expected = {k: wb[k] + (1 - m) * (wp[k] - wb[k]) for k in wb}
    expected = kit.merged(expected, (s, delta))
    _assert_weights(_loaded(neg), expected)
    assert kit.state_hash(pos.model) == kit.state_hash(tiny(KIND, seed=5).model)
    assert kit.state_hash(base.model) == kit.state_hash(tiny(KIND, seed=0).model)


def test_full_weight_offset_against_base(tiny, load_offset):
    """A full NPO UNet state dict (Self-NPO ``unet.ckpt`` style, checkpoint key names): δ = file − θ_base,
    applied to a fine-tune: θ_neg = θ_pos + s·(file − θ_base)."""
    wb = tiny.weights(KIND, 0)
    g = torch.Generator().manual_seed(9)
    npo_full = {
        k: v + 0.02 * torch.randn(v.shape, generator=g) if i % 3 == 0 else v.clone()
        for i, (k, v) in enumerate(sorted(wb.items()))
    }
    offset = load_offset({f"model.diffusion_model.{k}": v for k, v in npo_full.items()}, "unet_full.safetensors")
    base = tiny(KIND, seed=0)
    pos = tiny(KIND, seed=5)
    neg = _negative(model=pos, npo_offset=offset, strength=0.5, base_model=base)
    wp = tiny.weights(KIND, 5)
    _assert_weights(_loaded(neg), {k: wp[k] + 0.5 * (npo_full[k] - wb[k]) for k in wp})
