"""Helpers for the end-to-end tier: test assets, a ComfyUI server process, HTTP calls, and a
UI-format → API-format workflow converter.

Nothing here imports ComfyUI: the server runs in its own process (the venv's Python, ``main.py``),
and the synthetic models are made by ``make_assets.py`` in a subprocess.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
EXAMPLES = REPO / "example_workflows"
PACK_FOLDER = "comfyui-npo"  # the name of the pack's folder inside the test server's custom_nodes/
HOST = "127.0.0.1"

# Bump when make_assets.py changes what it writes: the cache folder name carries it.
ASSET_VERSION = "v1"
ASSET_FILES = ("tiny_sd15.safetensors", "taesd_encoder.safetensors", "taesd_decoder.safetensors",
               "tiny_npo_sd15.safetensors", "tiny_npo_sdxl.safetensors")

TINY_CKPT = "tiny_sd15.safetensors"
TINY_OFFSET = "tiny_npo_sd15.safetensors"
SDXL_OFFSET = "tiny_npo_sdxl.safetensors"

# Nodes that exist only in the frontend: never sent to the server.
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
_KEEP_WIDGET = object()  # a link from a PrimitiveNode: the target's own widget value is the value
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4


# ---------------------------------------------------------------------------------------------
# assets
# ---------------------------------------------------------------------------------------------
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


def prepare_base_directory(base: Path, assets: Path) -> None:
    """A ComfyUI ``--base-directory``: this pack in custom_nodes/, the tiny assets in models/."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_FOLDER
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    placements = {
        "checkpoints": [TINY_CKPT],
        "vae_approx": ["taesd_encoder.safetensors", "taesd_decoder.safetensors"],
        "npo": [TINY_OFFSET, SDXL_OFFSET],
    }
    for folder, names in placements.items():
        d = base / "models" / folder
        d.mkdir(parents=True, exist_ok=True)
        for name in names:
            dst = d / name
            if dst.exists():
                continue
            if folder == "npo":  # the pack refuses offsets that are symlinks to outside ComfyUI's folders
                shutil.copyfile(assets / name, dst)
            else:
                dst.symlink_to(assets / name)
    for d in ("input", "output", "temp", "user/default"):
        (base / d).mkdir(parents=True, exist_ok=True)
    # A quiet frontend for the browser test: no first-run tutorial/templates dialog.
    settings = base / "user" / "default" / "comfy.settings.json"
    if not settings.exists():
        settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Validation.Workflows": True,
                                        "Comfy.Minimap.Visible": False}))


# ---------------------------------------------------------------------------------------------
# server process
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# UI-format → API-format conversion
# ---------------------------------------------------------------------------------------------
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


class ConversionError(ValueError):
    pass


def input_spec(info: Mapping, name: str) -> tuple[Any, dict]:
    for section in ("required", "optional"):
        spec = (info.get("input") or {}).get(section, {}).get(name)
        if spec is not None:
            typ = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            return typ, opts
    raise KeyError(name)


def is_widget(typ: Any) -> bool:
    return isinstance(typ, list) or (isinstance(typ, str) and typ in WIDGET_TYPES)


def combo_options(typ: Any, opts: Mapping) -> list | None:
    if isinstance(typ, list):
        return typ
    if typ == "COMBO":
        return list(opts.get("options", []))
    return None


def input_order(info: Mapping) -> list[str]:
    order = info.get("input_order")
    if order:
        return list(order.get("required", [])) + list(order.get("optional", []))
    inputs = info.get("input") or {}
    return list(inputs.get("required", {})) + list(inputs.get("optional", {}))


def has_control_after_generate(name: str, typ: Any, opts: Mapping) -> bool:
    """Frontends add a hidden 'control_after_generate' value after seed-like INT widgets: when the input
    says so, or (no explicit setting) for INT inputs named seed/noise_seed. An explicit
    ``control_after_generate: false`` (e.g. Self-NPO Train's seed) means no control value."""
    if "control_after_generate" in opts:
        return bool(opts["control_after_generate"])
    return typ == "INT" and name in ("seed", "noise_seed")


