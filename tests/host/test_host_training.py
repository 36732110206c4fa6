"""Self-NPO Train through the node in real ComfyUI: both modes, save, reload (ours and stock
LoraLoaderModelOnly), sample with Apply NPO, cancel, resume, and the node's bad inputs."""

from __future__ import annotations

import os

import comfy.lora
import comfy.model_management
import folder_paths
import npo_hostkit as kit
import pytest
import torch
from safetensors.torch import load_file

from comfyui_npo.nodes.host import model_facts, runtime, training_model, training_run, training_session
from comfyui_npo.nodes.models import NPOApply
from comfyui_npo.nodes.offsets import NPOLoadOffset, NPOSaveOffset
from comfyui_npo.npo_core.errors import NPOError
from comfyui_npo.npo_core.offset import Dense, LowRank

train = kit.self_npo_train


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_train_save_reload_and_sample(mode, tiny, npo_dir, out_dir, monkeypatch):
    model = tiny("sd15")
    before = kit.state_hash(model_facts.unet_of(model))
    pos, neg = kit.make_conds("sd15")
    pos2, _ = kit.make_conds("sd15", seed=5)
    out = train(model, pos + pos2, neg, mode=mode, rank=4, learning_rate=1e-3 if mode == "lora" else 1e-4)
    offset, curve, steps = out.result
    assert steps == 3 and curve.shape[0] == 1 and curve.shape[-1] == 3 and float(curve.min()) >= 0
    assert kit.state_hash(model_facts.unet_of(model)) == before  # the model it was given never changes
    kinds = {type(e) for e in offset.entries.values()}
    assert kinds == ({LowRank} if mode == "lora" else {LowRank, Dense})  # full: compressed to rank 4 (+1-D dense)
    assert offset.is_resolved and offset.base_arch == "SD15" and "self-npo-tdft" in offset.metadata["npo.recipe"]
    if mode == "lora":  # attention layers only, the LoRA learned something
        assert all(".attn" in k for k in offset.entries)
        assert any(float(e.up.abs().max()) > 0 for e in offset.entries.values())

    with torch.inference_mode():
        NPOSaveOffset.execute(npo_offset=offset, filename_prefix="trained")
    files = os.listdir(npo_dir)
    assert files == ["trained_00001_.safetensors"]
    path = npo_dir / files[0]

    # reload through our loader: identical deltas
    with torch.inference_mode():
        loaded = NPOLoadOffset.execute(offset_name=files[0]).result[0]
    resolved = model_facts.resolve_for_model(loaded, model)
    assert set(resolved.entries) == set(offset.entries)
    for k, e in offset.entries.items():
        a = e.delta() if isinstance(e, LowRank) else e.delta
        b = resolved.entries[k]
        b = b.delta() if isinstance(b, LowRank) else b.delta
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    # the stock loader maps every key of the file onto the model
    sd = load_file(str(path))
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(sd, key_map)
    params = set()
    for k in sd:
        if k.endswith(".lora_up.weight"):
            params.add(k[: -len(".lora_up.weight")] + ".weight")
        elif k.endswith(".diff"):
            params.add(k[: -len(".diff")] + ".weight")
        elif k.endswith(".diff_b"):
            params.add(k[: -len(".diff_b")] + ".bias")
    assert set(patches) == params and len(params) == len(offset.entries)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(npo_dir)], {".safetensors"}))
    import nodes as comfy_nodes

    with torch.inference_mode():
        stock = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, files[0], 1.0)[0]
    assert set(stock.patches) == params

    # sample with Apply NPO: differs from plain CFG, finite, and the base samples as before
    plain = kit.ksample(model, pos, neg, 5.0)
    with torch.inference_mode():
        npo = NPOApply.execute(model=model, npo_offset=loaded, strength=1.0).result[0]
    got = kit.ksample(npo, pos, neg, 5.0)
    assert torch.isfinite(got).all() and not torch.equal(got, plain)
    assert torch.equal(kit.ksample(model, pos, neg, 5.0), plain)


