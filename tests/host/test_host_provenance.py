"""Provenance in the files the pack writes, as ComfyUI's own checkpoint savers do it: the prompt and each
extra_pnginfo entry (the workflow) as JSON, none under --disable-metadata, the npo.* keys kept; and models/npo
registered through ComfyUI's folder API, before folders an extra_model_paths.yaml gave it, models/loras still read.

The hidden inputs are set on the node class as ComfyUI's V3 execution sets ``cls.hidden`` before ``execute``.
"""

from __future__ import annotations

import json
import os
import types

import npo_hostkit as kit
import pytest
import torch
from safetensors import safe_open

from comfyui_npo.nodes.host import files
from comfyui_npo.nodes.offsets import NPOSaveOffset
from comfyui_npo.nodes.train import SelfNPOTrain

PROMPT = {"3": {"class_type": "KSampler", "inputs": {"seed": 7}}}
WORKFLOW = {"nodes": [{"id": 3, "type": "KSampler"}], "links": []}


@pytest.fixture()
def hidden(monkeypatch):
    """Sets ``cls.hidden`` of the given node classes to this prompt and workflow."""

    def set_on(*classes):
        for cls in classes:
            values = types.SimpleNamespace(prompt=PROMPT, extra_pnginfo={"workflow": WORKFLOW})
            monkeypatch.setattr(cls, "hidden", values, raising=False)

    return set_on


@pytest.fixture()
def disable_metadata(monkeypatch):
    from comfy.cli_args import args

    def set_to(value: bool):
        monkeypatch.setattr(args, "disable_metadata", value)

    return set_to


def _trained_offset(tiny, out_dir, **kw):
    pos, neg = kit.make_conds("sd15")
    return kit.self_npo_train(tiny("sd15"), pos, neg, steps=1, **kw).result[0]


def _header(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


@pytest.mark.parametrize("disabled", [False, True])
def test_save_npo_offset_writes_the_prompt_and_workflow_unless_disabled(
    tiny, out_dir, npo_dir, hidden, disable_metadata, disabled
):
    hidden(NPOSaveOffset, SelfNPOTrain)
    disable_metadata(disabled)
    offset = _trained_offset(tiny, out_dir)
    with torch.inference_mode():
        NPOSaveOffset.execute(npo_offset=offset, filename_prefix="prov")
    (saved,) = list(npo_dir.glob("prov_*.safetensors"))
    meta = _header(saved)
    assert "npo.recipe" in meta and meta["npo.format_version"] and "modelspec.title" in meta
    if disabled:
        assert "prompt" not in meta and "workflow" not in meta
    else:
        assert json.loads(meta["prompt"]) == PROMPT and json.loads(meta["workflow"]) == WORKFLOW


def test_a_resaved_offset_carries_the_new_graph_not_the_old(tiny, out_dir, npo_dir, hidden, monkeypatch):
    hidden(NPOSaveOffset, SelfNPOTrain)
    offset = _trained_offset(tiny, out_dir)
    offset = offset.replace(metadata={**offset.metadata, "prompt": '{"old": 1}', "workflow": '{"old": 1}'})
    monkeypatch.setattr(NPOSaveOffset, "hidden", types.SimpleNamespace(prompt=None, extra_pnginfo=None))
    with torch.inference_mode():
        NPOSaveOffset.execute(npo_offset=offset, filename_prefix="resave")
    meta = _header(next(npo_dir.glob("resave_*.safetensors")))
    assert "prompt" not in meta and "workflow" not in meta and "npo.recipe" in meta


@pytest.mark.parametrize("disabled", [False, True])
def test_training_checkpoints_hold_the_prompt_and_workflow(tiny, out_dir, hidden, disable_metadata, disabled):
    from test_host_preference import _pairs, _train

    from comfyui_npo.nodes.preference import NPOPreferenceTrain

    hidden(SelfNPOTrain, NPOPreferenceTrain)
    disable_metadata(disabled)
    _trained_offset(tiny, out_dir, save_every=1, filename_prefix="tdft_prov")
    _train(tiny("sd15"), _pairs(), steps=1, save_every=1, filename_prefix="pref_prov")
    for prefix in ("tdft_prov", "pref_prov"):
        (ckpt,) = list((out_dir / "npo_training").glob(f"{prefix}_*.pt"))
        meta = torch.load(str(ckpt), map_location="cpu", weights_only=True)["metadata"]
        if disabled:
            assert meta == {}, prefix
        else:
            assert json.loads(meta["prompt"]) == PROMPT and json.loads(meta["workflow"]) == WORKFLOW, prefix


def test_models_npo_comes_first_and_yaml_folders_are_kept(tmp_path, monkeypatch):
    """As if extra_model_paths.yaml had given ``npo`` a folder before the pack loaded."""
    import folder_paths

    table = {k: (list(v[0]), set(v[1])) for k, v in folder_paths.folder_names_and_paths.items() if k != "npo"}
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", table)
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path / "models"))
    monkeypatch.setattr(files, "_registered", False)
    yaml_folder = tmp_path / "shared_npo"
    yaml_folder.mkdir()
    folder_paths.add_model_folder_path("npo", str(yaml_folder))
    (yaml_folder / "from_yaml.safetensors").write_bytes(b"x")
    files.register_npo_folder()
    paths, exts = folder_paths.folder_names_and_paths["npo"]
    assert paths == [os.path.join(str(tmp_path / "models"), "npo"), str(yaml_folder)]
    assert ".safetensors" in exts and os.path.isdir(paths[0])
    assert files.npo_dir() == paths[0]  # where Save NPO Offset writes
    assert "from_yaml.safetensors" in files.offset_file_list()
    files.register_npo_folder()  # once per process: a second call changes nothing
    assert folder_paths.folder_names_and_paths["npo"][0] == paths
