"""scripts/npo_generate_pairs.py as a subprocess (it starts its own ComfyUI server) on the tiny SD1.5 checkpoint and
offset: 2 prompts × 2 seeds, NPO vs plain, scored by a tiny PickScore; then its resumption and its refusals.

One generation run (module fixture) serves the layout, pixel and report checks; the reruns change only what they
test and leave the folder complete.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import npo_e2ekit as kit
import numpy as np
import pytest

if kit.find_comfyui() is None:
    pytest.skip("ComfyUI not found: npo_generate_pairs.py end-to-end runs skipped", allow_module_level=True)
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "host"))
import npo_scorerkit  # noqa: E402  (the tiny PickScore folder and transformers' own PickScore)

SCRIPT = kit.REPO / "scripts" / "npo_generate_pairs.py"
PYTHON = os.environ.get("NPO_E2E_PYTHON", sys.executable)
PROMPTS = ["a red fox in the snow", "a lighthouse at night"]
SEEDS = (5, 6)
NAMES = [f"{i:05d}_s{seed}" for i in range(len(PROMPTS)) for seed in SEEDS]
LABELS = ("NPO", "plain")


class Run:
    """The paths and arguments of the module's generation run."""

    def __init__(self, comfy_root: Path, assets: Path, tmp: Path):
        self.env = {"COMFYUI_PATH": str(comfy_root)}
        self.prompts = tmp / "prompts.txt"
        self.prompts.write_text(f"{PROMPTS[0]}\n\n   \n  {PROMPTS[1]}  \n", encoding="utf-8")  # blank lines skipped
        self.out = tmp / "pairs out"
        self.pickscore = npo_scorerkit.write_pickscore_folder(tmp / "pickscore")
        self.args = ["--checkpoint", str(assets / kit.TINY_CKPT), "--offset", str(assets / kit.TINY_OFFSET),
                     "--prompts", str(self.prompts), "--seeds", "2", "--seed", str(SEEDS[0]), "--size", "64",
                     "--steps", "2", "--threads", "1", "--cpu", "--out", str(self.out)]

    def __call__(self, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([PYTHON, str(SCRIPT), *self.args, *extra], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, **self.env}, cwd=str(kit.REPO),
                              stdin=subprocess.DEVNULL)

    def png(self, side: int, name: str) -> Path:
        return self.out / LABELS[side] / f"{name}.png"

    def snapshot(self) -> dict[Path, tuple[int, bytes]]:
        """Every PNG's (mtime_ns, bytes)."""
        return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(self.out.glob("*/*.png"))}


def log(proc: subprocess.CompletedProcess) -> str:
    return f"rc {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def embedded_prompt(path: Path) -> dict:
    """The API prompt ComfyUI's Save Image wrote into the PNG's "prompt" text chunk."""
    with Image.open(path) as im:
        return json.loads(im.info["prompt"])


@pytest.fixture(scope="module")
def run(comfy_root, assets, tmp_path_factory) -> Run:
    return Run(comfy_root, assets, tmp_path_factory.mktemp("generate_pairs"))


@pytest.fixture(scope="module")
def first(run) -> subprocess.CompletedProcess:
    with kit.step("npo_generate_pairs.py: 4 pairs, tiny PickScore"):
        proc = run("--pickscore", str(run.pickscore))
    assert proc.returncode == 0, log(proc)
    return proc


