"""NPO Preference Train and its pair nodes on a real ComfyUI model (tiny SD1.5 / SDXL-v / a flow DiT).

The reversed-DPO step itself is checked against a transcription of the authors' loop in tests/unit/test_preference.py;
here: that the node trains the family's adapters from the pairs the graph gives, in the model's own parameterisation,
leaves the connected model bit-identical, resumes exactly, and refuses bad pairs naming the item.
"""

from __future__ import annotations

import json

import npo_familykit as fk
import npo_hostkit as kit
import pytest
import torch
from PIL import Image

from comfyui_npo.nodes.host import preference_run
from comfyui_npo.nodes.host.training_model import TrainingModel
from comfyui_npo.nodes.models import NPOApply
from comfyui_npo.nodes.preference import NPOPairsFromFolder, NPOPairsFromImages, NPOPreferenceTrain
from comfyui_npo.npo_core.errors import NPOError
from comfyui_npo.npo_core.offset import LowRank


class StandInVAE:
    """VAE-shaped: IMAGE [B, H, W, 3] → a 4-channel latent at 1/8 (fixed projection of 8×8 means)."""

    downscale_ratio = 8

    def encode(self, images):
        x = torch.nn.functional.avg_pool2d(images.movedim(-1, 1), 8)
        proj = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.5, 0.5, 0.5]])
        return torch.einsum("oc,bchw->bohw", proj, x) * 2 - 1


class StandInCLIP:
    """CLIP-shaped: each prompt text → a fixed SD1.5-tiny conditioning derived from the text."""

    def __init__(self, kind="sd15"):
        self.kind = kind
        self.seen: list[str] = []

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens):
        self.seen.append(tokens)
        pos, _ = kit.make_conds(self.kind, seed=sum(map(ord, tokens)) % 1000)
        return pos


def _images(n, seed, smooth=False):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(n, 64, 64, 3, generator=g)
    if smooth:
        img = torch.nn.functional.avg_pool2d(img.movedim(-1, 1), 9, 1, 4).movedim(1, -1)
    return img


def _pairs(n=4, kind="sd15"):
    pos, _ = kit.make_conds(kind)
    return NPOPairsFromImages.execute(
        preferred=_images(n, 1), rejected=_images(n, 2, smooth=True), positive=pos, vae=StandInVAE()
    ).result[0]


def _train(model, pair_set, **kw):
    args = dict(
        steps=3, batch_size=2, learning_rate="1e-3", beta=0.0, loss_type="sigmoid", rank=8, lora_layers="attention",
        seed=0, gradient_checkpointing=True, training_dtype="fp32", save_every=0, filename_prefix="pref",
        resume_from="none", grad_accumulation_steps=1, optimizer="AdamW",
    )
    args.update(kw)
    with torch.inference_mode():
        return NPOPreferenceTrain.execute(model=model, pairs=pair_set, **args)


def test_training_on_image_pairs_gives_an_attention_lora_and_leaves_the_model_unchanged(tiny, out_dir):
    model = tiny("sd15")
    before = kit.state_hash(model.model.diffusion_model)
    out = _train(model, _pairs())
    offset, curve, steps = out.result
    assert steps == 3 and curve.shape[-1] == 3
    assert kit.state_hash(model.model.diffusion_model) == before
    assert offset.entries and all(isinstance(e, LowRank) and e.rank == 8 for e in offset.entries.values())
    assert all(".attn1." in k or ".attn2." in k for k in offset.entries)
    assert any(float(e.up.abs().max()) > 0 for e in offset.entries.values())  # B moved from its zero init
    recipe = json.loads(offset.metadata["npo.recipe"])
    assert recipe["method"] == "diffusion-npo-reversed-dpo" and recipe["preference"]["beta"] == 500.0
    assert recipe["preference"]["prediction"] == "eps" and recipe["pairs"] == 4
    pos, neg = kit.make_conds("sd15")
    with torch.inference_mode():
        npo = NPOApply.execute(model=model, npo_offset=offset, strength=1.0).result[0]
    plain, with_npo = kit.ksample(model, pos, neg, 5.0), kit.ksample(npo, pos, neg, 5.0)
    assert torch.isfinite(with_npo).all() and not torch.equal(plain, with_npo)


