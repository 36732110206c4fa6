"""scripts/gpu_check.py --smoke: the GPU check's rows with tiny models on the CPU, in its own processes (one worker
per ComfyUI memory mode), so that the command a lent GPU runs cannot rot. Asserts what the script does (every row
ran and passed its checks, only CUDA-only numbers skipped), not machine speed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import npo_headless
import pytest

SCRIPT = Path(npo_headless.REPO) / "scripts" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))
from npo_gpucheck import plan  # noqa: E402  (the row list the script runs; standard library only)

NO_CUDA = "skipped: no CUDA"


def _run(tmp: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    """The script as a user runs it (ComfyUI's Python, COMFYUI_PATH set); returns (process, its JSON)."""
    env = {**os.environ, "COMFYUI_PATH": str(npo_headless.find_comfyui())}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp), *extra], env=env,
                          capture_output=True, text=True, timeout=400)
    files = list(tmp.glob("gpu_check_*.json"))
    assert len(files) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(files[0].read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One full --smoke run (about a minute on 2 cores), shared by the tests below."""
    return _run(tmp_path_factory.mktemp("gpu_check"))


def _knows_flag() -> bool:
    return "--disable-dynamic-vram" in (npo_headless.find_comfyui() / "comfy" / "cli_args.py").read_text()


def _has_partial_loading() -> bool:
    from comfyui_npo.nodes.train import SelfNPOTrain

    return "partial_loading" in {i.id for i in SelfNPOTrain.define_schema().inputs}


def _rows(doc: dict) -> dict[str, dict]:
    return {r["key"]: r for r in doc["rows"]}


def test_every_row_ran_and_passed(smoke):
    proc, doc = smoke
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = _rows(doc)
    expected = {plan.row_key(r.id, m) for r in plan.ROWS for m in r.modes}
    assert set(rows) == expected
    for key, r in rows.items():
        if r["mode"] == plan.NO_DYNAMIC_MODE and not _knows_flag():
            assert r["status"] == "n/a" and "--disable-dynamic-vram" in r["note"], key
        elif r["row"] == "partial_wan" and not _has_partial_loading():
            assert r["status"] == plan.NOT_IN_VERSION, key
        else:
            assert r["status"] == "ok", (key, r["status"], r["error"], r["note"])
            assert r["checks"] and all(r["checks"].values()), (key, r["checks"])
            for name, value in r["numbers"].items():  # only CUDA-only numbers (VRAM, in GiB) may be skipped
                assert value != NO_CUDA or name.endswith("_gib"), (key, name)
                if name.endswith("_gib") and name != "estimate_gib":
                    assert value == NO_CUDA, (key, name, value)
    assert all(r["title"] in proc.stdout for r in rows.values())  # the table is printed
    assert doc["card"] == "CPU" and doc["smoke"] and doc["torch"] and doc["date"]
    assert doc["comfyui"] == npo_headless.find_comfyui().joinpath("comfyui_version.py").read_text().split('"')[1]
    assert "commit" in doc


def test_each_memory_mode_ran_in_its_own_comfyui_process(smoke):
    _, doc = smoke
    default = doc["modes"][plan.DEFAULT_MODE]
    assert default["argv"] == ["--cpu"] and default["env"]["device"] == "cpu"
    assert not default["env"]["torch_imported_before_setup"]
    other = doc["modes"][plan.NO_DYNAMIC_MODE]
    if _knows_flag():
        assert other["argv"] == ["--cpu", "--disable-dynamic-vram"]
        assert other["env"]["pid"] != default["env"]["pid"]
    else:
        assert "n/a" in other and "argv" not in other


def test_training_rows_have_finite_losses_and_the_offset_applies(smoke):
    _, doc = smoke
    trained = [r for r in doc["rows"] if r["kind"] == "train" and r["status"] == "ok"]
    assert {r["row"] for r in trained} >= {"train_sd15_fp16", "train_sd15_bf16", "train_wan_bf16"}
    for r in trained:
        n = r["numbers"]
        assert len(n["losses"]) == n["steps"] == plan.PROFILES["smoke"].train_steps
        assert all(isinstance(v, float) and math.isfinite(v) for v in n["losses"]), n["losses"]
        assert n["offset_applies"] is True and n["sample_rel_max_diff"] > 0
        assert n["offset_entries"] > 0 and n["loaded_fraction_min"] == 1.0  # the CPU loads every weight
        assert n["dtype"] == {"fp16": "float16", "bf16": "bfloat16"}[r["dtype"]]
    wan = _rows(doc)[plan.row_key("train_wan_bf16", plan.DEFAULT_MODE)]["numbers"]
    assert wan["estimate_gib"] == plan.README_WAN_ESTIMATE_GIB


def test_oom_row_names_the_remedies_and_sampling_works_after(smoke):
    from comfyui_npo.nodes.host.training_run import TRAIN_OOM_REMEDIES

    _, doc = smoke
    r = _rows(doc)[plan.row_key("oom_sd15", plan.DEFAULT_MODE)]
    n, c = r["numbers"], r["checks"]
    assert n["injected"] is True and n["other_error"] is None
    assert "out of memory" in n["message"] and TRAIN_OOM_REMEDIES in n["message"]
    assert c == {"npo_error": True, "names_out_of_memory": True, "names_remedies": True, "sample_after_oom": True}


def test_timing_rows_pair_the_arms(smoke):
    _, doc = smoke
    for row_id in ("timing_sd15", "timing_wan"):
        r = _rows(doc)[plan.row_key(row_id, plan.DEFAULT_MODE)]
        n, (steps, repeats) = r["numbers"], plan.PROFILES["smoke"].timing[r["model"]]
        assert len(n["runs_s"]["plain"]) == len(n["runs_s"]["npo"]) == repeats
        assert all(len(run) == steps - 1 for arm in n["runs_s"].values() for run in arm)  # steps 2..N
        assert n["plain_step_s"] > 0 and n["npo_step_s"] > 0
        assert n["ratio"] > 0 and n["paired_ratio"] > 0 and n["lora_layers"] > 0


def test_a_row_past_its_cap_times_out_and_the_rest_still_run(tmp_path):
    """A cap far below the row's run time: that row is killed and reported "timed out"; a fresh worker runs the
    next row; the exit status says a row failed."""
    proc, doc = _run(tmp_path, "--rows", "oom_sd15,timing_wan", "--cap", "oom_sd15=0.01")  # default mode only
    rows = _rows(doc)
    assert proc.returncode == 1
    assert set(rows) == {plan.row_key(r, plan.DEFAULT_MODE) for r in ("oom_sd15", "timing_wan")}
    killed = rows[plan.row_key("oom_sd15", plan.DEFAULT_MODE)]
    assert killed["status"] == "timed out" and "cap" in killed["note"]
    assert rows[plan.row_key("timing_wan", plan.DEFAULT_MODE)]["status"] == "ok"


def test_partial_row_is_not_in_this_version_without_the_input(monkeypatch, tmp_path):
    """A pack whose Self-NPO Train lacks partial_loading: the row says so instead of failing (in-process)."""
    from npo_gpucheck import rows

    monkeypatch.setattr(rows, "node_inputs", lambda: {"model", "positive", "negative", "steps"})
    ctx = rows.Context(plan.PROFILES["smoke"], False, plan.DEFAULT_MODE, str(tmp_path))
    result = rows.run_row(ctx, plan.ROW_BY_ID["partial_wan"])
    assert result["status"] == plan.NOT_IN_VERSION and "partial_loading" in result["note"]
