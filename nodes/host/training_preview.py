"""The training nodes' validation preview (Self-NPO Train, NPO Preference Train): every ``every`` optimizer steps,
one fixed-seed pair sampled with the model as it is (plain CFG) and with the current offset on the negative pass only
(as Apply NPO runs it), the run's own first prompt and negative, few Euler steps (ComfyUI's ``sample_euler`` over
ComfyUI's sigmas) at a small size.

The pair is decoded with the connected VAE, else ComfyUI's latent previewer (TAESD / latent-to-RGB), shown as the
progress-bar preview above the loss curve, and written beside the run's checkpoints when it writes any. A connected
scorer scores both images each time; the scores are logged and plotted. Sigma is ComfyUI's; x0 comes from the
training denoiser (``apply_model``), in the model's latent space.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageDraw

from ...npo_core.atomic import atomic_write
from ...training import conds as C
from . import runtime

PREVIEW_STEPS = 8  # Euler steps per preview image
PREVIEW_SCHEDULER = "simple"
PREVIEW_MAX_SIZE = 1024  # px, the longest side ComfyUI shows of a progress preview
MIN_PREVIEW_LATENT = 64  # latent pixels a side the preview keeps, if the pool has them (PixArt fails below ~34)


@dataclass
class PreviewSettings:
    """What a training node's preview inputs asked for."""

    every: int  # optimizer steps between previews; 0 = off
    shape: tuple[int, ...]  # latent shape of one preview sample [1, C, (T,) H, W]
    cfg: float
    seed: int
    vae: object | None = None  # ComfyUI VAE: decode the previews exactly
    scorer: object | None = None  # NPO_SCORER: score both images of each pair
    prompt: str = ""  # the text the scorer scores against (the first training prompt's)


@dataclass
class PreviewHistory:
    steps: list[int] = field(default_factory=list)
    plain: list[float] = field(default_factory=list)
    npo: list[float] = field(default_factory=list)


