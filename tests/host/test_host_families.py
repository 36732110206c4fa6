"""NPO on every DiT / flow family ComfyUI samples with real CFG, on tiny models built from ComfyUI's own
classes (tests/host/families). Each family runs on every ComfyUI version that has its config class.

The reference negative pass is a separately built model whose weights are θ + s·ΔW, merged by hand
(ΔW written into the weight, or into its slice of a fused weight); ComfyUI's calc_cond_batch runs it.
"""

from __future__ import annotations

import comfy.lora
import comfy.model_management
import comfy.samplers
import comfyui_version
import npo_familykit as fk
import npo_hostkit as kit
import pytest
import torch

from comfyui_npo.nodes.host import model_facts, sampling
from comfyui_npo.nodes.models import NPONegativeModel
from comfyui_npo.nodes.offsets import NPOSaveOffset
from comfyui_npo.npo_core import families
from comfyui_npo.npo_core.errors import NPOError
from comfyui_npo.npo_core.offset import Dense, LowRank

# Collected per ComfyUI version (never a skip): the kit's families whose config class the running ComfyUI has.
# LACKING pins which families each release of the matrix lacks (their config class arrived later), so a family
# that stops being collected (a renamed config class, a newer release without it) fails
# test_the_families_not_collected_are_the_ones_this_release_lacks instead of silently not running.
LACKING = {
    "0.3.64": {"flux2_klein", "zimage", "hunyuan_video15", "kandinsky5", "kandinsky5_image", "cogvideox"},
    "0.14.1": {"cogvideox"},
    "0.33.0": set(),
}
HERE = [f for f in fk.all_families() if f.available()]
# the families whose record says the per-row negative pass cannot act (Cosmos Predict1): only the refusal is
# tested on them (test_refused_families here; Self-NPO Train's in test_host_every_config.py)
REFUSED = [f.name for f in HERE if getattr(families.BY_CONFIG.get(f.config_class), "unsupported", None)]
NAMES = [f.name for f in HERE if f.name not in REFUSED]


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".") if p.isdigit())


def _family(name: str):
    fam = fk.family(name)
    assert fam.available(), f"{name}: collected on ComfyUI {comfyui_version.__version__}, which lacks it"
    return fam


def test_the_families_not_collected_are_the_ones_this_release_lacks():
    """A release of the matrix lacks exactly its LACKING families; any other release (a newer canary, one in
    between) at most those of the nearest pinned release below it (the newest pin: none)."""
    here = comfyui_version.__version__
    lacking = {f.name for f in fk.all_families() if not f.available()}
    assert {f.name for f in HERE} | lacking == {f.name for f in fk.all_families()}
    if here in LACKING:
        assert lacking == LACKING[here], f"ComfyUI {here} lacks {sorted(lacking)}, pinned {sorted(LACKING[here])}"
        return
    below = [v for v in LACKING if _version(v) <= _version(here)] or [min(LACKING, key=_version)]
    bound = LACKING[max(below, key=_version)]
    assert lacking <= bound, f"ComfyUI {here} lacks {sorted(lacking - bound)} (config classes gone or renamed?)"


@pytest.mark.fault(
    "a family the per-row negative pass cannot act on (Cosmos Predict1)",
    "NPOError naming the family and why, from Apply NPO, NPO Negative Model and NPO CFG Guider",
)
@pytest.mark.parametrize("name", REFUSED)
def test_refused_families(name, load_offset):
    fam = _family(name)
    reason = fk.refused_reason(fam)
    assert reason, f"{fam.config_class}: the family the record refuses is not refused on the model"
    model = fk.tiny_model(fam)
    offset = load_offset(fk.comfy_lora_file(fk.attention_lora(fam, model)), f"{name}.safetensors")
    pos, neg = fam.conds(1)
    calls = {
        "Apply NPO": lambda: sampling.apply_offset(model, offset, 1.0),
        "NPO Negative Model": lambda: NPONegativeModel.execute(model=model, npo_offset=offset, strength=1.0),
        "NPO CFG Guider": lambda: sampling.make_guider(model, pos, neg, fam.cfg, offset=offset),
        "NPO CFG Guider (negative_model)": lambda: sampling.make_guider(
            fk.tiny_model(fk.family("wan21")), pos, neg, fam.cfg, negative_model=model
        ),
    }
    for node, call in calls.items():
        with pytest.raises(NPOError, match=f"{fam.config_class} is not supported by NPO") as info:
            call()
        assert reason in str(info.value), node