@pytest.mark.fault(
    "Cancel (ComfyUI's interrupt) during Self-NPO Train, then resume",
    "stops within one step; the last checkpoint is intact and resumes at its step; the model stays "
    "bit-identical; resume with too few steps or for SDXL is refused",
)
def test_cancel_stops_within_one_step_and_resume_continues(tiny, out_dir, monkeypatch):
    model = tiny("sd15")
    before = kit.state_hash(model_facts.unet_of(model))
    pos, neg = kit.make_conds("sd15")
    bars = []
    armed = [True]

    class Bar:
        """ComfyUI's ProgressBar interface; records every position it is moved to."""

        def __init__(self, total):
            self.total, self.current, self.seen = total, 0, []
            bars.append(self)

        def update_absolute(self, value, total=None, preview=None):
            self.total = total if total is not None else self.total
            self.current = min(value, self.total)
            self.seen.append(self.current)
            if armed[0] and self.current == 2 + 3:  # pool of 2, then the 3rd training step: press Cancel
                armed[0] = False
                comfy.model_management.interrupt_current_processing(True)

        def update(self, n):
            self.update_absolute(self.current + n)

    monkeypatch.setattr(runtime, "progress_bar", Bar)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        train(model, pos, neg, steps=8, save_every=2, filename_prefix="run")
    comfy.model_management.interrupt_current_processing(False)
    assert max(bars[0].seen) == 5  # no step ran after the cancel
    assert kit.state_hash(model_facts.unet_of(model)) == before and kit.hooked_modules(model_facts.unet_of(model)) == []
    ckpts = sorted(os.listdir(out_dir / "npo_training"))
    assert ckpts == ["run_00001_.pt"]
    state = torch.load(out_dir / "npo_training" / ckpts[0], weights_only=True)
    assert state["step"] == 2  # the last checkpoint before the cancel, intact

    out = train(model, pos, neg, steps=4, save_every=2, filename_prefix="run", resume_from=ckpts[0])
    assert out.result[2] == 4
    resumed = bars[1]
    # pool (1, 2), the 2 steps already done, then steps 3 and 4 only: the bar ends full
    assert resumed.seen == [1, 2, 2 + 2, 2 + 3, 2 + 4] and resumed.current == resumed.total == 2 + 4
    assert torch.load(out_dir / "npo_training" / ckpts[0], weights_only=True)["step"] == 4

    with pytest.raises(NPOError, match="steps"):
        train(model, pos, neg, steps=3, resume_from=ckpts[0])
    other = tiny("sdxl")
    xpos, xneg = kit.make_conds("sdxl")
    with pytest.raises(NPOError, match="resume_from"):
        train(other, xpos, xneg, steps=6, resume_from=ckpts[0])


def test_sdxl_v_prediction_trains(tiny, out_dir, monkeypatch):
    """A v-prediction SDXL trains: the training passes (the grad-enabled ones; the pool samples in inference
    mode) read the model's output as v (V_PREDICTION's x0 conversion), the loss is finite and the LoRA moved
    (its up starts at zero, so a trainer that never steps leaves every up zero)."""
    import math
    import re

    import comfy.model_sampling

    model = tiny("sdxl_v")
    ms = model.get_model_object("model_sampling")
    assert isinstance(ms, comfy.model_sampling.V_PREDICTION), type(ms).__mro__
    pos, neg = kit.make_conds("sdxl_v")
    v_calls = []  # torch.is_grad_enabled() at each V_PREDICTION x0 conversion
    real_denoised = comfy.model_sampling.V_PREDICTION.calculate_denoised

    def v_denoised(self, sigma, model_output, model_input):
        v_calls.append(torch.is_grad_enabled())
        return real_denoised(self, sigma, model_output, model_input)

    monkeypatch.setattr(comfy.model_sampling.V_PREDICTION, "calculate_denoised", v_denoised)
    out = train(model, pos, neg, steps=2, teacher_guidance=-5.0, student_cond="mix")
    assert out.result[2] == 2
    ups = [e.up for e in out.result[0].entries.values()]
    assert ups and all(torch.isfinite(u).all() for u in ups)
    assert any(torch.count_nonzero(u) for u in ups), "every LoRA up is still zero: training never stepped"
    assert any(v_calls), "no training pass converted the model's output as v-prediction"
    text = out.ui.as_dict()["text"][0]
    m = re.search(r"2/2 steps, last loss (\S+),", text)
    assert m and math.isfinite(float(m.group(1))), text


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"latents": {"samples": torch.zeros(2, 3, 8, 8)}}, "latents"),
        ({"width": 100}, "divisible"),
        ({"lora_layers": "attention", "rank": 0}, "rank"),
        ({"filename_prefix": "../escape", "save_every": 1}, "filename_prefix"),
        ({"resume_from": "missing.pt"}, "resume_from"),
    ],
)
@pytest.mark.fault(
    "Self-NPO Train with latents of the wrong channel count, a size not divisible by 8, rank 0, a '..' prefix, "
    "a missing resume file",
    "NPOError naming the input, before any sampling",
)
def test_bad_inputs_name_the_input(kw, match, tiny, out_dir):
    model = tiny("sd15")
    pos, neg = kit.make_conds("sd15")
    with pytest.raises(NPOError, match=match):
        train(model, pos, neg, **kw)


