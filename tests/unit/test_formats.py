"""Reading, recognising, resolving and writing offset files (no ComfyUI; a hand-made key map)."""

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from comfyui_npo.npo_core import formats
from comfyui_npo.npo_core.errors import NPOError
from comfyui_npo.npo_core.offset import Dense, Factored, FullWeight, LowRank, NPOOffset

# A two-block "UNet": LDM names and shapes, and the diffusers → LDM map ComfyUI would give.
TARGETS = {
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (8, 8),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 768),
    "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight": (8, 8),
    "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.bias": (8,),
    "input_blocks.1.1.proj_in.weight": (8, 8, 1, 1),
    "input_blocks.1.0.in_layers.2.weight": (8, 4, 3, 3),
}
D2L = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",  # noqa: E501
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",  # noqa: E501
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight": "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight",  # noqa: E501
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.bias": "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.bias",  # noqa: E501
    "down_blocks.0.attentions.0.proj_in.weight": "input_blocks.1.1.proj_in.weight",
    "down_blocks.0.resnets.0.conv1.weight": "input_blocks.1.0.in_layers.2.weight",
}
DIFF_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
DIFF_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
LDM_Q = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
LDM_K = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"


def lora(out, inn, r=2):
    return torch.randn(out, r), torch.randn(r, inn)


def resolve(off):
    return formats.resolve(off, TARGETS, D2L, "SD15", 768)


@pytest.mark.parametrize("prefix", ["unet.", "", "base_model.model."])
@pytest.mark.parametrize(
    "style", [("lora.up", "lora.down"), ("lora_B", "lora_A"), ("lora_linear_layer.up", "lora_linear_layer.down")]
)
def test_diffusers_and_peft_keys_land(prefix, style):
    (uq, dq), (uk, dk) = lora(8, 8), lora(8, 768)
    sd = {
        f"{prefix}{DIFF_Q}.{style[0]}.weight": uq,
        f"{prefix}{DIFF_Q}.{style[1]}.weight": dq,
        f"{prefix}{DIFF_K}.{style[0]}.weight": uk,
        f"{prefix}{DIFF_K}.{style[1]}.weight": dk,
    }
    off = formats.parse_state_dict(sd, {}, "x.safetensors")
    assert off.naming == "diffusers" and off.base_arch == "SD15"
    res = resolve(off)
    assert set(res.entries) == {f"{LDM_Q}.weight", f"{LDM_K}.weight"}
    e = res.entries[f"{LDM_Q}.weight"]
    assert isinstance(e, LowRank) and e.scale == 1.0 and torch.equal(e.up, uq) and torch.equal(e.down, dq)


def test_peft_alpha_from_adapter_metadata():
    u, d = lora(8, 8, r=4)
    meta = {"lora_adapter_metadata": '{"r": 4, "lora_alpha": 2}'}
    off = formats.parse_state_dict({f"unet.{DIFF_Q}.lora_B.weight": u, f"unet.{DIFF_Q}.lora_A.weight": d}, meta, "m")
    assert off.entries[f"{DIFF_Q}.weight"].scale == pytest.approx(0.5)


def test_attn_processor_names_map_to_linear():
    u, d = lora(8, 8)
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora"
    off = formats.parse_state_dict({f"{key}.up.weight": u, f"{key}.down.weight": d}, {}, "p")
    assert list(resolve(off).entries) == ["input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight"]


@pytest.mark.parametrize("path", [LDM_Q, DIFF_Q])
def test_kohya_keys_with_alpha(path):
    u, d = lora(8, 8, r=4)
    flat = "lora_unet_" + path.replace(".", "_")
    sd = {f"{flat}.lora_up.weight": u, f"{flat}.lora_down.weight": d, f"{flat}.alpha": torch.tensor(2.0)}
    off = formats.parse_state_dict(sd, {}, "k.safetensors")
    assert off.source_format == "kohya" and off.naming == "flat"
    e = resolve(off).entries[f"{LDM_Q}.weight"]
    assert e.scale == pytest.approx(0.5)


