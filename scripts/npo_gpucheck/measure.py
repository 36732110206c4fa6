"""Measuring inside a row: peak VRAM, the trainer's own losses and step states, an injected out-of-memory error, a
smaller VRAM budget for ComfyUI (worker side)."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time

import torch

from .plan import NO_CUDA

GIB = 2**30


class VramMeter:
    """Peak VRAM over a block: torch's allocator peak (``max_memory_allocated``, reset on entry) and the device's
    used memory (total − free, polled every 20 ms: it also counts the CUDA context, the allocator's cache and memory
    allocated outside torch's allocator, e.g. by comfy_aimdo). On the CPU every number reads NO_CUDA."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.start: int | str = 0
        self.peak: int | str = 0
        self.device_peak: int | str = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> VramMeter:
        if self.cuda:
            torch.cuda.synchronize()
            self.start = _read(torch.cuda.memory_allocated)
            self.peak = _read(torch.cuda.reset_peak_memory_stats)  # None, or why the allocator cannot
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                free, total = torch.cuda.mem_get_info()
            except RuntimeError as e:
                self.device_peak = f"unavailable: {e}"
                return
            self.device_peak = max(self.device_peak, total - free)
            self._stop.wait(0.02)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            if not isinstance(self.peak, str):
                self.peak = _read(torch.cuda.max_memory_allocated)
            self._stop.set()
            self._thread.join()

    def numbers(self, prefix: str) -> dict:
        """``{prefix}_peak_gib`` (torch allocator), ``{prefix}_device_peak_gib`` (device used), ``{prefix}_start_gib``
        (allocated on entry), in GiB; a number the allocator cannot give reads "unavailable: ..."."""
        keys = (f"{prefix}_peak_gib", f"{prefix}_device_peak_gib", f"{prefix}_start_gib")
        if not self.cuda:
            return dict.fromkeys(keys, NO_CUDA)
        values = (self.peak, self.device_peak, self.start)
        return {k: (round(v / GIB, 3) if isinstance(v, int) else v) for k, v in zip(keys, values, strict=True)}


def _read(fn) -> int | str:
    """``fn()`` (0 for None), or "unavailable: <why>" when this allocator does not keep that statistic."""
    try:
        return fn() or 0
    except RuntimeError as e:
        return f"unavailable: {e}"


class TrainSpy:
    """Records what the pack's Trainer.run returns (losses, steps) and, at each step, how much of ``mp`` ComfyUI
    has on the device and the step's wall time; Trainer.run is put back on exit."""

    def __init__(self, mp) -> None:
        self.mp = mp
        self.result = None
        self.loaded_fractions: list[float] = []
        self.step_seconds: list[float] = []
        self._orig = None

    def __enter__(self) -> TrainSpy:
        from comfyui_npo.training import trainer

        self._orig = orig = trainer.Trainer.run
        spy = self

        def run(trainer_self, denoiser, params, data, callbacks=None, *args, **kwargs):
            callbacks = dataclasses.replace(callbacks or trainer.Callbacks(), on_step=spy._wrap(callbacks))
            spy.result = orig(trainer_self, denoiser, params, data, callbacks, *args, **kwargs)
            return spy.result

        trainer.Trainer.run = run
        return self

    def _wrap(self, callbacks):
        inner = callbacks.on_step if callbacks is not None else (lambda done, total, value: None)
        last = [time.perf_counter()]

        def on_step(done: int, total: int, value: float) -> None:
            now = time.perf_counter()
            self.step_seconds.append(round(now - last[0], 3))
            last[0] = now
            self.loaded_fractions.append(loaded_fraction(self.mp))
            inner(done, total, value)

        return on_step

    def __exit__(self, *exc) -> None:
        from comfyui_npo.training import trainer

        trainer.Trainer.run = self._orig


def loaded_fraction(mp) -> float:
    """The share of the model's weights ComfyUI has on the load device (1.0 on the CPU, where it loads all)."""
    size = mp.model_size()
    return round(min(1.0, mp.loaded_size() / size), 4) if size else 1.0


@contextlib.contextmanager
def injected_oom(mp):
    """Raise torch.OutOfMemoryError in every forward of ``mp``'s diffusion model that records gradients (the
    student's), as a CUDA allocator does when a batch does not fit."""
    dm = mp.model.diffusion_model
    forward = dm.forward

    def oom_forward(*args, **kwargs):
        if torch.is_grad_enabled():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB (injected by gpu_check)")
        return forward(*args, **kwargs)

    dm.forward = oom_forward
    try:
        yield
    finally:
        del dm.forward


@contextlib.contextmanager
def comfy_vram_budget(visible_bytes: float, cuda: bool):
    """Make ComfyUI's model management see about ``visible_bytes`` free on the device, as starting it with
    ``--reserve-vram`` (the rest) would; yields what was done. Nothing on the CPU."""
    if not cuda:
        yield "n/a on the CPU (ComfyUI loads every weight there)"
        return
    import comfy.model_management as mm

    old = mm.EXTRA_RESERVED_VRAM
    free = mm.get_free_memory(mm.get_torch_device())
    mm.EXTRA_RESERVED_VRAM = max(old, int(free - visible_bytes))
    try:
        yield f"ComfyUI saw {visible_bytes / GIB:.2f} GiB free (reserved {mm.EXTRA_RESERVED_VRAM / GIB:.2f} GiB)"
    finally:
        mm.EXTRA_RESERVED_VRAM = old


def cuda_sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()
