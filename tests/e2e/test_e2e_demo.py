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


# ---------------------------------------------------------------------------------------------
# which ComfyUI: the one the pack sits in, before $COMFYUI_PATH and ~/comfy/ComfyUI
# ---------------------------------------------------------------------------------------------
def _fake_install(tmp_path):
    """<tmp>/ComfyUI (main.py, comfy/) with custom_nodes/ComfyUI-NPO a symlink to this repository, as a
    developer's or a git clone's install is laid out; the link keeps the resolved path outside custom_nodes/."""
    root = tmp_path / "ComfyUI"
    (root / "comfy").mkdir(parents=True)
    (root / "main.py").write_text("")
    (root / "custom_nodes").mkdir()
    (root / "custom_nodes" / "ComfyUI-NPO").symlink_to(kit.REPO, target_is_directory=True)
    return root


def test_locate_comfyui_prefers_the_comfyui_the_pack_is_installed_in(tmp_path, monkeypatch):
    root = _fake_install(tmp_path)
    pack = root / "custom_nodes" / "ComfyUI-NPO"
    other = tmp_path / "other"  # a valid $COMFYUI_PATH that must lose
    (other / "comfy").mkdir(parents=True)
    (other / "main.py").write_text("")
    monkeypatch.setenv("COMFYUI_PATH", str(other))
    assert demo.locate_comfyui(script=str(pack / "scripts" / "run_demo.py")) == (
        root, "the ComfyUI this pack is installed in")
    # run as `python scripts/run_demo.py` from the pack's folder: the shell's $PWD keeps the symlinked path
    monkeypatch.chdir(pack)
    monkeypatch.setenv("PWD", str(pack))
    assert demo.locate_comfyui(script="scripts/run_demo.py")[0] == root
    # --comfyui wins; outside custom_nodes/ $COMFYUI_PATH is next
    assert demo.locate_comfyui(str(other), script="scripts/run_demo.py") == (other.resolve(), "--comfyui")
    monkeypatch.setenv("PWD", str(kit.REPO))
    monkeypatch.chdir(kit.REPO)
    if kit.REPO.parent.name != "custom_nodes":
        assert demo.locate_comfyui(script="scripts/run_demo.py") == (other.resolve(), "$COMFYUI_PATH")
    # a folder named custom_nodes outside a ComfyUI is not an install
    (root / "main.py").unlink()
    monkeypatch.chdir(pack)
    monkeypatch.setenv("PWD", str(pack))
    assert demo.locate_comfyui(script="scripts/run_demo.py")[0] != root


@pytest.mark.parametrize("how", ["from the pack's folder", "by absolute path"])
def test_the_demo_says_it_uses_the_comfyui_it_sits_in(tmp_path, how):
    """`python scripts/run_demo.py` inside <ComfyUI>/custom_nodes/<pack>/ uses that ComfyUI even where
    $COMFYUI_PATH names another (stopped here at a missing checkpoint, before any server starts)."""
    from npo_headless.runner import missing_modules

    if missing_modules():
        pytest.skip(f"this Python lacks ComfyUI's requirements {missing_modules()}")
    root = _fake_install(tmp_path)
    pack = root / "custom_nodes" / "ComfyUI-NPO"
    script = "scripts/run_demo.py" if how == "from the pack's folder" else str(pack / "scripts" / "run_demo.py")
    cwd = pack if how == "from the pack's folder" else tmp_path
    env = {**os.environ, "PWD": str(cwd), "HOME": str(tmp_path), "COMFYUI_PATH": str(COMFY or tmp_path / "none")}
    proc = subprocess.run([PYTHON, script, "--checkpoint", "nope.safetensors", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, env=env, cwd=str(cwd), stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and "nope.safetensors not found" in proc.stderr, proc.stdout + proc.stderr
    assert f"ComfyUI: {root}  (the ComfyUI this pack is installed in)" in proc.stdout, proc.stdout


def test_the_missing_requirements_message_names_comfyuis_own_python(tmp_path, monkeypatch):
    from npo_headless import runner

    root = tmp_path / "ComfyUI_windows_portable" / "ComfyUI"
    (root / "comfy").mkdir(parents=True)
    embedded = root.parent / "python_embeded" / "python.exe"
    embedded.parent.mkdir()
    embedded.write_text("")
    monkeypatch.setattr(runner, "missing_modules", lambda: ["einops"])
    message = runner.environment_problem(root, "scripts/run_demo.py")
    assert f"{embedded} scripts/run_demo.py" in message and "lacks ComfyUI's requirements (einops)" in message
    assert "venv-comfy-<version>" not in message and "test.sh" not in message  # not the test venvs


def test_the_docstring_names_comfyuis_python_not_the_test_venv():
    doc = SCRIPT.read_text().split('"""')[1]
    assert "the Python that runs your ComfyUI" in doc and ".cache/comfyui-npo" not in doc
    assert "python_embeded" in doc


def test_the_default_output_folder_is_git_ignored():
    """Run from the pack's folder, the demo's default output lands in the repository: .gitignore keeps it out."""
    out = demo.DEFAULT_OUT / "20260101-000000" / "comparison.png"
    proc = subprocess.run(["git", "check-ignore", "-q", "--no-index", str(out)], cwd=str(kit.REPO))
    assert proc.returncode == 0, f"{out} is not git-ignored"
    assert not demo.DEFAULT_OUT.is_absolute()


# ---------------------------------------------------------------------------------------------
# the family's settings
# ---------------------------------------------------------------------------------------------
def _safetensors_with(path, tensors: dict) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, str(path))


def test_checkpoint_kind_reads_the_family_from_the_keys(tmp_path):
    from npo_headless.runner import checkpoint_kind

    unet = {"model.diffusion_model.input_blocks.0.0.weight": (4, 4, 3, 3)}
    sdxl = tmp_path / "xl.safetensors"
    _safetensors_with(sdxl, {**unet, "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight":
                             (8, 2048)})
    sd2 = tmp_path / "sd2.safetensors"
    _safetensors_with(sd2, {**unet, "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
                            (8, 1024)})
    vae = tmp_path / "vae.safetensors"
    _safetensors_with(vae, {"decoder.conv_in.weight": (4, 4)})
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x02}q\x00.")
    assert [checkpoint_kind(p) for p in (sdxl, sd2, vae, tmp_path / "old.ckpt")] == ["sdxl", "sd", None, None]
    # the tiny files the e2e tests generate: ComfyUI itself detects them as SD15 and SD3 (test_e2e_dit_examples)
    assert checkpoint_kind(kit.asset_cache_dir() / kit.TINY_CKPT) in ("sd", None)
    if (kit.dit_asset_cache_dir() / kit.TINY_SD35_CKPT).is_file():
        assert checkpoint_kind(kit.dit_asset_cache_dir() / kit.TINY_SD35_CKPT) == "dit"


