"""What the headless scripts (run_demo.py, npo_generate_pairs.py) share around a private ComfyUI server: checking this
Python can run ComfyUI, finding model files, starting the server on the GPU when torch sees one, running a prompt
with progress from the websocket, and reading a failed prompt's error.

Imports nothing of ComfyUI; torch (has_accelerator) and aiohttp (run_prompt) only when called."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Protocol, TextIO

from .server import ComfyServer, execution_error, get_json, post_json, queue_prompt, wait_history

# Where ComfyUI's own Python usually is, relative to the ComfyUI folder: a venv inside or beside it, the Windows
# portable build's python_embeded beside it.
COMFY_PYTHONS = ("venv/bin/python", ".venv/bin/python", "../venv/bin/python", "../.venv/bin/python",
                 "venv/Scripts/python.exe", ".venv/Scripts/python.exe", "../python_embeded/python.exe")
ANY_COMFY_PYTHON = ("the Python you start ComfyUI with (its venv's python; the Windows portable build: "
                    "python_embeded\\python.exe)")
# The file endings ComfyUI lists in its model folders (folder_paths.supported_pt_extensions).
CHECKPOINT_EXTS = (".safetensors", ".ckpt", ".pt", ".pt2", ".pth", ".bin", ".pkl", ".sft")
REQUIRED_MODULES = ("torch", "torchvision", "aiohttp", "safetensors", "yaml", "PIL", "einops", "transformers")


class UsageError(Exception):
    """A one-line problem with the user's input (a missing file, a refused setting): printed as "error: ...",
    exit status 2."""


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------
def install_help(script: str) -> str:
    """How to install ComfyUI and run ``script`` (a path relative to the repository) with its Python."""
    return f"""\
ComfyUI was not found (looked at --comfyui, the ComfyUI this pack is installed in (custom_nodes/<pack>),
$COMFYUI_PATH and ~/comfy/ComfyUI).

Install it, then run this script again with a Python that has ComfyUI's requirements:

    mkdir -p ~/comfy && git clone https://github.com/Comfy-Org/ComfyUI ~/comfy/ComfyUI
    python3 -m venv ~/comfy/venv
    ~/comfy/venv/bin/pip install -r ~/comfy/ComfyUI/requirements.txt   # GPU: see ComfyUI's README for torch
    ~/comfy/venv/bin/python {script}

Or run it from the pack's folder inside your ComfyUI (ComfyUI/custom_nodes/<pack>/), or point COMFYUI_PATH
(or --comfyui) at an existing ComfyUI checkout."""


def comfy_python(comfy: Path) -> Path | None:
    """ComfyUI's own Python where it usually is (a venv inside or beside ``comfy``, the portable build's
    python_embeded), or None."""
    for rel in COMFY_PYTHONS:
        path = comfy / rel
        if path.is_file():
            return Path(os.path.abspath(path))
    return None


def missing_modules() -> list[str]:
    """The modules ComfyUI needs that this Python cannot import."""
    return [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]


def environment_problem(comfy: Path | None, script: str) -> str | None:
    """What stops ``script`` from running ComfyUI at ``comfy`` (not found, or this Python lacks its requirements)
    and how to fix it; None when nothing does."""
    if comfy is None:
        return install_help(script)
    missing = missing_modules()
    if missing:
        own = comfy_python(comfy)
        how = f"{own} {script} ..." if own else f"<ComfyUI's python> {script} ..."
        return (f"This Python ({sys.executable}) lacks ComfyUI's requirements ({', '.join(missing)}). Run {script} "
                f"with {ANY_COMFY_PYTHON}, e.g.\n\n    {how}\n\n"
                f"or pip install -r {comfy / 'requirements.txt'} into this one.")
    return None


def has_accelerator() -> str | None:
    """'cuda' / 'mps' when this Python's torch sees one (ComfyUI then runs on it), else None."""
    try:
        import torch
    except ImportError:
        return None
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return None


def resolve_model_file(arg: str, comfy: Path, folders: tuple[str, ...], what: str) -> Path:
    """``arg`` as a file path, else as a name in ComfyUI's ``models/<folder>`` (first of ``folders`` that has it);
    its absolute path, symlinks not followed (a link's name is the name ComfyUI lists). UsageError when it is not
    found or has an ending ComfyUI does not list."""
    path = Path(arg).expanduser()
    if not path.is_file():
        path = next((comfy / "models" / f / arg for f in folders if (comfy / "models" / f / arg).is_file()), path)
    if not path.is_file():
        raise UsageError(f"{what} {arg} not found")
    if not path.name.lower().endswith(CHECKPOINT_EXTS):
        raise UsageError(f"{path.name}: ComfyUI lists only {', '.join(CHECKPOINT_EXTS)} files")
    return Path(os.path.abspath(path))