def preview_shape(pool_shape: tuple[int, ...]) -> tuple[int, ...]:
    """One sample of the pool's latent shape at half its height and width, but not below 64 latent pixels a side
    (512 px for 8× latents; PixArt's position-embedding interpolation is 0 below about 34) unless the pool is
    smaller."""
    *head, h, w = pool_shape
    return (1, *head[1:], max(min(h, MIN_PREVIEW_LATENT), h // 2), max(min(w, MIN_PREVIEW_LATENT), w // 2))


class TrainingPreview:
    """Samples, decodes, scores, shows and saves one preview pair every ``settings.every`` steps."""

    def __init__(self, mp, settings: PreviewSettings, save_stem: str | None) -> None:
        self.mp, self.settings, self.save_stem = mp, settings, save_stem
        self.history = PreviewHistory()
        self.saved: list[str] = []
        self.last: tuple[int, Image.Image] | None = None  # (step, sheet) of the newest preview

    def progress_preview(self, step: int):
        """The progress bar's preview for ``step`` (ComfyUI's (format, image, max size)), None between previews."""
        if self.last is None or self.last[0] != step:
            return None
        return ("JPEG", self.last[1], PREVIEW_MAX_SIZE)

    def due(self, step: int, total: int) -> bool:
        every = self.settings.every
        return every > 0 and (step % every == 0 or step == total)

    @torch.no_grad()
    def run(self, step: int, losses: list[float], denoise, cond_pos: dict, cond_neg: dict,
            offset_off: Callable[[], contextlib.AbstractContextManager]) -> Image.Image:
        """The preview at ``step``: sample the pair, decode it, score it, save it and keep it for the progress bar;
        returns the sheet."""
        runtime.throw_if_interrupted()
        plain, npo = self.sample_pair(denoise, cond_pos, cond_neg, offset_off)
        images = [self.decode(x) for x in (plain, npo)]
        scores = self.score(images)
        if scores is not None:
            self.history.steps.append(step)
            self.history.plain.append(scores[0])
            self.history.npo.append(scores[1])
            runtime.log.info("training preview at step %d: %s plain %.4f, with the offset %.4f", step,
                             self.settings.scorer.name, *scores)
        sheet = preview_sheet(images, step, losses, self.history, getattr(self.settings.scorer, "name", ""))
        self.last = (step, sheet)
        if self.save_stem:
            path = f"{self.save_stem}_preview_{step:06}.png"
            atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
            self.saved.append(path)
        return sheet

    def sample_pair(self, denoise, cond_pos: dict, cond_neg: dict, offset_off) -> tuple[torch.Tensor, torch.Tensor]:
        """(plain CFG, CFG with the offset on the negative pass only), model-space latents, the same noise."""
        import comfy.k_diffusion.sampling as kds
        import comfy.samplers

        s = self.settings
        ms = self.mp.get_model_object("model_sampling")
        device = next(iter(cond_pos.values())).device
        sigmas = comfy.samplers.calculate_sigmas(ms, PREVIEW_SCHEDULER, PREVIEW_STEPS).to(device)
        noise = torch.randn(s.shape, generator=torch.Generator().manual_seed(s.seed), dtype=torch.float32)
        empty = self.mp.model.process_latent_in(torch.zeros(s.shape))  # an empty latent, in the model's space
        sigma0 = float(sigmas[0])
        full = math.isclose(float(ms.sigma_max), sigma0, rel_tol=1e-5) or sigma0 > float(ms.sigma_max)
        start = ms.noise_scaling(sigmas[0].cpu(), noise, empty, full).to(device)  # as KSampler at denoise 1

        def plain_cfg(x, sigma, **_):
            with offset_off():
                both = denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), C.cat([cond_pos, cond_neg]))
            x0_pos, x0_neg = both.chunk(2)
            return _cfg(x0_pos, x0_neg, s.cfg)

        def npo_cfg(x, sigma, **_):
            with offset_off():
                x0_pos = denoise(x, sigma, cond_pos)
            x0_neg = denoise(x, sigma, cond_neg)  # the offset on the negative pass, as Apply NPO runs it
            return _cfg(x0_pos, x0_neg, s.cfg)

        out = []
        for model in (plain_cfg, npo_cfg):
            x = kds.sample_euler(model, start.clone(), sigmas, disable=True)
            out.append(ms.inverse_noise_scaling(sigmas[-1], x))
        return out[0], out[1]

    def decode(self, x: torch.Tensor) -> Image.Image:
        """A preview latent (model space) as an image: the VAE's decode, else ComfyUI's latent previewer."""
        import numpy as np

        latent = self.mp.model.process_latent_out(x.float())
        if self.settings.vae is not None:
            images = self.settings.vae.decode(latent)
            first = images.reshape(-1, *images.shape[-3:])[0]  # a video's first frame
            return Image.fromarray(np.clip(255.0 * first.float().cpu().numpy(), 0, 255).astype(np.uint8))
        previewer = _previewer(self.mp)
        if previewer is None:
            return Image.new("RGB", (256, 256), (128, 128, 128))
        return previewer.decode_latent_to_preview(x.float()).convert("RGB")

    def score(self, images: list[Image.Image]) -> tuple[float, float] | None:
        scorer = self.settings.scorer
        if scorer is None:
            return None
        got = scorer.score(images, [self.settings.prompt] * 2)
        release = getattr(scorer, "release", None)
        if release is not None:
            release()
        return float(got[0]), float(got[1])


@contextlib.contextmanager
def lora_off(lset) -> Iterator[None]:
    """The LoRA adapters detached: the model is the base θ inside."""
    lset.detach()
    try:
        yield
    finally:
        lset.attach()


@contextlib.contextmanager
def full_weights_off(params: dict[str, torch.nn.Parameter], original: Callable[[str], torch.Tensor]) -> Iterator[None]:
    """The trained weights swapped for the originals (full mode): the model is the base θ inside."""
    saved = {k: p.data for k, p in params.items()}
    try:
        for k, p in params.items():
            p.data = original(k).to(p.device, p.dtype)
        yield
    finally:
        for k, p in params.items():
            p.data = saved[k]


