"""Hostile paths, out-of-memory and isolation faults, through the nodes in real ComfyUI.

Paths: names with '..' and absolute names are refused by every node that reads or writes a file (a
symlinked file in a model folder loads, as with ComfyUI's own loaders); nothing is written outside
the model and output folders and no file is overwritten. Memory: an out-of-memory error in the pool
sampling or in training becomes an error naming the knobs that lower memory, the last checkpoint
stays resumable and the model given to the node stays bit-identical. Isolation: two models patched
with different offsets in one workflow each give their own, independently computed result."""

from __future__ import annotations

import os
from pathlib import Path

import npo_hostkit as kit
import pytest
import torch

from comfyui_npo.nodes.host import model_facts, training_model
from comfyui_npo.nodes.models import NPOApply
from comfyui_npo.nodes.offsets import NPOLoadOffset, NPOSaveOffset
from comfyui_npo.npo_core.errors import NPOError
from comfyui_npo.npo_core.offset import LowRank, NPOOffset


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _offset() -> NPOOffset:
    g = torch.Generator().manual_seed(0)
    key = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    return NPOOffset({key: LowRank(torch.randn(32, 2, generator=g), torch.randn(2, 32, generator=g), 2.0)})


def _load(name: str):
    with torch.inference_mode():
        return NPOLoadOffset.execute(offset_name=name).result[0]


def _save(prefix: str):
    with torch.inference_mode():
        return NPOSaveOffset.execute(npo_offset=_offset(), filename_prefix=prefix)


# ---------------------------------------------------------------------------------------------
# paths
# ---------------------------------------------------------------------------------------------
@pytest.mark.fault(
    "Load NPO Offset given a name with '..', an absolute path or a drive letter",
    "NPOError naming offset_name; nothing outside the folders is opened",
)
@pytest.mark.parametrize("name", ["../outside.safetensors", "sub/../../outside.safetensors", "ABS", "C:x.safetensors"])
def test_loader_refuses_names_leaving_the_folder(npo_dir, tmp_path, name):
    outside = tmp_path / "outside.safetensors"
    _save("ok")  # a valid file, so the refusal is about the name
    (npo_dir / "ok_00001_.safetensors").rename(outside)
    name = str(outside) if name == "ABS" else name
    with pytest.raises(NPOError, match="offset_name: .*no '..', no absolute path"):
        _load(name)


@pytest.mark.fault(
    "an offset in models/npo that is a symlink (to a file anywhere, or through a linked folder)",
    "it loads, as with ComfyUI's own loaders; names with '..' or absolute paths stay refused",
)
def test_symlinked_offsets_load_like_comfyuis_own_loaders(npo_dir, tmp_path):
    _save("real")
    real = npo_dir / "real_00001_.safetensors"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.safetensors").write_bytes(real.read_bytes())
    (npo_dir / "linked.safetensors").symlink_to(elsewhere / "x.safetensors")
    assert set(_load("linked.safetensors").entries) == set(_offset().entries)
    (npo_dir / "shared").symlink_to(elsewhere, target_is_directory=True)  # e.g. a NAS folder linked in
    assert set(_load("shared/x.safetensors").entries) == set(_offset().entries)
    with pytest.raises(NPOError, match="offset_name: .*no '..'"):
        _load("shared/../linked.safetensors")


@pytest.mark.fault(
    "Save NPO Offset or Self-NPO Train given a prefix with '..', an absolute path, or a subfolder symlinked outside",
    "NPOError naming filename_prefix; nothing is written anywhere",
)
@pytest.mark.parametrize("prefix", ["../up", "a/../../up", "ABS", "linked/x"])
@pytest.mark.parametrize("node", ["save", "train"])
def test_writers_refuse_prefixes_leaving_their_folder(npo_dir, out_dir, tmp_path, tiny, prefix, node):
    outside = tmp_path / "outside"
    outside.mkdir()
    for d in (npo_dir, out_dir / "npo_training"):
        d.mkdir(exist_ok=True)
        (d / "linked").symlink_to(outside, target_is_directory=True)
    prefix = str(outside / "x") if prefix == "ABS" else prefix
    before = _files(tmp_path)
    with pytest.raises(NPOError, match="filename_prefix"):
        if node == "save":
            _save(prefix)
        else:
            model = tiny("sd15")
            kit.self_npo_train(model, *kit.make_conds("sd15"), save_every=1, filename_prefix=prefix)
    assert _files(tmp_path) == before