def test_comfy_keys_with_diff_and_diff_b():
    u, d = lora(8, 8)
    sd = {
        f"diffusion_model.{LDM_Q}.lora_up.weight": u,
        f"diffusion_model.{LDM_Q}.lora_down.weight": d,
        f"diffusion_model.{LDM_Q}.alpha": torch.tensor(2.0),
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.diff": torch.randn(8, 8),
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.diff_b": torch.randn(8),
    }
    res = resolve(formats.parse_state_dict(sd, {}, "c"))
    assert isinstance(res.entries["input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight"], Dense)
    assert isinstance(res.entries["input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.bias"], Dense)


def test_linear_lora_on_1x1_conv_is_reshaped():
    u, d = lora(8, 8)
    sd = {
        "unet.down_blocks.0.attentions.0.proj_in.lora.up.weight": u,
        "unet.down_blocks.0.attentions.0.proj_in.lora.down.weight": d,
    }
    e = resolve(formats.parse_state_dict(sd, {}, "p")).entries["input_blocks.1.1.proj_in.weight"]
    assert e.weight_shape == (8, 8, 1, 1)
    assert torch.allclose(e.delta().flatten(1), u @ d)


@pytest.mark.parametrize("prefix,names", [("model.diffusion_model.", "ldm"), ("unet.", "diffusers"), ("", "diffusers")])
def test_full_state_dict_becomes_full_weights(prefix, names):
    keys = TARGETS if names == "ldm" else {k: TARGETS[v] for k, v in D2L.items()}
    sd = {prefix + k: torch.randn(s) for k, s in keys.items()}
    sd["first_stage_model.decoder.conv_in.weight"] = torch.randn(2)  # a whole checkpoint: VAE part ignored, reported
    off = formats.parse_state_dict(sd, {}, "full.ckpt")
    assert off.source_format == "full-state-dict"
    assert off.ignored == ["first_stage_model.decoder.conv_in.weight"] and "ignored" in off.summary()
    res = resolve(off)
    assert set(res.entries) == set(TARGETS) and all(isinstance(e, FullWeight) for e in res.entries.values())


@pytest.mark.fault("offset keys that match no layer of the model", "NPOError listing the keys; nothing is half-applied")
def test_unmatched_keys_are_an_error_listing_them():
    u, d = lora(8, 8)
    sd = {
        f"unet.{DIFF_Q}.lora.up.weight": u,
        f"unet.{DIFF_Q}.lora.down.weight": d,
        "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_v.lora.up.weight": u,
        "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_v.lora.down.weight": d,
    }
    with pytest.raises(NPOError, match=r"1 of 2 keys do not land(.|\n)*up_blocks\.3\.attentions\.2"):
        resolve(formats.parse_state_dict(sd, {}, "x.safetensors"))


@pytest.mark.fault("an SDXL offset on an SD1.5 model", "NPOError naming both architectures")
def test_sdxl_offset_on_sd15_model_names_both_architectures():
    u, d = lora(8, 2048)
    sd = {f"unet.{DIFF_K}.lora.up.weight": u, f"unet.{DIFF_K}.lora.down.weight": d}
    off = formats.parse_state_dict(sd, {}, "sdxl.safetensors")
    assert off.base_arch == "SDXL"
    with pytest.raises(NPOError, match=r"sdxl\.safetensors: made for SDXL(.|\n)*SD15"):
        resolve(off)


@pytest.mark.fault("offset tensors whose shapes do not fit the layers", "NPOError naming the shapes")
def test_shape_mismatch_is_an_error():
    u, d = lora(16, 8)
    sd = {f"unet.{DIFF_Q}.lora.up.weight": u, f"unet.{DIFF_Q}.lora.down.weight": d}
    with pytest.raises(NPOError, match="shape"):
        resolve(formats.parse_state_dict(sd, {}, "x"))