def checkpoint_kind(path: Path) -> str | None:
    """What a .safetensors checkpoint holds, from its header's key names and shapes: "sdxl" (a UNet with 2048-wide
    cross-attention), "sd" (another SD UNet: SD1.x, SD2.x), "dit" (a diffusion model without the UNet's
    input_blocks: SD3.5, AuraFlow, ...); None when it cannot tell (not safetensors, no diffusion model)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size)) if 0 < size < 1 << 28 else {}
    except (OSError, ValueError):
        return None
    prefix = "model.diffusion_model."
    keys = [k for k in header if k.startswith(prefix)]
    if not keys:
        return None
    if prefix + "input_blocks.0.0.weight" not in header:
        return "dit"
    context = next((header[k].get("shape", [0, 0])[-1] for k in keys if k.endswith("attn2.to_k.weight")), None)
    return "sdxl" if context == 2048 else "sd"


# ---------------------------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------------------------
def start_server(comfy: Path, base: Path, accel: str | None, threads: str | None, port: int | None,
                 announced: bool = False) -> ComfyServer:
    """Start ComfyUI on ``base`` (on the accelerator, else with --cpu), its log in ``base/comfyui.log``; prints which
    ComfyUI (unless the caller ``announced`` it), on which device, and how long the start took."""
    device = (f"{accel or 'CPU'}{', --cpu' if not accel else ''}"
              f"{f', {threads} thread(s)' if threads and not accel else ''}")
    print(f"device: {device}" if announced else f"ComfyUI: {comfy}  ({device})")
    server = ComfyServer(comfy, sys.executable, base, base / "comfyui.log", port=port, cpu=accel is None,
                         threads=threads)
    t0 = time.time()
    try:
        server.start(timeout=300)
    except BaseException:
        server.stop()
        raise
    print(f"server up at {server.url} in {time.time() - t0:.0f} s (log: {server.log_path})")
    return server


def pack_object_info(server: ComfyServer, node: str) -> dict | None:
    """The server's /object_info when the pack's ``node`` is registered; else None, after printing the log's tail."""
    object_info = get_json(server.url + "/object_info", timeout=120)
    if node not in object_info:
        print("error: the pack's nodes did not load in ComfyUI:\n" + server.log_tail(60), file=sys.stderr)
        return None
    return object_info


def interrupt(server: ComfyServer | None) -> None:
    """Ask a running server to stop the prompt it is executing (POST /interrupt); nothing when it is gone."""
    if server is not None and server.alive():
        try:
            post_json(server.url + "/interrupt", {}, timeout=5)
        except OSError:
            pass


def prompt_failure(entry: dict) -> tuple[str, str] | None:
    """(node type, message) of a /history entry that did not succeed; None for a success."""
    if (entry.get("status") or {}).get("status_str") == "success":
        return None
    err = execution_error(entry) or entry.get("status")
    if isinstance(err, dict) and "exception_message" in err:
        return str(err.get("node_type", "?")), str(err["exception_message"]).strip()
    return "?", str(err)


# ---------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------
def fmt_time(seconds: float) -> str:
    """[h:]mm:ss of whole seconds."""
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    return (f"{h}:" if h else "") + f"{rem // 60:02d}:{rem % 60:02d}"


class PromptProgress(Protocol):
    """What run_prompt reports from the websocket: the node executing (None: none), nodes taken from the cache, a
    node's step counter, and the end of the prompt."""

    def executing(self, nid: str | None) -> None: ...
    def cached(self, nodes: list) -> None: ...
    def progress(self, nid: str, value: int, total: int) -> None: ...
    def done(self) -> None: ...