def test_the_folders_hold_each_pair_with_its_prompt(run, first):
    assert "4 pairs (2 prompts x 2 seeds)" in first.stdout and "0 complete, 4 to generate (8 images)" in first.stdout
    umask = os.umask(0)
    os.umask(umask)
    for label in LABELS:
        folder = run.out / label
        assert sorted(p.name for p in folder.iterdir()) == sorted(f"{n}{ext}" for n in NAMES for ext in (".png",
                                                                                                        ".txt"))
        for name in NAMES:
            assert (folder / f"{name}.txt").read_text(encoding="utf-8") == PROMPTS[int(name[:5])]
            for ext in (".png", ".txt"):  # as ComfyUI's own outputs: 0o666 less the umask
                assert stat.S_IMODE((folder / f"{name}{ext}").stat().st_mode) == 0o666 & ~umask
            with Image.open(folder / f"{name}.png") as im:
                assert im.size == (64, 64)
    assert sorted(p.name for p in run.out.iterdir()) == sorted(
        [*LABELS, "settings.json", "comfyui.log", "report.txt", "report.json", "report.csv"])
    settings = json.loads((run.out / "settings.json").read_text())
    images = settings["images"]
    assert images["checkpoint"] == {"name": kit.TINY_CKPT, "bytes": (Path(run.args[1])).stat().st_size}
    assert images["offset_a"]["name"] == kit.TINY_OFFSET and images["offset_b"] is None
    assert {k: images[k] for k in ("sampler", "scheduler", "steps", "cfg", "width", "height", "strength", "negative",
                                   "zero_negative", "labels")} == {
        "sampler": "dpmpp_2m", "scheduler": "normal", "steps": 2, "cfg": 7.5, "width": 64, "height": 64,
        "strength": 1.0, "negative": "", "zero_negative": False, "labels": list(LABELS)}
    assert settings["pairs"]["seeds"] == list(SEEDS) and settings["pairs"]["pairs"] == 4
    assert "got prompt" in (run.out / "comfyui.log").read_text()  # the server's log, kept


def test_a_and_b_share_prompt_and_seed_and_differ_by_the_offset(run, first):
    for name in NAMES:
        index, seed = int(name[:5]), int(name.split("_s")[1])
        a, b = pixels(run.png(0, name)), pixels(run.png(1, name))
        assert np.abs(a.astype(int) - b.astype(int)).max() > 0, f"{name}: NPO changed nothing"
        for side, path in enumerate((run.png(0, name), run.png(1, name))):
            p = embedded_prompt(path)  # the prompt that made this very file; its Save Image for this side:
            (save,) = [e for e in p.values() if e["class_type"] == "SaveImage"
                       and e["inputs"]["filename_prefix"] == f"npo_pairs/{'ab'[side]}/{name}"]
            sampler = p[p[save["inputs"]["images"][0]]["inputs"]["samples"][0]]["inputs"]
            assert sampler["seed"] == seed and (sampler["steps"], sampler["cfg"]) == (2, 7.5)
            assert p[sampler["positive"][0]]["inputs"]["text"] == PROMPTS[index]
            model = p[sampler["model"][0]]
            if side == 0:  # A: Apply NPO with the offset on the checkpoint's model
                assert model["class_type"] == "NPOApply" and model["inputs"]["strength"] == 1.0
                assert p[model["inputs"]["npo_offset"][0]]["inputs"]["offset_name"] == kit.TINY_OFFSET
            else:  # B: the checkpoint's model as it is
                assert model["class_type"] == "CheckpointLoaderSimple"
    # different seeds give different images
    assert np.abs(pixels(run.png(1, NAMES[0])).astype(int) - pixels(run.png(1, NAMES[1]))).max() > 0


