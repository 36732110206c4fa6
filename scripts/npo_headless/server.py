"""A ComfyUI server process on 127.0.0.1 in a temporary base directory, and HTTP calls to it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from . import PACK_FOLDER, REPO
from .assets import SDXL_OFFSET, TINY_CKPT, TINY_OFFSET

HOST = "127.0.0.1"


def prepare_base_directory(base: Path, assets: Path | None = None, checkpoints: tuple[Path, ...] = (),
                           offsets: tuple[Path, ...] = ()) -> None:
    """A ComfyUI ``--base-directory``: this pack linked into custom_nodes/, the tiny ``assets`` (checkpoint,
    TAESD, NPO offsets), any ``checkpoints`` and any NPO ``offsets`` linked into models/ (by file name), empty
    input/output/temp folders, and user settings for a quiet frontend (no first-run dialogs)."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_FOLDER
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    placements: dict[str, list[Path]] = {"checkpoints": list(checkpoints), "npo": list(offsets)}
    if assets is not None:
        placements["checkpoints"].append(assets / TINY_CKPT)
        placements["vae_approx"] = [assets / "taesd_encoder.safetensors", assets / "taesd_decoder.safetensors"]
        placements["npo"] += [assets / TINY_OFFSET, assets / SDXL_OFFSET]  # symlinks load, as ComfyUI's own
    for folder, sources in placements.items():
        d = base / "models" / folder
        d.mkdir(parents=True, exist_ok=True)
        for src in sources:
            dst = d / src.name
            if not dst.exists():
                dst.symlink_to(src)
    for d in ("input", "output", "temp", "user/default"):
        (base / d).mkdir(parents=True, exist_ok=True)
    settings = base / "user" / "default" / "comfy.settings.json"
    if not settings.exists():
        settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Validation.Workflows": True,
                                        "Comfy.Minimap.Visible": False}))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ComfyServer:
    """``python main.py --cpu --listen 127.0.0.1 --port N --base-directory B`` with its log in a file.

    ``cpu=False`` leaves out ``--cpu`` (ComfyUI then uses a GPU when it finds one); ``threads`` sets
    OMP/MKL_NUM_THREADS (``$NPO_E2E_THREADS`` overrides it; None leaves them as they are)."""

    def __init__(self, comfy_root: Path, python: str, base: Path, log_path: Path, port: int | None = None,
                 cpu: bool = True, threads: str | None = "1"):
        self.comfy_root, self.python, self.base, self.log_path = comfy_root, python, base, log_path
        self.cpu, self.threads = cpu, threads
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    def start(self, timeout: float = 180.0, attempts: int = 3) -> None:
        """Start the server and wait until it answers; a port taken in the meantime gets a new port."""
        for _ in range(attempts):
            if self._start_once(timeout):
                return
            self.port = free_port()
            self.url = f"http://{HOST}:{self.port}"
        raise RuntimeError(f"ComfyUI could not bind a free port in {attempts} attempts.\n{self.log_tail()}")

    def _start_once(self, timeout: float) -> bool:
        cmd = [self.python, "main.py", *(["--cpu"] if self.cpu else []), "--listen", HOST, "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch",
               *self._optional_flags("--database-url", f"sqlite:///{self.base / 'comfyui-e2e.db'}"),
               *self._optional_flags("--disable-assets-autoscan")]
        env = dict(os.environ)
        # One intra-op thread: the tiny model's ops are small, and on a busy 2-core machine several
        # OpenMP threads spin against each other (measured: 0.35 s vs 6.5 s per UNet call).
        threads = os.environ.get("NPO_E2E_THREADS", self.threads)
        if threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = threads
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("COMFYUI_PATH", None)
        if self._log is not None:
            self._log.close()
        self._log = open(self.log_path, "a")
        self._log.write(f"$ {' '.join(cmd)}\n")
        self._log.flush()
        self.proc = subprocess.Popen(cmd, cwd=str(self.comfy_root), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                if "address already in use" in self.log_text().lower():
                    return False
                raise RuntimeError(f"ComfyUI exited with rc {self.proc.returncode} during start-up.\n{self.log_tail()}")
            try:
                # make sure the server answering is this one (not another process that took the port)
                stats = get_json(self.url + "/system_stats", timeout=5)
                if str(self.base) in " ".join(stats.get("system", {}).get("argv", [])):
                    if isinstance(get_json(self.url + "/object_info/KSampler", timeout=30), dict):
                        return True
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer /object_info within {timeout:.0f} s.\n{self.log_tail()}")

    def _optional_flags(self, flag: str, *values: str) -> list[str]:
        """``[flag, *values]`` when this ComfyUI's ``comfy/cli_args.py`` knows the flag, else [] (older or
        newer versions may lack it, and an unknown flag stops main.py)."""
        try:
            known = flag in (self.comfy_root / "comfy" / "cli_args.py").read_text(errors="replace")
        except OSError:
            known = True
        return [flag, *values] if known else []

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 80) -> str:
        lines = self.log_text().splitlines()
        return f"---- last {min(n, len(lines))} lines of {self.log_path} ----\n" + "\n".join(lines[-n:])