def test_the_first_step_loss_is_log_2_and_the_beta_follows_the_family(tiny, out_dir):
    """Before any update the policy is the model itself (LoRA B = 0): logits 0, loss −log σ(0) = log 2."""
    from comfyui_npo.training.trainer import Callbacks

    for kind, beta, prediction in (("sd15", 500.0, "eps"), ("sdxl_v", 2000.0, "v")):
        tm = TrainingModel(tiny(kind).clone())
        assert preference_run.authors_beta(tm) == beta and preference_run.prediction_of(tm) == prediction
        job = preference_run.plan(tm, preference_run.PreferenceRecipe(steps=1, batch_size=2), _pairs(2, kind))
        with torch.inference_mode(False), torch.enable_grad():
            result, _ = preference_run.train(job, Callbacks(), True)
        assert result.losses[0] == pytest.approx(0.6931472, abs=1e-5), kind


def test_a_flow_family_trains_with_the_velocity_loss(out_dir):
    fam = next((f for f in fk.families_here() if f.config_class == "SD3"), None)
    assert fam is not None, "SD3 is in every ComfyUI of the matrix"
    model = fk.tiny_model(fam)
    tm = TrainingModel(model.clone())
    assert preference_run.prediction_of(tm) == "flow"
    lat = torch.randn(fam.latent_shape(2), generator=torch.Generator().manual_seed(0))
    pos, _ = fam.conds(1)
    pair_set = preference_run.PairSet(lat, lat.flip(-1), pos, torch.zeros(2, dtype=torch.long), ["a", "b"], "t")
    out = _train(model, pair_set, steps=2)
    assert out.result[2] == 2 and out.result[0].entries


def test_a_stopped_run_resumed_gives_the_offset_of_an_uninterrupted_one(tiny, out_dir):
    model = tiny("sd15")
    straight = _train(model, _pairs(), steps=4).result[0]
    first = _train(model, _pairs(), steps=2, save_every=2, filename_prefix="res")
    ckpts = sorted((out_dir / "npo_training").glob("res_*.pt"))
    assert len(ckpts) == 1 and first.result[2] == 2
    resumed = _train(model, _pairs(), steps=4, save_every=2, resume_from=ckpts[0].name).result[0]
    for k, e in straight.entries.items():
        assert torch.equal(e.up, resumed.entries[k].up) and torch.equal(e.down, resumed.entries[k].down), k


def test_a_self_npo_checkpoint_is_not_resumed_as_preference_training(tiny, out_dir):
    model = tiny("sd15")
    pos, neg = kit.make_conds("sd15")
    kit.self_npo_train(model, pos, neg, steps=1, save_every=1, filename_prefix="tdft", rank=8)
    ckpt = next((out_dir / "npo_training").glob("tdft_*.pt"))
    with pytest.raises(NPOError, match="another model or training setup|is a self-npo checkpoint"):
        _train(model, _pairs(), steps=2, save_every=1, resume_from=ckpt.name)


@pytest.mark.fault(
    "preference pairs of two sizes, a prompt count that fits neither one nor every pair, images off the VAE factor",
    "NPOError naming the input, before anything trains",
)
def test_bad_image_pairs_are_refused_naming_the_input(tiny):
    pos, _ = kit.make_conds("sd15")
    with pytest.raises(NPOError, match="rejected: .* does not match preferred"):
        NPOPairsFromImages.execute(preferred=_images(2, 1), rejected=_images(3, 2), positive=pos, vae=StandInVAE())
    three = pos + pos + pos
    with pytest.raises(NPOError, match="positive: 3 prompts for 2 pairs"):
        NPOPairsFromImages.execute(preferred=_images(2, 1), rejected=_images(2, 2), positive=three, vae=StandInVAE())
    odd = torch.rand(2, 60, 64, 3)
    with pytest.raises(NPOError, match="preferred: 64×60 px is not a multiple of the VAE's factor 8"):
        NPOPairsFromImages.execute(preferred=odd, rejected=odd, positive=pos, vae=StandInVAE())


