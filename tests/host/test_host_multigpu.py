"""Multi-GPU CFG split (ComfyUI ≥ 0.33, MultiGPU CFG Split node): cond chunks run on deep clones of the
model, each with its own module tree, in worker threads. The NPO offset must reach the clone that
computes the negative rows.

The clones are built by ComfyUI's own ``create_multigpu_deepclones`` (the node's code), on two CPU
"devices" (``cpu`` and ``cpu:0`` are distinct device keys that both compute on the CPU); the split then
runs through ComfyUI's scheduler and thread pool.
"""

from __future__ import annotations

import comfy.model_management
import npo_hostkit as kit
import pytest
import torch

from comfyui_npo.nodes.guider import NPOCFGGuider
from comfyui_npo.nodes.models import NPOApply

multigpu = pytest.importorskip("comfy.multigpu")
if not hasattr(multigpu, "create_multigpu_deepclones"):
    pytest.skip("this ComfyUI has no multi-GPU CFG split", allow_module_level=True)

CFG = 5.0
KIND = "sd15"


@pytest.fixture()
def split_model(tiny, monkeypatch):
    """(model split over two devices, the clone, the plain model) as MultiGPU CFG Split makes them."""
    base = tiny(KIND)
    base.cached_patcher_init = (lambda: tiny(KIND), ())  # what ComfyUI's core loaders register
    second = torch.device("cpu", 0)
    devices = [base.load_device, second]
    monkeypatch.setattr(comfy.model_management, "get_all_torch_devices", lambda exclude_current=False: devices)
    split = multigpu.create_multigpu_deepclones(base, max_gpus=2)
    clones = split.get_additional_models_with_key("multigpu")
    assert len(clones) == 1 and clones[0].load_device == second and clones[0].model is not base.model
    return split, clones[0], tiny(KIND)


def _count_forwards(module, calls: list):
    return module.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))


def _sample_counting(model, clone, sample):
    main_calls, clone_calls = [], []
    handles = [_count_forwards(model.model.diffusion_model, main_calls)]
    handles.append(_count_forwards(clone.model.diffusion_model, clone_calls))
    try:
        out = sample()
    finally:
        for h in handles:
            h.remove()
    return out, main_calls, clone_calls


@pytest.mark.parametrize("batch", [1, 2])
def test_apply_npo_reaches_the_clone_that_runs_the_negative_rows(split_model, load_offset, batch):
    split, clone, single = split_model
    sd, _ = kit.make_lora(KIND, "peft", rank=4, seed=3)
    offset = load_offset(sd)
    pos, neg = kit.make_conds(KIND)
    with torch.inference_mode():
        npo_split = NPOApply.execute(model=split, npo_offset=offset, strength=1.0).result[0]
        npo_single = NPOApply.execute(model=single, npo_offset=offset, strength=1.0).result[0]
    out, main_calls, clone_calls = _sample_counting(
        split, clone, lambda: kit.ksample(npo_split, pos, neg, CFG, batch)
    )
    assert main_calls and clone_calls, "the split did not use both devices"
    reference = kit.ksample(npo_single, pos, neg, CFG, batch)
    plain = kit.ksample(single, pos, neg, CFG, batch)
    assert kit.max_err(reference, plain) > 1e-2
    assert kit.close(out, reference), f"max |split − single device| = {kit.max_err(out, reference):.3g}"
    comfy.model_management.unload_all_models()  # the injections leave both module trees on unload
    assert not kit.hooked_modules(clone.model.diffusion_model)
    assert not kit.hooked_modules(split.model.diffusion_model)


def test_npo_cfg_guider_on_a_split_model(split_model, load_offset):
    split, clone, single = split_model
    offset = load_offset(kit.make_lora(KIND, "kohya_ldm", rank=4, seed=5, alpha=4.0)[0])
    pos, neg = kit.make_conds(KIND)

    def guider(model):
        with torch.inference_mode():
            return NPOCFGGuider.execute(
                model=model, positive=pos, negative=neg, cfg=CFG, npo_offset=offset, strength=0.7
            ).result[0]

    out, main_calls, clone_calls = _sample_counting(split, clone, lambda: kit.guider_sample(guider(split), 2))
    assert main_calls and clone_calls
    assert kit.close(out, kit.guider_sample(guider(single), 2))