@pytest.mark.parametrize(
    "sd,match",
    [
        ({}, "no tensors"),
        ({f"unet.{DIFF_Q}.lora.up.weight": torch.zeros(8, 2)}, "only one of up/down"),
        (
            {f"unet.{DIFF_Q}.lora.up.weight": torch.zeros(8, 2), f"unet.{DIFF_Q}.lora.down.weight": torch.zeros(3, 8)},
            "mismatched",
        ),
        ({f"unet.{DIFF_Q}.hada_w1_a": torch.zeros(2, 2)}, "LoHa module .* lacks hada_w1_b, hada_w2_a, hada_w2_b"),
        ({f"unet.{DIFF_Q}.lokr_w1": torch.zeros(2, 2)}, r"LoKr module .* lacks lokr_w2 \(or lokr_w2_a and lokr_w2_b\)"),
        ({f"unet.{DIFF_Q}.oft_blocks": torch.zeros(2, 2, 2)}, "not supported as an NPO offset.*OFT/BOFT rotate"),
        ({f"unet.{DIFF_Q}.dora_scale": torch.zeros(8, 1)}, "DoRA magnitude but no lora_up"),
        (
            {
                f"unet.{DIFF_Q}.lora.up.weight": torch.full((8, 2), float("nan")),
                f"unet.{DIFF_Q}.lora.down.weight": torch.zeros(2, 8),
            },
            "NaN",
        ),
        (
            {
                f"unet.{DIFF_Q}.lora.up.weight": torch.zeros(8, 2, dtype=torch.int32),
                f"unet.{DIFF_Q}.lora.down.weight": torch.zeros(2, 8),
            },
            "floating",
        ),
        (
            {
                "lora_te_text_model_x.lora_up.weight": torch.zeros(2, 1),
                "lora_te_text_model_x.lora_down.weight": torch.zeros(1, 2),
            },
            "only the UNet",
        ),
    ],
)
@pytest.mark.fault(
    "state dicts with no tensors, unknown keys, half a LoRA pair, mismatched ranks, an incomplete LoHa/LoKr/DoRA "
    "module, OFT, text-encoder-only keys",
    "NPOError naming the file and the problem",
)
def test_bad_state_dicts_are_refused_with_the_file_name(sd, match):
    with pytest.raises(NPOError, match=match) as err:
        formats.parse_state_dict(sd, {}, "bad.safetensors")
    assert "bad.safetensors" in str(err.value)


@pytest.mark.parametrize(
    "sd",
    [
        {"foo.bar": torch.zeros(2)},
        {"something.lora_up.weight": torch.zeros(2, 1), "something.lora_down.weight": torch.zeros(1, 2)},
    ],
)
@pytest.mark.fault("keys in no naming the model knows", "NPOError at apply time listing every key that does not land")
def test_unknown_keys_parse_but_do_not_land(sd):
    """Whether a name is a layer depends on the model (a DiT's names are not a UNet's): the file parses, and
    resolving it against a model lists every key that does not land."""
    off = formats.parse_state_dict(sd, {}, "bad.safetensors")
    assert off.naming == "unknown"
    with pytest.raises(NPOError, match="do not land") as err:
        resolve(off)
    assert "bad.safetensors" in str(err.value) and ("foo.bar" in str(err.value) or "something" in str(err.value))


def test_text_encoder_keys_are_ignored_and_reported():
    u, d = lora(8, 8)
    sd = {
        f"unet.{DIFF_Q}.lora.up.weight": u,
        f"unet.{DIFF_Q}.lora.down.weight": d,
        "text_encoder.text_model.x.lora.up.weight": u,
        "text_encoder.text_model.x.lora.down.weight": d,
    }
    off = formats.parse_state_dict(sd, {}, "x")
    assert len(off.ignored) == 2 and len(off.entries) == 1