def test_the_report_scores_every_pair_as_transformers_pickscore_does(run, first):
    doc = json.loads((run.out / "report.json").read_text())
    assert (doc["label_a"], doc["label_b"]) == LABELS
    assert sorted((x["name"], x["prompt"]) for x in doc["pairs"]) == sorted(
        (f"{n}.png", PROMPTS[int(n[:5])]) for n in NAMES)
    pick = doc["scorers"]["PickScore"]
    assert pick["n"] == 4 and pick["wins_a"] + pick["wins_b"] + pick["ties"] == 4
    names = [x["name"][: -len(".png")] for x in doc["pairs"]]
    prompts = [x["prompt"] for x in doc["pairs"]]
    ref = []
    for side in (0, 1):  # the PNGs as a ComfyUI IMAGE batch: SaveImage's uint8 / 255 is exact in float32
        batch = torch.from_numpy(np.stack([pixels(run.png(side, n)) for n in names])).float() / 255.0
        ref.append(npo_scorerkit.reference_pickscore(run.pickscore, batch, prompts))
    assert pick["mean_a"] == pytest.approx(float(ref[0].mean()), abs=1e-4)
    assert pick["mean_b"] == pytest.approx(float(ref[1].mean()), abs=1e-4)
    rows = (run.out / "report.csv").read_text().splitlines()
    assert rows[0] == "pair,label,PickScore_a,PickScore_b" and len(rows) == 5
    for i, row in enumerate(rows[1:]):
        _, label, a, b = row.split(",")
        assert label == f"{names[i]}.png"
        assert (float(a), float(b)) == (pytest.approx(float(ref[0][i]), abs=1e-4),
                                        pytest.approx(float(ref[1][i]), abs=1e-4))
    assert (run.out / "report.txt").read_text().strip() in first.stdout  # the report is printed


def test_a_rerun_of_a_complete_folder_generates_nothing(run, first):
    before = run.snapshot()
    proc = run()
    assert proc.returncode == 0, log(proc)
    assert re.search(r"4 complete, 0 to generate", proc.stdout), log(proc)
    assert "server up" not in proc.stdout  # no server started
    assert run.snapshot() == before
    # without a scorer option: the command that scores the folders later
    assert "npo_compare_folders.py" in proc.stdout and str(run.out / "NPO") in proc.stdout, log(proc)


@pytest.mark.fault(
    "one side's PNG of a finished pair deleted, then the same command rerun",
    "only that image is generated again, pixel-identical to the deleted one (same seed, CPU); every other file is "
    "left as it was",
)
def test_a_deleted_image_is_generated_again_and_alone(run, first):
    name = NAMES[3]
    victim = run.png(1, name)
    deleted = pixels(victim)
    before = run.snapshot()
    victim.unlink()
    with kit.step("npo_generate_pairs.py: resume one image"):
        proc = run()
    assert proc.returncode == 0, log(proc)
    assert "3 complete, 1 to generate (1 image)" in proc.stdout and f"{name} (plain only)" in proc.stdout, log(proc)
    after = run.snapshot()
    assert {p: v for p, v in after.items() if p != victim} == {p: v for p, v in before.items() if p != victim}
    assert np.array_equal(pixels(victim), deleted)
    kinds = sorted(e["class_type"] for e in embedded_prompt(victim).values())
    assert "NPOApply" not in kinds and kinds.count("KSampler") == 1  # the NPO side was not sampled again


@pytest.mark.fault(
    "a rerun into a finished output folder with another --cfg",
    "refused with exit status 2, naming cfg with both values and telling to use another --out; nothing is written",
)
def test_other_settings_are_refused_naming_them(run, first):
    before = run.snapshot()
    settings = (run.out / "settings.json").read_bytes()
    proc = run("--cfg", "5")
    assert proc.returncode == 2, log(proc)
    assert "cfg: 7.5 there, 5.0 now" in proc.stderr and "another --out" in proc.stderr, log(proc)
    assert run.snapshot() == before and (run.out / "settings.json").read_bytes() == settings


@pytest.mark.fault("a --prompts file that does not exist", "exit status 2 with one line naming the file")
def test_a_missing_prompt_file_is_named(run, tmp_path):
    missing = tmp_path / "no prompts.txt"
    proc = run("--prompts", str(missing), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, log(proc)
    assert proc.stderr.strip() == f"error: prompt file {missing} not found", log(proc)
    assert not (tmp_path / "out").exists()


@pytest.mark.fault("--cfg 1 (where CFG ignores the negative prediction)",
                   "refused with exit status 2, saying NPO cannot act at cfg 1 and why")
def test_cfg_1_is_refused(run, tmp_path):
    proc = run("--cfg", "1", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, log(proc)
    assert "--cfg 1" in proc.stderr and "negative" in proc.stderr and "ignores" in proc.stderr, log(proc)
    assert not (tmp_path / "out").exists()
