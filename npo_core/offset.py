"""NPO offsets: per-parameter weight deltas δ that the negative CFG pass adds to the model.

Sign convention: the negative/uncond pass runs θ_neg = θ_pos + strength·δ.
δ is *added*; the "negative" effect comes from sitting in the uncond slot of CFG.

Keys are parameter names relative to the diffusion model ("<module>.weight" / "<module>.bias") in the
naming of ``NPOOffset.naming``: "ldm" (the model's own names as ComfyUI builds it: ``input_blocks.1.1...``
for SD UNets, ``blocks.0.self_attn.q`` for Wan, ...), "diffusers" (``down_blocks.0.attentions.0...``),
"flat" (kohya: dots written as underscores), "unknown" or "mixed" (resolved only through a key map).
Only "ldm" offsets are applied; ``formats.resolve`` / ``formats.resolve_with_key_map`` convert the others.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .errors import NPOError


@dataclass(frozen=True)
class LowRank:
    """ΔW = (alpha / rank) · up @ down. Linear: up [out, r], down [r, in].
    Conv: up [out, r, 1, 1], down [r, in, kh, kw]. ``alpha=None`` means alpha = rank (scale 1)."""

    up: torch.Tensor
    down: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (int(self.up.shape[0]), int(self.down.shape[1]), *self.down.shape[2:])

    def delta(self) -> torch.Tensor:
        """Dense ΔW in fp32, shaped like the weight."""
        up = self.up.float().flatten(1)
        down = self.down.float().flatten(1)
        return (self.scale * (up @ down)).reshape(self.weight_shape)

    def scaled(self, s: float) -> LowRank:
        return LowRank(self.up.float() * (s * self.scale), self.down, None)

    def numel(self) -> int:
        return self.up.numel() + self.down.numel()


@dataclass(frozen=True)
class Dense:
    """ΔW (or Δb) stored in full, shaped like the parameter."""

    delta: torch.Tensor

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.delta.shape)

    def scaled(self, s: float) -> Dense:
        return Dense(self.delta.float() * s)

    def numel(self) -> int:
        return self.delta.numel()


@dataclass(frozen=True)
class FullWeight:
    """An absolute parameter value from a full UNet state dict (e.g. Self-NPO's ``unet.ckpt``).
    It becomes an offset δ = value − reference once resolved against a model's weights."""

    value: torch.Tensor

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    def numel(self) -> int:
        return self.value.numel()


@dataclass(frozen=True)
class Factored:
    """A LyCORIS LoHa / LoKr module or a DoRA LoRA, kept as the file's tensors under ComfyUI's names for them
    (``hada_w1_a``, ``lokr_w1``, ``lora_up.weight``, ``dora_scale``, ``alpha``, ...).

    ``delta`` is the factors' ΔW (alpha applied, strength 1), computed by the host's weight adapter, in the
    factors' natural shape until the keys are mapped. Without ``dora_scale`` it becomes a ``Dense`` entry when
    resolved. With one (``needs_weight``) the final ΔW = W' − W depends on the model's weight W
    (``weight_decomposed``); ``shape`` is then the parameter's."""

    kind: str  # "loha", "lokr" or "dora"
    tensors: Mapping[str, torch.Tensor]
    delta: torch.Tensor | None = None
    shape: tuple[int, ...] | None = None

    @property
    def needs_weight(self) -> bool:
        return "dora_scale" in self.tensors

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.shape is not None:
            return self.shape
        if self.delta is not None:
            return tuple(self.delta.shape)
        return factored_shape(self.kind, self.tensors)

    def fits(self, target: tuple[int, ...]) -> bool:
        """Same output rows and the same number of elements: ComfyUI reshapes the factors' product to the weight."""
        shape = self.weight_shape
        return len(target) >= 2 and shape[0] == target[0] and _numel(shape) == _numel(target)

    def numel(self) -> int:
        return sum(t.numel() for k, t in self.tensors.items() if k != "alpha")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _product_shape(a: torch.Tensor | None, b: torch.Tensor | None, full: torch.Tensor | None) -> tuple[int, ...]:
    """Shape of a factor that is either ``full`` or the product ``a @ b`` (flattened past dim 1)."""
    if full is not None:
        return tuple(full.shape)
    return (int(a.shape[0]), _numel(tuple(b.shape[1:])))


def factored_shape(kind: str, t: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """The shape of ΔW the factors make (LyCORIS's layout, as ComfyUI's adapters read it). CP/Tucker forms
    (``hada_t1``, ``lokr_t2``: ``einsum("i j k l, j r, i p -> p r k l", t, b, a)``) give [out, in, kh, kw];
    the others [out, everything else] that ComfyUI reshapes to the weight."""
    if kind == "dora":
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        return (int(up.shape[0]), int(down.shape[1]), *down.shape[2:])
    if kind == "loha":
        if "hada_t1" in t:
            return (int(t["hada_w1_a"].shape[1]), int(t["hada_w1_b"].shape[1]), *t["hada_t1"].shape[2:])
        return (int(t["hada_w1_a"].shape[0]), _numel(tuple(t["hada_w1_b"].shape[1:])))
    if kind == "lokr":
        w1 = _product_shape(t.get("lokr_w1_a"), t.get("lokr_w1_b"), t.get("lokr_w1"))
        if "lokr_t2" in t:
            w2 = (int(t["lokr_w2_a"].shape[1]), int(t["lokr_w2_b"].shape[1]), *t["lokr_t2"].shape[2:])
        else:
            w2 = _product_shape(t.get("lokr_w2_a"), t.get("lokr_w2_b"), t.get("lokr_w2"))
        if len(w2) == 4:  # ComfyUI: w1.unsqueeze(2).unsqueeze(2), then the Kronecker product
            return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
        return (w1[0] * w2[0], w1[1] * _numel(w2[1:]))
    raise NPOError(f"unknown factored offset kind '{kind}'")


Entry = LowRank | Dense | FullWeight | Factored


def weight_decomposed(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's weight W' = m · V / ‖V‖ with V = W + ΔW, in fp32. ‖V‖ is taken per output row when ``magnitude``
    has one value per row (PEFT's ``lora_magnitude_vector``, LyCORIS ``wd_on_out``), else per input column
    (LyCORIS's [1, in, …] layout); ComfyUI tells the two apart the same way (first dimension = rows)."""
    v = weight.float() + delta.float()
    m = magnitude.float()
    ones = [1] * (v.dim() - 1)
    if m.shape[0] == v.shape[0] and m.numel() == v.shape[0]:
        norm = v.flatten(1).norm(dim=1).reshape(v.shape[0], *ones)
        return v * m.reshape(v.shape[0], *ones) / norm
    if m.numel() == v.shape[1]:
        norm = v.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, v.shape[1], *ones[1:])
        return v * m.reshape(1, v.shape[1], *ones[1:]) / norm
    raise NPOError(
        f"a DoRA magnitude of shape {tuple(m.shape)} fits neither the rows ({v.shape[0]}) nor the columns "
        f"({v.shape[1]}) of a weight of shape {tuple(v.shape)}; the file was made for another model."
    )


@dataclass
class NPOOffset:
    """A set of parameter offsets plus what is known about them.

    ``entries`` maps parameter names (see module docstring) to LowRank / Dense / FullWeight.
    ``source_format`` is what the file was ("peft", "diffusers-lora", "kohya", "comfy",
    "full-state-dict", "npo-pack", ...); ``base_arch`` the family it was made for ("SD15", "SDXL",
    "SD2", or "unknown"); ``ignored`` lists file keys that are not UNet parameters (text encoder,
    VAE) and were deliberately left out, so the summary can show them.
    """

    entries: dict[str, Entry]
    naming: str = "ldm"
    source_format: str = "unknown"
    base_arch: str = "unknown"
    source: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    # entry key -> the module name as the file writes it (before ``.lora_up.weight``, ``.diff``, ...), for
    # mapping through a host's LoRA key map; empty for offsets made in memory (already in model names)
    file_modules: dict[str, str] = field(default_factory=dict)

    # ---- inspection -------------------------------------------------------------------------
    def modules(self) -> list[str]:
        return sorted({k.rsplit(".", 1)[0] for k in self.entries})

    def ranks(self) -> list[int]:
        return sorted({e.rank for e in self.entries.values() if isinstance(e, LowRank)})

    def kinds(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries.values():
            name = e.kind if isinstance(e, Factored) else type(e).__name__
            out[name] = out.get(name, 0) + 1
        return out

    def numel(self) -> int:
        return sum(e.numel() for e in self.entries.values())

    @property
    def is_resolved(self) -> bool:
        return self.naming == "ldm" and not any(isinstance(e, (FullWeight, Factored)) for e in self.entries.values())

    def summary(self) -> str:
        ranks = self.ranks()
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.kinds().items()))
        lines = [
            f"source: {self.source or '(in memory)'}",
            f"format: {self.source_format} (key naming: {self.naming})",
            f"base architecture: {self.base_arch}",
            f"layers: {len(self.modules())} modules, {len(self.entries)} tensors ({kinds})",
            f"rank: {', '.join(map(str, ranks)) if ranks else 'dense'}",
            f"parameters: {self.numel():,}",
        ]
        if self.ignored:
            lines.append(
                f"ignored (not UNet, NPO changes only the UNet): {len(self.ignored)} keys, e.g. {self.ignored[0]}"
            )
        recipe = self.metadata.get("npo.recipe")
        if recipe:
            lines.append(f"recipe: {recipe}")
        return "\n".join(lines)

    # ---- arithmetic -------------------------------------------------------------------------
    def replace(self, **changes) -> NPOOffset:
        return dataclasses.replace(self, **changes)

    def scaled(self, s: float) -> NPOOffset:
        """δ → s·δ (exact for low-rank: the scale is folded into ``up``)."""
        self._require_resolved("scale")
        return self.replace(entries={k: e.scaled(s) for k, e in self.entries.items()})

    def resolved_full_weights(self, reference: Callable[[str], torch.Tensor]) -> NPOOffset:
        """Turn FullWeight entries into Dense δ = value − reference(key). ``reference`` returns the
        model's current parameter (LDM name). Other entries pass through."""
        out: dict[str, Entry] = {}
        for k, e in self.entries.items():
            if isinstance(e, FullWeight):
                ref = reference(k)
                if tuple(ref.shape) != tuple(e.value.shape):
                    raise NPOError(
                        f"{self.source}: full weight '{k}' has shape {tuple(e.value.shape)} but the model's is "
                        f"{tuple(ref.shape)}; this state dict was made for another architecture."
                    )
                out[k] = Dense(e.value.float() - ref.float().to(e.value.device))
            else:
                out[k] = e
        return self.replace(entries=out)

    def resolved_decompositions(self, reference: Callable[[str], torch.Tensor]) -> NPOOffset:
        """Turn DoRA-weighted Factored entries (mapped onto the model's names) into Dense ΔW = W' − W with
        W = reference(key), the model's current parameter; other entries pass through."""
        out: dict[str, Entry] = {}
        for k, e in self.entries.items():
            if isinstance(e, Factored) and e.needs_weight and e.delta is not None:
                w = reference(k).float()
                try:
                    decomposed = weight_decomposed(w, e.delta.to(w.device), e.tensors["dora_scale"].to(w.device))
                except NPOError as err:
                    raise NPOError(f"{self.source}: '{k}': {err}") from None
                out[k] = Dense(decomposed - w)
            else:
                out[k] = e
        return self.replace(entries=out)

    def plus(self, other: NPOOffset) -> NPOOffset:
        """δ_a + δ_b. Two low-rank entries on one key are concatenated along the rank (exact)."""
        self._require_resolved("add")
        other._require_resolved("add")
        out: dict[str, Entry] = dict(self.entries)
        for k, e in other.entries.items():
            if k not in out:
                out[k] = e
                continue
            a = out[k]
            if isinstance(a, LowRank) and isinstance(e, LowRank):
                a1, e1 = a.scaled(1.0), e.scaled(1.0)
                out[k] = LowRank(
                    torch.cat([a1.up.float(), e1.up.float()], 1), torch.cat([a1.down.float(), e1.down.float()], 0)
                )
            else:
                out[k] = Dense(_dense(a).float() + _dense(e).float().to(_dense(a).device))
        return self.replace(entries=out, source_format="combined")

    def compressed(self, rank: int, min_size: int = 2) -> tuple[NPOOffset, float]:
        """Best rank-r approximation (Eckart–Young) of every 2-D+ entry whose rank exceeds r: dense
        entries by SVD, low-rank entries by QR of up/down and an SVD of the small core. Returns the new
        offset and the energy kept, Σ kept σ² / Σ σ² over the compressed entries (1.0 when none needed
        it). 1-D entries (biases, norm scales) stay dense."""
        self._require_resolved("compress")
        if rank < 1:
            raise NPOError(f"rank must be ≥ 1, got {rank}")
        kept = total = 0.0
        count = 0
        out: dict[str, Entry] = {}
        for k, e in self.entries.items():
            shape = e.weight_shape
            if len(shape) < min_size:
                out[k] = e
                continue
            if isinstance(e, Dense) and min(shape[0], e.delta[0].numel()) > rank:
                u, s, vh = torch.linalg.svd(e.delta.float().flatten(1), full_matrices=False)
                left, right = u[:, :rank] * s[:rank], vh[:rank]
            elif isinstance(e, LowRank) and e.rank > rank:
                qu, ru = torch.linalg.qr(e.up.float().flatten(1) * e.scale)
                qd, rd = torch.linalg.qr(e.down.float().flatten(1).T)
                a, s, bh = torch.linalg.svd(ru @ rd.T)
                left, right = (qu @ a[:, :rank]) * s[:rank], (qd @ bh[:rank].T).T
            else:
                out[k] = e
                continue
            s2 = s.square()
            kept += float(s2[:rank].sum())
            total += float(s2.sum())
            count += 1
            up = left.reshape(shape[0], rank, *([1] * (len(shape) - 2)))
            out[k] = LowRank(up.contiguous(), right.reshape(rank, *shape[1:]).contiguous(), None)
        energy = 1.0 if total == 0 else kept / total
        meta = dict(
            self.metadata,
            **{"npo.svd_rank": str(rank), "npo.svd_energy": f"{energy:.6f}", "npo.svd_entries": str(count)},
        )
        return self.replace(entries=out, metadata=meta), energy

    def _require_resolved(self, what: str) -> None:
        if not self.is_resolved:
            raise NPOError(
                f"{self.source or 'offset'}: cannot {what} before it is resolved against a model "
                "(it holds full weights or non-ComfyUI key names); apply it to a model first."
            )


def _dense(e: Entry) -> torch.Tensor:
    if isinstance(e, LowRank):
        return e.delta()
    if isinstance(e, Dense):
        return e.delta
    raise NPOError("a full-weight or LoHa/LoKr/DoRA entry must be resolved against a model before arithmetic")


def negative_offset(
    offset: NPOOffset,
    strength: float = 1.0,
    merge_weight: float = 0.0,
    positive: Mapping[str, torch.Tensor] | None = None,
    base: Mapping[str, torch.Tensor] | None = None,
) -> NPOOffset:
    """The offset to add to θ_pos so the negative pass runs the authors' merged weights:

        θ_neg = θ_base + s·δ + (1 − m)·(θ_pos − θ_base)   ⇔   θ_neg − θ_pos = s·δ − m·(θ_pos − θ_base)

    s = ``strength``, m = ``merge_weight`` (``--merge_weight`` in gen.py / gen_xl.py). m = 0 (the
    authors' default) gives θ_pos + s·δ and needs no base. For m > 0, ``positive`` and ``base``
    map LDM parameter names to the two models' weights; keys where they differ get a dense term.
    """
    if not (0.0 <= merge_weight <= 1.0):
        raise NPOError(f"merge_weight must be in [0, 1], got {merge_weight}")
    out = offset.scaled(strength)
    if merge_weight == 0.0:
        return out
    if positive is None or base is None:
        raise NPOError(
            "merge_weight > 0 needs base_model: connect the original base checkpoint (e.g. SD1.5 or "
            "SDXL base) the offset was trained against, or set merge_weight to 0."
        )
    missing = sorted(set(positive) ^ set(base))
    if missing:
        raise NPOError(
            f"base_model and model have different parameters (e.g. {missing[:3]}); base_model must be "
            "the same architecture as model."
        )
    extra: dict[str, Entry] = {}
    for k in positive:
        p, b = positive[k], base[k]
        if p.shape != b.shape:
            raise NPOError(
                f"base_model parameter '{k}' has shape {tuple(b.shape)}, model has {tuple(p.shape)}; "
                "base_model must be the same architecture as model."
            )
        d = p.float() - b.float().to(p.device)
        if torch.count_nonzero(d):
            extra[k] = Dense(-merge_weight * d)
    return out.plus(NPOOffset(extra, source_format="merge"))
