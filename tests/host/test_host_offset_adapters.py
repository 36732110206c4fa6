"""LoHa, LoKr and DoRA offset files (LyCORIS, kohya, PEFT layouts) become the ΔW their published math gives.

Every expected ΔW is computed here by hand from the factors, written from LyCORIS's and the DoRA paper's
formulas (not through ComfyUI's adapters or the pack's code):
- LoHa: ΔW = (α/r) · (W1a W1b) ⊙ (W2a W2b); CP form: Wi = einsum("i j k l, j r, i p -> p r k l", Ti, Wib, Wia);
- LoKr: ΔW = s · W1 ⊗ W2 (Kronecker), Wi full or Wia Wib, W2 in CP form for convs; s = α / r when a factor is
  low-rank (r: its rank), 1 when both are full;
- DoRA: W' = m · (W + s·BA) / ‖W + s·BA‖, the norm per output row (m of shape [out] or [out, 1, …]) or per
  input column (m of shape [1, in, …]); ΔW = W' − W against the model's weight.
Then Apply NPO with a LoKr + DoRA file samples as a separately built UNet with those ΔW merged by hand.
"""

from __future__ import annotations

import npo_familykit as fk
import npo_hostkit as kit
import pytest
import torch

from comfyui_npo.nodes.host import model_facts
from comfyui_npo.nodes.models import NPOApply
from comfyui_npo.npo_core.errors import NPOError
from comfyui_npo.npo_core.offset import Dense

LIN = "output_blocks.2.1.transformer_blocks.0.attn2.to_k"  # Linear [32, 64] (cross-attention, non-square)
SQ = "output_blocks.2.1.transformer_blocks.0.attn1.to_q"  # Linear [32, 32]
CONV = "output_blocks.3.0.in_layers.2"  # Conv2d [32, 64, 3, 3]
PROJ = "output_blocks.3.1.proj_in"  # 1x1 Conv2d [32, 32, 1, 1]


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _r(g, *shape, s=0.3):
    return torch.randn(*shape, generator=g) * s


def _cp(t, b, a):
    """LyCORIS's CP (Tucker) rebuild of a conv factor, by hand: out[p, r, k, l] = Σ_ij t[i,j,k,l] b[j,r] a[i,p]."""
    out = torch.zeros(a.shape[1], b.shape[1], *t.shape[2:])
    for i in range(t.shape[0]):
        for j in range(t.shape[1]):
            out += a[i][:, None, None, None] * b[j][None, :, None, None] * t[i, j][None, None]
    return out


def _kron(a, b):
    """Kronecker product by hand (blocks a[i, j] · b), for 2-D a and 2-D or 4-D b."""
    rows = [torch.cat([a[i, j] * b for j in range(a.shape[1])], dim=1) for i in range(a.shape[0])]
    return torch.cat(rows, dim=0)


def _dora(w, lora_delta, m):
    v = w.float() + lora_delta
    if m.numel() == w.shape[0]:
        norm = torch.stack([v[i].pow(2).sum().sqrt() for i in range(v.shape[0])])
        return v * (m.flatten() / norm).reshape(-1, *[1] * (v.dim() - 1)) - w
    norm = torch.stack([v[:, j].pow(2).sum().sqrt() for j in range(v.shape[1])])
    return v * (m.flatten() / norm).reshape(1, -1, *[1] * (v.dim() - 2)) - w


def _loha_linear(prefix, g, shape, r=3, alpha=2.0):
    out, inn = shape[0], int(torch.tensor(shape[1:]).prod())
    t = {"hada_w1_a": _r(g, out, r), "hada_w1_b": _r(g, r, inn), "hada_w2_a": _r(g, out, r), "hada_w2_b": _r(g, r, inn)}
    truth = (alpha / r) * ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]))
    t["alpha"] = torch.tensor(alpha)
    return {f"{prefix}.{k}": v for k, v in t.items()}, truth.reshape(shape)


