"""CLIP image preprocessing as transformers' PIL CLIPImageProcessor does it, read from a preprocessor_config.json.

Conventions: images are ComfyUI IMAGE tensors [B, H, W, 3] float in 0..1 (quantised to uint8 by truncation, as
ComfyUI's SaveImage writes the PNG, so a tensor scores as its saved file does), uint8 tensors [B, H, W, 3], or
PIL images. Output: pixel_values [B, 3, crop_h, crop_w] float32. Steps: resize (shortest side to ``size``, the long
side ``int(size * long / short)``), centre crop (top ``(h - crop_h) // 2``, zero padding if the crop is larger),
times ``rescale_factor``, minus mean, over std. Backend ``"pil"`` resizes each image with PIL, exactly as
CLIPImageProcessor (transformers 4.x) / CLIPImageProcessorPil (5.x) do; ``"torch"`` is batched on the images'
device with antialiased separable passes rounded to uint8 after each pass as PIL's 8-bit resampler does (measured
against PIL, sizes 37x55 to 1344x768 into 224: at most 2 uint8 levels on at most 1.3 % of the values for uniform
noise, 1 level on at most 0.3 % for smoother images; transformers 5's torchvision CLIPImageProcessor is as far).
OpenAI's own CLIP preprocess (the LAION aesthetic predictor's) crops at ``round((h - crop_h) / 2)``: one pixel off
this crop when ``h - crop_h`` is odd.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..npo_core.errors import NPOError

CONFIG_NAME = "preprocessor_config.json"
PIL_BILINEAR = 2
PIL_BICUBIC = 3
_TORCH_MODES = {PIL_BILINEAR: "bilinear", PIL_BICUBIC: "bicubic"}
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BACKENDS = ("pil", "torch")


def _hw(value, key: str, source: str) -> tuple[int, int]:
    """A crop or resize size from the config: an int (square) or {"height", "width"}."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    raise NPOError(f"{source}: '{key}' is {value!r}; expected an int or {{'height': H, 'width': W}} (fix the file)")