def _delta(entry) -> torch.Tensor:
    return entry.delta() if isinstance(entry, LowRank) else entry.delta.float()


@pytest.fixture(scope="module")
def plain_runs():
    """Plain-CFG samples per (family, batch), shared by the tests of this module."""
    cache: dict = {}

    def get(fam, batch):
        key = (fam.name, batch)
        if key not in cache:
            cache[key] = fk.sample(fk.tiny_model(fam), fam, batch)
        return cache[key]

    return get


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_apply_npo_equals_a_hand_merged_negative_model(name, batch, load_offset, plain_runs):
    fam = _family(name)
    model = fk.tiny_model(fam)
    before = kit.state_hash(model.model.diffusion_model)
    factors = fk.attention_lora(fam, model)
    offset = load_offset(fk.comfy_lora_file(factors, alpha=2.0), f"{name}.safetensors")
    s = 0.8
    got = fk.sample(sampling.apply_offset(model, offset, s), fam, batch)

    truth = fk.dense_truth(factors, scale=2.0 / 4)  # alpha / rank
    reference = fk.model_from(fam, fk.merged(fk.pristine(fam), truth, s))
    want = fk.sample(kit.with_reference_cfg(fk.tiny_model(fam), reference), fam, batch)
    plain = plain_runs(fam, batch)
    err, effect = fk.max_err(got, want), fk.max_err(plain, want)
    assert torch.isfinite(got).all()
    assert effect > 1e-3, f"{name}: the offset should change the sample (plain vs reference {effect:.2e})"
    assert fk.close(got, want), f"{name} batch {batch}: NPO vs hand-merged reference {err:.2e} (effect {effect:.2e})"
    comfy.model_management.unload_all_models()
    assert kit.state_hash(model.model.diffusion_model) == before
    assert not kit.hooked_modules(model.model.diffusion_model)


@pytest.mark.parametrize("name", NAMES)
def test_a_lora_on_every_linear_layer_changes_only_the_negative_rows(name, load_offset, plain_runs):
    """Every Linear of the family, whatever its input layout (PixArt's kv_linear sees [1, B·L, C], HunyuanDiT's
    pooler [L, B, C] and mlp_t5 [B·L, C]), at batch 2: still the hand-merged reference. HiDream's routed
    experts mix rows and are refused (test below), so they are left out here."""
    fam = _family(name)
    model = fk.tiny_model(fam)
    mixed = model_facts.family(model).mixed_rows
    factors = fk.attention_lora(fam, model, rank=2, magnitude=0.2, modules=fk.all_linears(model, skip=mixed))
    offset = load_offset(fk.comfy_lora_file(factors), f"{name}_all.safetensors")
    got = fk.sample(sampling.apply_offset(model, offset, 1.0), fam, 2)
    reference = fk.model_from(fam, fk.merged(fk.pristine(fam), fk.dense_truth(factors), 1.0))
    want = fk.sample(kit.with_reference_cfg(fk.tiny_model(fam), reference), fam, 2)
    assert fk.max_err(plain_runs(fam, 2), want) > 1e-3
    assert fk.close(got, want), f"{name}: all linears, batch 2: {fk.max_err(got, want):.2e}"
    if mixed:
        experts = fk.all_linears(model)
        experts = [m for m in experts if any(p in f".{m}." for p in mixed)]
        bad = load_offset(fk.comfy_lora_file(fk.attention_lora(fam, model, modules=experts[:1])), "experts.safetensors")
        with pytest.raises(NPOError, match="cannot take it") as info:
            sampling.apply_offset(model, bad, 1.0)
        assert experts[0] in str(info.value)