class Progress:
    """One text line per node; a live counter for nodes that report progress (\\r on a terminal, else a line
    every 10% or 30 s)."""

    def __init__(self, titles: dict[str, str], stream: TextIO = sys.stdout):
        self.titles, self.stream = titles, stream
        self.tty = stream.isatty()
        self.t0 = time.time()
        self.node: str | None = None
        self.node_t0 = self.t0
        self.first: tuple[float, int] | None = None
        self.last_print = 0.0
        self.last_bucket = -1
        self.open_line = False

    def _write(self, text: str, live: bool = False) -> None:
        if self.open_line and not live:
            self.stream.write("\n")
        self.stream.write(("\r" + text + "\x1b[K") if live else text + "\n")
        self.open_line = live
        self.stream.flush()

    def executing(self, nid: str | None) -> None:
        if nid == self.node:
            return
        now = time.time()
        if self.node is not None and self.first is not None:
            self._write(f"[{fmt_time(now - self.t0)}]   {self.titles.get(self.node, self.node)} done in "
                        f"{fmt_time(now - self.node_t0)}")
        self.node, self.node_t0, self.first, self.last_bucket = nid, now, None, -1
        if nid is not None:
            self._write(f"[{fmt_time(now - self.t0)}] {self.titles.get(nid, nid)}")

    def cached(self, nodes: list) -> None:
        if nodes:
            names = ", ".join(self.titles.get(str(n), str(n)) for n in nodes)
            self._write(f"[{fmt_time(time.time() - self.t0)}] cached (not run again): {names}")

    def progress(self, nid: str, value: int, total: int) -> None:
        if nid != self.node:
            self.executing(nid)
        now = time.time()
        if self.first is None:
            self.first = (now, value)
        t_first, v_first = self.first
        eta = ""
        if value > v_first and total:
            rate = (now - t_first) / (value - v_first)
            eta = f", {rate:.2f} s/it, ETA {fmt_time(rate * (total - value))}"
        pct = 100 * value // max(total, 1)
        line = f"    {self.titles.get(nid, nid)}: {value}/{total} ({pct}%){eta}"
        if self.tty:
            self._write(line, live=True)
        elif pct // 10 != self.last_bucket or now - self.last_print > 30 or value == total:
            self._write(line)
            self.last_print, self.last_bucket = now, pct // 10

    def done(self) -> None:
        self.executing(None)
        self._write(f"[{fmt_time(time.time() - self.t0)}] finished")


async def _run_ws(url: str, prompt: dict, progress: PromptProgress, server: ComfyServer) -> str:
    """Queue ``prompt`` on a websocket connection and feed its messages to ``progress`` until it ends; its id."""
    import aiohttp

    client_id = uuid.uuid4().hex
    ws_url = url.replace("http://", "ws://", 1) + f"/ws?clientId={client_id}"
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(ws_url, heartbeat=30, max_msg_size=0) as ws:
            pid = queue_prompt(url, prompt, client_id=client_id)
            while True:
                try:
                    msg = await ws.receive(timeout=5)
                except asyncio.TimeoutError:
                    if not server.alive():
                        raise RuntimeError("the ComfyUI server stopped") from None
                    continue
                if msg.type == aiohttp.WSMsgType.BINARY:
                    continue  # latent previews
                if msg.type != aiohttp.WSMsgType.TEXT:
                    return pid  # the socket closed: wait_history() below takes over
                data = json.loads(msg.data)
                kind, body = data.get("type"), data.get("data") or {}
                if body.get("prompt_id") not in (None, pid):
                    continue
                if kind == "executing":
                    if body.get("node") is None and body.get("prompt_id") == pid:
                        return pid
                    progress.executing(str(body["node"]) if body.get("node") is not None else None)
                elif kind == "execution_cached":
                    progress.cached(body.get("nodes") or [])
                elif kind == "progress" and body.get("node") is not None:
                    progress.progress(str(body["node"]), int(body.get("value", 0)), int(body.get("max", 0)))
                elif kind in ("execution_success", "execution_error", "execution_interrupted"):
                    return pid


def run_prompt(server: ComfyServer, prompt: dict, titles: dict[str, str] | None = None,
               progress: PromptProgress | None = None) -> dict:
    """Queue the prompt, show progress from the websocket (``progress``, default one line per node titled by
    ``titles``), return its /history entry."""
    progress = progress or Progress(titles or {})
    try:
        pid = asyncio.run(_run_ws(server.url, prompt, progress, server))
    except ImportError:  # no aiohttp: poll /history without progress
        pid = queue_prompt(server.url, prompt)
        print("(no aiohttp: polling /history, no progress display)")
    entry = wait_history(server.url, pid, timeout=10 ** 7, server=server)
    progress.done()
    return entry


def api_titles(prompt: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Node id -> its _meta title, else its class type (what the progress lines name)."""
    return {nid: (e.get("_meta") or {}).get("title") or e["class_type"] for nid, e in prompt.items()}
