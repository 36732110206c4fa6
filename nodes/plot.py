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


def compare_grid(
    images_a: torch.Tensor, images_b: torch.Tensor, captions: list[str], label_a: str, label_b: str,
    thumb: int = 160, columns: int = 4,
) -> torch.Tensor:
    """Pairs side by side (A left, B right) under a caption each, ``columns`` pairs a row: [1, H, W, 3]."""
    n = images_a.shape[0]
    cols = max(1, min(columns, n))
    rows = (n + cols - 1) // cols
    cell_w, caption_h, head = 2 * thumb + 12, 14 * max(1, max(c.count("\n") + 1 for c in captions)) + 6, 20
    sheet = Image.new("RGB", (cols * cell_w + 8, head + rows * (thumb + caption_h + 8)), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    d.text((8, 4), f"left: {label_a}   right: {label_b}", fill=(0, 0, 0))
    for i in range(n):
        x, y = 8 + (i % cols) * cell_w, head + (i // cols) * (thumb + caption_h + 8)
        for j, img in enumerate((images_a[i], images_b[i])):
            pic = Image.fromarray((img[..., :3].clamp(0, 1) * 255).round().byte().cpu().numpy())
            pic.thumbnail((thumb, thumb))
            sheet.paste(pic, (x + j * (thumb + 4), y))
        d.text((x, y + thumb + 2), captions[i], fill=(0, 0, 0))
    arr = np.asarray(sheet, dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]