def _write_folder(root, lines):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        arr = (_images(1, 10 + i)[0] * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).resize((80, 64)).save(root / f"{i}.png")
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n")


def test_a_pair_folder_in_the_input_folder_becomes_pairs(tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path))
    _write_folder(tmp_path / "prefs", [
        {"prompt": "a fox", "preferred": "0.png", "rejected": "1.png"},
        {"prompt": "a hut", "preferred": "2.png", "rejected": "0.png"},
        {"prompt": "a fox", "preferred": "1.png", "rejected": "2.png"},
    ])
    clip = StandInCLIP()
    got = NPOPairsFromFolder.execute(folder="prefs", clip=clip, vae=StandInVAE(), resolution=32, mirrored_copies=True)
    ps = got.result[0]
    assert clip.seen == ["a fox", "a hut", ""]  # each distinct prompt once, then the preview's empty negative
    assert ps.preferred.shape == (6, 4, 4, 4) and ps.prompt_of.tolist() == [0, 1, 0, 0, 1, 0]
    assert ps.items[3] == "pairs.jsonl line 1 (mirrored)"
    # the mirrored copy is the pair's images flipped left-right before encoding
    want = StandInVAE().encode(torch.stack([_prep(tmp_path / "prefs" / "0.png", 32)]).flip(2))
    assert torch.allclose(ps.preferred[3:4], want, atol=1e-6)


def _prep(path, res):
    from comfyui_npo.training.pairs import prepared

    return prepared(path, res, "t")


@pytest.mark.fault(
    "NPO Pairs From Folder: a folder that is not there, outside the input folder, or a bad pairs.jsonl line",
    "NPOError naming the folder input and the line",
)
def test_bad_pair_folders_are_refused(tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path))
    kw = dict(clip=StandInCLIP(), vae=StandInVAE(), resolution=32, mirrored_copies=False)
    with pytest.raises(NPOError, match="folder: 'nope' is not a folder in ComfyUI's input folder"):
        NPOPairsFromFolder.execute(folder="nope", **kw)
    assert NPOPairsFromFolder.validate_inputs(folder="../x", resolution=32) is not True
    assert "multiple of 8" in NPOPairsFromFolder.validate_inputs(folder="x", resolution=36)
    _write_folder(tmp_path / "bad", [{"prompt": "a", "preferred": "0.png", "rejected": "9.png"}])
    with pytest.raises(NPOError, match="folder: pairs.jsonl line 1: 'rejected' image '9.png' is missing"):
        NPOPairsFromFolder.execute(folder="bad", **kw)


def test_train_widgets_are_checked_at_validation():
    check = NPOPreferenceTrain.validate_inputs
    assert "learning_rate" in check(learning_rate="fast", filename_prefix="p", save_every=0)
    assert "beta" in NPOPreferenceTrain.validate_inputs(beta=float("nan"), save_every=0)
    assert "filename_prefix" in NPOPreferenceTrain.validate_inputs(filename_prefix="../x", save_every=5)
    assert NPOPreferenceTrain.validate_inputs(learning_rate="auto", filename_prefix="p", save_every=5, beta=0.0)


class DecodingVAE(StandInVAE):
    def decode(self, latent):
        return torch.nn.functional.interpolate(torch.sigmoid(latent[:, :3]), scale_factor=8).movedim(1, -1)


class BrightnessScorer:
    """Higher for brighter images: a scorer the test can recompute by hand."""

    name = "brightness"

    def __init__(self, constant=None):
        self.constant, self.calls = constant, []

    def score(self, images, prompts):
        self.calls.append(list(prompts))
        if self.constant is not None:
            return torch.full((images.shape[0],), self.constant)
        return images.mean(dim=(1, 2, 3))