def test_fp16_model_trains_with_loss_scaling(tiny, out_dir, monkeypatch):
    """A model loaded in float16 (ComfyUI's choice for SD1.5/SDXL on most GPUs) trains with dynamic loss
    scaling, recorded in the offset's recipe; the loaded fp16 weights are unchanged afterwards."""
    cfg = kit.model_config("sd15")
    cfg.set_inference_dtype(torch.float16, None)
    m = cfg.get_model({})
    m.diffusion_model.load_state_dict({k: v.half() for k, v in tiny.weights("sd15").items()})
    model = kit.patcher(m)
    assert model.model.get_dtype() == torch.float16
    before = kit.state_hash(model_facts.unet_of(model))
    seen = []
    real = training_run.Trainer.run
    spy = lambda t, *a, **k: seen.append(t.cfg.fp16_loss_scaling) or real(t, *a, **k)  # noqa: E731
    monkeypatch.setattr(training_run.Trainer, "run", spy)
    out = train(model, *kit.make_conds("sd15"), steps=3, learning_rate=1e-3)
    offset = out.result[0]
    assert seen == [True] and '"fp16_loss_scaling": true' in offset.metadata["npo.recipe"]
    ups = [e.up for e in offset.entries.values()]
    assert all(torch.isfinite(u).all() for u in ups) and any(torch.count_nonzero(u) for u in ups)
    assert kit.state_hash(model_facts.unet_of(model)) == before


def test_user_latents_replace_the_pool(tiny, out_dir, monkeypatch):
    """Connected latents are the training data: no pool is sampled (comfy.sample.sample, which the pool
    sampler calls, never runs) and the trainer's StartData holds exactly those latents, in model space."""
    import comfy.sample

    from comfyui_npo.training.data import StartData

    model = tiny("sd15")
    pos, neg = kit.make_conds("sd15")
    lat = {"samples": torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))}
    user = lat["samples"].clone()
    sampled, made = [], []
    real_sample = comfy.sample.sample
    monkeypatch.setattr(comfy.sample, "sample", lambda *a, **k: sampled.append(a) or real_sample(*a, **k))
    real_post_init = StartData.__post_init__
    monkeypatch.setattr(StartData, "__post_init__", lambda self: made.append(self) or real_post_init(self))
    out = train(model, pos, neg, steps=2, latents=lat, pool_size=50)  # pool_size ignored: no sampling
    assert out.result[2] == 2
    assert sampled == [], f"comfy.sample.sample ran {len(sampled)} times although latents were connected"
    (data,) = made
    expected = model.model.process_latent_in(user.clone()).float()
    assert data.latents.shape == expected.shape == (3, 4, 8, 8)
    torch.testing.assert_close(data.latents.cpu(), expected)
    assert torch.equal(lat["samples"], user)  # the user's LATENT is not changed in place


