"""Self-NPO Train on the DiT / flow families (lora mode, data-free pool), through the node, on tiny models.

Every family with real CFG: the run finishes, the model is bit-identical afterwards, the offset applies
(Apply NPO) and its file loads in ComfyUI's stock LoRA loader with every key landing; a flow family
resumes exactly, also after a cancel, with the progress bar where it belongs; a cancel during the
start-pool sampling stops within one sampler step; bad input (a guidance-distilled model, an image
latent for a video model, a checkpoint of another family in resume_from) is refused before any sampling.
"""

from __future__ import annotations

import comfy.lora
import comfy.model_management
import comfy.sample
import npo_familykit as fk
import npo_hostkit as kit
import pytest
import torch
from test_host_families import NAMES, _family  # the families this ComfyUI has, the refused one out

from comfyui_npo.nodes.host import model_facts, runtime, sampling, training_model
from comfyui_npo.nodes.offsets import NPOSaveOffset
from comfyui_npo.npo_core.errors import NPOError


def _pool_size(fam, model) -> dict:
    """width/height/frames of a pool sample with the family's tiny latent shape."""
    shape = fam.latent_shape(1)
    layout = model_facts.latent_layout(model)
    out = {"width": shape[-1] * layout.spatial_factor, "height": shape[-2] * layout.spatial_factor}
    if len(shape) == 5:
        out["frames"] = (shape[2] - 1) * layout.temporal_factor + 1
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


def test_student_cond_auto_is_the_unconditional_student_on_flow_models(out_dir):
    """auto on a flow-matching model (Wan 2.1, CONST) trains exactly what student_cond = negative trains."""
    fam = _family("wan21")
    runs = {c: _train(fam, fk.tiny_model(fam), steps=2, student_cond=c) for c in ("auto", "negative", "prompt")}
    auto, negative, prompt = (runs[c].result[0].entries for c in ("auto", "negative", "prompt"))
    assert all(torch.equal(auto[k].up, negative[k].up) and torch.equal(auto[k].down, negative[k].down) for k in auto)
    assert any(not torch.equal(auto[k].up, prompt[k].up) for k in auto)
    assert "student_cond negative (auto)" in runs["auto"].ui.as_dict()["text"][0]


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


class _RecordingBar:
    """ComfyUI's ProgressBar interface; records every position and can press Cancel at one of them."""

    def __init__(self, total, cancel_at=None):
        self.total, self.current, self.seen, self.cancel_at = total, 0, [], cancel_at

    def update_absolute(self, value, total=None, preview=None):
        self.total = total if total is not None else self.total
        self.current = min(value, self.total)
        self.seen.append(self.current)
        if self.current == self.cancel_at:
            self.cancel_at = None
            comfy.model_management.interrupt_current_processing(True)

    def update(self, n):
        self.update_absolute(self.current + n)


def _bars(monkeypatch, cancel_at=None) -> list:
    bars = []

    def make(total):
        bars.append(_RecordingBar(total, cancel_at if not bars else None))
        return bars[-1]

    monkeypatch.setattr(runtime, "progress_bar", make)
    return bars


def _count_sampling(monkeypatch) -> list:
    """A list that grows by one at every ``comfy.sample.sample`` call (the start-pool sampling)."""
    sampled = []
    real_sample = comfy.sample.sample
    monkeypatch.setattr(comfy.sample, "sample", lambda *a, **k: sampled.append(1) or real_sample(*a, **k))
    return sampled


@pytest.mark.fault(
    "Cancel during Self-NPO Train on a DiT / video model (Wan 2.1), then resume",
    "stops within one training step; the model stays bit-identical; the last checkpoint resumes to the "
    "same offset an uninterrupted run gives; the progress bar counts pool samples then steps",
)
def test_cancel_on_a_video_model_stops_within_one_step_and_resume_matches_an_uninterrupted_run(
    out_dir, monkeypatch
):
    fam = _family("wan21")
    model = fk.tiny_model(fam)
    before = kit.state_hash(model.model.diffusion_model)
    bars = _bars(monkeypatch, cancel_at=2 + 3)  # pool of 2, then the 3rd training step: press Cancel
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _train(fam, model, steps=6, save_every=2, filename_prefix="wan_cancel")
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert bars[0].seen == [1, 2, 2, 3, 4, 5] and bars[0].total == 2 + 6  # pool 1, 2; steps 0..3; none after
    comfy.model_management.unload_all_models()
    assert kit.state_hash(model.model.diffusion_model) == before
    assert not kit.hooked_modules(model.model.diffusion_model)
    ckpts = sorted(p.name for p in (out_dir / "npo_training").glob("wan_cancel*.pt"))
    assert len(ckpts) == 1 and torch.load(out_dir / "npo_training" / ckpts[0], weights_only=True)["step"] == 2

    resumed = _train(fam, model, steps=4, save_every=2, filename_prefix="wan_cancel", resume_from=ckpts[0])
    assert bars[1].seen == [1, 2, 2 + 2, 2 + 3, 2 + 4] and bars[1].current == bars[1].total == 2 + 4
    whole = _train(fam, fk.tiny_model(fam), steps=4, save_every=2, filename_prefix="wan_whole").result[0]
    resumed = resumed.result[0]
    assert set(whole.entries) == set(resumed.entries)
    for k in whole.entries:
        assert torch.equal(whole.entries[k].up, resumed.entries[k].up), k
        assert torch.equal(whole.entries[k].down, resumed.entries[k].down), k