# ---------------------------------------------------------------------------------------------
# HTTP (127.0.0.1 only)
# ---------------------------------------------------------------------------------------------
def _check_local(url: str) -> None:
    host = urllib.parse.urlsplit(url).hostname
    if host not in (HOST, "localhost"):
        raise ValueError(f"e2e tests talk to 127.0.0.1 only, not {url}")


def get_json(url: str, timeout: float = 30.0) -> Any:
    _check_local(url)
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


def get_bytes(url: str, timeout: float = 30.0) -> bytes:
    _check_local(url)
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def post_json(url: str, payload: Any, timeout: float = 30.0) -> tuple[int, Any]:
    """(status, decoded JSON body); HTTP errors are returned, not raised."""
    _check_local(url)
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read().decode() or "null")
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        try:
            return e.code, json.loads(body)
        except ValueError:
            return e.code, body


def queue_prompt(url: str, prompt: dict, workflow: dict | None = None, client_id: str = "npo-e2e") -> str:
    payload: dict[str, Any] = {"prompt": prompt, "client_id": client_id}
    if workflow is not None:
        payload["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
    status, body = post_json(url + "/prompt", payload)
    if status != 200 or not isinstance(body, dict) or "prompt_id" not in body:
        raise AssertionError(f"POST /prompt was refused ({status}): {json.dumps(body, indent=1)[:4000]}")
    if body.get("node_errors"):
        raise AssertionError(f"POST /prompt reported node errors: {json.dumps(body['node_errors'], indent=1)[:4000]}")
    return body["prompt_id"]


def wait_history(url: str, prompt_id: str, timeout: float = 240.0, server: ComfyServer | None = None) -> dict:
    """Poll ``/history/<id>`` until the prompt has finished (success or error); bounded by ``timeout``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server is not None and not server.alive():
            raise AssertionError(f"the ComfyUI server died while running {prompt_id}.\n{server.log_tail()}")
        hist = get_json(f"{url}/history/{prompt_id}")
        entry = hist.get(prompt_id) if isinstance(hist, dict) else None
        status = (entry or {}).get("status") or {}
        if entry and (status.get("completed") or status.get("status_str") in ("success", "error")):
            return entry
        time.sleep(0.25)
    raise AssertionError(f"prompt {prompt_id} did not finish within {timeout:.0f} s"
                         + (f"\n{server.log_tail()}" if server else ""))


def status_messages(entry: dict) -> list[tuple[str, dict]]:
    return [(m[0], m[1]) for m in (entry.get("status") or {}).get("messages", []) if len(m) == 2]


def execution_error(entry: dict) -> dict | None:
    for kind, data in status_messages(entry):
        if kind == "execution_error":
            return data
    return None


def output_images(entry: dict) -> list[dict]:
    """Every image record ({filename, subfolder, type}) the prompt's output nodes reported."""
    out = []
    for node_out in (entry.get("outputs") or {}).values():
        out.extend(node_out.get("images", []) or [])
    return out
