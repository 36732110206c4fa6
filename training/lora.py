"""Trainable LoRA adapters attached as forward hooks: y = f(x) + (alpha/r)·up(down(x)).

The wrapped modules' own weights are never touched or copied. ``up`` starts at zero, so the
student starts equal to the base model (as the authors' full fine-tune does).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..npo_core.offset import LowRank, NPOOffset


def is_linear(m: nn.Module) -> bool:
    """nn.Linear, or a Linear of a quantized / mixed-precision checkpoint (an ``nn.Module`` with
    ``in_features``/``out_features``): the adapter needs only the input and the shapes."""
    return isinstance(m, nn.Linear) or (
        isinstance(getattr(m, "in_features", None), int) and isinstance(getattr(m, "out_features", None), int)
    )


def select_modules(root: nn.Module, pattern: str) -> list[str]:
    """Names of Linear (quantized ones included) / Conv2d (groups 1) modules of ``root`` whose name matches the
    regex ``pattern`` (``npo_core.families.Family.preset`` turns a preset name into one)."""
    rx = re.compile(pattern)
    out = []
    for name, m in root.named_modules():
        if not name or not rx.search(name):
            continue
        if is_linear(m) or (isinstance(m, nn.Conv2d) and m.groups == 1):
            out.append(name)
    return out


LORA_INITS = ("uniform", "gaussian")  # up (B) starts at 0 in both: the adapter starts as the identity


class LoRASet(nn.Module):
    def __init__(
        self,
        root: nn.Module,
        module_names: list[str],
        rank: int,
        alpha: float | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        init: str = "uniform",
    ) -> None:
        super().__init__()
        if init not in LORA_INITS:
            raise ValueError(f"init must be one of {LORA_INITS}, got {init!r}")
        if rank < 1:
            raise ValueError(f"rank must be ≥ 1, got {rank}")
        if not module_names:
            raise ValueError("no layers selected for LoRA")
        self.rank, self.alpha = int(rank), float(alpha if alpha is not None else rank)
        self.names = list(module_names)
        self.modules_ = [root.get_submodule(n) for n in self.names]
        self.downs, self.ups = nn.ParameterList(), nn.ParameterList()
        for m in self.modules_:
            w = m.weight
            dev = device if device is not None else w.device
            if is_linear(m):
                down = torch.empty(rank, m.in_features, dtype=torch.float32)
                up = torch.zeros(m.out_features, rank, dtype=dtype, device=dev)
            else:
                down = torch.empty(rank, m.in_channels, *m.kernel_size, dtype=torch.float32)
                up = torch.zeros(m.out_channels, rank, 1, 1, dtype=dtype, device=dev)
            fan_in = down[0].numel()
            if init == "gaussian":  # PEFT's init_lora_weights="gaussian" (the authors' DPO-NPO): A ~ N(0, 1/r)
                down.normal_(0.0, 1.0 / rank, generator=generator)
            else:
                down.uniform_(-1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in), generator=generator)
            self.downs.append(nn.Parameter(down.to(dev, dtype)))
            self.ups.append(nn.Parameter(up))
        self._handles: list = []

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def named_trainable(self) -> dict[str, nn.Parameter]:
        out = {}
        for n, d, u in zip(self.names, self.downs, self.ups, strict=True):
            out[f"{n}.lora_down"] = d
            out[f"{n}.lora_up"] = u
        return out

    def attach(self) -> None:
        if self._handles:
            return
        scale = self.scale
        for m, d, u in zip(self.modules_, self.downs, self.ups, strict=True):

            def hook(mod, args, out, d=d, u=u):
                x = args[0]
                if is_linear(mod):
                    h = F.linear(F.linear(x.to(d.dtype), d), u)
                else:
                    h = F.conv2d(F.conv2d(x.to(d.dtype), d, None, mod.stride, mod.padding, mod.dilation), u)
                return out + (scale * h).to(out.dtype)

            self._handles.append(m.register_forward_hook(hook))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def to_offset(self, **meta) -> NPOOffset:
        """The adapters as an NPO offset (keys ``<module>.weight``, naming of ``root``)."""
        entries = {
            f"{n}.weight": LowRank(u.detach().float().cpu().clone(), d.detach().float().cpu().clone(), self.alpha)
            for n, d, u in zip(self.names, self.downs, self.ups, strict=True)
        }
        return NPOOffset(entries, **meta)