def _generate(model, out_dir, **kw):
    from comfyui_npo.nodes.preference import NPOSelfGeneratedPairs

    args = dict(
        clip=StandInCLIP(), vae=DecodingVAE(), scorer=BrightnessScorer(), prompts="a fox\n\na hut\n",
        negative_prompt="", samples_per_prompt=3, width=64, height=64, steps=2, cfg=5.0, sampler_name="euler",
        scheduler="normal", seed=7, cache=True,
    )
    args.update(kw)
    with torch.inference_mode():
        return NPOSelfGeneratedPairs.execute(model=model, **args)


def test_self_generated_pairs_are_the_best_and_worst_sample_of_each_prompt(tiny, out_dir):
    import comfy.sample

    model = tiny("sd15")
    out = _generate(model, out_dir)
    ps, preview = out.result
    assert ps.preferred.shape == (2, 4, 8, 8) and ps.prompt_of.tolist() == [0, 1]
    assert preview.shape == (2, 64, 128, 3)
    clip, vae = StandInCLIP(), DecodingVAE()
    neg = clip.encode_from_tokens_scheduled("")
    for p, text in enumerate(["a fox", "a hut"]):  # every sample again, by hand: seed + p·K + k
        samples = []
        for k in range(3):
            noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7 + p * 3 + k))
            with torch.inference_mode():
                samples.append(comfy.sample.sample(
                    model, noise, 2, 5.0, "euler", "normal", clip.encode_from_tokens_scheduled(text), neg,
                    torch.zeros(1, 4, 8, 8), seed=7 + p * 3 + k, disable_pbar=True,
                ).float())
        bright = [float(vae.decode(s).mean()) for s in samples]
        assert len(set(bright)) == 3, "the samples must differ for the pick to mean anything"
        assert torch.allclose(ps.preferred[p], samples[bright.index(max(bright))][0], atol=1e-5)
        assert torch.allclose(ps.rejected[p], samples[bright.index(min(bright))][0], atol=1e-5)


