"""Mapping an offset's file keys onto a model's parameters through the host's LoRA key map.

``key_map`` (ComfyUI's ``model_lora_keys_unet`` convention): file module name, as a LoRA file writes it
before ``.lora_up.weight`` / ``.diff`` / ... → the model parameter it patches, either
``"<prefix><module>.weight"`` or a tuple ``(that key, (dim, start, length) | None[, function])``: the file
module is a *slice* of a fused weight (Flux's diffusers ``to_q`` is rows 0…h of ``img_attn.qkv``), and
``function`` (a fixed row permutation such as swap_scale_shift) reorders the file's rows into the model's.

Every slice is placed into a full-size entry of its parameter: low-rank slices stay low-rank (their ``up``
rows, or ``down`` columns for dim 1, sit at the slice and are zero elsewhere, so ΔW is exactly the file's),
dense ones become a dense ΔW. Several slices of one parameter (to_q, to_k, to_v) are concatenated along
the rank. Keys that land nowhere are an error listing them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .errors import NPOError
from .formats import _fit_shape, file_key, raise_unmatched
from .offset import Dense, Entry, Factored, FullWeight, LowRank, NPOOffset

Slice = tuple[int, int, int]  # (dim, start, length)


@dataclass(frozen=True)
class _Target:
    name: str  # parameter name relative to the model
    part: Slice | None
    function: Callable[[torch.Tensor], torch.Tensor] | None


def resolve_with_key_map(
    offset: NPOOffset,
    key_map: Mapping[str, object],
    targets: Mapping[str, tuple[int, ...]],
    prefix: str,
    model_arch: str,
) -> NPOOffset:
    """``offset`` in the model's parameter names (relative, without ``prefix``), checked against
    ``targets`` (name → shape). FullWeight entries stay absolute (they never map to slices)."""
    src = offset.source or "offset"
    placed: dict[str, list[tuple[str, Entry, _Target]]] = {}
    unmatched: list[str] = []
    for key, entry in offset.entries.items():
        target = _target_of(key, offset.file_modules.get(key), key_map, targets, prefix)
        if target is None:
            unmatched.append(file_key(offset, key))
            continue
        placed.setdefault(target.name, []).append((key, entry, target))
    if unmatched:
        raise_unmatched(src, unmatched, len(offset.entries), model_arch)
    out: dict[str, Entry] = {}
    for name, parts in placed.items():
        out[name] = _combine(src, name, parts, tuple(targets[name]))
    return offset.replace(entries=out, naming="ldm")


def _normalise(value, prefix: str) -> _Target | None:
    if isinstance(value, str):
        name, part, function = value, None, None
    elif isinstance(value, tuple) and value and isinstance(value[0], str):
        name = value[0]
        part = tuple(value[1]) if len(value) > 1 and value[1] is not None else None
        function = value[2] if len(value) > 2 else None
    else:
        return None
    if not name.startswith(prefix):
        return None
    return _Target(name[len(prefix) :], part, function)


def _target_of(key, module, key_map, targets, prefix) -> _Target | None:
    """Where entry ``key`` (file module ``module``) lands: the key map first, then the model's own names."""
    if module is None:  # made in memory: already the model's names
        return _Target(key, None, None) if key in targets else None
    leaf = key.rsplit(".", 1)[-1] if key.endswith((".weight", ".bias")) else ""
    own = [f"{module}.{leaf}" if leaf else module]
    if leaf == "weight":
        t = _normalise(key_map.get(module), prefix)
        if t is not None and t.name in targets:
            return t
    elif leaf == "bias":
        t = _normalise(key_map.get(module), prefix)
        if t is not None and t.part is None and t.function is None and t.name.endswith(".weight"):
            bias = t.name[: -len("weight")] + "bias"
            if bias in targets:
                return _Target(bias, None, None)
        t = _normalise(key_map.get(f"{module}.bias"), prefix)
        if t is not None and t.name in targets:
            return t
    else:  # a bare parameter: ComfyUI's generic map lists it under its full name
        t = _normalise(key_map.get(module), prefix)
        if t is not None and t.name in targets:
            return t
    for name in own:
        for cand in (name[len(prefix) :] if name.startswith(prefix) else None, name):
            if cand is not None and cand in targets:
                return _Target(cand, None, None)
    return None


