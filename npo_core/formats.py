"""Reading, recognising, converting and writing NPO offset files.

Understood:
- diffusers / PEFT LoRA: ``[unet.|base_model.model.]<diffusers module>.{lora.up|lora.down|lora_B|lora_A|
  lora_linear_layer.up|...}.weight`` (no alpha → scale 1; the authors' released files);
- kohya: ``lora_unet_<module with _>.{lora_up,lora_down}.weight`` + ``.alpha``;
- ComfyUI: ``diffusion_model.<ldm module>.{lora_up.weight,lora_down.weight,alpha,diff,diff_b}``;
- LyCORIS LoHa (``hada_w1_a/b``, ``hada_w2_a/b``[, ``hada_t1/t2``]) and LoKr (``lokr_w1`` or ``lokr_w1_a/b``,
  ``lokr_w2`` or ``lokr_w2_a/b``[, ``lokr_t2``]) modules, and DoRA LoRAs (``dora_scale``, or PEFT's
  ``lora_magnitude_vector``), in any of the namings above: kept as ``Factored`` entries that the host's
  weight adapters turn into a dense ΔW;
- full UNet state dicts (diffusers or LDM names, e.g. Self-NPO's ``unet.ckpt``): absolute weights,
  turned into δ = θ_file − θ_reference when applied.
Pickles load only through ``torch.load(weights_only=True)``. Everything else is refused with an
``NPOError`` that names the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from . import families
from .atomic import atomic_write
from .errors import NPOError
from .offset import Dense, Entry, Factored, FullWeight, LowRank, NPOOffset

FORMAT_VERSION = "1"
SAFETENSORS_EXT = (".safetensors", ".sft")
PICKLE_EXT = (".ckpt", ".pt", ".pth", ".bin")

# (suffix, role) — longest/most specific first; matched with str.endswith.
_LORA_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_linear_layer.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    ("_lora.up.weight", "up"),
    ("_lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_A.default.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_magnitude_vector.default.weight", "magnitude"),
    (".lora_magnitude_vector.weight", "magnitude"),
    (".lora_magnitude_vector.default", "magnitude"),
    (".lora_magnitude_vector", "magnitude"),
    (".dora_scale", "dora_scale"),
    (".hada_w1_a", "hada_w1_a"),
    (".hada_w1_b", "hada_w1_b"),
    (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"),
    (".hada_t1", "hada_t1"),
    (".hada_t2", "hada_t2"),
    (".lokr_w1_a", "lokr_w1_a"),
    (".lokr_w1_b", "lokr_w1_b"),
    (".lokr_w2_a", "lokr_w2_a"),
    (".lokr_w2_b", "lokr_w2_b"),
    (".lokr_w1", "lokr_w1"),
    (".lokr_w2", "lokr_w2"),
    (".lokr_t2", "lokr_t2"),
    (".alpha", "alpha"),
    (".diff_b", "diff_b"),
    (".diff", "diff"),
)
# marker in a key → why that adapter cannot be an NPO offset here
_UNSUPPORTED_MARKERS: tuple[tuple[str, str], ...] = (
    (".oft_", "OFT/BOFT rotate the weight (W' = R·W): ComfyUI's strength is not a scale of one ΔW"),
    (".lora_mid.", "LoCon's CP-decomposed 'lora_mid' layers are not read"),
    (".set_weight", "'set_weight' replaces the weight instead of adding to it"),
    (".w_norm", "norm-layer 'w_norm'/'b_norm' patches are not read"),
    (".b_norm", "norm-layer 'w_norm'/'b_norm' patches are not read"),
)
_LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_UNET_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "unet.", "model.")
_NON_UNET_PREFIXES = (
    "text_encoder",
    "lora_te",
    "te_",
    "te1_",
    "te2_",
    "te1.",
    "te2.",
    "cond_stage_model.",
    "conditioner.",
    "first_stage_model.",
    "vae.",
    "clip_l.",
    "clip_g.",
    "text_model.",
    "text_encoders.",
    "model_ema.",
    "lora_te1_",
    "lora_te2_",
)
_LDM_ROOTS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")
_DIFFUSERS_ROOTS = (
    "down_blocks",
    "up_blocks",
    "mid_block",
    "conv_in",
    "conv_out",
    "conv_norm_out",
    "time_embedding",
    "add_embedding",
)


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and safetensors header metadata of ``path``. Refuses non-tensor pickles."""
    p = Path(path)
    name = p.name
    if not p.is_file():
        raise NPOError(f"{name}: file not found ({p}).")
    if p.stat().st_size == 0:
        raise NPOError(f"{name}: the file is empty; download or save it again.")
    ext = p.suffix.lower()
    if ext in SAFETENSORS_EXT:
        return _read_safetensors(p)
    if ext in PICKLE_EXT:
        return _read_pickle(p), {}
    raise NPOError(
        f"{name}: unknown file type '{ext}'; NPO offsets are .safetensors (or .ckpt/.pt/.pth/.bin "
        "holding plain tensors)."
    )


