"""The optimizers Self-NPO training offers: AdamW (the authors'), torch's Adafactor (factored second moments: less
optimizer memory) and bitsandbytes' 8-bit AdamW, only where bitsandbytes is already importable (never a requirement).

Conventions: ``learning_rate`` is AdamW's step size; for Adafactor it is the cap of torch's relative step
(the update is scaled by the parameter's RMS, at least Adafactor's eps2 = 1e-3, times min(lr, 1/√step)), so it needs
a larger value: "auto" gives torch's default 1e-2. Every optimizer's state round-trips through ``state_dict``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

import torch

ADAMW, ADAFACTOR, ADAMW_8BIT = "AdamW", "Adafactor", "AdamW 8-bit"
OPTIMIZERS = (ADAMW, ADAFACTOR, ADAMW_8BIT)
ADAFACTOR_AUTO_LR = 1e-2  # torch.optim.Adafactor's default: the cap of its relative step size
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # the authors' AdamW settings


def unavailable_reason(name: str) -> str | None:
    """None when ``name`` can run in this Python; otherwise why not."""
    if name not in OPTIMIZERS:
        return f"'{name}' is not one of {', '.join(OPTIMIZERS)}"
    if name == ADAMW_8BIT and importlib.util.find_spec("bitsandbytes") is None:
        return (
            "it needs the bitsandbytes package, which is not installed in this Python (the pack never installs it; "
            "pip install bitsandbytes where your GPU supports it)"
        )
    return None


def auto_learning_rate(name: str, adam_rate: float) -> float:
    """The learning rate "auto" means: the family's AdamW rate, or Adafactor's own default."""
    return ADAFACTOR_AUTO_LR if name == ADAFACTOR else adam_rate


def make_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], learning_rate: float, weight_decay: float
) -> torch.optim.Optimizer:
    """The named optimizer over ``params``; ValueError when it cannot run here (the reason)."""
    reason = unavailable_reason(name)
    if reason:
        raise ValueError(f"optimizer: {reason}")
    params = list(params)
    if name == ADAFACTOR:
        return torch.optim.Adafactor(params, lr=learning_rate, weight_decay=weight_decay)
    if name == ADAMW_8BIT:
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(
            params, lr=learning_rate, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=weight_decay
        )
    return torch.optim.AdamW(params, lr=learning_rate, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=weight_decay)