@pytest.mark.parametrize("extra", ["skip_layer_guidance", "cfg_pp_sampler", "both"])
@pytest.mark.parametrize("name", ["sd3", "wan21"])
def test_extra_single_cond_passes_and_cfg_pp_keep_the_positive_weights(name, extra, load_offset):
    """SkipLayerGuidanceDiT adds a cond-only pass (index 0) that must run θ; a CFG++ sampler reads the uncond
    prediction after CFG, which must be the NPO one. Reference: the uncond chunk computed on a hand-merged
    model inside the CFG batch."""
    from comfy_extras.nodes_slg import SkipLayerGuidanceDiT

    fam = _family(name)
    model = fk.tiny_model(fam)
    factors = fk.attention_lora(fam, model)
    offset = load_offset(fk.comfy_lora_file(factors), f"{name}.safetensors")
    reference = fk.model_from(fam, fk.merged(fk.pristine(fam), fk.dense_truth(factors), 1.0))
    slg = extra in ("skip_layer_guidance", "both")
    sampler = "euler_cfg_pp" if extra in ("cfg_pp_sampler", "both") else "euler"

    def guided(m):
        if not slg:
            return m
        return SkipLayerGuidanceDiT.execute(
            model=m, scale=3.0, start_percent=0.0, end_percent=1.0, double_layers="0", single_layers=""
        ).result[0]

    got = fk.sample(guided(sampling.apply_offset(model, offset, 1.0)), fam, 2, sampler=sampler, cfg=2.0)
    want = fk.sample(guided(fk.with_reference_batch(fk.tiny_model(fam), reference)), fam, 2, sampler=sampler, cfg=2.0)
    plain = fk.sample(guided(fk.tiny_model(fam)), fam, 2, sampler=sampler, cfg=2.0)
    assert fk.max_err(plain, want) > 1e-3
    assert fk.close(got, want), f"{name} {extra}: {fk.max_err(got, want):.2e}"


@pytest.mark.parametrize("name", NAMES)
def test_strength_zero_is_plain_cfg_and_weights_survive_a_raise(name, load_offset, plain_runs):
    fam = _family(name)
    model = fk.tiny_model(fam)
    before = kit.state_hash(model.model.diffusion_model)
    offset = load_offset(fk.comfy_lora_file(fk.attention_lora(fam, model)), f"{name}.safetensors")
    assert torch.equal(fk.sample(sampling.apply_offset(model, offset, 0.0), fam, 1), plain_runs(fam, 1))

    class Stop(Exception):
        pass

    def boom(*_):
        raise Stop

    patched = sampling.apply_offset(model, offset, 1.0)
    pos, neg = fam.conds(1)
    latent, noise = fk.noise_and_latent(fam, 1)
    with pytest.raises(Stop), torch.inference_mode():
        comfy.sample.sample(
            patched, noise, 2, fam.cfg, "euler", "simple", pos, neg, latent, callback=boom, disable_pbar=True
        )
    comfy.model_management.unload_all_models()
    assert kit.state_hash(model.model.diffusion_model) == before
    assert not kit.hooked_modules(model.model.diffusion_model)


@pytest.mark.parametrize("name", NAMES)
def test_npo_negative_model_and_guider_equal_the_reference(name, load_offset, plain_runs):
    fam = _family(name)
    model = fk.tiny_model(fam)
    factors = fk.attention_lora(fam, model)
    offset = load_offset(fk.comfy_lora_file(factors), f"{name}.safetensors")
    truth = fk.dense_truth(factors)
    reference = fk.model_from(fam, fk.merged(fk.pristine(fam), truth, 1.0))
    want = fk.sample(kit.with_reference_cfg(fk.tiny_model(fam), reference), fam, 1)

    negative = NPONegativeModel.execute(model=model, npo_offset=offset, strength=1.0).result[0]
    pos, neg = fam.conds(1)
    latent, noise = fk.noise_and_latent(fam, 1)
    guiders = {
        "offset": sampling.make_guider(model, pos, neg, fam.cfg, offset=offset),
        "negative_model": sampling.make_guider(model, pos, neg, fam.cfg, negative_model=negative),
    }
    for how, guider in guiders.items():
        with torch.inference_mode():
            sig = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 2)
            got = guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sig, disable_pbar=True, seed=0)
        assert fk.close(got, want), f"{name} NPO CFG Guider ({how}): {fk.max_err(got, want):.2e}"


