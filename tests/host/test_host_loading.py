"""What Load NPO Offset lists and says, and the note for a full-weight file applied to a far-off model."""

from __future__ import annotations

import logging

import folder_paths
import npo_hostkit as kit
import pytest
import torch
from safetensors.torch import save_file

from comfyui_npo.nodes.host import files
from comfyui_npo.nodes.models import NPOApply
from comfyui_npo.nodes.offsets import NPOLoadOffset, NPOSaveOffset


def _text(out) -> str:
    return out.ui.as_dict()["text"][0]


@pytest.fixture()
def loras_dir(tmp_path, monkeypatch):
    d = tmp_path / "loras"
    d.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(d)], {".safetensors"}))
    return d


def test_npo_files_first_loras_marked_and_plain_loras_get_a_note(npo_dir, loras_dir):
    sd, _ = kit.make_lora("sd15", "kohya_ldm", rank=4, alpha=4.0)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(npo_dir / "b_npo.safetensors"))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(loras_dir / "a_style.safetensors"))
    names = files.offset_file_list()
    assert names[: names.index("b_npo.safetensors") + 1] == ["b_npo.safetensors"]  # models/npo first
    assert "[loras] a_style.safetensors" in names and "a_style.safetensors" not in names
    with torch.inference_mode():
        plain_lora = NPOLoadOffset.execute(offset_name="[loras] a_style.safetensors")
        from_npo = NPOLoadOffset.execute(offset_name="b_npo.safetensors")
        old_workflow = NPOLoadOffset.execute(offset_name="a_style.safetensors")  # saved before the marking
    assert "will be used as a NEGATIVE offset" in _text(plain_lora)
    assert "NEGATIVE offset" not in _text(from_npo)
    assert set(old_workflow.result[0].entries) == set(plain_lora.result[0].entries)


def test_a_pack_saved_offset_in_loras_gets_no_note(npo_dir, loras_dir, tiny):
    sd, _ = kit.make_lora("sd15", "kohya_ldm", rank=4, alpha=4.0)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(npo_dir / "x.safetensors"))
    with torch.inference_mode():
        offset = NPOLoadOffset.execute(offset_name="x.safetensors").result[0]
        NPOSaveOffset.execute(npo_offset=offset, filename_prefix="ours", model=tiny("sd15"))
    (loras_dir / "ours.safetensors").symlink_to(npo_dir / "ours_00001_.safetensors")
    with torch.inference_mode():
        out = NPOLoadOffset.execute(offset_name="[loras] ours.safetensors")
    assert "NEGATIVE offset" not in _text(out)


@pytest.mark.fault(
    "a full-weight NPO UNet applied without base_model to a model it differs from by far more than an offset",
    "a warning giving the measured relative difference and saying to connect base_model",
)
def test_full_weight_file_on_a_far_off_model_says_to_connect_base_model(tiny, load_offset, caplog):
    kind = "sd15"
    wb = tiny.weights(kind)
    g = torch.Generator().manual_seed(3)
    npo_unet = {k: v + 0.002 * v.abs().mean() * torch.randn(v.shape, generator=g) for k, v in wb.items()}
    offset = load_offset({f"model.diffusion_model.{k}": v for k, v in npo_unet.items()}, "npo_unet.safetensors")
    finetune = tiny.from_weights(kind, {k: v + 0.3 * v.abs().mean() * torch.randn(v.shape, generator=g)
                                        for k, v in wb.items()})
    caplog.set_level(logging.WARNING)
    with torch.inference_mode():
        NPOApply.execute(model=tiny(kind), npo_offset=offset, strength=1.0)
    assert not [r for r in caplog.records if "full-weight" in r.getMessage()]  # on its own base: quiet
    with torch.inference_mode():
        NPOApply.execute(model=finetune, npo_offset=offset, strength=1.0)
    (msg,) = [r.getMessage() for r in caplog.records if "full-weight" in r.getMessage()]
    assert "connect base_model" in msg and "%" in msg
    percent = float(msg.split("by ", 1)[1].split("%", 1)[0])
    assert 20 < percent < 60  # ~0.3·mean|w| noise on every weight, measured by hand below
    num = sum(float((npo_unet[k] - finetune.model.diffusion_model.state_dict()[k]).pow(2).sum()) for k in wb)
    den = sum(float(finetune.model.diffusion_model.state_dict()[k].float().pow(2).sum()) for k in wb)
    assert abs(percent - 100 * (num / den) ** 0.5) < 0.1