@needs_comfyui
def test_a_dit_checkpoint_gets_the_dit_templates_settings_and_student_cond(object_info):
    """--family dit (what a DiT checkpoint's keys select) samples as the SD3.5 template and pools as template 7;
    --student-cond sets Self-NPO Train's input of that name, whose choices are the node's own."""
    spec = kit.input_spec(object_info["SelfNPOTrain"], "student_cond")
    assert list(demo.STUDENT_CONDS) == kit.combo_options(*spec)
    base = kit.ui_to_api(kit.load_example(kit.EXAMPLE_SELF_NPO), object_info)
    o = demo.parse_args(["--family", "dit", "--student-cond", "negative"])
    p = demo.customize(json.loads(json.dumps(base)), object_info, kit.TINY_CKPT, o)
    assert kit.validate_against_object_info(p, object_info) == []

    def values(name: str, typ: str) -> dict:
        node = next(n for n in kit.load_example(name)["nodes"] if n["type"] == typ)
        return kit.widget_values(node, object_info[typ])

    sd35_ks = values(kit.EXAMPLE_SD35, "KSampler")
    sd35_latent = values(kit.EXAMPLE_SD35, "EmptySD3LatentImage")
    wan_train = values(kit.EXAMPLE_WAN21_SELF_NPO, "SelfNPOTrain")
    for ks in (e["inputs"] for e in p.values() if e["class_type"] == "KSampler"):
        assert {k: ks[k] for k in ("steps", "cfg", "sampler_name", "scheduler")} == {
            k: sd35_ks[k] for k in ("steps", "cfg", "sampler_name", "scheduler")}
    (ti,) = [e["inputs"] for e in p.values() if e["class_type"] == "SelfNPOTrain"]
    assert (ti["width"], ti["height"]) == (sd35_latent["width"], sd35_latent["height"])
    assert (ti["batch_size"], ti["pool_size"]) == (wan_train["batch_size"], wan_train["pool_size"])
    assert ti["pool_cfg"] == sd35_ks["cfg"] and ti["student_cond"] == "negative"
    assert ti["learning_rate"] == "auto" and ti["teacher_guidance"] == wan_train["teacher_guidance"]
    latents = [e["inputs"] for e in p.values() if e["class_type"] == "EmptyLatentImage"]
    assert latents and all((lt["width"], lt["height"]) == (1024, 1024) for lt in latents)
    # a knob the user sets wins over the family's
    o = demo.parse_args(["--family", "dit", "--cfg", "3.5", "--size", "512"])
    p = demo.customize(json.loads(json.dumps(base)), object_info, kit.TINY_CKPT, o)
    assert {e["inputs"]["cfg"] for e in p.values() if e["class_type"] == "KSampler"} == {3.5}
    (ti,) = [e["inputs"] for e in p.values() if e["class_type"] == "SelfNPOTrain"]
    assert ti["width"] == 512 and ti["student_cond"] == "auto"


def test_comparison_captions_are_separate_words_over_their_own_image(tmp_path):
    """The captions of comparison.png: each word apart (a gap wider than a letter's spacing), each caption
    inside its own image's column."""
    from PIL import Image

    for size in (64, 512):
        Image.new("RGB", (size, size), (200, 0, 0)).save(tmp_path / "off.png")
        Image.new("RGB", (size, size), (0, 0, 200)).save(tmp_path / "on.png")
        dest = demo.comparison_image(tmp_path / "off.png", tmp_path / "on.png", tmp_path / "cmp.png")
        im = Image.open(dest).convert("L")
        width = (im.width - 8) // 2 if size < 256 else size
        top = next(y for y in range(im.height) if im.getpixel((im.width // 4, y)) < 100 and
                   im.getpixel((2, y)) < 100)  # the first row of the images
        band = im.crop((0, 0, im.width, top))
        ink = [any(band.getpixel((x, y)) < 128 for y in range(band.height)) for x in range(band.width)]
        for text, (left, right) in zip(demo.CAPTIONS, ((0, width), (im.width - width, im.width)), strict=True):
            cols = [x for x in range(band.width) if ink[x]]
            mine = [x for x in cols if left <= x < right]
            assert mine and all(left <= x < right for x in cols if abs(x - (left + right) / 2) < width / 2 + 1)
            gaps, run = [], 0
            for x in range(mine[0], mine[-1] + 1):
                run = 0 if ink[x] else run + 1
                if run and (x + 1 > mine[-1] or ink[x + 1]):
                    gaps.append(run)
            font_px = max(16, width // 14)
            assert sum(g >= font_px // 4 for g in gaps) == text.count(" "), (size, text, gaps)