def _loha_cp(prefix, g, shape, r=2, alpha=1.0):
    out, inn, kh, kw = shape
    t = {
        "hada_w1_a": _r(g, r, out),
        "hada_w1_b": _r(g, r, inn),
        "hada_t1": _r(g, r, r, kh, kw),
        "hada_w2_a": _r(g, r, out),
        "hada_w2_b": _r(g, r, inn),
        "hada_t2": _r(g, r, r, kh, kw),
    }
    m1 = _cp(t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
    m2 = _cp(t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
    t["alpha"] = torch.tensor(alpha)
    return {f"{prefix}.{k}": v for k, v in t.items()}, (alpha / r) * m1 * m2


def _lokr(prefix, g, shape, form, r=2, alpha=3.0):
    out, inn = shape[0], shape[1]
    a, b = 4, 8  # W1 is [4, 8]; W2 the rest
    c, d = out // a, inn // b
    t: dict[str, torch.Tensor] = {}
    scale = 1.0
    if form == "full":  # both factors full matrices: no alpha scaling
        t["lokr_w1"], t["lokr_w2"] = _r(g, a, b), _r(g, c, d, *shape[2:])
        w1, w2 = t["lokr_w1"], t["lokr_w2"]
    elif form == "w1_full":
        t["lokr_w1"], t["lokr_w2_a"], t["lokr_w2_b"] = _r(g, a, b), _r(g, c, r), _r(g, r, d * _prod(shape[2:]))
        w1, w2 = t["lokr_w1"], (t["lokr_w2_a"] @ t["lokr_w2_b"])
        scale = alpha / r
    elif form == "both_factored":
        t["lokr_w1_a"], t["lokr_w1_b"] = _r(g, a, r), _r(g, r, b)
        t["lokr_w2_a"], t["lokr_w2_b"] = _r(g, c, r), _r(g, r, d * _prod(shape[2:]))
        w1, w2 = t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w2_a"] @ t["lokr_w2_b"]
        scale = alpha / r
    elif form == "cp":
        t["lokr_w1"] = _r(g, a, b)
        t["lokr_w2_a"], t["lokr_w2_b"], t["lokr_t2"] = _r(g, r, c), _r(g, r, d), _r(g, r, r, *shape[2:])
        w1, w2 = t["lokr_w1"], _cp(t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
        scale = alpha / r
    else:
        raise AssertionError(form)
    t["alpha"] = torch.tensor(alpha)
    if w2.dim() == 4:
        truth = _kron(w1, w2)
    else:
        truth = _kron(w1, w2).reshape(shape)
    return {f"{prefix}.{k}": v for k, v in t.items()}, scale * truth.reshape(shape)


def _prod(s) -> int:
    n = 1
    for x in s:
        n *= int(x)
    return n


def _dora_file(prefix, g, w, axis, r=2, alpha=1.0, layout="kohya"):
    out, inn = w.shape[0], w.shape[1]
    rest = w.shape[2:]
    up, down = _r(g, out, r, *([1] * len(rest))), _r(g, r, inn, *rest)
    lora_delta = (alpha / r) * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    v = w.float() + lora_delta
    # a trained magnitude: the norm of V times a factor near 1 (what DoRA starts at and moves from)
    if axis == "out":
        m = torch.stack([v[i].norm() for i in range(out)]) * (1 + _r(g, out, s=0.2))
    else:
        m = torch.stack([v[:, j].norm() for j in range(inn)]) * (1 + _r(g, inn, s=0.2))
    if layout == "peft":
        sd = {f"{prefix}.lora_A.weight": down, f"{prefix}.lora_B.weight": up, f"{prefix}.lora_magnitude_vector": m}
    else:
        scale_shape = (out, *([1] * (w.dim() - 1))) if axis == "out" else (1, inn, *([1] * len(rest)))
        sd = {
            f"{prefix}.lora_up.weight": up,
            f"{prefix}.lora_down.weight": down,
            f"{prefix}.alpha": torch.tensor(alpha),
            f"{prefix}.dora_scale": m.reshape(scale_shape),
        }
    return sd, _dora(w, lora_delta, m)


def _flat(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def _check(resolved, truth: dict[str, torch.Tensor]) -> None:
    assert sorted(resolved.entries) == sorted(f"{m}.weight" for m in truth)
    for m, want in truth.items():
        got = resolved.entries[f"{m}.weight"]
        assert isinstance(got, Dense), (m, type(got))
        assert got.delta.shape == want.shape, m
        assert float(want.abs().max()) > 1e-3, f"{m}: the reference ΔW is ~0, the comparison could not fail"
        assert torch.allclose(got.delta, want, rtol=1e-4, atol=1e-5), (m, float((got.delta - want).abs().max()))


def _weights(tiny):
    return {k: v.float() for k, v in tiny.weights("sd15").items()}


@pytest.mark.fault("a LyCORIS LoHa file (Linear, conv, CP/Tucker conv)", "its ΔW, by ComfyUI's LoHa adapter")
def test_loha_linear_conv_and_cp_forms(tiny, load_offset):
    w, g = _weights(tiny), _g(1)
    sd, truth = {}, {}
    for module, make in ((LIN, _loha_linear), (CONV, _loha_linear), (PROJ, _loha_linear)):
        part, truth[module] = make(_flat(module), g, tuple(w[f"{module}.weight"].shape))
        sd.update(part)
    cp_sd, truth_cp = _loha_cp(_flat(CONV), g, tuple(w[f"{CONV}.weight"].shape))
    offset = load_offset(sd, "loha.safetensors")
    assert "LoHa" in offset.source_format and offset.kinds() == {"loha": 3}
    _check(model_facts.resolve_for_model(offset, tiny("sd15")), truth)
    _check(model_facts.resolve_for_model(load_offset(cp_sd, "loha_cp.safetensors"), tiny("sd15")), {CONV: truth_cp})


@pytest.mark.parametrize("form", ["full", "w1_full", "both_factored"])
@pytest.mark.fault(
    "a LyCORIS LoKr file (full-rank w1/w2, w1 full + w2_a/w2_b, both factored, CP conv)",
    "its ΔW = s · W1 ⊗ W2, by ComfyUI's LoKr adapter",
)
def test_lokr_factor_forms(tiny, load_offset, form):
    w, g = _weights(tiny), _g(2)
    sd, truth = {}, {}
    for module in (LIN, CONV):
        part, truth[module] = _lokr(f"diffusion_model.{module}", g, tuple(w[f"{module}.weight"].shape), form)
        sd.update(part)
    _check(model_facts.resolve_for_model(load_offset(sd, f"lokr_{form}.safetensors"), tiny("sd15")), truth)


def test_lokr_cp_conv(tiny, load_offset):
    w = _weights(tiny)
    sd, truth = _lokr(_flat(CONV), _g(3), tuple(w[f"{CONV}.weight"].shape), "cp")
    _check(model_facts.resolve_for_model(load_offset(sd, "lokr_cp.safetensors"), tiny("sd15")), {CONV: truth})


@pytest.mark.parametrize(
    "axis,layout", [("out", "kohya"), ("in", "kohya"), ("out", "peft")], ids=["rows-kohya", "columns-lycoris", "peft"]
)
@pytest.mark.fault(
    "a DoRA file (kohya/LyCORIS dora_scale on rows or columns, PEFT lora_magnitude_vector)",
    "ΔW = m·V/‖V‖ − W against the model's weight, V = W + s·BA (DoRA's own normalisation, not ComfyUI's ‖W‖)",
)
def test_dora_against_the_models_weight(tiny, load_offset, axis, layout):
    w, g = _weights(tiny), _g(4)
    sd, truth = {}, {}
    for module in (LIN, CONV):
        prefix = f"base_model.model.{module}" if layout == "peft" else _flat(module)
        part, truth[module] = _dora_file(prefix, g, w[f"{module}.weight"], axis, alpha=2.0, layout=layout)
        sd.update(part)
    meta = {"lora_adapter_metadata": '{"lora_alpha": 2, "r": 2}'} if layout == "peft" else None  # PEFT: α in metadata
    offset = load_offset(sd, f"dora_{axis}_{layout}.safetensors", metadata=meta)
    assert offset.kinds() == {"dora": 2}
    _check(model_facts.resolve_for_model(offset, tiny("sd15")), truth)


def test_dora_is_taken_against_the_base_model_when_one_is_given(tiny, load_offset):
    """Load NPO Offset's base_model: W is the base's weight, not the (fine-tuned) model's."""
    base_w = _weights(tiny)
    sd, truth = _dora_file(_flat(SQ), _g(5), base_w[f"{SQ}.weight"], "out")
    offset = load_offset(sd, "dora_base.safetensors")
    finetune = tiny("sd15", seed=3)
    _check(model_facts.resolve_for_model(offset, finetune, reference=tiny("sd15")), {SQ: truth})
    other = model_facts.resolve_for_model(offset, finetune).entries[f"{SQ}.weight"].delta
    assert not torch.allclose(other, truth, atol=1e-4), "W must be the reference's weight"


def test_loha_with_weight_decomposition(tiny, load_offset):
    """LyCORIS's DoRA option on a LoHa: V = W + ΔW_LoHa, then the magnitude."""
    w, g = _weights(tiny), _g(6)
    sd, loha = _loha_linear(_flat(LIN), g, tuple(w[f"{LIN}.weight"].shape))
    m = torch.stack([(w[f"{LIN}.weight"] + loha)[i].norm() for i in range(32)]) * (1 + _r(g, 32, s=0.2))
    sd[f"{_flat(LIN)}.dora_scale"] = m.reshape(32, 1)
    truth = _dora(w[f"{LIN}.weight"], loha, m)
    _check(model_facts.resolve_for_model(load_offset(sd, "loha_dora.safetensors"), tiny("sd15")), {LIN: truth})


def test_apply_npo_with_lokr_and_dora_samples_as_the_hand_merged_model(tiny, load_offset):
    w, g = _weights(tiny), _g(7)
    strength = 0.8
    sd, lokr = _lokr(_flat(LIN), g, tuple(w[f"{LIN}.weight"].shape), "w1_full")
    dora_sd, dora = _dora_file(_flat(SQ), g, w[f"{SQ}.weight"], "out")
    sd.update(dora_sd)
    offset = load_offset(sd, "lokr_dora.safetensors")
    base = tiny("sd15")
    truth = {f"{LIN}.weight": lokr, f"{SQ}.weight": dora}
    ref = tiny.from_weights("sd15", kit.merged(tiny.weights("sd15"), (strength, truth)))
    pos, neg = kit.make_conds("sd15")
    ref_out = kit.ksample(kit.with_reference_cfg(base, ref), pos, neg, 5.0, 2)
    plain_out = kit.ksample(base, pos, neg, 5.0, 2)
    with torch.inference_mode():
        npo_model = NPOApply.execute(model=base, npo_offset=offset, strength=strength).result[0]
    out = kit.ksample(npo_model, pos, neg, 5.0, 2)
    effect = kit.max_err(ref_out, plain_out)
    assert effect > 100 * 2e-4, f"the offset has no visible effect ({effect})"
    assert kit.close(out, ref_out, 1e-4, 1e-4), kit.max_err(out, ref_out)


@pytest.mark.fault(
    "an incomplete LoHa/LoKr module, a LoKr on the wrong layer shape, DoRA on a slice of a fused weight",
    "NPOError naming the module and what is missing or why",
)
def test_broken_and_unsupported_factor_files_are_refused(tiny, load_offset):
    w = _weights(tiny)
    sd, _ = _lokr(_flat(LIN), _g(8), tuple(w[f"{LIN}.weight"].shape), "full")
    sd[f"{_flat(SQ)}.lokr_w1"] = sd.pop(f"{_flat(LIN)}.lokr_w1")  # LIN keeps only w2; SQ only w1
    with pytest.raises(NPOError, match=r"LoKr module .* lacks lokr_w(1|2) \(or lokr_w\1_a and lokr_w\1_b\)"):
        load_offset(sd, "half.safetensors")
    sd, _ = _lokr(_flat(SQ), _g(8), tuple(w[f"{LIN}.weight"].shape), "full")  # [32, 64] factors on a [32, 32] layer
    with pytest.raises(NPOError, match=r"makes a ΔW of shape \(32, 64\) but the model's parameter is \(32, 32\)"):
        model_facts.resolve_for_model(load_offset(sd, "wrong.safetensors"), tiny("sd15"))


def _slice_target(model):
    for lora_key, target in sorted(fk.key_map(model).items()):
        sliced = isinstance(target, tuple) and target[1] is not None and target[1][0] == 0
        if sliced and not fk.out_of_bounds(model, target):
            return lora_key, target
    return None


def test_lokr_on_a_slice_of_a_fused_weight_lands_in_its_rows(load_offset):
    """A LoKr in another naming (a diffusers to_q of a fused qkv) lands in its rows, zero elsewhere; a DoRA there
    is refused with the reason."""
    found = next(((f, t) for f in fk.families_here() if (t := _slice_target(fk.tiny_model(f)))), None)
    assert found is not None, "no family of this ComfyUI maps LoRA keys onto slices of fused weights"
    fam, (lora_key, target) = found
    model = fk.tiny_model(fam)
    rel = target[0][len(fk.PREFIX) :]
    shape = model_facts.param_shapes(model)[rel]
    _, start, length = target[1]
    g = _g(9)
    a, b = (2 if length % 2 == 0 else 1), (2 if shape[1] % 2 == 0 else 1)
    w1, w2 = _r(g, a, b), _r(g, length // a, shape[1] // b)
    want = torch.zeros(shape)
    want[start : start + length] = _kron(w1, w2)
    resolved = model_facts.resolve_for_model(
        load_offset({f"{lora_key}.lokr_w1": w1, f"{lora_key}.lokr_w2": w2}, "slice_lokr.safetensors"), model
    )
    assert isinstance(resolved.entries[rel], Dense) and torch.allclose(resolved.entries[rel].delta, want, atol=1e-6)

    dora = {
        f"{lora_key}.lora_up.weight": _r(g, length, 2),
        f"{lora_key}.lora_down.weight": _r(g, 2, shape[1]),
        f"{lora_key}.dora_scale": torch.ones(length, 1),
    }
    with pytest.raises(NPOError, match="DoRA .* on a slice of the fused"):
        model_facts.resolve_for_model(load_offset(dora, "slice_dora.safetensors"), model)