@pytest.mark.fault(
    "Self-NPO Train given a resume_from with '..' or an absolute path",
    "NPOError naming resume_from, before any sampling; a checkpoint symlinked into output/npo_training resumes",
)
def test_resume_from_cannot_leave_the_output_folder(out_dir, tmp_path, tiny):
    model = tiny("sd15")
    pos, neg = kit.make_conds("sd15")
    kit.self_npo_train(model, pos, neg, steps=1, save_every=1, filename_prefix="run")
    ckpt = out_dir / "npo_training" / "run_00001_.pt"
    moved = tmp_path / "moved.pt"
    moved.write_bytes(ckpt.read_bytes())
    for name, match in (("../../moved.pt", "no '..'"), (str(moved), "no absolute path")):
        with pytest.raises(NPOError, match=f"resume_from: .*{match}"):
            kit.self_npo_train(model, pos, neg, steps=2, resume_from=name)
    (out_dir / "npo_training" / "link.pt").symlink_to(moved)
    assert kit.self_npo_train(model, pos, neg, steps=2, resume_from="link.pt")[2] == 2


@pytest.mark.fault(
    "the same filename_prefix saved twice, and training runs that reuse a prefix",
    "nothing is overwritten: a new file with the next counter each time; earlier files keep their bytes",
)
def test_nothing_is_overwritten(npo_dir, out_dir, tiny):
    _save("same")
    first = (npo_dir / "same_00001_.safetensors").read_bytes()
    _save("same")
    assert sorted(os.listdir(npo_dir)) == ["same_00001_.safetensors", "same_00002_.safetensors"]
    assert (npo_dir / "same_00001_.safetensors").read_bytes() == first
    model = tiny("sd15")
    pos, neg = kit.make_conds("sd15")
    kit.self_npo_train(model, pos, neg, steps=1, save_every=1, filename_prefix="run")
    ck1 = (out_dir / "npo_training" / "run_00001_.pt").read_bytes()
    kit.self_npo_train(model, pos, neg, steps=1, save_every=1, filename_prefix="run", seed=1)
    assert sorted(os.listdir(out_dir / "npo_training")) == [  # the runs' checkpoints and their final previews
        "run_00001_.pt", "run_00001__preview_000001.png", "run_00002_.pt", "run_00002__preview_000001.png"]
    assert (out_dir / "npo_training" / "run_00001_.pt").read_bytes() == ck1


@pytest.mark.fault(
    "a whole train → save run, watched for files written anywhere",
    "files appear only in output/npo_training and models/npo; no temporary file is left",
)
def test_training_and_saving_write_only_into_comfy_folders(npo_dir, out_dir, tmp_path, tiny, monkeypatch):
    import folder_paths

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = _files(tmp_path)
    models_before = _listing(Path(folder_paths.models_dir))
    model = tiny("sd15")
    out = kit.self_npo_train(model, *kit.make_conds("sd15"), steps=3, save_every=2, filename_prefix="w")
    with torch.inference_mode():
        NPOSaveOffset.execute(npo_offset=out.result[0], filename_prefix="w")
    new = sorted(set(_files(tmp_path)) - set(before))
    assert new == ["npo/w_00001_.safetensors", "output/npo_training/w_00001_.pt",
                   "output/npo_training/w_00001__preview_000003.png"]  # the preview at the end, beside it
    assert _listing(Path(folder_paths.models_dir)) == models_before  # the ComfyUI install is not written to


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------
# out of memory
# ---------------------------------------------------------------------------------------------
OOM_ERRORS = {
    "cuda": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "cpu": lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
}


def _student_fault(monkeypatch, at_student_step: int, fault):
    """training_model.training_denoiser whose student pass (the one with grad) of step ``at_student_step`` returns
    ``fault(output)``; ``fault`` may raise instead. Returns the real factory, to put back."""
    real = training_model.training_denoiser
    seen = [0]

    def make(mp, dtype, *rest, **kw):
        inner = real(mp, dtype, *rest, **kw)

        def den(x, nu, cond):
            out = inner(x, nu, cond)
            if torch.is_grad_enabled():
                seen[0] += 1
                if seen[0] == at_student_step:
                    return fault(out)
            return out

        return den

    monkeypatch.setattr(training_model, "training_denoiser", make)
    return real


def _raise(error):
    def fault(out):
        raise error()

    return fault


@pytest.mark.fault(
    "out of memory (CUDA or CPU allocator) in the middle of Self-NPO Train, lora and full mode",
    "NPOError naming batch_size, resolution, gradient_checkpointing, mode and rank; the last checkpoint "
    "resumes; the model stays bit-identical with no hook left",
)
@pytest.mark.parametrize("kind", list(OOM_ERRORS))
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_out_of_memory_in_training(out_dir, tiny, monkeypatch, kind, mode):
    model = tiny("sd15")
    unet = model_facts.unet_of(model)
    before = kit.state_hash(unet)
    params_before = [id(p) for p in unet.parameters()]
    pos, neg = kit.make_conds("sd15")
    real_denoiser = _student_fault(monkeypatch, 3, _raise(OOM_ERRORS[kind]))
    with pytest.raises(NPOError) as info:
        kit.self_npo_train(model, pos, neg, steps=4, save_every=2, filename_prefix="oom", mode=mode)
    msg = str(info.value)
    assert msg.startswith("out of memory during Self-NPO training")
    for knob in ("batch_size", "width/height", "gradient_checkpointing", "mode lora", "rank", "resume_from"):
        assert knob in msg, f"{knob!r} missing from: {msg}"
    assert kit.state_hash(unet) == before and kit.hooked_modules(unet) == []
    assert [id(p) for p in unet.parameters()] == params_before  # the original Parameters are back
    assert [n for n, m in unet.named_modules() if "forward" in vars(m)] == []  # no checkpointing wrapper left
    monkeypatch.setattr(training_model, "training_denoiser", real_denoiser)
    ckpt = out_dir / "npo_training" / "oom_00001_.pt"
    assert torch.load(ckpt, weights_only=True)["step"] == 2
    out = kit.self_npo_train(model, pos, neg, steps=4, save_every=2, mode=mode, resume_from=ckpt.name)
    assert out.result[2] == 4
    assert kit.state_hash(unet) == before


