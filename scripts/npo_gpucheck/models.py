"""Random-weight models loaded by ComfyUI's own loader, random conditioning and latents, sampling, a random LoRA
offset (worker side: imports torch and ComfyUI)."""

from __future__ import annotations

import math

import torch

from .plan import ModelSpec

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_TILE = 1 << 22  # unit normals tiled into every weight: fast, and the values only need sane scales


def random_checkpoint(spec: ModelSpec, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """The diffusion model's weights as a checkpoint file in ``dtype`` holds them, random: names and shapes from
    ComfyUI's config class built on the meta device; matrices ~ N(0, 1/fan_in), 1-D weights (norm scales) 1,
    biases 0.02·N."""
    import comfy.supported_models

    with torch.device("meta"):
        cfg = getattr(comfy.supported_models, spec.config_class)(dict(spec.unet_config))
        shapes = {k: tuple(v.shape) for k, v in cfg.get_model({}).diffusion_model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    tile = torch.randn(_TILE, generator=g)
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 1 and name.endswith("weight"):
            out[name] = torch.ones(shape, dtype=dtype)
            continue
        n = math.prod(shape)
        start = int(torch.randint(0, _TILE, (1,), generator=g))
        flat = tile.repeat(-(-(n + start) // _TILE))[start:start + n]
        scale = math.prod(shape[1:]) ** -0.5 if len(shape) >= 2 else 0.02
        out[name] = (flat * scale).to(dtype).reshape(shape)
    return out


def load(spec: ModelSpec, dtype_name: str, seed: int = 0):
    """A ModelPatcher from ComfyUI's diffusion-model loader (what Load Diffusion Model does with a file of that
    dtype): the class is detected from the weights, the patcher is ComfyUI's CoreModelPatcher."""
    import comfy.sd

    sd = random_checkpoint(spec, DTYPES[dtype_name], seed)
    mp = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": DTYPES[dtype_name]})
    found = type(mp.model.model_config).__name__ if mp is not None else None
    if found != spec.config_class:
        raise RuntimeError(f"ComfyUI's loader detected {found} from the random {spec.config_class} weights")
    return mp


def describe(mp) -> dict:
    """Parameter count, dtype and patcher class of a loaded model."""
    return {
        "params_m": round(sum(p.numel() for p in mp.model.diffusion_model.parameters()) / 1e6, 1),
        "dtype": str(mp.model.get_dtype()).replace("torch.", ""),
        "patcher": type(mp).__name__,
    }


def conds(spec: ModelSpec, seed: int = 1) -> tuple[list, list]:
    """(positive, negative) CONDITIONING of random text embeddings [1, tokens, width] (no text encoder)."""
    g = torch.Generator().manual_seed(seed)
    tokens, width = spec.text
    return [[torch.randn(1, tokens, width, generator=g), {}]], [[torch.randn(1, tokens, width, generator=g), {}]]


def latents(spec: ModelSpec, batch: int, seed: int = 2, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Random start latents [batch, *spec.latent] (or ``shape``, batch first), as VAE Encode would give."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape or (batch, *spec.latent), generator=g)


def sample(mp, spec: ModelSpec, pos, neg, steps: int, seed: int = 0, callback=None) -> torch.Tensor:
    """comfy.sample.sample (the KSampler node's function) at batch 1, euler, under inference mode."""
    import comfy.sample

    latent = torch.zeros(1, *spec.latent)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return comfy.sample.sample(mp, noise, steps, spec.cfg, "euler", spec.scheduler, pos, neg, latent,
                                   seed=seed, disable_pbar=True, callback=callback)


def finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def random_lora_offset(mp, rank: int, seed: int = 3):
    """A rank-``rank`` LoRA on the layers Self-NPO's ``attention`` preset trains, in ComfyUI's LoRA layout, read
    by the pack's parser (what Load NPO Offset does with such a file)."""
    from comfyui_npo.nodes.host.training_model import TrainingModel
    from comfyui_npo.npo_core import formats

    names = TrainingModel(mp.clone()).lora_targets("attention")
    shapes = {k: tuple(v.shape) for k, v in mp.model.diffusion_model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for m in names:
        out_f, in_f = shapes[f"{m}.weight"][:2]
        sd[f"diffusion_model.{m}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) * in_f**-0.5
        sd[f"diffusion_model.{m}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * (0.05 * rank**-0.5)
        sd[f"diffusion_model.{m}.alpha"] = torch.tensor(float(rank))
    return formats.parse_state_dict(sd, {}, source=f"gpu_check rank-{rank} LoRA"), len(names)