@dataclass(frozen=True)
class ClipPreprocess:
    """One preprocessor_config.json: sizes in pixels (height, width), mean / std per RGB channel, PIL filter id."""

    shortest_edge: int | None = 224  # resize the short side to this (None: resize_hw or no resize)
    resize_hw: tuple[int, int] | None = None  # resize to exactly this when shortest_edge is None
    crop_hw: tuple[int, int] | None = (224, 224)  # None: no centre crop
    rescale_factor: float | None = 1 / 255  # None: no rescale
    mean: tuple[float, float, float] | None = OPENAI_CLIP_MEAN  # None (with std): no normalisation
    std: tuple[float, float, float] | None = OPENAI_CLIP_STD
    resample: int = PIL_BICUBIC

    @classmethod
    def from_config(cls, cfg: dict, source: str = CONFIG_NAME) -> ClipPreprocess:
        """Parse a CLIPImageProcessor / CLIPFeatureExtractor config dict (missing keys take CLIP's defaults)."""
        shortest, resize_hw = None, None
        if cfg.get("do_resize", True):
            size = cfg.get("size", {"shortest_edge": 224})
            if isinstance(size, int):
                shortest = size
            elif isinstance(size, dict) and "shortest_edge" in size and not size.get("longest_edge"):
                shortest = int(size["shortest_edge"])
            else:
                resize_hw = _hw(size, "size", source)
        crop = _hw(cfg.get("crop_size", 224), "crop_size", source) if cfg.get("do_center_crop", True) else None
        rescale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else None
        mean, std = None, None
        if cfg.get("do_normalize", True):
            mean = tuple(float(v) for v in cfg.get("image_mean", OPENAI_CLIP_MEAN))
            std = tuple(float(v) for v in cfg.get("image_std", OPENAI_CLIP_STD))
            if len(mean) != 3 or len(std) != 3:
                raise NPOError(f"{source}: image_mean / image_std need 3 values (RGB); got {mean} / {std}")
        resample = int(cfg.get("resample", PIL_BICUBIC))
        if resample not in _TORCH_MODES:
            raise NPOError(f"{source}: resample {resample} is not supported; use 3 (bicubic, CLIP's) or 2 (bilinear)")
        return cls(shortest, resize_hw, crop, rescale, mean, std, resample)

    @classmethod
    def from_file(cls, path: str | Path) -> ClipPreprocess:
        """Read a preprocessor_config.json; a folder means its preprocessor_config.json."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.is_file():
            raise NPOError(f"{path} not found: copy the model's {CONFIG_NAME} (CLIP image processor settings) there")
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise NPOError(f"{path} is not readable JSON ({e}); copy the model's original {CONFIG_NAME}") from e
        if not isinstance(cfg, dict):
            raise NPOError(f"{path} is not a JSON object; copy the model's original {CONFIG_NAME}")
        return cls.from_config(cfg, str(path))

    def resized_hw(self, h: int, w: int) -> tuple[int, int]:
        """The (height, width) after the resize step, as transformers' get_resize_output_image_size computes it."""
        if self.shortest_edge is not None:
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            return (new_long, new_short) if w <= h else (new_short, new_long)
        return self.resize_hw if self.resize_hw is not None else (h, w)

    def __call__(self, images, backend: str = "pil", device: torch.device | str | None = None) -> torch.Tensor:
        """pixel_values [B, 3, h, w] float32 on ``device`` (default: the images' device, CPU for PIL input)."""
        if backend not in BACKENDS:
            raise NPOError(f"backend {backend!r}: use one of {BACKENDS}")
        u8 = to_uint8(images)
        dev = torch.device(device) if device is not None else (u8.device if isinstance(u8, torch.Tensor) else None)
        if backend == "pil":
            levels = torch.stack([self._resize_crop_pil(img.cpu().numpy()) for img in u8]).to(dev)
        elif isinstance(u8, torch.Tensor):
            levels = self._resize_crop_torch(u8.to(dev))
        else:
            levels = torch.cat([self._resize_crop_torch(img[None].to(dev)) for img in u8])
        return self._normalise(levels)

    def _resize_crop_pil(self, img: np.ndarray) -> torch.Tensor:
        """One uint8 [H, W, 3] array → float64 levels [3, h, w] (0..255), resized with PIL."""
        from PIL import Image

        h, w = img.shape[:2]
        nh, nw = self.resized_hw(h, w)
        if (nh, nw) != (h, w):
            img = np.asarray(Image.fromarray(img).resize((nw, nh), resample=self.resample))
        return self._crop(torch.from_numpy(np.array(img)).permute(2, 0, 1).to(torch.float64))

    def _resize_crop_torch(self, u8: torch.Tensor) -> torch.Tensor:
        """A uint8 [B, H, W, 3] batch → float64 levels [B, 3, h, w], separable passes rounded like PIL's."""
        x = u8.permute(0, 3, 1, 2).to(torch.float32)
        h, w = x.shape[-2:]
        nh, nw = self.resized_hw(h, w)
        mode = _TORCH_MODES[self.resample]
        for size in ((h, nw), (nh, nw)):  # horizontal pass first, as PIL does
            if size != tuple(x.shape[-2:]):
                x = F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)
                x = torch.floor(x + 0.5).clamp_(0, 255)  # PIL rounds half up and clips to uint8 after each pass
        return self._crop(x.to(torch.float64))

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        """Centre crop [..., H, W] to crop_hw as transformers' center_crop does (zero padding if too small)."""
        if self.crop_hw is None:
            return x
        ch, cw = self.crop_hw
        h, w = x.shape[-2:]
        if ch > h or cw > w:
            ph, pw = max(ch, h), max(cw, w)
            padded = x.new_zeros((*x.shape[:-2], ph, pw))
            top_pad, left_pad = math.ceil((ph - h) / 2), math.ceil((pw - w) / 2)
            padded[..., top_pad : top_pad + h, left_pad : left_pad + w] = x
            top, left = (h - ch) // 2 + top_pad, (w - cw) // 2 + left_pad
            x, h, w = padded, ph, pw
        else:
            top, left = (h - ch) // 2, (w - cw) // 2
        return x[..., top : top + ch, left : left + cw]

    def _normalise(self, levels: torch.Tensor) -> torch.Tensor:
        """float64 levels → float32 pixel_values: rescale in float64 then float32, (x - mean) / std in float32."""
        x = levels * self.rescale_factor if self.rescale_factor is not None else levels
        x = x.to(torch.float32)
        if self.mean is not None:
            shape = (1, 3, 1, 1) if x.dim() == 4 else (3, 1, 1)
            mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(shape)
            std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(shape)
            x = (x - mean) / std
        return x.contiguous()


def to_uint8(images) -> torch.Tensor | list[torch.Tensor]:
    """IMAGE tensor [B, H, W, 3] (float 0..1, or uint8) → uint8 [B, H, W, 3]; PIL images → uint8 [H, W, 3] each."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
            raise NPOError(
                f"images: got a tensor of shape {tuple(images.shape)}; expected a ComfyUI IMAGE [B, H, W, 3] "
                "(drop an alpha channel first)"
            )
        if images.dtype == torch.uint8:
            return images
        if not images.is_floating_point():
            raise NPOError(f"images: dtype {images.dtype}; expected float in 0..1 (ComfyUI IMAGE) or uint8")
        # as SaveImage: np.clip(255. * x, 0, 255).astype(np.uint8), i.e. truncation in float32
        return (images.detach().to(torch.float32) * 255.0).clamp(0, 255).to(torch.uint8)
    if isinstance(images, Sequence) and len(images) > 0 and all(hasattr(im, "convert") for im in images):
        return [torch.from_numpy(np.array(im.convert("RGB") if im.mode != "RGB" else im)) for im in images]
    raise NPOError(
        f"images: got {type(images).__name__}; expected an IMAGE tensor [B, H, W, 3] or a list of PIL images"
    )