def test_self_generated_pairs_are_cached_and_sampled_again_when_a_setting_changes(tiny, out_dir, monkeypatch):
    import comfy.sample

    model = tiny("sd15")
    first = _generate(model, out_dir).result[0]
    cached = list((out_dir / "npo_pairs").glob("pairs_*.pt"))
    assert len(cached) == 1
    real = comfy.sample.sample
    monkeypatch.setattr(comfy.sample, "sample", lambda *a, **k: pytest.fail("sampled again despite the cache"))
    again = _generate(model, out_dir).result[0]
    assert torch.equal(first.preferred, again.preferred) and torch.equal(first.rejected, again.rejected)
    calls = []
    monkeypatch.setattr(comfy.sample, "sample", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    _generate(model, out_dir, seed=8)
    assert len(calls) == 6 and len(list((out_dir / "npo_pairs").glob("pairs_*.pt"))) == 2
    calls.clear()
    _generate(tiny("sd15", seed=3), out_dir)  # another checkpoint: another fingerprint
    assert len(calls) == 6


@pytest.mark.fault(
    "self-generated pairs whose samples all score the same, an empty prompt list",
    "NPOError naming the prompt (raise samples_per_prompt, another seed or scorer) / the prompts input",
)
def test_self_generated_ties_and_empty_prompts_are_refused(tiny, out_dir):
    from comfyui_npo.nodes.preference import NPOSelfGeneratedPairs

    with pytest.raises(NPOError, match="scorer: prompt 'a fox': all 3 samples score 0.5: no preference"):
        _generate(tiny("sd15"), out_dir, scorer=BrightnessScorer(constant=0.5), cache=False)
    assert "prompts: empty" in NPOSelfGeneratedPairs.validate_inputs(prompts=" \n ")


def test_training_on_self_generated_pairs(tiny, out_dir):
    model = tiny("sd15")
    ps = _generate(model, out_dir).result[0]
    offset, _, steps = _train(model, ps, steps=2).result
    assert steps == 2 and offset.entries


def test_the_preview_pair_is_what_ksampler_gives_with_and_without_the_offset(tiny, out_dir, monkeypatch):
    """The last preview (the final step, the final offset) equals ComfyUI's KSampler (euler, simple, 8 steps,
    preview_cfg, seed, the pairs' size) on the model and on Apply NPO with the returned offset, for the first
    prompt and preview_negative; every preview reaches the progress bar and is saved beside the checkpoints."""
    import comfy.sample

    from comfyui_npo.nodes.host import runtime, sampling, training_preview

    shown, sampled = [], []

    class Bar:
        def __init__(self, total):
            pass

        def update_absolute(self, value, total=None, preview=None):
            if preview is not None:
                shown.append(value)

        def update(self, n):
            pass

    monkeypatch.setattr(runtime, "progress_bar", Bar)
    real_pair = training_preview.TrainingPreview.sample_pair
    monkeypatch.setattr(training_preview.TrainingPreview, "sample_pair",
                        lambda self, *a, **k: (sampled.append(real_pair(self, *a, **k)), sampled[-1])[1])
    model = tiny("sd15")
    pos, neg = kit.make_conds("sd15")
    out = _train(model, _pairs(), steps=3, preview_every=2, save_every=1, learning_rate="3e-3", preview_cfg=5.0,
                 preview_negative=neg, seed=4)
    offset = out.result[0]
    assert shown == [2, 3] and len(sampled) == 2
    saved = sorted(p.name for p in (out_dir / "npo_training").glob("*_preview_*.png"))
    assert saved == ["pref_00001__preview_000002.png", "pref_00001__preview_000003.png"]
    plain, npo = sampled[-1]
    assert tuple(plain.shape) == (1, 4, 8, 8)  # the pairs' latents: 64 px images, smaller than 64 latent px
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(4))

    def ksampler(m):
        with torch.inference_mode():
            return comfy.sample.sample(m, noise, 8, 5.0, "euler", "simple", pos[:1], neg, torch.zeros(1, 4, 8, 8),
                                       seed=4, disable_pbar=True)

    want_plain, want_npo = ksampler(model), ksampler(sampling.apply_offset(model, offset, 1.0))
    got_plain, got_npo = (model.model.process_latent_out(x.cpu()) for x in (plain, npo))
    torch.testing.assert_close(got_plain, want_plain, rtol=1e-4, atol=1e-4)
    effect = float((want_npo - want_plain).abs().max())
    assert effect > 1.0, effect  # the offset acts: the two references differ (measured 12.3)
    # Apply NPO adds the LoRA in its own order of operations: float noise (measured 6e-4); the offset on both
    # passes, or on none, would be off by the effect itself
    assert float((got_npo - want_npo).abs().max()) < 1e-3 * effect


def test_the_preview_uses_the_pairs_own_negative_and_says_when_there_is_none(tiny, out_dir, monkeypatch):
    """Self-generated pairs carry their negative prompt, so the preview runs without preview_negative; pairs from
    IMAGE batches carry none: the report says the preview is off and how to turn it on."""
    from comfyui_npo.nodes.host import training_preview

    negatives = []
    real_pair = training_preview.TrainingPreview.sample_pair
    monkeypatch.setattr(training_preview.TrainingPreview, "sample_pair",
                        lambda self, d, p, n, o: (negatives.append(n), real_pair(self, d, p, n, o))[1])
    model = tiny("sd15")
    ps = _generate(model, out_dir, negative_prompt="blurry").result[0]
    _train(model, ps, steps=2, preview_every=1)
    want = TrainingModel(model.clone()).model_inputs(ps.positive, StandInCLIP().encode_from_tokens_scheduled(
        "blurry")[0], (8, 8))[1]
    assert len(negatives) == 2 and all(torch.equal(n["c_crossattn"].cpu(), want["c_crossattn"]) for n in negatives)
    negatives.clear()
    out = _train(model, _pairs(), steps=2, preview_every=1)
    assert not negatives and "preview off: these pairs carry no negative prompt" in out.ui.as_dict()["text"][0]
    assert "preview_cfg" in NPOPreferenceTrain.validate_inputs(save_every=0, preview_cfg=float("nan"))


