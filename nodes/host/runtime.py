"""ComfyUI services used during long work: logging, cancel, progress bar, out-of-memory errors.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from ...npo_core.errors import NPOError

log = logging.getLogger("comfyui-npo")


def interrupted() -> bool:
    """True once the user pressed Cancel (ComfyUI's interrupt flag); ``throw_if_interrupted`` then raises."""
    import comfy.model_management as mm

    return bool(mm.processing_interrupted())


def throw_if_interrupted() -> None:
    import comfy.model_management as mm

    mm.throw_exception_if_processing_interrupted()


_OOM_TYPES = (torch.cuda.OutOfMemoryError,)  # torch.OutOfMemoryError is the same class since torch 2.5
_OOM_WORDS = ("out of memory", "can't allocate memory", "not enough memory")


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA/ROCm raise OutOfMemoryError; the CPU and MPS allocators raise a RuntimeError saying so."""
    return isinstance(e, _OOM_TYPES) or (isinstance(e, RuntimeError) and any(w in str(e) for w in _OOM_WORDS))


@contextlib.contextmanager
def explain_out_of_memory(what: str, remedies: str):
    """Turn an out-of-memory error inside the block into an NPOError naming the knobs that lower memory.

    The original exception (whose traceback pins the frames holding the big tensors) is dropped
    before ComfyUI's cache is emptied, so the memory is really given back."""
    try:
        yield
    except (RuntimeError, *_OOM_TYPES) as e:
        if not is_out_of_memory(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    else:
        return
    import comfy.model_management

    comfy.model_management.soft_empty_cache()
    raise NPOError(f"out of memory during {what} ({first}). {remedies}")


def progress_bar(total: int):
    import comfy.utils

    return comfy.utils.ProgressBar(total)
