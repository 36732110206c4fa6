"""Tiny models of every model family, built from ComfyUI's own classes (host tier only).

Each family module (``fam_*.py``) exports ``FAMILIES: list[TinyFamily]``. A family is available on
a ComfyUI version when its config class exists there (``available()``); tests parametrize over the
families the running version has (test_host_families.py: NAMES, and LACKING pins which each release lacks).

Weights: ``build_model()`` returns a BaseModel whose diffusion model holds torch.empty garbage;
``init_weights`` (npo_hostkit) fills every parameter from a seed, then ``fix_buffers`` fills any
buffer the family needs (e.g. SD3's pos_embed) deterministically.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class TinyFamily:
    name: str  # test id, e.g. "sd3", "wan21"
    config_class: str  # class name in comfy.supported_models (the family ComfyUI detects)
    build_model: Callable[[], object]  # () -> comfy.model_base.BaseModel, uninitialised weights
    conds: Callable[[int], tuple[list, list]]  # seed -> (positive, negative) CONDITIONING
    latent_shape: Callable[[int], tuple[int, ...]]  # batch -> the latent the sampler gets
    cfg: float = 3.0
    fix_buffers: Callable[[object], None] | None = None  # (BaseModel) -> None, after init_weights
    attention_linears: list[str] = field(default_factory=list)  # module names under diffusion_model
    folded_batch_layers: list[str] = field(default_factory=list)  # layers whose input is [1, B·L, C]
    notes: str = ""

    def available(self) -> bool:
        import comfy.supported_models

        return hasattr(comfy.supported_models, self.config_class)


def all_families() -> list[TinyFamily]:
    out: list[TinyFamily] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("fam_"):
            out.extend(importlib.import_module(f"{__name__}.{info.name}").FAMILIES)
    return out


def seeded_init(unet: torch.nn.Module, seed: int) -> None:
    """Seeded normal init with sane scales (comfy ops leave torch.empty garbage): matrices ~ N(0, 1/fan_in),
    weights of norms ~ 1 + 0.1·N, biases ~ 0.02·N."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