def test_partial_loading_trains_through_comfyuis_low_vram_load(tiny, out_dir, monkeypatch):
    """With partial_loading, ComfyUI loads the model within the memory it sees free (less than the model) and casts
    the rest per layer; the offset equals a whole-model load's. partial_loading without checkpointing is refused."""
    import comfy.model_management as mm


    full = _train(tiny("sd15"), _pairs(), steps=2).result[0]
    mm.unload_all_models()
    watch = kit.LoadWatch(monkeypatch)
    model = tiny("sd15")
    kit.low_vram(monkeypatch, free_bytes=0.3 * model.model_size())
    partial = _train(model, _pairs(), steps=2, partial_loading=True).result[0]
    watch.assert_partial()
    for k, e in full.entries.items():
        torch.testing.assert_close(partial.entries[k].up, e.up, rtol=0, atol=2e-5)
    mm.unload_all_models()
    with pytest.raises(NPOError, match="partial_loading: needs gradient_checkpointing"):
        _train(tiny("sd15"), _pairs(), gradient_checkpointing=False, partial_loading=True)


def test_a_preference_offset_saves_reloads_and_loads_in_comfyuis_lora_loader(tiny, npo_dir, out_dir, monkeypatch):
    """Save NPO Offset → Load NPO Offset gives the same ΔW; ComfyUI's LoraLoaderModelOnly patches every trained
    layer to W + (alpha/rank)·up·down, computed here by hand from the trained LoRA's factors."""
    import comfy.lora
    import folder_paths

    import nodes as comfy_nodes
    from comfyui_npo.nodes.host import model_facts
    from comfyui_npo.nodes.offsets import NPOLoadOffset, NPOSaveOffset

    model = tiny("sd15")
    offset = _train(model, _pairs(), steps=2, learning_rate="1e-3").result[0]
    with torch.inference_mode():
        NPOSaveOffset.execute(npo_offset=offset, filename_prefix="pref")
    (name,) = [p.name for p in npo_dir.iterdir()]
    with torch.inference_mode():
        loaded = model_facts.resolve_for_model(NPOLoadOffset.execute(offset_name=name).result[0], model)
    assert set(loaded.entries) == set(offset.entries)
    assert "diffusion-npo-reversed-dpo" in loaded.metadata["npo.recipe"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(npo_dir)], {".safetensors"}))
    with torch.inference_mode():
        stock = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)[0]
    unet = dict(model.model.diffusion_model.named_parameters())
    assert set(stock.patches) == {f"diffusion_model.{k}" for k in offset.entries}  # every trained layer, no other
    for key, e in offset.entries.items():
        w = unet[key].detach().float()
        by_hand = w + (e.alpha / e.down.shape[0] if e.alpha is not None else 1.0) * (e.up.float() @ e.down.float())
        got = comfy.lora.calculate_weight(stock.patches[f"diffusion_model.{key}"], w.clone(), key)
        torch.testing.assert_close(got, by_hand, rtol=1e-5, atol=1e-6)
        assert float((got - w).abs().max()) > 0, key


