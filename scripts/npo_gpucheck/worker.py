"""The worker process: ComfyUI in-process with the given argv, started the way its ``main.py`` starts (minus the
server), then the pack as ``comfyui_npo``; runs rows and appends one JSON line per event to the progress file.

Events: ``{"event": "ready", "env": {...}}`` once ComfyUI is imported, ``{"event": "start", "row": id}`` before and
``{"event": "done", "row": id, "result": {...}}`` after each row. The spec (a JSON file) holds ``comfy`` (the
ComfyUI root), ``argv`` (ComfyUI arguments), ``profile``, ``mode``, ``rows`` (ids), ``progress`` and ``workdir``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

from . import plan


class Progress:
    """Appends events to the progress file, one JSON object a line, flushed at once."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def emit(self, event: str, **fields) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"event": event, "t": time.time(), **fields}, default=str) + "\n")
            f.flush()


def start_comfyui(comfy: str, argv: list[str], workdir: str) -> dict:
    """Import ComfyUI with ``argv`` as main.py does before its server starts: args parsed from argv, cuda_malloc
    (the allocator ComfyUI picks) and the DynamicVRAM set-up before torch is imported, output/temp folders in
    ``workdir``, then comfy.model_management and ComfyUI's nodes. Returns what was set up."""
    sys.path.insert(0, comfy)
    sys.argv = ["main.py", *argv]
    import comfy.options

    comfy.options.enable_args_parsing()
    import cuda_malloc  # noqa: F401  (main.py: sets PYTORCH_CUDA_ALLOC_CONF before torch is imported)
    from comfy.cli_args import args

    torch_early = "torch" in sys.modules  # main.py sets up the allocator and aimdo before torch is imported
    dynamic = _dynamic_vram_before_torch(args)
    import folder_paths

    for sub in ("output", "temp", "input"):
        os.makedirs(os.path.join(workdir, sub), exist_ok=True)
    folder_paths.set_output_directory(os.path.join(workdir, "output"))
    folder_paths.set_temp_directory(os.path.join(workdir, "temp"))
    folder_paths.set_input_directory(os.path.join(workdir, "input"))
    import comfy.model_management
    import comfy.utils  # noqa: F401

    import nodes  # noqa: F401  (ComfyUI's nodes.py, as main.py imports it before the model patchers are swapped)

    if dynamic is None:
        dynamic = _dynamic_vram_devices(args)
    return {"dynamic_vram": dynamic, "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
            "torch_imported_before_setup": torch_early}


def _dynamic_vram_before_torch(args) -> str | None:
    """main.py (v0.33.0) initialises comfy_aimdo before torch when DynamicVRAM is on; returns why it is off (a
    text), or None when it goes on to the device step."""
    import comfy.cli_args

    enables = getattr(comfy.cli_args, "enables_dynamic_vram", None)
    if enables is None:
        return "off: this ComfyUI has no DynamicVRAM"
    if not enables():
        return "off: " + ("--cpu" if args.cpu else "disabled by the arguments")
    try:
        import comfy_aimdo.control as control
    except ImportError:
        return "off: comfy_aimdo is not installed"
    if not hasattr(control, "init_devices"):
        return "off: this ComfyUI's aimdo protocol is older than the one gpu_check mirrors (v0.33.0 main.py)"
    headroom = None if args.reserve_vram is None else int(args.reserve_vram * 1024**3)
    try:
        control.init(simple_vram_headroom=headroom, nvml_pressure=not getattr(args, "disable_nvml_pressure", False))
    except TypeError:  # comfy-aimdo 0.4.10 / 0.4.9 protocols, as main.py falls back
        try:
            control.init(simple_vram_headroom=headroom)
        except TypeError:
            control.init()
    return None


def _dynamic_vram_devices(args) -> str:
    """main.py's second DynamicVRAM step (after comfy.model_management): aimdo on every torch device, then
    ModelPatcherDynamic as ComfyUI's CoreModelPatcher."""
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy_aimdo.control as control

    if not (args.enable_dynamic_vram or mm.is_nvidia()):
        return "off: not an NVIDIA device"
    if mm.torch_version_numeric < (2, 8):
        return "off: torch older than 2.8"
    devices = mm.get_all_torch_devices()
    try:
        ok = control.init_devices((d.index, int(getattr(args, "vram_headroom", 0) * 1024**3)) for d in devices)
    except TypeError:  # comfy-aimdo 0.4.9 protocol
        ok = control.init_devices(d.index for d in devices)
    if not ok:
        return "off: no working comfy-aimdo install (ComfyUI falls back to the legacy ModelPatcher)"
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    return "on"


def environment(setup: dict) -> dict:
    """Versions and the device, as the JSON records them."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import torch

    device = mm.get_torch_device()
    cuda = device.type == "cuda"
    env = {
        "device": str(device),
        "card": torch.cuda.get_device_name(device) if cuda else "CPU",
        "cuda": cuda,
        "vram_total_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "comfyui": _comfyui_version(),
        "python": sys.version.split()[0],
        "pid": os.getpid(),
        "patcher": getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher).__name__,
        **setup,
    }
    return env


def _comfyui_version() -> str:
    try:
        import comfyui_version

        return comfyui_version.__version__
    except (ImportError, AttributeError):
        return "unknown"


def run(spec_path: str) -> int:
    """The worker's main: set up, report ready, run each row with its result recorded."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    progress = Progress(spec["progress"])
    try:
        setup = start_comfyui(spec["comfy"], spec["argv"], spec["workdir"])
        from npo_headless import register_pack

        register_pack()
        env = environment(setup)
    except BaseException:
        progress.emit("failed", error=traceback.format_exc(limit=8))
        raise
    profile = plan.PROFILES[spec["profile"]]
    if profile.threads:
        import torch

        torch.set_num_threads(profile.threads)
    progress.emit("ready", env=env)
    from . import rows

    ctx = rows.Context(profile, env["cuda"], spec["mode"], spec["workdir"])
    for row_id in spec["rows"]:
        progress.emit("start", row=row_id)
        result = rows.run_row(ctx, plan.ROW_BY_ID[row_id])
        progress.emit("done", row=row_id, result=result)
    return 0
