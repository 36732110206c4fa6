"""LoHa, LoKr and DoRA offsets expanded to ΔW by ComfyUI's own weight adapters (``comfy.weight_adapter``).

The adapter computes the factors' ΔW (alpha applied, strength 1) on a zero weight of the factors' natural
shape: ΔW = adapter(0) − 0. A DoRA magnitude is left out of that call: ComfyUI's ``weight_decompose``
(v0.3.64 to v0.33.0) divides row-wise magnitudes by ‖W‖ instead of ‖W + ΔW‖ and broadcasts a 1-D
magnitude [out] against [out, 1] norms, so the decomposition is done by ``npo_core.offset.weight_decomposed``
once the keys are mapped onto the model's weight.

A LoKr whose second factor is in CP form (``lokr_t2``, convs) is handed to the adapter with that factor
rebuilt as a full ``lokr_w2`` (and the scale α/r it carried folded in): torch 2.14's ``kron`` refuses the
non-contiguous tensor the adapter's own ``einsum`` rebuild gives, and the adapter then logs an error and
leaves the weight unchanged.
"""

from __future__ import annotations

import dataclasses
import logging

import comfy.lora
import comfy.weight_adapter as weight_adapter
import torch

from ...npo_core.errors import NPOError
from ...npo_core.offset import Factored, NPOOffset

_ADAPTER = {"loha": "LoHaAdapter", "lokr": "LoKrAdapter", "dora": "LoRAAdapter"}
_MODULE = "npo_factored"
_TARGET = "npo_factored.weight"


class _Errors(logging.Handler):
    """Collects the errors ComfyUI's adapters log instead of raising (a failed ΔW is otherwise a silent 0)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def expanded(offset: NPOOffset) -> NPOOffset:
    """``offset`` with every Factored entry's ``delta`` (the factors' ΔW, natural shape) filled in."""
    if not any(isinstance(e, Factored) and e.delta is None for e in offset.entries.values()):
        return offset
    out = {}
    for key, e in offset.entries.items():
        if isinstance(e, Factored) and e.delta is None:
            e = dataclasses.replace(e, delta=_factors_delta(e, offset.source or "offset", key))
        out[key] = e
    return offset.replace(entries=out)


def _lokr_without_cp(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoKr's CP-form W2 = einsum("i j k l, j r, i p -> p r k l", t2, w2_b, w2_a) as a full ``lokr_w2``,
    with the same ΔW under the adapter's scaling rule (α / rank of the last low-rank factor, 1 if none)."""
    t = dict(tensors)
    w2 = torch.einsum("i j k l, j r, i p -> p r k l", t.pop("lokr_t2"), t["lokr_w2_b"], t["lokr_w2_a"])
    rank2 = t.pop("lokr_w2_b").shape[0]
    t.pop("lokr_w2_a")
    alpha = t.get("alpha")
    if alpha is not None:
        rank1 = t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
        w2 = w2 * (rank1 / rank2 if rank1 is not None else float(alpha) / rank2)
    t["lokr_w2"] = w2.contiguous()
    return t


def _factors_delta(e: Factored, source: str, key: str) -> torch.Tensor:
    tensors = {role: t for role, t in e.tensors.items() if role != "dora_scale"}
    if e.kind == "lokr" and "lokr_t2" in tensors:
        tensors = _lokr_without_cp(tensors)
    lora = {f"{_MODULE}.{role}": t for role, t in tensors.items()}
    patches = comfy.lora.load_lora(lora, {_MODULE: _TARGET}, log_missing=False)
    adapter = patches.get(_TARGET)
    wanted = getattr(weight_adapter, _ADAPTER[e.kind])
    if not isinstance(adapter, wanted):
        raise NPOError(
            f"{source}: '{key}': ComfyUI's weight adapters do not read these {e.kind} factors "
            f"({sorted(e.tensors)}); the file is incomplete or of a newer layout."
        )
    zero = torch.zeros(e.weight_shape, dtype=torch.float32)
    errors = _Errors()
    root = logging.getLogger()
    root.addHandler(errors)
    try:
        delta = comfy.lora.calculate_weight([(1.0, adapter, 1.0, None, None)], zero, _TARGET)
    finally:
        root.removeHandler(errors)
    if errors.messages:
        raise NPOError(
            f"{source}: '{key}': ComfyUI's {_ADAPTER[e.kind]} could not build ΔW from the factors "
            f"({errors.messages[0][:200]}); the file is corrupt or made for another model."
        )
    return delta.float()