def widget_values(node: Mapping, info: Mapping) -> dict[str, Any]:
    """Map a UI node's ``widgets_values`` onto its widget inputs (positional, like the frontend)."""
    raw = node.get("widgets_values")
    names = []
    for name in input_order(info):
        typ, opts = input_spec(info, name)
        if is_widget(typ) and not opts.get("forceInput"):
            names.append((name, typ, opts))
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return {n: raw[n] for n, _, _ in names if n in raw}
    values = list(raw)
    out: dict[str, Any] = {}
    i = 0
    for name, typ, opts in names:
        if i >= len(values):
            break
        out[name] = values[i]
        i += 1
        if has_control_after_generate(name, typ, opts):
            if i < len(values) and values[i] in ("fixed", "increment", "decrement", "randomize"):
                i += 1
        if any(opts.get(k) for k in ("image_upload", "video_upload", "audio_upload")):
            if i < len(values) and values[i] in ("image", "video", "audio"):
                i += 1  # the upload button's serialized value
    if i != len(values):
        raise ConversionError(f"node {node.get('id')} ({node.get('type')}): {len(values)} widgets_values but "
                              f"{i} were used by widget inputs {[n for n, _, _ in names]}")
    return out


def ui_to_api(workflow: Mapping, object_info: Mapping, substitutions: Mapping[str, Any] | None = None,
              overrides: Mapping[tuple[str, str], Any] | None = None) -> dict[str, dict]:
    """Convert a UI-format workflow (``nodes`` + ``links``) into the API prompt ``/prompt`` takes.

    - widget values come from ``widgets_values`` by position over ``/object_info`` ``input_order``
      (seed widgets carry an extra control_after_generate value);
    - links become ``[source id, source slot]``; links through Reroute nodes are followed;
    - Note/MarkdownNote/Reroute/PrimitiveNode (frontend-only) and muted nodes are left out; bypassed
      nodes pass their first input of the matching type through;
    - ``substitutions`` {input name: value}: for combo inputs whose value is not offered by this server
      (e.g. the example's "sd_v1-5.safetensors" on a test server), the value to use instead;
    - ``overrides`` {(class_type, input name): value}: forced values (e.g. smaller images for speed).
    """
    substitutions = dict(substitutions or {})
    overrides = dict(overrides or {})
    nodes = {int(n["id"]): n for n in workflow["nodes"]}
    links = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            lid, src, sslot, dst, dslot, typ = (link["id"], link["origin_id"], link["origin_slot"], link["target_id"],
                                                link["target_slot"], link.get("type"))
        else:
            lid, src, sslot, dst, dslot, typ = link[:6]
        links[int(lid)] = (int(src), int(sslot), int(dst), int(dslot), typ)

    def resolve_link(lid: int, seen: frozenset = frozenset()) -> Any:
        """[source id, slot]; None when the input is left out; _KEEP_WIDGET for a PrimitiveNode."""
        if lid in seen:
            raise ConversionError(f"link cycle through {lid}")
        src, sslot, _, _, typ = links[lid]
        node = nodes[src]
        ntype, mode = node["type"], node.get("mode", MODE_ALWAYS)
        if ntype == "Reroute" or mode == MODE_BYPASS:
            for inp in node.get("inputs", []):
                if inp.get("link") is None:
                    continue
                if ntype == "Reroute" or inp.get("type") in (typ, "*"):
                    return resolve_link(int(inp["link"]), seen | {lid})
            return None
        if mode == MODE_NEVER:
            return None
        if ntype == "PrimitiveNode":
            return _KEEP_WIDGET
        if ntype in FRONTEND_ONLY:
            raise ConversionError(f"link {lid} starts at frontend-only node {src} ({ntype})")
        return [str(src), sslot]

    prompt: dict[str, dict] = {}
    for nid, node in sorted(nodes.items()):
        ntype, mode = node["type"], node.get("mode", MODE_ALWAYS)
        if ntype in FRONTEND_ONLY or mode in (MODE_NEVER, MODE_BYPASS):
            continue
        info = object_info.get(ntype)
        if info is None:
            raise ConversionError(f"node {nid}: type '{ntype}' is not registered on the server (missing node pack?)")
        inputs: dict[str, Any] = widget_values(node, info)
        for inp in node.get("inputs", []):
            if inp.get("link") is None:
                continue
            src = resolve_link(int(inp["link"]))
            if src is None:
                inputs.pop(inp["name"], None)
            elif src is not _KEEP_WIDGET:
                inputs[inp["name"]] = src
        for name in list(inputs):
            if isinstance(inputs[name], list):
                continue
            try:
                typ, opts = input_spec(info, name)
            except KeyError:
                continue
            options = combo_options(typ, opts)
            if options is not None and inputs[name] not in options and name in substitutions:
                inputs[name] = substitutions[name]
        for (cls, name), value in overrides.items():
            if cls == ntype and name in inputs and not isinstance(inputs[name], list):
                inputs[name] = value
        entry: dict[str, Any] = {"class_type": ntype, "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        prompt[str(nid)] = entry
    return prompt


def validate_against_object_info(prompt: Mapping[str, Mapping], object_info: Mapping) -> list[str]:
    """Problems the server's validation would report: missing required inputs, combo values it does not
    offer, out-of-range numbers, links to missing nodes or wrong output types."""
    problems = []
    for nid, entry in prompt.items():
        info = object_info[entry["class_type"]]
        inputs = entry["inputs"]
        required = (info.get("input") or {}).get("required", {})
        for name in required:
            if name not in inputs:
                problems.append(f"{nid} {entry['class_type']}: required input '{name}' missing")
        for name, value in inputs.items():
            try:
                typ, opts = input_spec(info, name)
            except KeyError:
                problems.append(f"{nid} {entry['class_type']}: unknown input '{name}'")
                continue
            if isinstance(value, list):
                src = prompt.get(str(value[0]))
                if src is None:
                    problems.append(f"{nid}.{name}: links to missing node {value[0]}")
                    continue
                out_types = object_info[src["class_type"]]["output"]
                if value[1] >= len(out_types):
                    problems.append(f"{nid}.{name}: links to output {value[1]} of {src['class_type']}")
                elif not isinstance(typ, list) and typ not in ("*", out_types[value[1]]):
                    problems.append(f"{nid}.{name}: expects {typ}, gets {out_types[value[1]]}")
                continue
            options = combo_options(typ, opts)
            if options is not None:
                if value not in options:
                    problems.append(f"{nid}.{name}: '{value}' not among {options[:8]}")
            elif typ in ("INT", "FLOAT"):
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    problems.append(f"{nid}.{name}: {value!r} is not a number")
                elif ("min" in opts and value < opts["min"]) or ("max" in opts and value > opts["max"]):
                    problems.append(f"{nid}.{name}: {value} outside [{opts.get('min')}, {opts.get('max')}]")
            elif typ == "BOOLEAN" and not isinstance(value, bool):
                problems.append(f"{nid}.{name}: {value!r} is not a boolean")
            elif typ == "STRING" and not isinstance(value, str):
                problems.append(f"{nid}.{name}: {value!r} is not a string")
    return problems


def load_example(name: str) -> dict:
    return json.loads((EXAMPLES / f"{name}.json").read_text())


def example_names() -> list[str]:
    return sorted(p.stem for p in EXAMPLES.glob("*.json"))


@contextlib.contextmanager
def step(msg: str):
    t0 = time.time()
    yield
    print(f"[e2e] {msg}: {time.time() - t0:.1f} s", file=sys.stderr)