def _cfg(x0_pos: torch.Tensor, x0_neg: torch.Tensor, cfg: float) -> torch.Tensor:
    return x0_neg + cfg * (x0_pos - x0_neg)


def _previewer(mp):
    """ComfyUI's previewer for the model's latent format (TAESD or latent-to-RGB), latent-to-RGB when previews are
    switched off in ComfyUI, None when the format has no RGB factors."""
    import latent_preview

    fmt = mp.model.latent_format
    previewer = latent_preview.get_previewer(mp.load_device, fmt)
    if previewer is None and getattr(fmt, "latent_rgb_factors", None) is not None:
        extra = {}
        if getattr(fmt, "latent_rgb_factors_reshape", None) is not None:
            extra["latent_rgb_factors_reshape"] = fmt.latent_rgb_factors_reshape
        previewer = latent_preview.Latent2RGBPreviewer(fmt.latent_rgb_factors, fmt.latent_rgb_factors_bias, **extra)
    return previewer


def preview_sheet(images: list[Image.Image], step: int, losses: list[float], history: PreviewHistory,
                  scorer_name: str) -> Image.Image:
    """[plain | with the offset] at 256 px a side over the loss curve (and the preview scores, when scored)."""
    from ..plot import loss_curve_image

    side = 256
    thumbs = [im.resize((side, max(1, round(side * im.height / max(im.width, 1)))), Image.BICUBIC) for im in images]
    top = max(t.height for t in thumbs) + 20
    curve = _tensor_image(loss_curve_image(losses, width=2 * side + 8, height=180))
    panels = [curve]
    if history.steps:
        panels.append(_score_plot(history, scorer_name, 2 * side + 8, 150))
    sheet = Image.new("RGB", (2 * side + 8, top + sum(p.height for p in panels)), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    d.text((4, 3), f"step {step}: plain CFG", fill=(0, 0, 0))
    d.text((side + 12, 3), "with the offset (negative pass)", fill=(0, 0, 0))
    sheet.paste(thumbs[0], (0, 20))
    sheet.paste(thumbs[1], (side + 8, 20))
    y = top
    for p in panels:
        sheet.paste(p, (0, y))
        y += p.height
    return sheet


def _tensor_image(t: torch.Tensor) -> Image.Image:
    import numpy as np

    return Image.fromarray(np.clip(255.0 * t[0].float().cpu().numpy(), 0, 255).astype(np.uint8))


def _score_plot(h: PreviewHistory, name: str, width: int, height: int) -> Image.Image:
    """The preview scores against the step: plain (grey) and with the offset (blue)."""
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 60, width - 15, 22, height - 20
    d.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    d.text((left, 4), f"{name} of the preview pair: grey plain, blue with the offset", fill=(0, 0, 0))
    vals = [v for v in h.plain + h.npo if math.isfinite(v)]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    s_lo, s_hi = min(h.steps), max(h.steps)
    span = max(s_hi - s_lo, 1)

    def xy(step, v):
        return (left + (right - left) * (step - s_lo) / span, bottom - (bottom - top) * (v - lo) / (hi - lo))

    for series, colour in ((h.plain, (120, 120, 120)), (h.npo, (30, 90, 200))):
        pts = [xy(s, v) for s, v in zip(h.steps, series, strict=True)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    d.text((4, top), f"{hi:.3g}", fill=(0, 0, 0))
    d.text((4, bottom - 10), f"{lo:.3g}", fill=(0, 0, 0))
    return img


def preview_stem(checkpoint_path) -> str | None:
    """Where the previews go: beside the run's checkpoint file, named after it; None when it writes none."""
    if checkpoint_path is None:
        return None
    root, _ = os.path.splitext(str(checkpoint_path))
    return root