@pytest.mark.fault(
    "Cancel while Self-NPO Train samples its data-free start pool",
    "ComfyUI's interrupt is raised after the sampler step in which Cancel was pressed, not after the whole "
    "pool sample (a video sample can take minutes)",
)
def test_cancel_during_pool_sampling_stops_within_one_sampler_step(out_dir, monkeypatch):
    fam = _family("wan21")
    model = fk.tiny_model(fam)
    dm = model.model.diffusion_model
    calls = []

    def pressing_cancel(module, args):
        calls.append(1)
        comfy.model_management.interrupt_current_processing(True)  # Cancel during the first model call

    handle = dm.register_forward_pre_hook(pressing_cancel)
    bars = _bars(monkeypatch)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _train(fam, model, pool_steps=4)
    finally:
        handle.remove()
        comfy.model_management.interrupt_current_processing(False)
    # one sampler step (cond and uncond in one call), not the pool sample's 4 (ComfyUI ≥ 0.14's ops also check
    # the interrupt inside the model call; v0.3.64 relies on the node's per-step check)
    assert len(calls) == 1
    assert bars[0].seen == []  # no pool sample finished


@pytest.mark.fault(
    "resume_from names a checkpoint trained on another model family (SD3 checkpoint, Wan model)",
    "NPOError naming resume_from and both setups, before any sampling",
)
def test_resume_from_a_checkpoint_of_another_family_is_refused_before_sampling(out_dir, monkeypatch):
    sd3 = _family("sd3")
    _train(sd3, fk.tiny_model(sd3), steps=2, save_every=2, filename_prefix="sd3_run")
    ckpt = sorted(p.name for p in (out_dir / "npo_training").glob("sd3_run*.pt"))[-1]
    wan = _family("wan21")
    sampled = _count_sampling(monkeypatch)
    with pytest.raises(NPOError, match=r"resume_from: .*another model.*SD3.*WAN21_T2V"):
        _train(wan, fk.tiny_model(wan), steps=4, resume_from=ckpt)
    assert sampled == []


@pytest.mark.fault(
    "Self-NPO Train on Wan with a negative of another token length than the prompts",
    "NPOError naming positive/negative: Wan batches only prompts of exactly the same length (shapes given), "
    "before any sampling",
)
def test_prompts_a_model_cannot_batch_are_refused_with_their_shapes(out_dir, monkeypatch):
    fam = _family("wan21")
    model = fk.tiny_model(fam)
    pos, neg = fam.conds(1)
    longer = [[torch.cat([neg[0][0], neg[0][0]], dim=1), {}]]  # twice the negative's tokens
    sampled = _count_sampling(monkeypatch)
    n = pos[0][0].shape[1]
    with pytest.raises(NPOError, match=rf"exactly the same token length; shapes \[1, {n}, 64\], \[1, {2 * n}, 64\]"):
        kit.self_npo_train(model, pos, longer, pool_cfg=fam.cfg, rank=2, truncation_steps=2, **_pool_size(fam, model))
    assert sampled == []


if "cogvideox" in NAMES:  # CogVideoX arrived after v0.3.64: not collected where its config class is missing

    def test_cogvideox_trains_on_its_zero_terminal_snr_v_prediction_schedule(out_dir, monkeypatch):
        """CogVideoX samples with V_PREDICTION_DDPM on a zero-terminal-SNR table: Self-NPO Train must build the
        ``vp_zsnr`` TDFT schedule from that table (ComfyUI ends it at a finite ν ≈ 4519, not ∞)."""
        fam = _family("cogvideox")
        model = fk.tiny_model(fam)
        table = model.get_model_object("model_sampling").sigmas
        assert model_facts.schedule_kind(model)[0] == "vp_zsnr"
        assert torch.isfinite(table).all() and float(table[-1]) > 1000
        built = []
        real = training_model.make_schedule
        monkeypatch.setattr(training_model, "make_schedule", lambda k, s, n=1.0: built.append(k) or real(k, s, n))
        out = _train(fam, model)
        assert out.result[2] == 3 and built and set(built) == {"vp_zsnr"}
