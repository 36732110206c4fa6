"""A loss-curve picture as a ComfyUI IMAGE tensor ([1, H, W, 3], floats in [0, 1]). PIL only."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw


def loss_curve_image(
    losses: list[float], width: int = 640, height: int = 320, title: str = "Self-NPO loss"
) -> torch.Tensor:
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 60, width - 15, 30, height - 35
    d.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    d.text((left, 8), f"{title} ({len(losses)} steps)", fill=(0, 0, 0))
    vals = [v for v in losses if math.isfinite(v)]
    if vals:
        lo, hi = min(vals), max(vals)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5 * abs(lo or 1), hi + 0.5 * abs(hi or 1)
        window = max(1, len(vals) // 50)
        smooth = np.convolve(vals, np.ones(window) / window, mode="valid") if len(vals) >= window else np.array(vals)

        def pt(i: int, v: float, n: int) -> tuple[float, float]:
            x = left + (right - left) * (i / max(n - 1, 1))
            y = bottom - (bottom - top) * ((v - lo) / (hi - lo))
            return x, y

        raw = [pt(i, v, len(vals)) for i, v in enumerate(vals)]
        if len(raw) > 1:
            d.line(raw, fill=(170, 190, 230), width=1)
        sm = [pt(i + window - 1, float(v), len(vals)) for i, v in enumerate(smooth)]
        if len(sm) > 1:
            d.line(sm, fill=(20, 60, 160), width=2)
        d.text((5, top - 4), f"{hi:.4g}", fill=(0, 0, 0))
        d.text((5, bottom - 8), f"{lo:.4g}", fill=(0, 0, 0))
        d.text((left, bottom + 8), "step 1", fill=(0, 0, 0))
        d.text((right - 60, bottom + 8), f"step {len(vals)}", fill=(0, 0, 0))
    else:
        d.text((left + 10, (top + bottom) // 2), "no steps run", fill=(120, 0, 0))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]