def test_user_latents_train_with_their_own_prompts(tiny, out_dir, monkeypatch):
    """One prompt per latent (Conditioning (Combine) of three prompts, three latents): every batch pairs
    latent i with prompt i, whatever batch position it lands in."""
    model = tiny("sd15")
    prompts = [kit.make_conds("sd15", seed=s)[0] for s in (11, 12, 13)]
    neg = kit.make_conds("sd15")[1]
    lat = {"samples": torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    made = []
    real = training_run.StartData
    monkeypatch.setattr(training_run, "StartData", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    train(model, prompts[0] + prompts[1] + prompts[2], neg, steps=1, batch_size=2, latents=lat)
    data = made[0]
    pairs = set()
    for step in range(6):
        z0, cond_pos, _ = data.batch(step, 2)
        for row in range(2):
            (i,) = [i for i in range(3) if torch.equal(z0[row], data.latents[i])]
            assert torch.allclose(cond_pos["c_crossattn"][row].float(), prompts[i][0][0][0].float()), (step, row, i)
            pairs.add((i, row))
    assert {i for i, _ in pairs} == {0, 1, 2}  # every latent was seen


def test_resume_offers_subfolder_checkpoints_and_auto_reads_as_auto(tiny, out_dir):
    from comfyui_npo.nodes.train import checkpoint_files

    model = tiny("sd15")
    pos, neg = kit.make_conds("sd15")
    out = train(model, pos, neg, steps=2, save_every=1, filename_prefix="sd15/run")
    assert "sd15/run_00001_.pt" in checkpoint_files()
    text = out.ui.as_dict()["text"][0]
    assert "lr auto (0.0001)" in text and "checkpoint: sd15/run_00001_.pt" in text
    resumed = train(model, pos, neg, steps=3, save_every=1, resume_from="sd15/run_00001_.pt", learning_rate="2e-4")
    assert resumed.result[2] == 3 and "lr 0.0002" in resumed.ui.as_dict()["text"][0]


@pytest.mark.fault("Self-NPO Train given a learning_rate that is neither 'auto' nor a number", "NPOError naming it")
@pytest.mark.parametrize("value", ["fast", "-1e-4", "2"])
def test_learning_rate_text_is_checked(tiny, value):
    with pytest.raises(NPOError, match="learning_rate"):
        train(tiny("sd15"), *kit.make_conds("sd15"), learning_rate=value)


def _unet_at_first_denoiser_call(monkeypatch, snapshot=None) -> list:
    """Patch the training denoiser so that its first call appends ``snapshot(unet)`` (default: a dict of
    parameter data pointers) of the UNet as training sees it; returns that list."""
    seen = []
    real = training_model.training_denoiser
    take = snapshot or (lambda unet: {n: p.data_ptr() for n, p in unet.named_parameters()})

    def spy(mp, dtype, *rest, **kw):
        den = real(mp, dtype, *rest, **kw)

        def call(x, nu, cond):
            if not seen:
                seen.append(take(model_facts.unet_of(mp)))
            return den(x, nu, cond)

        return call

    monkeypatch.setattr(training_model, "training_denoiser", spy)
    return seen


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_lora_mode_trains_on_the_loaded_weights_without_a_copy(mode, tiny, out_dir, monkeypatch):
    """lora: the UNet weights autograd sees share memory with the loaded ones (no second UNet); full: the
    student is a copy. Either way the loaded Parameters are back, unchanged, afterwards."""
    model = tiny("sd15")
    unet = model_facts.unet_of(model)
    before = kit.state_hash(unet)
    loaded = {n: p.data_ptr() for n, p in unet.named_parameters()}
    pointers = _unet_at_first_denoiser_call(monkeypatch)  # data pointers of the weights training sees
    train(model, *kit.make_conds("sd15"), steps=2, mode=mode, learning_rate=1e-3)
    seen = pointers[0]
    assert set(seen) == set(loaded)
    shared = sum(seen[n] == loaded[n] for n in loaded)
    assert shared == (len(loaded) if mode == "lora" else 0)
    assert kit.state_hash(unet) == before


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_a_model_with_weight_patches_trains_on_the_patched_weights(mode, tiny, out_dir, monkeypatch):
    """A checkpoint + LoRA (weight patches, as LoraLoader adds them) is the model the user connected:
    teacher and student start from the patched weights, and a full-mode offset is relative to them."""
    model = tiny("sd15")
    unet = model_facts.unet_of(model)
    pristine = kit.state_hash(unet)
    name = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    base = unet.get_parameter(name).detach().clone()
    delta = 0.1 * torch.randn(base.shape, generator=torch.Generator().manual_seed(5))
    patched = model.clone()
    patched.add_patches({"diffusion_model." + name: (delta,)}, 1.0)  # ComfyUI's "diff" patch
    seen = _unet_at_first_denoiser_call(monkeypatch, lambda unet: unet.get_parameter(name).detach().clone())
    out = train(patched, *kit.make_conds("sd15"), steps=2, mode=mode)
    torch.testing.assert_close(seen[0], base + delta, rtol=0, atol=1e-6)  # the patch was in, by hand
    if mode == "full":  # δ = trained − patched: a few steps at lr 1e-6, not the 0.1-sized patch
        entry = out.result[0].entries[name]
        assert entry.delta().abs().max() < 1e-3  # (compressed to rank 16: a LowRank)
    comfy.model_management.unload_all_models()
    assert kit.state_hash(unet) == pristine


def test_sampling_patches_are_not_run_in_training_and_the_node_says_so(tiny, out_dir):
    """A FreeU-style output-block patch changes sampling, not the weights: training does not run it (the
    teacher and student are the UNet with its weight patches), and the node's text names it."""
    model = tiny("sd15").clone()
    calls = []
    model.set_model_output_block_patch(lambda h, hsp, opts: (calls.append(1), (h, hsp))[1])
    lat = {"samples": torch.randn(2, 4, 8, 8)}
    out = train(model, *kit.make_conds("sd15"), steps=2, latents=lat)
    assert out.result[2] == 2 and calls == []
    text = out.ui.as_dict()["text"][0]
    assert "not run during training" in text and "patches:output_block_patch" in text
    plain = train(tiny("sd15"), *kit.make_conds("sd15"), steps=1, latents=lat)
    assert "note:" not in plain.ui.as_dict()["text"][0]
    kit.ksample(model, *kit.make_conds("sd15"), cfg=2.0, steps=1)
    assert calls  # the patch is live: sampling runs it


def test_autograd_alias_gives_the_gradient_of_a_copy():
    with torch.inference_mode():
        w = torch.randn(6, 5)
    alias = training_session._autograd_alias(w)
    assert not alias.is_inference() and alias.data_ptr() == w.data_ptr()
    x1 = torch.randn(3, 5, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x1, alias).square().sum().backward()
    torch.nn.functional.linear(x2, w.clone()).square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)


@pytest.mark.fault(
    "Self-NPO Train on a model turned into a continuous-EDM model by a ModelSampling node (a schedule the trainer "
    "does not know)",
    "NPOError naming model and the sampling type, before any sampling; flow-matching and v-prediction patches train",
)
def test_continuous_schedules_are_refused_and_flow_matching_trains(tiny, out_dir):
    """A ModelSampling node decides the schedule the model samples with, so training follows it: flow
    matching (ModelSamplingSD3) trains with the flow TDFT, a continuous EDM schedule is refused."""
    from comfy_extras import nodes_model_advanced as adv

    model = tiny("sd15")
    pos, neg = kit.make_conds("sd15")
    with torch.inference_mode():
        flow = adv.ModelSamplingSD3().patch(model, 3.0)[0]
        edm = adv.ModelSamplingContinuousEDM().patch(model, "v_prediction", 120.0, 0.002)[0]
        v_pred = adv.ModelSamplingDiscrete().patch(model, "v_prediction", False)[0]
    with pytest.raises(NPOError, match="model: .*ModelSamplingContinuousEDM.*a schedule the trainer does not know"):
        train(edm, pos, neg, steps=1)
    assert train(flow, pos, neg, steps=1).result[2] == 1
    assert train(v_pred, pos, neg, steps=1).result[2] == 1


def test_no_checkpoint_folder_without_checkpoints(tiny, out_dir):
    """save_every 0 writes no checkpoint, so Self-NPO Train leaves output/npo_training uncreated."""
    out = train(tiny("sd15"), *kit.make_conds("sd15"), steps=1, save_every=0)
    assert out.result[2] == 1 and "checkpoint:" not in out.ui.as_dict()["text"][0]
    assert not (out_dir / "npo_training").exists()


def test_prompts_of_different_lengths_train_padded_as_comfyui_batches_them(tiny, out_dir, monkeypatch):
    """SD prompts of 8 and 16 tokens (and a 16-token negative) train in one batch: the shorter text is repeated
    to the common length, as ComfyUI's CONDCrossAttn.concat does when it batches conds for sampling."""
    model = tiny("sd15")
    (short, _), (long, neg) = kit.make_conds("sd15", seed=3, tokens=8), kit.make_conds("sd15", seed=4, tokens=16)
    seen = []
    real = training_model.training_denoiser

    def spy(mp, dtype, *rest, **kw):
        den = real(mp, dtype, *rest, **kw)
        return lambda x, nu, cond: seen.append(cond["c_crossattn"].detach().clone()) or den(x, nu, cond)

    monkeypatch.setattr(training_model, "training_denoiser", spy)
    lat = {"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    out = train(model, short + long, neg, steps=2, batch_size=2, latents=lat, teacher_guidance=-5.0)
    assert out.result[2] == 2 and seen and all(c.shape[1] == 16 for c in seen)
    padded = short[0][0].repeat(1, 2, 1)  # 8 tokens → the common 16, by repetition
    rows = torch.cat(seen).flatten(1)
    assert any(torch.equal(r, padded.flatten(1)[0]) for r in rows), "the 8-token prompt is not the repeated text"
    assert any(torch.equal(r, long[0][0].flatten(1)[0]) for r in rows)


def test_training_unloads_the_other_models_first_and_sampling_reloads_them(tiny, out_dir, monkeypatch):
    """A model loaded before Self-NPO Train (here a second checkpoint) is off ComfyUI's device while training runs, as
    core's Train LoRA frees it; the model being trained is loaded; afterwards sampling loads what it needs."""
    mm = comfy.model_management
    model, other = tiny("sd15"), tiny("sd15", seed=1)
    pos, neg = kit.make_conds("sd15")
    mm.unload_all_models()
    mm.load_models_gpu([other])
    assert any(m.model is other for m in mm.current_loaded_models)
    seen = []
    real_load = training_model.TrainingModel.load

    def load_and_look(self, *a, **k):
        device = real_load(self, *a, **k)
        seen.append([m.model for m in mm.current_loaded_models])
        return device

    monkeypatch.setattr(training_model.TrainingModel, "load", load_and_look)
    train(model, pos, neg, steps=1)
    (loaded,) = seen
    assert not any(p is other for p in loaded), "the other model stayed loaded during training"
    assert any(p.is_clone(model) for p in loaded), "the model being trained is not loaded"
    got = kit.ksample(other, pos, neg, 5.0)  # ComfyUI's model management loads it again
    assert torch.isfinite(got).all() and any(m.model is other for m in mm.current_loaded_models)


def test_student_cond_auto_is_the_prompt_student_on_sd_models(tiny, out_dir):
    """auto on an SD (VP, eps) model trains exactly what student_cond = prompt trains, not what negative trains."""
    pos, neg = kit.make_conds("sd15")
    runs = {c: train(tiny("sd15"), pos, neg, steps=2, student_cond=c).result[0] for c in ("auto", "prompt", "negative")}
    auto, prompt, negative = (runs[c].entries for c in ("auto", "prompt", "negative"))
    assert all(torch.equal(auto[k].up, prompt[k].up) and torch.equal(auto[k].down, prompt[k].down) for k in auto)
    assert any(not torch.equal(auto[k].up, negative[k].up) for k in auto)


def test_grad_accumulation_through_the_node_equals_the_larger_batch(tiny, out_dir, monkeypatch):
    """Self-NPO Train with batch 1 × 2 accumulated equals batch 2 on the real model (same pool, seed, steps); the
    progress bar counts optimizer steps."""
    pos, neg = kit.make_conds("sd15")
    totals = []
    real_bar = runtime.progress_bar
    monkeypatch.setattr(runtime, "progress_bar", lambda total: (totals.append(total), real_bar(total))[1])
    acc = train(tiny("sd15"), pos, neg, steps=2, batch_size=1, grad_accumulation_steps=2).result[0]
    big = train(tiny("sd15"), pos, neg, steps=2, batch_size=2).result[0]
    small = train(tiny("sd15"), pos, neg, steps=2, batch_size=1).result[0]
    assert totals == [2 + 2] * 3  # pool of 2 + 2 optimizer steps, with or without accumulation
    # AdamW's update is about lr (1e-4) per step whatever the gradient's size; a gradient component near zero can
    # flip the update of one element by float noise (measured: 1 of 256 elements off by 3.9e-6), so compare at 2e-5
    # and show that one micro-batch alone (batch 1) is a different run at that scale
    far = 0.0
    for k, e in big.entries.items():
        torch.testing.assert_close(acc.entries[k].up, e.up, rtol=0, atol=2e-5)
        torch.testing.assert_close(acc.entries[k].down, e.down, rtol=0, atol=2e-5)
        far = max(far, float((small.entries[k].up - e.up).abs().max()))
    assert far > 5e-5, far


def test_adafactor_through_the_node_and_8bit_adamw_refused_without_bitsandbytes(tiny, out_dir, monkeypatch):
    """optimizer Adafactor trains with its own auto learning rate (1e-2); AdamW 8-bit without bitsandbytes is refused
    before any sampling, naming the package."""
    from comfyui_npo.training import optimizers

    pos, neg = kit.make_conds("sd15")
    out = train(tiny("sd15"), pos, neg, steps=2, optimizer="Adafactor")
    assert out.result[2] == 2 and "lr auto (0.01)" in out.ui.as_dict()["text"][0]
    assert any(float(e.up.abs().max()) > 0 for e in out.result[0].entries.values())
    monkeypatch.setattr(optimizers.importlib.util, "find_spec", lambda name: None)
    sampled = []
    monkeypatch.setattr(training_model, "sample_pool", lambda *a, **k: sampled.append(1))
    with pytest.raises(NPOError, match="optimizer: AdamW 8-bit cannot run here: it needs the bitsandbytes package"):
        train(tiny("sd15"), pos, neg, steps=2, optimizer="AdamW 8-bit")
    assert not sampled


def test_validation_preview_is_the_pair_ksampler_gives_and_is_shown_and_saved(tiny, out_dir, monkeypatch):
    """The last preview pair (at the final step, with the final offset) equals ComfyUI's KSampler (euler, simple,
    8 steps, pool_cfg, the preview's seed and size) on the model and on Apply NPO with the returned offset; every
    preview reaches the progress bar and is saved beside the checkpoints."""
    import comfy.sample

    from comfyui_npo.nodes.host import sampling, training_preview

    shown, pairs = [], []

    class Bar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            if preview is not None:
                shown.append((value, preview))

        def update(self, n):
            pass

    monkeypatch.setattr(runtime, "progress_bar", Bar)
    real_pair = training_preview.TrainingPreview.sample_pair

    def record(self, *a, **k):
        pairs.append(real_pair(self, *a, **k))
        return pairs[-1]

    monkeypatch.setattr(training_preview.TrainingPreview, "sample_pair", record)
    model = tiny("sd15")
    pos, neg = kit.make_conds("sd15")
    out = train(model, pos, neg, steps=3, preview_every=2, save_every=1, learning_rate=3e-3, pool_cfg=5.0)
    offset = out.result[0]
    assert len(pairs) == 2 and [v for v, _ in shown] == [2 + 2, 2 + 3]  # steps 2 and 3 (the end), after the pool
    assert training_preview.preview_shape((1, 4, 256, 192)) == (1, 4, 128, 96)  # SDXL's 2048×1536 pool: half
    assert training_preview.preview_shape((1, 4, 128, 96)) == (1, 4, 64, 64)  # 1024×768: not below 64 latent px
    assert training_preview.preview_shape((1, 16, 9, 60, 104)) == (1, 16, 9, 60, 64)  # Wan 832×480
    assert all(kind == "JPEG" and img.width == 2 * 256 + 8 for _, (kind, img, _) in shown)
    saved = sorted(p.name for p in (out_dir / "npo_training").glob("*_preview_*.png"))
    assert saved == ["t_00001__preview_000002.png", "t_00001__preview_000003.png"]

    plain, npo = pairs[-1]
    shape = training_preview.preview_shape((1, 4, 8, 8))  # the 64 px pool: smaller than 64 latent px, kept
    assert tuple(plain.shape) == shape == (1, 4, 8, 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    latent = torch.zeros(shape)

    def ksampler(m):
        with torch.inference_mode():
            return comfy.sample.sample(m, noise, 8, 5.0, "euler", "simple", pos[:1], neg, latent, seed=0,
                                       disable_pbar=True)

    want_plain, want_npo = ksampler(model), ksampler(sampling.apply_offset(model, offset, 1.0))
    got_plain, got_npo = (model.model.process_latent_out(x.cpu()) for x in (plain, npo))
    torch.testing.assert_close(got_plain, want_plain, rtol=1e-4, atol=1e-4)
    effect = float((want_npo - want_plain).abs().max())
    assert effect > 0.1, effect  # the offset acts: the two references differ
    # Apply NPO adds the LoRA on the negative rows in its own order of operations: float noise, measured 3e-4 to
    # 8e-4 of an effect of 5.4; the offset on both passes, or on none, would be off by the effect itself
    assert float((got_npo - want_npo).abs().max()) < 1e-3 * effect


def test_preview_decodes_with_the_vae_scores_each_pair_and_works_in_full_mode(tiny, out_dir, monkeypatch):
    """Full mode (the trained weights swapped for the originals in the plain pass), a connected VAE decodes the pair,
    a connected scorer scores both images each time; a text scorer without preview_prompt is refused first."""
    from comfyui_npo.nodes.host import training_preview

    decoded, scored = [], []

    class StandInVAE:
        def decode(self, latent):
            img = torch.sigmoid(latent[:, :3]).movedim(1, -1)  # [B, h, w, 3] in 0..1
            decoded.append(img)
            return img

    class StandInScorer:
        name, uses_prompt = "stand-in", True

        def score(self, images, prompts):
            scored.append(prompts)
            return torch.tensor([float(sum(im.getpixel((0, 0)))) for im in images])

    model = tiny("sd15")
    pos, neg = kit.make_conds("sd15")
    with pytest.raises(NPOError, match="preview_prompt: stand-in scores an image against its prompt"):
        train(model, pos, neg, steps=2, preview_every=1, preview_scorer=StandInScorer())
    runs = []
    real_run = training_preview.TrainingPreview.run
    monkeypatch.setattr(training_preview.TrainingPreview, "run",
                        lambda self, *a, **k: (runs.append(self), real_run(self, *a, **k))[1])
    out = train(model, pos, neg, steps=2, mode="full", learning_rate=1e-4, preview_every=1,
                preview_vae=StandInVAE(), preview_scorer=StandInScorer(), preview_prompt="a red fox")
    assert out.result[2] == 2 and len(decoded) == 4 and scored == [["a red fox"] * 2] * 2
    history = runs[0].history
    assert history.steps == [1, 2] and len(history.plain) == len(history.npo) == 2
    first = decoded[0][0]  # the first plain image, as the scorer saw it (its top-left pixel, uint8 levels)
    assert history.plain[0] == float(sum((255.0 * first[0, 0]).clamp(0, 255).to(torch.uint8).tolist()))


def test_partial_loading_trains_through_comfyuis_low_vram_load(tiny, out_dir, monkeypatch):
    """With partial_loading, ComfyUI loads the model within the free memory it sees (here: less than the model) and
    casts the rest per layer; training through it gives the offset a whole-model load gives. Without the option the
    same low memory still loads the whole model."""
    mm = comfy.model_management
    pos, neg = kit.make_conds("sd15")
    full = train(tiny("sd15"), pos, neg, steps=2).result[0]
    mm.unload_all_models()
    watch = kit.LoadWatch(monkeypatch)
    model = tiny("sd15")
    kit.low_vram(monkeypatch, free_bytes=0.3 * model.model_size())
    partial = train(model, pos, neg, steps=2, partial_loading=True).result[0]
    watch.assert_partial()  # ComfyUI left part of the weights off the device
    for k, e in full.entries.items():  # AdamW steps ~1e-4 an element: near a zero gradient float noise moves one
        torch.testing.assert_close(partial.entries[k].up, e.up, rtol=0, atol=2e-5)
    mm.unload_all_models()
    train(tiny("sd15"), pos, neg, steps=1)
    assert watch.loads[-1][0] == watch.loads[-1][1], "without partial_loading the whole model is loaded"


def test_partial_loading_refuses_full_mode_and_no_checkpointing(tiny, out_dir):
    pos, neg = kit.make_conds("sd15")
    with pytest.raises(NPOError, match="partial_loading: full mode trains every weight"):
        train(tiny("sd15"), pos, neg, mode="full", partial_loading=True)
    with pytest.raises(NPOError, match="partial_loading: needs gradient_checkpointing"):
        train(tiny("sd15"), pos, neg, gradient_checkpointing=False, partial_loading=True)