@pytest.mark.fault(
    "a truncated, empty, missing or unknown-type (.gguf) offset file",
    "NPOError naming the file and what is wrong",
)
def test_files_truncated_empty_unknown_and_pickles(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file(
        {f"unet.{DIFF_Q}.lora.up.weight": torch.randn(8, 2), f"unet.{DIFF_Q}.lora.down.weight": torch.randn(2, 8)},
        str(good),
    )
    assert len(formats.load_offset(good).entries) == 1
    data = good.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) - 20])
    with pytest.raises(NPOError, match="trunc.safetensors: not a readable safetensors"):
        formats.load_offset(trunc)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(NPOError, match="empty"):
        formats.load_offset(empty)
    with pytest.raises(NPOError, match="unknown file type"):
        (tmp_path / "x.gguf").write_bytes(b"abc")
        formats.load_offset(tmp_path / "x.gguf")
    with pytest.raises(NPOError, match="not found"):
        formats.load_offset(tmp_path / "missing.safetensors")
    # a plain-tensor pickle (Self-NPO's unet.ckpt) loads
    ck = tmp_path / "unet.ckpt"
    torch.save({f"{k}": torch.randn(s) for k, s in TARGETS.items()}, ck)
    assert formats.load_offset(ck).source_format == "full-state-dict"
    # a pickle with arbitrary objects is refused and never executed
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(NPOError, match="evil.pt: refused"):
        formats.load_offset(evil)
    assert not (tmp_path / "pwned").exists()


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_save_roundtrip_in_comfy_keys_atomically(tmp_path):
    u, d = lora(8, 8, r=3)
    off = NPOOffset(
        {
            f"{LDM_Q}.weight": LowRank(u, d, 1.5),
            "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.bias": Dense(torch.ones(8)),
        },
        base_arch="SD15",
        metadata={"npo.recipe": "test", "npo.steps": "3"},
    )
    path = formats.save_offset(off, tmp_path / "out" / "o.safetensors")
    assert sorted(os.listdir(path.parent)) == ["o.safetensors"]  # no temporary left behind
    sd, meta = formats.read_state_dict(path)
    assert set(sd) == {
        f"diffusion_model.{LDM_Q}.lora_up.weight",
        f"diffusion_model.{LDM_Q}.lora_down.weight",
        f"diffusion_model.{LDM_Q}.alpha",
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.diff_b",
    }
    assert meta["npo.format_version"] == "1" and meta["npo.recipe"] == "test" and meta["npo.steps"] == "3"
    # LoRA managers read modelspec.*: the file shows as an NPO negative offset, not a style LoRA
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.title"] == "o (NPO negative offset)"
    assert "negative" in meta["modelspec.description"] and "degrades" in meta["modelspec.description"]
    back = formats.load_offset(path)
    assert back.source_format == "npo-pack" and back.base_arch == "SD15"
    e = resolve(back).entries[f"{LDM_Q}.weight"]
    assert torch.allclose(e.delta(), LowRank(u, d, 1.5).delta())


@pytest.mark.fault(
    "the disk fails while an offset file is written",
    "the old file is untouched; no temporary file is left",
)
def test_failed_save_leaves_old_file(tmp_path, monkeypatch):
    path = tmp_path / "o.safetensors"
    path.write_bytes(b"old")
    off = NPOOffset({f"{LDM_Q}.weight": Dense(torch.ones(8, 8))})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError):
        formats.save_offset(off, path)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["o.safetensors"]


# ---------------------------------------------------------------------------------------------
# LoHa / LoKr / DoRA: parsed as Factored entries; the host's adapter fills in ``delta``
# ---------------------------------------------------------------------------------------------
def test_loha_lokr_and_dora_modules_parse_as_factored_entries_with_their_shapes():
    lin = f"lora_unet_{LDM_K.replace('.', '_')}"  # [8, 768]
    conv = "lora_unet_input_blocks_1_0_in_layers_2"  # [8, 4, 3, 3]
    sd = {
        f"{lin}.hada_w1_a": torch.randn(8, 2),
        f"{lin}.hada_w1_b": torch.randn(2, 768),
        f"{lin}.hada_w2_a": torch.randn(8, 2),
        f"{lin}.hada_w2_b": torch.randn(2, 768),
        f"{lin}.alpha": torch.tensor(1.0),
        f"{conv}.lokr_w1": torch.randn(2, 2),
        f"{conv}.lokr_w2_a": torch.randn(2, 4),  # CP form: w2_a [r, out/2], w2_b [r, in/2], t2 [r, r, 3, 3]
        f"{conv}.lokr_w2_b": torch.randn(2, 2),
        f"{conv}.lokr_t2": torch.randn(2, 2, 3, 3),
        f"{conv}.diff_b": torch.randn(8),
    }
    off = formats.parse_state_dict(sd, {}, "ly.safetensors")
    assert off.kinds() == {"loha": 1, "lokr": 1, "Dense": 1}
    assert off.source_format == "kohya (LoHa, LoKr)" and not off.is_resolved
    assert off.entries[f"{LDM_K.replace('.', '_')}.weight"].weight_shape == (8, 768)
    assert off.entries["input_blocks_1_0_in_layers_2.weight"].weight_shape == (8, 4, 3, 3)
    assert off.base_arch == "SD15"  # the cross-attention width read off the LoHa's factors