@pytest.mark.parametrize("name", NAMES)
def test_every_lora_layout_of_comfyuis_key_map_lands(name, load_offset):
    """For each layout ComfyUI's LoraLoader maps for the family (prefix × own names / renamed / slices of a
    fused weight), a file on the attention linears resolves to the ΔW placed by hand, and ComfyUI's own
    loader reads the same file to the same weights."""
    fam = _family(name)
    model = fk.tiny_model(fam)
    shapes = model_facts.param_shapes(model)
    layouts = fk.layouts(model, fam.attention_linears)
    assert layouts, f"{name}: ComfyUI's key map has no entry for the attention linears"
    broken = {k: t for k, t in fk.key_map(model).items() if fk.out_of_bounds(model, t)}
    if broken:  # refused with the reason, where ComfyUI's loader would place rows past the weight
        lora_key, target = sorted(broken.items())[0]
        dim, _, length = target[1]
        sub = list(shapes[target[0][len(fk.PREFIX) :]])
        sub[dim] = length
        bad = {
            f"{lora_key}.lora_up.weight": torch.zeros(sub[0], 2),
            f"{lora_key}.lora_down.weight": torch.zeros(2, sub[1]),
        }
        with pytest.raises(NPOError, match="which has only"):
            model_facts.resolve_for_model(load_offset(bad, f"{name}_broken.safetensors"), model)
    for i, (layout, entries) in enumerate(sorted(layouts.items())):
        sd, truth = fk.layout_file(entries, shapes)
        resolved = model_facts.resolve_for_model(load_offset(sd, f"{name}_{i}.safetensors"), model)
        assert set(resolved.entries) == set(truth), layout
        for k, d in truth.items():
            assert fk.close(_delta(resolved.entries[k]), d, atol=1e-6), f"{name} {layout} {k}"
        # the same file through ComfyUI's loader (independent of the pack): the same ΔW
        patches = comfy.lora.load_lora(sd, fk.key_map(model))
        clone = model.clone()
        clone.add_patches(patches, 1.0)
        for k, d in truth.items():
            w0 = model_facts.original_weight(model, k).detach().float()
            merged = comfy.lora.calculate_weight(clone.patches[fk.PREFIX + k], w0.clone(), fk.PREFIX + k)
            assert fk.close(merged - w0, d, atol=1e-6), f"{name} {layout} {k}: ComfyUI reads the file otherwise"


@pytest.mark.parametrize("name", NAMES)
def test_saved_offsets_record_the_family_and_load_in_the_stock_loader(name, load_offset, npo_dir, monkeypatch):
    fam = _family(name)
    model = fk.tiny_model(fam)
    factors = fk.attention_lora(fam, model)
    offset = model_facts.resolve_for_model(load_offset(fk.comfy_lora_file(factors), f"{name}.safetensors"), model)
    assert offset.base_arch == fam.config_class
    import folder_paths
    from safetensors import safe_open

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(npo_dir))
    with torch.inference_mode():
        NPOSaveOffset.execute(npo_offset=offset, filename_prefix=f"saved_{name}")
    path = next(npo_dir.rglob(f"saved_{name}*.safetensors"))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        sd = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["npo.base_arch"] == fam.config_class
    assert meta["npo.base_variant"] == model_facts.model_variant(model) != ""
    assert meta["modelspec.architecture"] == f"{fam.config_class}/lora"
    patches = comfy.lora.load_lora(sd, fk.key_map(model))
    assert {k if isinstance(k, str) else k[0] for k in patches} == {f"{fk.PREFIX}{m}.weight" for m in factors}
    for m, (up, down) in factors.items():
        assert fk.close(_delta(offset.entries[f"{m}.weight"]), up @ down, atol=1e-6)


def test_an_offset_of_one_family_on_another_names_both(load_offset):
    names = [f.name for f in fk.families_here()]
    if len(names) < 2:
        pytest.skip("fewer than two families in this ComfyUI")
    a, b = fk.family(names[0]), fk.family(names[1])
    model_a, model_b = fk.tiny_model(a), fk.tiny_model(b)
    resolved = model_facts.resolve_for_model(
        load_offset(fk.comfy_lora_file(fk.attention_lora(a, model_a)), "a.safetensors"), model_a
    )
    with pytest.raises(NPOError, match=f"made for {a.config_class} but the model is {b.config_class}"):
        sampling.apply_offset(model_b, resolved, 1.0)
    other_size = resolved.replace(metadata={**resolved.metadata, "npo.base_variant": "dim=4096 num_layers=40"})
    with pytest.raises(NPOError, match=r"another size of the family"):
        sampling.apply_offset(model_a, other_size, 1.0)
    sd15 = load_offset(kit.make_lora("sd15", "peft", rank=2)[0], "sd.safetensors", metadata={"npo.base_arch": "SD15"})
    with pytest.raises(NPOError, match=f"made for SD15 but the model is {b.config_class}"):
        sampling.apply_offset(model_b, sd15, 1.0)