def _combine(src: str, name: str, parts: list[tuple[str, Entry, _Target]], shape: tuple[int, ...]) -> Entry:
    if len(parts) == 1 and parts[0][2].part is None and parts[0][2].function is None:
        key, entry, _ = parts[0]
        return _fit_shape(src, key, entry, shape)
    if any(isinstance(e, FullWeight) for _, e, _ in parts):
        raise NPOError(f"{src}: full weights for '{name}' come from several keys or a slice; the file is inconsistent.")
    if any(t.part is None for _, _, t in parts) and len(parts) > 1:
        raise NPOError(f"{src}: several keys ({', '.join(k for k, _, _ in parts)}) map to the same parameter '{name}'.")
    _check_disjoint(src, name, parts)
    placed = [_place(src, key, entry, t, shape) for key, entry, t in parts]
    if all(isinstance(p, LowRank) for p in placed):
        return LowRank(torch.cat([p.up for p in placed], 1), torch.cat([p.down for p in placed], 0))
    total = torch.zeros(shape, dtype=torch.float32)
    for p in placed:
        total += p.delta() if isinstance(p, LowRank) else p.delta.float()
    return Dense(total)


def _check_disjoint(src: str, name: str, parts) -> None:
    spans: list[tuple[int, int, int, str]] = []
    for key, _, t in parts:
        if t.part is None:
            continue
        dim, start, length = t.part
        for d, s, n, other in spans:
            if d == dim and start < s + n and s < start + length:
                raise NPOError(f"{src}: '{key}' and '{other}' both patch rows {start}… of '{name}'.")
        spans.append((dim, start, length, key))


def _place(src: str, key: str, entry: Entry, t: _Target, shape: tuple[int, ...]) -> Entry:
    """``entry`` (the file's ΔW of the slice, in the file's row order) as a full-size entry of ``t.name``."""
    if len(shape) != 2:
        raise NPOError(f"{src}: '{key}' is a slice of '{t.name}' with shape {shape}; only Linear weights are sliced.")
    dim, start, length = t.part if t.part is not None else (0, 0, shape[0])
    if dim not in (0, 1):
        raise NPOError(
            f"{src}: '{key}' slices '{t.name}' on dim {dim}; only dims 0 and 1 of a Linear weight are known."
        )
    if start < 0 or start + length > shape[dim]:
        raise NPOError(
            f"{src}: the key map places '{key}' at {start}…{start + length} on dim {dim} of '{t.name}', which has "
            f"only {shape[dim]} there (ComfyUI's map for this family assumes another head layout). Use a file in "
            "the model's own names (diffusion_model.…) instead."
        )
    sub = list(shape)
    sub[dim] = length
    if not isinstance(entry, Factored) and tuple(entry.weight_shape) != tuple(sub):
        raise NPOError(
            f"{src}: '{key}' has shape {tuple(entry.weight_shape)} but its slice of the model's '{t.name}' is "
            f"{tuple(sub)}. The offset was made for another architecture; use one made for this model."
        )
    if isinstance(entry, Factored):
        if entry.needs_weight or entry.delta is None:
            raise NPOError(
                f"{src}: '{key}' is a DoRA (weight-decomposed) module on a slice of the fused '{t.name}'; DoRA is "
                "read only where a file module is a whole parameter. Use a file in the model's own names "
                "(diffusion_model.…) or one trained without DoRA."
            )
        if not entry.fits(tuple(sub)):
            raise NPOError(
                f"{src}: '{key}' makes a ΔW of shape {tuple(entry.weight_shape)} but its slice of the model's "
                f"'{t.name}' is {tuple(sub)}. The offset was made for another architecture; use one made for this "
                "model."
            )
        entry = Dense(entry.delta.float().reshape(sub))
    fn = t.function or (lambda w: w)
    if isinstance(entry, LowRank):
        up = entry.up.float().flatten(1) * entry.scale
        down = entry.down.float().flatten(1)
        if dim == 0:
            full_up = torch.zeros(shape[0], up.shape[1])
            full_up[start : start + length] = _rows(fn, up, key, src)
            return LowRank(full_up, down)
        if t.function is not None:
            raise NPOError(f"{src}: '{key}': a row function on a dim-1 slice is not known.")
        full_down = torch.zeros(down.shape[0], shape[1])
        full_down[:, start : start + length] = down
        return LowRank(up, full_down)
    full = torch.zeros(shape, dtype=torch.float32)
    full.narrow(dim, start, length).copy_(_rows(fn, entry.delta.float(), key, src))
    return Dense(full)


def _rows(fn, w: torch.Tensor, key: str, src: str) -> torch.Tensor:
    out = fn(w)
    if tuple(out.shape) != tuple(w.shape):
        raise NPOError(f"{src}: '{key}': the key map's function changes the shape; cannot place it.")
    return out
