"""Per-row offset injection: forward hooks that add offset(x) to selected batch rows only.

ComfyUI evaluates cond and uncond in ONE batched UNet call. NPO must change only the rows of the
negative/uncond chunk: each hooked layer computes y = f(x) as usual, then adds Δ(x[rows]) to
y[rows], where Δ is the layer's response to its weight offset (low-rank: up·(down·x)·scale; dense:
ΔW·x; norms: normalize(x)·Δγ + Δβ). No weight is copied or modified. Outside a ``RowGate.active``
block the hooks return immediately, so a hook left attached can never change another model's output.

One injector can be attached to several copies of the model at once (multi-GPU clones, each with its
own module tree), and the gate is per thread, so copies running in parallel threads each see only
the rows of their own forward.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import NPOError
from .offset import Dense, Entry, Factored, FullWeight, LowRank, NPOOffset

UNCOND = 1  # ComfyUI's cond_or_uncond value for the negative/uncond chunk (0 = positive)


class RowGate:
    """Which batch rows the injected offset applies to during the current forward in this thread
    (None: none), and the batch size of that forward (to recognise layers that fold the batch)."""

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def rows(self) -> list[slice] | None:
        return getattr(self._local, "rows", None)

    @property
    def batch(self) -> int | None:
        return getattr(self._local, "batch", None)

    @contextlib.contextmanager
    def active(self, rows: list[slice] | None, batch: int | None = None) -> Iterator[None]:
        previous = self.rows, self.batch
        self._local.rows, self._local.batch = rows or None, batch
        try:
            yield
        finally:
            self._local.rows, self._local.batch = previous


def chunk_row_mask(cond_or_uncond: Sequence[int] | None, batch: int, select: int = UNCOND) -> torch.Tensor:
    """Bool mask [batch]: True on rows of the chunks whose ``cond_or_uncond`` entry equals ``select``.
    ComfyUI concatenates equal-sized chunks in ``cond_or_uncond`` order."""
    mask = torch.zeros(batch, dtype=torch.bool)
    if not cond_or_uncond:
        return mask
    n = len(cond_or_uncond)
    if batch % n:
        raise NPOError(
            f"batch {batch} is not a multiple of the {n} cond/uncond chunks; cannot tell which rows are uncond"
        )
    size = batch // n
    for i, kind in enumerate(cond_or_uncond):
        if kind == select:
            mask[i * size : (i + 1) * size] = True
    return mask


def layer_rows(
    name: str, shape: torch.Size, rows: list[slice], batch: int | None, folded: bool = False
) -> list[tuple[slice, ...]]:
    """Index tuples selecting the negative rows in a layer's input/output of ``shape``.

    Most layers see the batch on dim 0. Some do not, and each layout is recognised by its shape:
    - [1, B·L, C]: the batch folded into the sequence (PixArt's cross-attention ``kv_linear`` runs on every
      row's text at once): row i is the i-th run of L positions on dim 1;
    - [L, B, C]: sequence first (HunyuanDiT's attention pooler);
    - [B·L, ...] for layers the host declares ``folded``, row-major ([B, L, C] viewed as [B·L, C]: HunyuanDiT's
      ``mlp_t5``; [B, T, C, H, W] as [B·T, C, H, W]: CogVideoX's patch-embedding Conv2d); the shape alone cannot
      tell this from other layouts, so the declaration wins over the shape checks below.
    Rows covering the whole call select everything. Any other layout is refused, never guessed."""
    if batch is None or shape[0] == batch:
        return [(sl,) for sl in rows]
    if len(rows) == 1 and rows[0].start == 0 and rows[0].stop == batch:
        return [(slice(None),)]
    if folded and len(shape) >= 2 and shape[0] % batch == 0:
        per_row = shape[0] // batch
        return [(slice(sl.start * per_row, sl.stop * per_row),) for sl in rows]
    if len(shape) >= 3 and shape[0] == 1 and shape[1] % batch == 0:
        per_row = shape[1] // batch
        return [(slice(None), slice(sl.start * per_row, sl.stop * per_row)) for sl in rows]
    if len(shape) >= 3 and shape[1] == batch:
        return [(slice(None), sl) for sl in rows]
    raise NPOError(
        f"'{name}': the layer's input has shape {tuple(shape)} in a model call of batch {batch}: the batch is not on "
        "dim 0 (nor folded into the sequence), so the negative rows cannot be told apart there. Leave this "
        "layer out of the offset."
    )


def mask_to_slices(mask: torch.Tensor) -> list[slice]:
    """Contiguous runs of True as slices (uncond chunks are contiguous, so usually one slice)."""
    out: list[slice] = []
    start = None
    for i, v in enumerate(mask.tolist()):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append(slice(start, i))
            start = None
    if start is not None:
        out.append(slice(start, len(mask)))
    return out


class _LayerOffset:
    """The offset of one module (weight and/or bias), cached per (device, dtype)."""

    def __init__(self, name: str, module: nn.Module, weight: Entry | None, bias: Entry | None, strength: float) -> None:
        self.name = name
        self.kind = _module_kind(name, module)
        if isinstance(weight, FullWeight) or isinstance(bias, FullWeight):
            raise NPOError(f"'{name}': full weights must be resolved to offsets before injection")
        if isinstance(weight, LowRank):
            if self.kind not in ("linear", "conv") or getattr(module, "groups", 1) != 1:
                raise NPOError(f"'{name}': a low-rank offset on a {type(module).__name__} layer is not supported")
            w = weight.scaled(strength)
            self.lowrank: tuple[torch.Tensor, torch.Tensor] | None = (w.down.float(), w.up.float())
            self.dense = None
        else:
            self.lowrank = None
            self.dense = None if weight is None else weight.delta.float() * strength
        self.bias = None if bias is None else bias.delta.float() * strength
        if isinstance(bias, LowRank):
            raise NPOError(f"'{name}': low-rank bias offsets are not supported")
        self._cache: dict[tuple[torch.device, torch.dtype], tuple] = {}

    def tensors(self, device: torch.device, dtype: torch.dtype) -> tuple:
        key = (device, dtype)
        hit = self._cache.get(key)
        if hit is None:
            conv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
            lr = None if self.lowrank is None else (conv(self.lowrank[0]), conv(self.lowrank[1]))
            hit = (lr, conv(self.dense), conv(self.bias))
            self._cache[key] = hit
        return hit

    def response(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Δy for input rows x: what the output changes by when the parameters move by the offset."""
        lr, dw, db = self.tensors(x.device, x.dtype)
        k = self.kind
        if k == "linear":
            if lr is not None:
                y = F.linear(F.linear(x, lr[0]), lr[1])
            elif dw is not None:
                y = F.linear(x, dw)
            else:
                y = torch.zeros((*x.shape[:-1], db.shape[0]), device=x.device, dtype=x.dtype)
            return y if db is None else y + db
        if k == "conv":
            conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.dim() - 2]
            m = module
            if lr is not None:
                y = conv(conv(x, lr[0], None, m.stride, m.padding, m.dilation), lr[1])
            elif dw is not None:
                y = conv(x, dw, None, m.stride, m.padding, m.dilation, m.groups)
            else:
                y = conv(
                    x,
                    torch.zeros((db.shape[0], x.shape[1] // m.groups, *m.kernel_size), device=x.device, dtype=x.dtype),
                    None,
                    m.stride,
                    m.padding,
                    m.dilation,
                    m.groups,
                )
            return y if db is None else y + db.view(1, -1, *([1] * (y.dim() - 2)))
        if k == "groupnorm":
            normed = F.group_norm(x, module.num_groups, None, None, module.eps)
            shape = (1, -1, *([1] * (x.dim() - 2)))
            y = normed * dw.view(shape) if dw is not None else torch.zeros_like(x)
            return y if db is None else y + db.view(shape)
        if k == "layernorm":
            normed = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
            y = normed * dw if dw is not None else torch.zeros_like(x)
            return y if db is None else y + db
        if k == "rmsnorm":
            if db is not None:
                raise NPOError(f"'{self.name}': RMSNorm has no bias; the offset's bias cannot be applied")
            return _rms_normalized(module, x) * dw
        raise AssertionError(k)


def _rms_normalized(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x / rms(x) over the normalized dims, with the module's eps (None: the dtype's machine epsilon, as
    torch's and ComfyUI's RMSNorm do)."""
    shape = getattr(module, "normalized_shape", None) or (x.shape[-1],)
    if isinstance(shape, int):
        shape = (shape,)
    return F.rms_norm(x, tuple(shape), None, module.eps)


def _module_kind(name: str, module: nn.Module) -> str:
    """The layer kind the offset's response is computed for. "linear" covers nn.Linear and the Linear
    layers of quantized / mixed-precision checkpoints that are plain ``nn.Module``s with
    ``in_features``/``out_features`` (their weight is never read: Δ(x) needs x and the shapes only)."""
    if isinstance(module, nn.Linear) or (
        isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int)
    ):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(module, nn.GroupNorm):
        return "groupnorm"
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    if _is_rmsnorm(module):
        return "rmsnorm"
    raise NPOError(
        f"'{name}': an offset on a {type(module).__name__} layer is not supported (Linear, quantized Linear, "
        "Conv, GroupNorm, LayerNorm and RMSNorm are). Leave this layer out of the offset."
    )


def _is_rmsnorm(module: nn.Module) -> bool:
    rms = getattr(nn, "RMSNorm", None)
    return (rms is not None and isinstance(module, rms)) or (
        type(module).__name__ == "RMSNorm" and hasattr(module, "eps") and hasattr(module, "weight")
    )


class OffsetInjector:
    """Forward hooks for a resolved (LDM-named) offset on one or more ``root`` modules (UNet copies).

    Δ is added to the rows in ``gate.rows`` only; ``strength`` multiplies δ. The per-layer offsets
    (and their per-device casts) are shared by every root.
    """

    def __init__(self, offset: NPOOffset, strength: float, gate: RowGate, folded: frozenset[str] = frozenset()) -> None:
        if not offset.is_resolved:
            raise NPOError(f"{offset.source or 'offset'}: resolve it against the model before injecting")
        self.offset = offset
        self.strength = float(strength)
        self.gate = gate
        self.folded = folded  # modules whose input folds the batch into dim 0, [B·L, ...] (see ``layer_rows``)
        self._lock = threading.Lock()
        self._handles: dict[int, tuple[nn.Module, list]] = {}  # id(root) -> (root, hook handles)
        self._layers: dict[str, _LayerOffset] = {}

    def is_attached(self, root: nn.Module) -> bool:
        entry = self._handles.get(id(root))
        return entry is not None and entry[0] is root

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def _modules(self, root: nn.Module) -> list[tuple[nn.Module, _LayerOffset]]:
        by_module: dict[str, dict[str, Entry]] = {}
        for k, e in self.offset.entries.items():
            module, leaf = k.rsplit(".", 1)
            by_module.setdefault(module, {})[leaf] = e
        out = []
        for name, parts in sorted(by_module.items()):
            bare = sorted(set(parts) - {"weight", "bias"})
            if bare:
                raise NPOError(
                    f"{self.offset.source or 'offset'}: a delta on the bare parameter '{name}.{bare[0]}' (not a "
                    "layer's weight or bias, e.g. Wan's modulation or LTX's scale_shift_table) cannot be applied "
                    "to the negative rows only. Remove it from the offset (train or save it without that "
                    "parameter)."
                )
            try:
                module = root.get_submodule(name)
            except AttributeError as err:
                raise NPOError(f"{self.offset.source or 'offset'}: module '{name}' not found in the model") from err
            layer = self._layers.get(name)
            if layer is None:
                layer = _LayerOffset(name, module, parts.get("weight"), parts.get("bias"), self.strength)
                self._layers[name] = layer
            out.append((module, layer))
        return out

    def check(self, root: nn.Module) -> None:
        """Raise now (not at the first sampling step) for an offset on a layer kind or name the pack cannot
        take in ``root``."""
        with self._lock:
            self._modules(root)

    def attach(self, root: nn.Module) -> None:
        with self._lock:
            if self.is_attached(root):
                return
            self._detach_locked(root)
            gate = self.gate
            handles = []
            for module, layer in self._modules(root):
                folded = layer.name in self.folded

                def hook(
                    mod: nn.Module, args: tuple, out: torch.Tensor, layer: _LayerOffset = layer, folded: bool = folded
                ) -> torch.Tensor | None:
                    rows = gate.rows
                    if rows is None:
                        return None
                    x = args[0]
                    for index in layer_rows(layer.name, x.shape, rows, gate.batch, folded):
                        out[index].add_(layer.response(mod, x[index]))  # indices are slices: a view
                    return out

                handles.append(module.register_forward_hook(hook))
            self._handles[id(root)] = (root, handles)

    def _detach_locked(self, root: nn.Module | None) -> None:
        keys = list(self._handles) if root is None else [id(root)]
        for key in keys:
            _, handles = self._handles.pop(key, (None, []))
            for h in handles:
                h.remove()

    def detach(self, root: nn.Module | None = None) -> None:
        """Remove the hooks from ``root`` (None: from every root)."""
        with self._lock:
            self._detach_locked(root)

    @contextlib.contextmanager
    def attached_to(self, root: nn.Module) -> Iterator[None]:
        """Attach to ``root`` for the duration of the block if not attached there already."""
        was = self.is_attached(root)
        if not was:
            self.attach(root)
        try:
            yield
        finally:
            if not was:
                self.detach(root)


def dense_cost_note(offset: NPOOffset) -> str:
    """One line on what an offset costs per negative pass, for logs and the Load node's summary."""
    dense = sum(e.numel() for e in offset.entries.values() if isinstance(e, (Dense, FullWeight)))
    dense += sum(math.prod(e.weight_shape) for e in offset.entries.values() if isinstance(e, Factored))
    low = sum(e.numel() for e in offset.entries.values() if isinstance(e, LowRank))
    return f"{low:,} low-rank + {dense:,} dense offset parameters evaluated on the negative rows"