@pytest.mark.fault(
    "the student's prediction turns NaN at step 3 of Self-NPO Train (checkpoints every 2 steps)",
    "NPOError naming step 3 and the kept checkpoint, which holds step 2 and resumes; the model stays bit-identical",
)
def test_nan_during_training_through_the_node(out_dir, tiny, monkeypatch):
    model = tiny("sd15")
    unet = model_facts.unet_of(model)
    before = kit.state_hash(unet)
    pos, neg = kit.make_conds("sd15")
    real = _student_fault(monkeypatch, 3, lambda out: out * float("nan"))
    with pytest.raises(NPOError, match=r"loss became nan at step 3; the last good checkpoint, nan_00001_\.pt, is kept"):
        kit.self_npo_train(model, pos, neg, steps=4, save_every=2, filename_prefix="nan", learning_rate=1e-3)
    assert kit.state_hash(unet) == before and kit.hooked_modules(unet) == []
    monkeypatch.setattr(training_model, "training_denoiser", real)
    state = torch.load(out_dir / "npo_training" / "nan_00001_.pt", weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["params"].values())
    out = kit.self_npo_train(model, pos, neg, steps=4, save_every=2, learning_rate=1e-3, resume_from="nan_00001_.pt")
    assert out.result[2] == 4 and all(torch.isfinite(e.up).all() for e in out.result[0].entries.values())


@pytest.mark.fault(
    "out of memory while sampling the data-free start pool",
    "NPOError naming width/height and the latents input",
)
def test_out_of_memory_in_the_pool(out_dir, tiny, monkeypatch):
    def boom(*a, **k):
        raise OOM_ERRORS["cuda"]()

    monkeypatch.setattr(training_model, "sample_pool", boom)
    with pytest.raises(NPOError, match="out of memory during the start-pool sampling .*width/height.*latents"):
        kit.self_npo_train(tiny("sd15"), *kit.make_conds("sd15"))


def test_other_runtime_errors_are_not_disguised_as_memory(out_dir, tiny, monkeypatch):
    """The OOM translation must not swallow real bugs: any other RuntimeError passes through unchanged."""
    _student_fault(monkeypatch, 1, _raise(lambda: RuntimeError("mat1 and mat2 shapes cannot be multiplied")))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        kit.self_npo_train(tiny("sd15"), *kit.make_conds("sd15"))


# ---------------------------------------------------------------------------------------------
# isolation between models in one workflow
# ---------------------------------------------------------------------------------------------
@pytest.mark.fault(
    "two models patched from one base with different offsets in one workflow, sampled interleaved",
    "each equals its own two-network reference (θ + δ merged by hand); the base stays bit-identical",
)
def test_two_models_with_different_offsets_keep_their_own_results(tiny, load_offset):
    kind, cfg = "sd15", 5.0
    base = tiny(kind)
    before = kit.state_hash(base.model)
    sd_a, d_a = kit.make_lora(kind, "peft", rank=4, seed=21)
    sd_b, d_b = kit.make_lora(kind, "comfy", rank=4, seed=22, alpha=2.0, extras=True)
    off_a, off_b = load_offset(sd_a, "a.safetensors"), load_offset(sd_b, "b.safetensors")
    pos, neg = kit.make_conds(kind)
    refs = {
        name: kit.ksample(
            kit.with_reference_cfg(base, tiny.from_weights(kind, kit.merged(tiny.weights(kind), (s, d)))), pos, neg, cfg
        )
        for name, s, d in (("a", 1.0, d_a), ("b", 0.6, d_b))
    }
    assert not kit.close(refs["a"], refs["b"]), "the two offsets must give different images for this test to bite"
    with torch.inference_mode():
        m_a = NPOApply.execute(model=base, npo_offset=off_a, strength=1.0).result[0]
        m_b = NPOApply.execute(model=base, npo_offset=off_b, strength=0.6).result[0]
    for name, m in (("a", m_a), ("b", m_b), ("a", m_a), ("b", m_b)):
        assert kit.close(kit.ksample(m, pos, neg, cfg), refs[name]), f"model {name} did not give its own result"
    assert kit.state_hash(base.model) == before
