"""The tiny generated model files (a small SD1.5 checkpoint, TAESD, NPO offsets), cached per version."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Bump when make_assets.py changes what it writes: the cache folder name carries it.
ASSET_VERSION = "v1"
ASSET_FILES = ("tiny_sd15.safetensors", "taesd_encoder.safetensors", "taesd_decoder.safetensors",
               "tiny_npo_sd15.safetensors", "tiny_npo_sdxl.safetensors")

TINY_CKPT = "tiny_sd15.safetensors"
TINY_OFFSET = "tiny_npo_sd15.safetensors"
SDXL_OFFSET = "tiny_npo_sdxl.safetensors"


def asset_cache_dir() -> Path:
    root = os.environ.get("NPO_E2E_CACHE") or str(Path.home() / ".cache" / "comfyui-npo")
    return Path(root) / f"e2e-assets-{ASSET_VERSION}"


def ensure_assets(comfy_root: Path, python: str, log=print) -> Path:
    """The cached asset folder, generated (about 10-30 s, ~310 MB) when any file is missing.

    Generation writes to a temporary sibling folder and renames it, under a lock file, so parallel
    runs neither see half-written files nor generate twice."""
    target = asset_cache_dir()
    if all((target / f).is_file() for f in ASSET_FILES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover (not POSIX)
            pass
        if all((target / f).is_file() for f in ASSET_FILES):
            return target
        tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.time()
        log(f"[e2e] generating test assets into {target} (one-off, cached) ...")
        proc = subprocess.run([python, str(HERE / "make_assets.py"), "--comfyui", str(comfy_root), "--out", str(tmp)],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"make_assets.py failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                               f"{proc.stderr[-5000:]}")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        log(f"[e2e] assets generated in {time.time() - t0:.1f} s: {proc.stdout.strip()[-400:]}")
    return target
