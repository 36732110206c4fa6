"""Draw the template-browser thumbnails of example_workflows/ (one JPEG beside each workflow).

A card says what the workflow does, large enough to read at the browser's card size: its title, the
chain of nodes it runs, and what it produces. Run with any Python that has Pillow ≥ 10.1:

    python scripts/make_thumbnails.py
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
from npo_headless import EXAMPLES  # noqa: E402
from npo_headless.workflows import (  # noqa: E402
    EXAMPLE_COMPARE,
    EXAMPLE_GUIDER,
    EXAMPLE_KSAMPLER,
    EXAMPLE_PREFERENCE,
    EXAMPLE_SD35,
    EXAMPLE_SDXL,
    EXAMPLE_SELF_NPO,
    EXAMPLE_WAN21,
    EXAMPLE_WAN21_SELF_NPO,
)

SIZE = (512, 384)
BACKGROUND, PANEL, ACCENT, TEXT, MUTED = "#1f2430", "#2d3445", "#7cc4ff", "#f2f4f8", "#a9b1c3"
MAX_BYTES = 100_000

# title line, the node chain, what comes out
CARDS = {
    EXAMPLE_KSAMPLER: ("Apply NPO + KSampler", ["Checkpoint", "Apply NPO", "KSampler"],
                       "same seed: with / without NPO"),
    EXAMPLE_SDXL: ("NPO on SDXL", ["SDXL", "Apply NPO", "KSampler"], "zeroed negative, cfg 5"),
    EXAMPLE_GUIDER: ("NPO CFG Guider", ["Checkpoint", "NPO CFG Guider", "Sampler Custom Adv."],
                     "for custom-sampler workflows"),
    EXAMPLE_SELF_NPO: ("Train Self-NPO", ["Checkpoint", "Self-NPO Train", "Apply NPO"],
                       "your own offset, A/B, loss curve"),
    EXAMPLE_SD35: ("NPO on SD3.5", ["SD3.5 Large", "Apply NPO", "KSampler"], "your own offset, same-seed A/B"),
    EXAMPLE_WAN21: ("NPO on Wan 2.1", ["Wan 2.1 T2V", "Apply NPO", "KSampler"], "text-to-video, your own offset"),
    EXAMPLE_WAN21_SELF_NPO: ("Self-NPO on Wan 2.1", ["Wan 2.1 T2V", "Self-NPO Train", "Apply NPO"],
                             "train a video offset, same-seed A/B"),
    EXAMPLE_COMPARE: ("Does NPO help?", ["Prompt List", "KSampler ± Apply NPO", "NPO Compare Report"],
                      "PickScore per pair, win rate, p-value"),
    EXAMPLE_PREFERENCE: ("Preference NPO", ["Self-Generated Pairs", "NPO Preference Train", "Compare Reports"],
                         "no NPO vs Self-NPO vs preference"),
}


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def card(number: str, title: str, chain: list[str], result: str) -> Image.Image:
    im = Image.new("RGB", SIZE, BACKGROUND)
    d = ImageDraw.Draw(im)
    d.text((24, 18), number, font=font(56), fill=ACCENT)
    d.text((84, 30), title, font=font(38), fill=TEXT)
    box_w, box_h, x, y = 440, 54, 36, 112
    for i, name in enumerate(chain):
        top = y + i * (box_h + 22)
        d.rounded_rectangle((x, top, x + box_w, top + box_h), radius=12, fill=PANEL, outline=ACCENT, width=2)
        d.text((x + box_w // 2, top + box_h // 2), name, font=font(30), fill=TEXT, anchor="mm")
        if i:
            d.polygon([(x + box_w // 2 - 9, top - 16), (x + box_w // 2 + 9, top - 16), (x + box_w // 2, top - 4)],
                      fill=ACCENT)
    d.text((SIZE[0] // 2, SIZE[1] - 28), result, font=font(28), fill=MUTED, anchor="mm")
    return im


def jpeg(im: Image.Image) -> bytes:
    for quality in (90, 80, 70, 60):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality, optimize=True)
        if buf.tell() <= MAX_BYTES:
            return buf.getvalue()
    raise SystemExit("thumbnail over 100 KB even at quality 60")


def main() -> None:
    for name, (title, chain, result) in CARDS.items():
        path = EXAMPLES / f"{name}.jpg"
        data = jpeg(card(name.split(" ", 1)[0], title, chain, result))
        tmp = path.with_suffix(".jpg.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        print(f"{path.name}: {len(data):,} bytes")


if __name__ == "__main__":
    main()
