"""scripts/run_demo.py, the headless demo the README names: as a subprocess on the built-in tiny checkpoint
with quick settings (it starts its own ComfyUI server), plus its error exits and its prompt editing.

The subprocess run needs ComfyUI (it is skipped without); the missing-ComfyUI exit runs everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys

import npo_e2ekit as kit
import pytest

SCRIPT = kit.REPO / "scripts" / "run_demo.py"
PYTHON = os.environ.get("NPO_E2E_PYTHON", sys.executable)


def load_demo():
    spec = importlib.util.spec_from_file_location("npo_run_demo", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


demo = load_demo()
COMFY = demo.find_comfyui()
needs_comfyui = pytest.mark.skipif(COMFY is None, reason="ComfyUI not found: run_demo.py end-to-end run skipped")


def run_demo(args: list[str], env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=str(kit.REPO), stdin=subprocess.DEVNULL)


def test_without_comfyui_it_says_how_to_install_and_exits_2(tmp_path):
    proc = run_demo(["--out", str(tmp_path / "out")], env={"COMFYUI_PATH": str(tmp_path / "nothing"),
                                                          "HOME": str(tmp_path)}, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "ComfyUI was not found" in proc.stderr and "git clone" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


@needs_comfyui
def test_a_missing_checkpoint_is_a_clear_error(tmp_path):
    proc = run_demo(["--checkpoint", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "out")],
                    env={"COMFYUI_PATH": str(COMFY)}, timeout=120)
    assert proc.returncode == 2 and "nope.safetensors not found" in proc.stderr, proc.stdout + proc.stderr


@needs_comfyui
def test_prompt_editing(object_info):
    """--prompt replaces the training prompts (old encoders pruned), --sdxl zeroes the negative; the result
    validates against the live server's /object_info."""
    base = kit.ui_to_api(kit.load_example(kit.EXAMPLE_SELF_NPO), object_info)
    opts = demo.parse_args(["--prompt", "a cat", "--prompt", "a dog", "--prompt", "a car", "--test-prompt", "a boat",
                            "--steps", "7", "--size", "128", "--sdxl", "--strength", "0.5"])
    p = demo.customize(json.loads(json.dumps(base)), object_info, kit.TINY_CKPT, opts)
    assert kit.validate_against_object_info(p, object_info) == []
    (train,) = [nid for nid, e in p.items() if e["class_type"] == "SelfNPOTrain"]
    assert demo.training_prompts(p, train) == ["a cat", "a dog", "a car"]
    ti = p[train]["inputs"]
    assert (ti["steps"], ti["width"], ti["height"], ti["teacher_guidance"]) == (7, 128, 128, -5.0)
    samplers = [e["inputs"] for e in p.values() if e["class_type"] == "KSampler"]
    assert len(samplers) == 2 and all(s["cfg"] == 5.0 for s in samplers)
    assert all(p[s["positive"][0]]["inputs"]["text"] == "a boat" for s in samplers)
    zero = ti["negative"][0]
    assert p[zero]["class_type"] == "ConditioningZeroOut" and all(s["negative"][0] == zero for s in samplers)
    texts = [e["inputs"]["text"] for e in p.values() if e["class_type"] == "CLIPTextEncode"]
    assert sorted(texts) == ["", "a boat", "a car", "a cat", "a dog"]  # the workflow's three prompts are gone
    assert [e["inputs"]["strength"] for e in p.values() if e["class_type"] == "NPOApply"] == [0.5]
    # without options nothing but the checkpoint changes
    same = demo.customize(json.loads(json.dumps(base)), object_info, kit.TINY_CKPT, demo.parse_args([]))
    (ckpt,) = [nid for nid, e in base.items() if e["class_type"] == "CheckpointLoaderSimple"]
    base[ckpt]["inputs"]["ckpt_name"] = kit.TINY_CKPT
    (t,) = [nid for nid, e in base.items() if e["class_type"] == "SelfNPOTrain"]
    base[t]["inputs"]["save_every"] = 0  # the demo's default: its base folder is temporary
    assert same == base


@needs_comfyui
def test_demo_runs_end_to_end_on_the_tiny_checkpoint(tmp_path):
    out = tmp_path / "demo out"
    args = ["--out", str(out), "--steps", "2", "--batch-size", "1", "--pool-size", "2", "--pool-steps", "2",
            "--sample-steps", "2", "--size", "64", "--prompt", "a red fox", "--prompt", "a blue house",
            "--test-prompt", "a lighthouse"]
    with kit.step("scripts/run_demo.py (tiny checkpoint, 2 training steps)"):
        proc = run_demo(args, env={"COMFYUI_PATH": str(COMFY), "NPO_E2E_THREADS": "1"})
    log = f"rc {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, log
    assert f"results in {out}" in proc.stdout, log
    assert "Self-NPO (lora) 2/2 steps" in proc.stdout and "Self-NPO Train" in proc.stdout, log
    for name in ("self_npo_offset.safetensors", "self_npo_on.png", "self_npo_off.png", "comparison.png",
                 "loss_curve.png", "training.txt", "prompt_api.json", "comfyui.log"):
        assert (out / name).is_file(), f"{name} missing from {sorted(p.name for p in out.iterdir())}\n{log}"
    from PIL import Image
    from safetensors import safe_open

    umask = os.umask(0)
    os.umask(umask)
    for name in ("self_npo_offset.safetensors", "self_npo_on.png", "training.txt"):  # as ComfyUI's own outputs
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name
    for name in ("self_npo_on.png", "self_npo_off.png"):
        with Image.open(out / name) as im:
            assert im.size == (64, 64)
    with safe_open(str(out / "self_npo_offset.safetensors"), "pt") as f:
        meta = f.metadata() or {}
        assert any(k.startswith("diffusion_model.") for k in f.keys())
    assert json.loads(meta["npo.recipe"])["steps"] == 2, meta
    prompt = json.loads((out / "prompt_api.json").read_text())
    (train,) = [nid for nid, e in prompt.items() if e["class_type"] == "SelfNPOTrain"]
    assert demo.training_prompts(prompt, train) == ["a red fox", "a blue house"]
    # the temporary base folder is removed, the server stopped
    base = [ln.split("log: ", 1)[1].rstrip(")") for ln in proc.stdout.splitlines() if "server up at" in ln]
    assert base and not os.path.exists(os.path.dirname(base[0])), base