@pytest.mark.fault(
    "Cancel (ComfyUI's interrupt) during NPO Preference Train",
    "stops within one step; the model stays bit-identical with no adapter left on it; the last checkpoint resumes",
)
def test_cancel_stops_within_one_step_and_leaves_the_model_as_it_was(tiny, out_dir, monkeypatch):
    import comfy.model_management

    from comfyui_npo.nodes.host import runtime

    model = tiny("sd15")
    before = kit.state_hash(model.model.diffusion_model)
    seen, armed = [], [True]

    class Bar:
        def __init__(self, total):
            pass

        def update_absolute(self, value, total=None, preview=None):
            seen.append(value)
            if armed[0] and value == 3:  # the 3rd step done: press Cancel
                armed[0] = False
                comfy.model_management.interrupt_current_processing(True)

        def update(self, n):
            pass

    monkeypatch.setattr(runtime, "progress_bar", Bar)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _train(model, _pairs(), steps=8, save_every=2, filename_prefix="stop")
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert max(seen) == 3  # no step ran after the cancel
    assert kit.state_hash(model.model.diffusion_model) == before
    assert kit.hooked_modules(model.model.diffusion_model) == []
    (ckpt,) = (out_dir / "npo_training").glob("stop_*.pt")
    assert torch.load(ckpt, weights_only=True)["step"] == 2
    assert _train(model, _pairs(), steps=4, save_every=2, resume_from=ckpt.name).result[2] == 4


class VideoVAE:
    """Wan-shaped stand-in: latent [B, 16, T, h, w] → video [B, T, 8h, 8w, 3] (a fixed squash of 3 channels)."""

    def decode(self, latent):
        x = torch.sigmoid(latent[:, :3]).movedim(2, 1).flatten(0, 1)  # [B·T, 3, h, w]
        up = torch.nn.functional.interpolate(x, scale_factor=8).movedim(1, -1)
        return up.reshape(latent.shape[0], latent.shape[2], *up.shape[1:])


class FamilyCLIP:
    """Encodes a prompt to the family's conditioning, seeded by the text."""

    def __init__(self, fam):
        self.fam = fam

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens):
        return self.fam.conds(sum(map(ord, tokens)) % 1000)[0]


def test_self_generated_video_pairs_score_the_mean_of_their_frames_and_train(tiny, out_dir):
    """A video model (tiny Wan 2.1, 5 frames = 2 latent frames): each sample's score is the mean of its frames'
    scores, recomputed here by sampling every sample again by hand; the pairs train a preference offset."""
    import comfy.sample


    fam = fk.family("wan21")
    model = fk.tiny_model(fam)
    clip = FamilyCLIP(fam)
    with pytest.raises(NPOError, match=r"frames: .* takes 4·n \+ 1 frames \(e.g. 5\); got 6"):
        _generate(model, out_dir, clip=clip, vae=VideoVAE(), frames=6, cache=False)
    with pytest.raises(NPOError, match="frames: .* makes single images"):
        _generate(tiny("sd15"), out_dir, frames=5, cache=False)
    scorer = BrightnessScorer()
    out = _generate(model, out_dir, clip=clip, vae=VideoVAE(), scorer=scorer, frames=5, cfg=fam.cfg,
                    prompts="a fox", samples_per_prompt=3)
    ps, preview = out.result
    assert ps.preferred.shape == (1, 16, 2, 8, 8) and preview.shape == (2, 64, 128, 3)  # 2 frames, side by side
    assert len(scorer.calls[0]) == 3 * 2  # every frame of every sample scored
    means = []
    for k in range(3):
        noise = torch.randn((1, 16, 2, 8, 8), generator=torch.Generator().manual_seed(7 + k))
        with torch.inference_mode():
            lat = comfy.sample.sample(model, noise, 2, fam.cfg, "euler", "normal", clip.encode_from_tokens_scheduled(
                "a fox"), clip.encode_from_tokens_scheduled(""), torch.zeros(1, 16, 2, 8, 8), seed=7 + k,
                disable_pbar=True).float()
        means.append((lat, float(VideoVAE().decode(lat).mean())))  # equal-size frames: mean of frame means
    assert len({m for _, m in means}) == 3
    best = max(means, key=lambda t: t[1])[0]
    worst = min(means, key=lambda t: t[1])[0]
    assert torch.allclose(ps.preferred, best, atol=1e-5) and torch.allclose(ps.rejected, worst, atol=1e-5)
    offset, _, steps = _train(model, ps, steps=2, preview_every=2, learning_rate="1e-3").result
    assert steps == 2 and offset.entries and offset.base_arch == "WAN21_T2V"