def test_a_factored_entry_resolves_to_its_expanded_delta_reshaped_to_the_weight():
    """The adapter's ΔW comes in the factors' natural shape [out, in·kh·kw]; it lands reshaped on a conv."""
    delta = torch.randn(8, 4 * 9)
    off = NPOOffset({"input_blocks.1.0.in_layers.2.weight": Factored("loha", {}, delta=delta)}, naming="ldm")
    out = resolve(off).entries["input_blocks.1.0.in_layers.2.weight"]
    assert isinstance(out, Dense) and torch.equal(out.delta, delta.reshape(8, 4, 3, 3))
    wrong = NPOOffset({f"{LDM_Q}.weight": Factored("lokr", {}, delta=torch.randn(8, 16))}, naming="ldm")
    with pytest.raises(NPOError, match=r"makes a ΔW of shape \(8, 16\) but the model's parameter is \(8, 8\)"):
        resolve(wrong)
    with pytest.raises(NPOError, match="not expanded"):
        resolve(NPOOffset({f"{LDM_Q}.weight": Factored("loha", {"hada_w1_a": torch.zeros(8, 1)})}, naming="ldm"))


def test_dora_decomposition_is_taken_against_the_reference_weight():
    """W' = m · (W + ΔW) / ‖W + ΔW‖ per output row (m [out] or [out, 1]) or per input column (m [1, in])."""
    g = torch.Generator().manual_seed(0)
    w, d = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g) * 0.1
    rows, cols = torch.rand(8, generator=g) + 0.5, torch.rand(8, generator=g) + 0.5
    v = w + d
    by_rows = torch.stack([rows[i] * v[i] / v[i].norm() for i in range(8)])
    by_cols = torch.stack([cols[j] * v[:, j] / v[:, j].norm() for j in range(8)], dim=1)
    for m, want in ((rows, by_rows), (rows.reshape(8, 1), by_rows), (cols.reshape(1, 8), by_cols)):
        e = Factored("dora", {"dora_scale": m}, delta=d, shape=(8, 8))
        off = NPOOffset({f"{LDM_Q}.weight": e}, naming="ldm").resolved_decompositions(lambda k: w)
        assert off.is_resolved
        assert torch.allclose(off.entries[f"{LDM_Q}.weight"].delta, want - w, atol=1e-6)
    bad = Factored("dora", {"dora_scale": torch.ones(5)}, delta=d, shape=(8, 8))
    with pytest.raises(NPOError, match=r"magnitude of shape \(5,\) fits neither"):
        NPOOffset({f"{LDM_Q}.weight": bad}, source="d.safetensors").resolved_decompositions(lambda k: w)


@pytest.mark.parametrize(
    "module,looks",
    [
        ("lora_unet_double_blocks_0_img_attn_qkv", "Flux, Chroma or HunyuanVideo"),
        ("diffusion_model.joint_blocks.3.x_block.attn.qkv", "SD3 / SD3.5"),
        ("diffusion_model.blocks.0.self_attn.q", "Wan 2.x"),
        ("transformer.transformer_blocks.0.img_mlp.net.0.proj", "QwenImage"),
    ],
)
@pytest.mark.fault(
    "an offset of another family without npo.base_arch metadata",
    "the key list, and the family its key names look like",
)
def test_keys_of_another_family_are_named_by_the_family_they_look_like(module, looks):
    off = formats.parse_state_dict(
        {f"{module}.lora_up.weight": torch.zeros(8, 2), f"{module}.lora_down.weight": torch.zeros(2, 8)}, {}, "dit.sft"
    )
    with pytest.raises(NPOError, match="do not land") as err:
        resolve(off)
    assert f"look like an offset for {looks}" in str(err.value) and "not for SD15" in str(err.value)


def test_a_file_of_the_models_own_kind_gets_no_family_hint():
    off = formats.parse_state_dict({"input_blocks.9.1.proj_out.diff": torch.zeros(8, 8)}, {}, "x.sft")
    with pytest.raises(NPOError, match="do not land") as err:
        formats.resolve(off, TARGETS, D2L, "SDXL", 768)
    assert "look like" not in str(err.value)
