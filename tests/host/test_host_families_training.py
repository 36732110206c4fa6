"""Self-NPO Train on the DiT / flow families (lora mode, data-free pool), through the node, on tiny models.

Every family with real CFG: the run finishes, the model is bit-identical afterwards, the offset applies
(Apply NPO) and its file loads in ComfyUI's stock LoRA loader with every key landing; a flow family
resumes exactly; bad input (a guidance-distilled model, an image latent for a video model) is refused
before any sampling.
"""

from __future__ import annotations

import comfy.lora
import comfy.model_management
import npo_familykit as fk
import npo_hostkit as kit
import pytest
import torch

from comfyui_npo.nodes.host import model_facts, sampling, training_session
from comfyui_npo.nodes.offsets import NPOSaveOffset
from comfyui_npo.npo_core.errors import NPOError

NAMES = [f.name for f in fk.all_families()]


def _family(name):
    fam = fk.family(name)
    if not fam.available():
        pytest.skip(f"{fam.config_class} is not in this ComfyUI")
    if fk.refused_reason(fam):
        pytest.skip(f"{fam.config_class} is refused by design")
    return fam


def _pool_size(fam, model) -> dict:
    """width/height/frames of a pool sample with the family's tiny latent shape."""
    shape = fam.latent_shape(1)
    f = training_session.spatial_factor(model)
    out = {"width": shape[-1] * f, "height": shape[-2] * f}
    if len(shape) == 5:
        fmt = model.model.latent_format
        out["frames"] = (shape[2] - 1) * int(getattr(fmt, "temporal_downscale_ratio", 1)) + 1
    return out


def _train(fam, model, **kw):
    pos, neg = fam.conds(1)
    args = dict(pool_cfg=fam.cfg, rank=2, truncation_steps=2, gradient_checkpointing=True, **_pool_size(fam, model))
    args.update(kw)
    return kit.self_npo_train(model, pos, neg, **args)


@pytest.mark.parametrize("name", NAMES)
def test_self_npo_train_on_every_family(name, out_dir, npo_dir, monkeypatch):
    fam = _family(name)
    model = fk.tiny_model(fam)
    before = kit.state_hash(model.model.diffusion_model)
    out = _train(fam, model)
    offset, steps = out.result[0], out.result[2]
    assert steps == 3
    assert offset.entries and offset.base_arch == fam.config_class
    assert all(torch.isfinite(e.up).all() and torch.isfinite(e.down).all() for e in offset.entries.values())
    assert any(float(e.up.abs().max()) > 0 for e in offset.entries.values()), "the LoRA never moved"
    comfy.model_management.unload_all_models()
    assert kit.state_hash(model.model.diffusion_model) == before
    assert not kit.hooked_modules(model.model.diffusion_model)

    # the offset applies, and its file loads in the stock loader with every key landing
    got = fk.sample(sampling.apply_offset(model, offset, 1.0), fam, 1)
    assert torch.isfinite(got).all()
    import folder_paths
    from safetensors import safe_open

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(npo_dir))
    with torch.inference_mode():
        NPOSaveOffset.execute(npo_offset=offset, filename_prefix=f"trained_{name}")
    path = next(npo_dir.rglob(f"trained_{name}*.safetensors"))
    with safe_open(str(path), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    assert meta["npo.base_arch"] == fam.config_class and meta["npo.base_variant"] == model_facts.model_variant(model)
    patches = comfy.lora.load_lora(sd, fk.key_map(model))
    landed = {k if isinstance(k, str) else k[0] for k in patches}
    assert landed == {f"{fk.PREFIX}{k}" for k in offset.entries}


def test_flow_training_resumes_exactly(out_dir):
    fam = _family("wan21")
    full = _train(fam, fk.tiny_model(fam), steps=4, save_every=2, filename_prefix="wan_full").result[0]
    _train(fam, fk.tiny_model(fam), steps=2, save_every=2, filename_prefix="wan_half")
    ckpt = sorted(p.name for p in (out_dir / "npo_training").glob("wan_half*.pt"))[-1]
    resumed = _train(fam, fk.tiny_model(fam), steps=4, save_every=2, filename_prefix="wan_half", resume_from=ckpt)
    resumed = resumed.result[0]
    assert set(full.entries) == set(resumed.entries)
    for k in full.entries:
        assert torch.equal(full.entries[k].up, resumed.entries[k].up), k


@pytest.mark.fault(
    "a video model given an image LATENT (or the reverse) in Self-NPO Train",
    "NPOError naming the latents input, the shapes expected and given, before any sampling",
)
def test_image_latent_for_a_video_model_is_refused(out_dir):
    fam = _family("wan21")
    model = fk.tiny_model(fam)
    wrong = {"samples": torch.zeros(2, 4, 8, 8)}
    with pytest.raises(NPOError, match="latents: WAN21_T2V takes video"):
        _train(fam, model, latents=wrong)


@pytest.mark.fault(
    "a guidance-distilled model (Flux.1 dev: guidance_embed) in Self-NPO Train",
    "NPOError: it samples at cfg 1, where no offset can act",
)
def test_guidance_distilled_model_is_refused(out_dir):
    fam = _family("chroma")
    model = fk.tiny_model(fam)
    model.model.model_config.unet_config["guidance_embed"] = True  # what Flux.1 dev's config says
    with pytest.raises(NPOError, match="guidance-distilled"):
        _train(fam, model)