def test_dense_slices_full_weights_and_bare_parameters(load_offset):
    """A dense .diff on a slice of a fused weight lands in its rows; a full-weight file in the model's own
    names becomes file − model; a non-zero delta on a bare parameter is refused, never skipped."""
    with_slices = (
        f for f in fk.families_here() if any(isinstance(t, tuple) for t in fk.key_map(fk.tiny_model(f)).values())
    )
    fam = next(with_slices, None)
    if fam is None:
        pytest.skip("no family with slice entries in this ComfyUI")
    model = fk.tiny_model(fam)
    shapes = model_facts.param_shapes(model)
    km = fk.key_map(model)
    lora_key, target = next((k, t) for k, t in sorted(km.items()) if isinstance(t, tuple) and t[1] is not None)
    rel = target[0][len(fk.PREFIX) :]
    dim, start, length = target[1]
    sub = list(shapes[rel])
    sub[dim] = length
    diff = torch.randn(sub)
    resolved = model_facts.resolve_for_model(load_offset({f"{lora_key}.diff": diff}, "slice.safetensors"), model)
    want = torch.zeros(shapes[rel])
    want.narrow(dim, start, length).copy_(diff)
    assert isinstance(resolved.entries[rel], Dense) and torch.equal(resolved.entries[rel].delta, want)

    full = {f"{fk.PREFIX}{k}": v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    some = sorted(k for k in full if k.endswith(".weight") and full[k].dim() == 2)[0]
    full[some] = full[some] + 0.5
    resolved = model_facts.resolve_for_model(load_offset(full, "full.safetensors"), model)
    assert list(resolved.entries) == [some[len(fk.PREFIX) :]]
    assert torch.allclose(resolved.entries[some[len(fk.PREFIX) :]].delta, torch.full_like(full[some], 0.5))

    bare = [k for k, _ in model.model.diffusion_model.named_parameters() if not k.endswith((".weight", ".bias"))]
    if bare:
        full = {f"{fk.PREFIX}{bare[0]}": model_facts.original_weight(model, bare[0]).float() + 1.0}
        with pytest.raises(NPOError, match="bare parameter"):
            sampling.apply_offset(model, load_offset(full, "bare.safetensors"), 1.0)


if "cogvideox" in NAMES:  # CogVideoX arrived after v0.3.64: not collected where its config class is missing

    @pytest.mark.fault(
        "An offset on CogVideoX's patch-embedding Conv2d, whose input folds the frames into the batch [B·T, C, H, W]",
        "the negative rows' frames get the conv delta, at batch 2, equal to a hand-merged reference",
    )
    def test_a_conv_offset_on_cogvideox_patch_embedding_acts_on_the_negative_frames_only(load_offset, plain_runs):
        fam = _family("cogvideox")
        model = fk.tiny_model(fam)
        assert fam.latent_shape(2)[2] > 1, "needs ≥ 2 latent frames, or [B·T, ...] cannot be told from [B, ...]"
        w = model.model.diffusion_model.state_dict()["patch_embed.proj.weight"]
        g = torch.Generator().manual_seed(11)
        down = torch.randn(2, *w.shape[1:], generator=g) / w[0].numel() ** 0.5
        up = torch.randn(w.shape[0], 2, 1, 1, generator=g) * 0.3
        offset = load_offset(fk.comfy_lora_file({"patch_embed.proj": (up, down)}), "cogvideox_conv.safetensors")
        got = fk.sample(sampling.apply_offset(model, offset, 1.0), fam, 2)
        delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)  # the conv LoRA's ΔW, by hand
        reference = fk.model_from(fam, fk.merged(fk.pristine(fam), {"patch_embed.proj.weight": delta}, 1.0))
        want = fk.sample(kit.with_reference_cfg(fk.tiny_model(fam), reference), fam, 2)
        assert fk.max_err(plain_runs(fam, 2), want) > 1e-3
        assert fk.close(got, want), f"conv offset, batch 2: {fk.max_err(got, want):.2e}"