def _read_safetensors(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for broken headers/buffers
        raise NPOError(
            f"{p.name}: not a readable safetensors file ({type(e).__name__}: {e}). The file is truncated "
            "or corrupt; download or save it again."
        ) from e
    return sd, meta


def _read_pickle(p: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise NPOError(
            f"{p.name}: refused. Pickled files load only if they hold plain tensors "
            f"(torch.load weights_only=True failed: {type(e).__name__}: {str(e)[:200]}). Convert it to "
            ".safetensors with a tool you trust."
        ) from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise NPOError(f"{p.name}: expected a dict of tensors (a state dict), got {type(obj).__name__}.")
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise NPOError(f"{p.name}: entries that are not tensors: {bad[:5]}; expected a plain state dict.")
    return {str(k): v for k, v in obj.items()}


def load_offset(path: str | os.PathLike) -> NPOOffset:
    """Read and parse an offset file (any supported format). The result may still need ``resolve``."""
    sd, meta = read_state_dict(path)
    return parse_state_dict(sd, meta, source=Path(path).name)


# ---------------------------------------------------------------------------------------------
# recognising
# ---------------------------------------------------------------------------------------------
def _split_role(key: str) -> tuple[str, str] | None:
    for suffix, role in _LORA_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _strip_prefix(module: str) -> tuple[str, str] | None:
    """(naming, module path) or None for a non-UNet key."""
    if module.startswith("lora_unet_"):
        return "flat", module[len("lora_unet_") :]
    if module.startswith("lycoris_"):
        return "flat", module[len("lycoris_") :]
    for pre in _NON_UNET_PREFIXES:
        if module.startswith(pre):
            return None
    for pre in _UNET_PREFIXES:
        if module.startswith(pre):
            module = module[len(pre) :]
            break
    module = module.replace(".processor.", ".")
    if module.endswith(".to_out"):  # diffusers attn-processor LoRA names to_out; the Linear is to_out.0
        module += ".0"
    root = module.split(".", 1)[0]
    if root in _LDM_ROOTS:
        return "ldm", module
    if root in _DIFFUSERS_ROOTS:
        return "diffusers", module
    return "unknown", module


def _check_values(source: str, key: str, t: torch.Tensor) -> None:
    if not (t.is_floating_point()):
        raise NPOError(
            f"{source}: tensor '{key}' has dtype {t.dtype}; offsets must be floating point. The file is "
            "not an NPO offset or LoRA."
        )
    if not bool(torch.isfinite(t).all()):
        raise NPOError(
            f"{source}: tensor '{key}' contains NaN or Inf values; the file is damaged (or was saved from a "
            "diverged training run). Use another checkpoint of it."
        )


def parse_state_dict(
    sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, source: str = ""
) -> NPOOffset:
    """Recognise the key format of ``sd`` and build an ``NPOOffset`` in the file's own naming."""
    metadata = dict(metadata or {})
    if not sd:
        raise NPOError(f"{source}: the file holds no tensors.")
    for marker, why in _UNSUPPORTED_MARKERS:
        hit = next((k for k in sd if marker in k), None)
        if hit is not None:
            raise NPOError(
                f"{source}: adapter not supported as an NPO offset (key '{hit}'): {why}. Supported: LoRA "
                "(up/down/alpha), LoHa, LoKr, DoRA, .diff tensors and full weights."
            )
    for k, t in sd.items():
        _check_values(source, k, t)
    is_lora = any(_split_role(k) is not None for k in sd)
    if is_lora:
        return _parse_lora(sd, metadata, source)
    return _parse_full(sd, metadata, source)


def _peft_alpha(metadata: Mapping[str, str]) -> float | None:
    raw = metadata.get("lora_adapter_metadata") or metadata.get("unet.lora_adapter_metadata")
    if not raw:
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        return None
    if isinstance(info, dict) and "unet" in info and isinstance(info["unet"], dict):
        info = info["unet"]
    alpha = info.get("lora_alpha") if isinstance(info, dict) else None
    return float(alpha) if isinstance(alpha, (int, float)) else None


def _parse_lora(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str) -> NPOOffset:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    stray: list[str] = []
    for k, t in sd.items():
        split = _split_role(k)
        if split is None:
            stray.append(k)
            continue
        module, role = split
        groups.setdefault(module, {})[role] = t
    if stray:
        raise NPOError(
            f"{source}: mixes LoRA keys with keys of no known LoRA role, e.g. {stray[:3]}. Unknown key format; "
            "expected diffusers/PEFT, kohya or ComfyUI LoRA keys."
        )
    peft_alpha = _peft_alpha(metadata)
    entries: dict[str, Entry] = {}
    file_modules: dict[str, str] = {}
    ignored: list[str] = []
    namings: set[str] = set()
    fmt = _lora_format(sd, metadata)
    for module, parts in groups.items():
        stripped = _strip_prefix(module)
        if stripped is None:
            ignored.extend(f"{module}.{r}" for r in parts)
            continue
        naming, path = stripped
        namings.add(naming)
        for leaf in ("weight", "bias"):
            _claim(file_modules, f"{path}.{leaf}", module, source)
        factored = _factored(module, parts, peft_alpha, source)
        if factored is not None:
            entries[f"{path}.weight"] = factored
        elif "up" in parts or "down" in parts:
            if "up" not in parts or "down" not in parts:
                raise NPOError(f"{source}: LoRA module '{module}' has only one of up/down; the file is incomplete.")
            up, down = parts["up"], parts["down"]
            if up.dim() < 2 or down.dim() < 2 or up.shape[1] != down.shape[0]:
                raise NPOError(
                    f"{source}: LoRA module '{module}' has mismatched up {tuple(up.shape)} / down "
                    f"{tuple(down.shape)}; the file is corrupt."
                )
            alpha_t = parts.get("alpha")
            alpha = float(alpha_t.float().flatten()[0]) if alpha_t is not None else peft_alpha
            entries[f"{path}.weight"] = LowRank(up, down, alpha)
        elif "alpha" in parts and "diff" not in parts and "diff_b" not in parts:
            raise NPOError(f"{source}: '{module}.alpha' has no lora_up/lora_down; the file is incomplete.")
        elif "dora_scale" in parts or "magnitude" in parts:
            raise NPOError(
                f"{source}: '{module}' has a DoRA magnitude but no lora_up/lora_down; the file is incomplete."
            )
        if "diff" in parts:
            entries[f"{path}.weight"] = Dense(parts["diff"])
        if "diff_b" in parts:
            entries[f"{path}.bias"] = Dense(parts["diff_b"])
    file_modules = {k: v for k, v in file_modules.items() if k in entries}
    kinds = sorted({_KIND_NAMES[e.kind] for e in entries.values() if isinstance(e, Factored)})
    if kinds:
        fmt = f"{fmt} ({', '.join(kinds)})"
    return _finish(entries, namings, fmt, metadata, source, ignored, file_modules)


_KIND_NAMES = {"loha": "LoHa", "lokr": "LoKr", "dora": "DoRA"}


def _factored(module: str, parts: Mapping[str, torch.Tensor], peft_alpha: float | None, source: str) -> Factored | None:
    """The module as a LoHa / LoKr / DoRA entry (ComfyUI's role names), None for a plain LoRA or diff;
    an incomplete set of factors is an error naming the missing ones."""
    roles = set(parts)
    if any(r.startswith("hada_") for r in roles):
        kind = "loha"
        missing = [r for r in _LOHA_ROLES if r not in roles]
        if ("hada_t1" in roles) != ("hada_t2" in roles):
            missing.append("hada_t2" if "hada_t1" in roles else "hada_t1")
    elif any(r.startswith("lokr_") for r in roles):
        kind = "lokr"
        missing = []
        for w in ("lokr_w1", "lokr_w2"):
            if w not in roles and not {f"{w}_a", f"{w}_b"} <= roles:
                missing.append(f"{w} (or {w}_a and {w}_b)")
        if "lokr_t2" in roles and not {"lokr_w2_a", "lokr_w2_b"} <= roles:
            missing.append("lokr_w2_a and lokr_w2_b (for lokr_t2)")
    elif ("dora_scale" in roles or "magnitude" in roles) and {"up", "down"} <= roles:
        kind = "dora"
        missing = []
    else:
        return None
    if missing:
        raise NPOError(
            f"{source}: {_KIND_NAMES[kind]} module '{module}' lacks {', '.join(missing)}; the file is incomplete."
        )
    stray = sorted(roles & {"up", "down", "diff"}) if kind != "dora" else []
    if stray:
        raise NPOError(
            f"{source}: '{module}' mixes {_KIND_NAMES[kind]} factors with LoRA keys ({stray}); the file is "
            "inconsistent."
        )
    names = {"up": "lora_up.weight", "down": "lora_down.weight", "magnitude": "dora_scale"}
    tensors = {names.get(r, r): t for r, t in parts.items() if r != "diff_b"}
    if kind == "dora":
        up, down = tensors["lora_up.weight"], tensors["lora_down.weight"]
        if up.dim() < 2 or down.dim() < 2 or up.shape[1] != down.shape[0]:
            raise NPOError(
                f"{source}: LoRA module '{module}' has mismatched up {tuple(up.shape)} / down {tuple(down.shape)}; "
                "the file is corrupt."
            )
        if "alpha" not in tensors and peft_alpha is not None:
            tensors["alpha"] = torch.tensor(peft_alpha)
    return Factored(kind, tensors)


def _claim(file_modules: dict[str, str], key: str, module: str, source: str) -> None:
    """Record that entry ``key`` comes from the file's ``module``; two file modules on one key is an error."""
    other = file_modules.setdefault(key, module)
    if other != module:
        raise NPOError(f"{source}: '{other}' and '{module}' name the same layer; the file is inconsistent.")


def _lora_format(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    if "npo.format_version" in metadata:
        return "npo-pack"
    keys = list(sd)
    if any(k.startswith("lora_unet_") or k.startswith("lora_te") for k in keys):
        return "kohya"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "peft"
    if any(".lora.up." in k or "lora_linear_layer" in k or "_lora.up." in k for k in keys):
        return "diffusers-lora"
    return "comfy"


def _parse_full(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str) -> NPOOffset:
    entries: dict[str, Entry] = {}
    file_modules: dict[str, str] = {}
    ignored: list[str] = []
    namings: set[str] = set()
    for k, t in sd.items():
        # parameters of layers end in .weight/.bias; others are bare parameters (Wan's blocks.0.modulation)
        module, leaf = k.rsplit(".", 1) if k.endswith((".weight", ".bias")) else (k, "")
        stripped = _strip_prefix(module)
        if stripped is None:
            ignored.append(k)
            continue
        naming, path = stripped
        namings.add("unknown" if naming == "flat" else naming)
        key = f"{path}.{leaf}" if leaf else path
        _claim(file_modules, key, module, source)
        entries[key] = FullWeight(t)
    return _finish(entries, namings, "full-state-dict", metadata, source, ignored, file_modules)


def _finish(
    entries: dict[str, Entry],
    namings: set[str],
    fmt: str,
    metadata: Mapping[str, str],
    source: str,
    ignored: list[str],
    file_modules: dict[str, str],
) -> NPOOffset:
    if not entries:
        raise NPOError(
            f"{source}: no UNet offsets in the file ({len(ignored)} text-encoder/VAE keys only). NPO changes "
            "only the UNet."
        )
    naming = namings.pop() if len(namings) == 1 else "mixed"
    arch = metadata.get("npo.base_arch") or detect_base_arch(entries)
    return NPOOffset(
        entries=entries,
        naming=naming,
        source_format=fmt,
        base_arch=arch,
        source=source,
        metadata={k: v for k, v in metadata.items() if k.startswith("npo.")},
        ignored=sorted(ignored),
        file_modules=file_modules,
    )


def context_dim_of(entries: Mapping[str, Entry]) -> int | None:
    """The text-context width the offset expects, read from any cross-attention key/value projection."""
    for k, e in entries.items():
        flat = k.replace("_", ".")
        if "attn2.to.k" in flat or "attn2.to.v" in flat:
            shape = e.weight_shape
            if len(shape) >= 2:
                return int(shape[1])
    return None


def detect_base_arch(entries: Mapping[str, Entry]) -> str:
    ctx = context_dim_of(entries)
    if ctx is not None:
        return families.detected_from_context(ctx) or f"unknown (text context {ctx})"
    if any(k.startswith("label_emb") or k.startswith("add_embedding") for k in entries):
        return "SDXL"
    return "unknown"


# ---------------------------------------------------------------------------------------------
# converting to the model's names
# ---------------------------------------------------------------------------------------------
def _fit_shape(source: str, key: str, e: Entry, target: tuple[int, ...]) -> Entry:
    """Check ``e`` against the parameter shape; allow Linear-vs-1×1-conv differences (trailing 1s)."""
    if isinstance(e, Factored) and e.delta is None:
        raise NPOError(f"{source}: '{key}': its {e.kind} factors were not expanded by a weight adapter.")
    shape = tuple(e.weight_shape)
    if isinstance(e, Factored):
        if not e.fits(target):
            raise NPOError(
                f"{source}: '{key}' makes a ΔW of shape {shape} but the model's parameter is {target}. The offset "
                "was made for another architecture; use one made for this model's base."
            )
        delta = e.delta.float().reshape(target)
        return dataclasses.replace(e, delta=delta, shape=target) if e.needs_weight else Dense(delta)
    if shape == target:
        return e
    squeeze = lambda s: tuple(d for i, d in enumerate(s) if i < 2 or d != 1)  # noqa: E731
    if squeeze(shape) == squeeze(target) and len(target) >= 2:
        extra = [1] * (len(target) - 2)
        if isinstance(e, LowRank):
            return LowRank(
                e.up.reshape(e.up.shape[0], e.up.shape[1], *extra),
                e.down.reshape(e.down.shape[0], e.down.shape[1], *target[2:]),
                e.alpha,
            )
        if isinstance(e, Dense):
            return Dense(e.delta.reshape(target))
        return FullWeight(e.value.reshape(target))
    raise NPOError(
        f"{source}: '{key}' has shape {shape} but the model's parameter is {target}. The offset was made for "
        "another architecture (SD1.5 vs SDXL?); use an offset trained for this model's base."
    )


def resolve(
    offset: NPOOffset,
    targets: Mapping[str, tuple[int, ...]],
    diffusers_to_ldm: Mapping[str, str],
    model_arch: str = "unknown",
    model_context_dim: int | None = None,
) -> NPOOffset:
    """Map every key of ``offset`` onto the model's LDM parameter names and check shapes.

    ``targets``: LDM parameter name (relative to the UNet) → shape. ``diffusers_to_ldm``: diffusers
    parameter name → LDM name (ComfyUI's ``comfy.utils.unet_to_diffusers``). Any key that does not
    land is an error listing the keys: nothing is skipped. FullWeight entries stay absolute.
    """
    src = offset.source or "offset"
    ctx = context_dim_of(offset.entries)
    if ctx is not None and model_context_dim is not None and ctx != model_context_dim:
        raise NPOError(
            f"{src}: made for {families.detected_from_context(ctx) or 'another model'} (text context {ctx}) but the "
            f"model is {model_arch} (text context {model_context_dim}). Use an NPO offset trained for this model's "
            "base (SD1.5 offsets on SD1.5 fine-tunes, SDXL offsets on SDXL ones)."
        )
    if offset.naming == "mixed":
        raise NPOError(f"{src}: mixes key namings (LDM, diffusers, kohya); expected one format per file.")
    if offset.naming == "ldm":
        mapping = {k: k for k in offset.entries if k in targets}
    elif offset.naming == "diffusers":
        mapping = {k: diffusers_to_ldm[k] for k in offset.entries if k in diffusers_to_ldm}
    elif offset.naming == "flat":
        lookup: dict[str, str] = {}
        for name in targets:
            lookup[_flat(name)] = name
        for dname, lname in diffusers_to_ldm.items():
            lookup.setdefault(_flat(dname), lname)
        mapping = {k: lookup[_flat(k)] for k in offset.entries if _flat(k) in lookup}
    else:
        mapping = {}  # "unknown": no UNet naming; every key is listed below
    unmatched = sorted(k for k in offset.entries if k not in mapping or mapping[k] not in targets)
    if unmatched:
        raise_unmatched(src, [file_key(offset, k) for k in unmatched], len(offset.entries), model_arch)
    out: dict[str, Entry] = {}
    for k, e in offset.entries.items():
        name = mapping[k]
        if name in out:
            raise NPOError(f"{src}: two keys map to the same parameter '{name}'; the file is inconsistent.")
        out[name] = _fit_shape(src, k, e, tuple(targets[name]))
    return offset.replace(entries=out, naming="ldm")


def file_key(offset: NPOOffset, key: str) -> str:
    """How entry ``key`` is named in the file (its module, and which parameter of it)."""
    module = offset.file_modules.get(key)
    if module is None:
        return key
    leaf = key.rsplit(".", 1)[-1] if key.endswith((".weight", ".bias")) else ""
    return f"{module} ({leaf})" if leaf else module


def raise_unmatched(src: str, names: list[str], total: int, model_arch: str) -> None:
    names = sorted(names)
    shown = "\n  ".join(names[:20])
    more = f"\n  … and {len(names) - 20} more" if len(names) > 20 else ""
    looks = families.looks_like(names)
    hint = (
        f"\nIts keys look like an offset for {looks}, not for {model_arch}: use one made for this model's family."
        if looks is not None and model_arch not in looks
        else ""
    )
    raise NPOError(
        f"{src}: {len(names)} of {total} keys do not land on the model ({model_arch}):\n  {shown}{more}{hint}\nThe "
        "offset was made for another architecture or uses an unknown key format (expected a LoRA layout "
        "ComfyUI's LoraLoader reads for this model, or the model's own parameter names)."
    )


def _flat(param_name: str) -> str:
    module, leaf = param_name.rsplit(".", 1)
    return f"{module.replace('.', '_')}.{leaf}"


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def to_comfy_state_dict(offset: NPOOffset, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """ComfyUI LoRA keys (``diffusion_model.<module>.lora_up.weight`` / ``lora_down.weight`` / ``alpha`` /
    ``diff`` / ``diff_b``), readable by the stock LoraLoader."""
    if not offset.is_resolved:
        raise NPOError(f"{offset.source or 'offset'}: resolve it against a model before saving.")
    sd: dict[str, torch.Tensor] = {}
    for k, e in offset.entries.items():
        module, leaf = k.rsplit(".", 1)
        base = f"diffusion_model.{module}"
        if isinstance(e, LowRank):
            if leaf != "weight":
                raise NPOError(f"low-rank offset on a bias ('{k}') cannot be saved")
            sd[f"{base}.lora_up.weight"] = e.up.to(dtype).contiguous()
            sd[f"{base}.lora_down.weight"] = e.down.to(dtype).contiguous()
            sd[f"{base}.alpha"] = torch.tensor(float(e.alpha if e.alpha is not None else e.rank))
        elif isinstance(e, Dense):
            sd[f"{base}.diff" if leaf == "weight" else f"{base}.diff_b"] = e.delta.to(dtype).contiguous()
        else:
            raise NPOError(f"full-weight entry '{k}' must be resolved against a model before saving")
    return sd


NEGATIVE_OFFSET_NOTE = (
    "NPO negative offset: for the negative (unconditional) CFG pass only, with the NPO nodes (Apply NPO, "
    "NPO CFG Guider, NPO Negative Model). Not a style LoRA: loaded with an ordinary LoRA loader it changes "
    "both passes and degrades the images."
)


def modelspec_metadata(offset: NPOOffset, title: str) -> dict[str, str]:
    """The ``modelspec.*`` header keys (SAI model spec 1.0.0) that LoRA managers read, marking the file
    as an NPO negative offset."""
    import datetime

    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": families.modelspec_architecture(offset.base_arch),
        "modelspec.title": f"{title} (NPO negative offset)",
        "modelspec.description": NEGATIVE_OFFSET_NOTE,
        "modelspec.tags": "npo,negative-offset,negative-cfg-pass-only",
        "modelspec.usage_hint": "Apply NPO or NPO CFG Guider (ComfyUI-NPO); not a LoRA for the positive pass",
        "modelspec.date": datetime.date.today().isoformat(),
    }


def save_offset(offset: NPOOffset, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """Write atomically (temporary name in the same folder, then rename) in ComfyUI's LoRA key format,
    with NPO metadata and the ``modelspec.*`` keys that mark it as a negative offset."""
    from safetensors.torch import save_file

    p = Path(path)
    sd = to_comfy_state_dict(offset, dtype)
    meta = modelspec_metadata(offset, p.stem)
    meta.update({k: str(v) for k, v in offset.metadata.items()})
    meta.update(
        {
            "npo.format_version": FORMAT_VERSION,
            "npo.base_arch": offset.base_arch,
            "npo.source_format": offset.source_format,
        }
    )
    return atomic_write(p, lambda tmp: save_file(sd, tmp, metadata=meta))
