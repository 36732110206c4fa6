"""Reading scorer weights safely: .safetensors, or a pickle that torch.load(weights_only=True) accepts; nothing else.

Conventions: every refusal is an NPOError naming the file and the fix; transformers models are read from a local
folder in the Hugging Face layout (config.json + model.safetensors, or pytorch_model.bin read with weights_only)
with ``local_files_only=True``, and a checkpoint that leaves any weight of the model missing is refused.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ..npo_core.errors import NPOError

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_FIX = (
    "only if you trust its source, convert it once: safetensors.torch.save_file(torch.load(path, weights_only=False), "
    "'<name>.safetensors'), and load the .safetensors file instead"
)


def read_weights(
    path: str | Path,
    pickle_fix: str = SAFETENSORS_FIX,
    missing: str = "put the weights file there (or pass its full path)",
    formats: str = "use .safetensors (or a weights-only .pth)",
):
    """What a .safetensors file or a weights-only pickle (.pth/.pt/.bin/.ckpt) holds, on the CPU; every other file,
    and a pickle that needs more than weights_only, is refused naming the file (the fix texts are the caller's)."""
    path = Path(path)
    if not path.is_file():
        raise NPOError(f"{path} not found: {missing}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError on a bad header
            raise NPOError(f"{path} is not a readable .safetensors file ({e}); download it again") from e
    if suffix in PICKLE_SUFFIXES:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as e:
            raise NPOError(
                f"{path} is refused: torch.load(weights_only=True) cannot read it (it needs pickled code or objects, "
                f"or is damaged: {str(e).splitlines()[0] if str(e) else type(e).__name__}); {pickle_fix}"
            ) from e
    raise NPOError(f"{path}: unknown weights format {suffix!r}; {formats}")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from .safetensors or a weights-only pickle (.pth/.pt/.bin/.ckpt), on the CPU."""
    sd = read_weights(path)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise NPOError(f"{path} holds {type(sd).__name__}, not a flat state dict of tensors; save model.state_dict()")
    return sd


def load_pretrained(cls, folder: str | Path, what: str):
    """``cls.from_pretrained`` on a local HF folder (eval mode, no grad), refusing missing files and weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NPOError(f"{folder} is not a folder: pass the {what} folder (config.json, model.safetensors, ...)")
    if not (folder / "config.json").is_file():
        raise NPOError(f"{folder}: config.json is missing; copy it from the {what} model's Hugging Face repository")
    safe = [folder / n for n in ("model.safetensors", "model.safetensors.index.json") if (folder / n).is_file()]
    pickled = folder / "pytorch_model.bin"
    try:
        if safe:
            weights = safe[0]
            model, info = cls.from_pretrained(
                str(folder), local_files_only=True, use_safetensors=True, output_loading_info=True
            )
        elif pickled.is_file():
            weights = pickled
            config = cls.config_class.from_pretrained(str(folder), local_files_only=True)
            sd = load_state_dict_file(pickled)
            model, info = cls.from_pretrained(None, config=config, state_dict=sd, output_loading_info=True)
        else:
            raise NPOError(
                f"{folder}: model.safetensors is missing; download the {what} weights (model.safetensors) into it"
            )
    except NPOError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise NPOError(f"{folder}: transformers could not load the {what} model ({e}); check config.json") from e
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(info.get("mismatched_keys") or [])
    if missing or mismatched:
        raise NPOError(
            f"{weights}: {len(missing)} weights missing and {len(mismatched)} of the wrong shape for {cls.__name__} "
            f"(first: {(missing + [str(m) for m in mismatched])[0]}); this is not a complete {what} checkpoint "
            "for its config.json: download the matching files"
        )
    return model.eval().requires_grad_(False)
