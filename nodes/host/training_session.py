"""Self-NPO training, the ComfyUI side: schedule, denoiser, conds, data-free pool, trainable weights.
"""

from __future__ import annotations

import torch

from ...npo_core.errors import NPOError
from .model_facts import MIXED_ROWS, check_supported_model, is_unet, model_arch, unet_of


def check_trainable(mp, input_name: str = "model") -> str:
    """The TDFT schedule kind of the model: "vp" (discrete eps / v / x0 prediction), "vp_zsnr"
    (V_PREDICTION_DDPM, zero terminal SNR) or "flow" (CONST: DiscreteFlow and Flux sampling, with the
    model's shift). Judged on the model_sampling the model will really run with, so a ModelSampling* node
    counts. Guidance-distilled models (they sample at cfg 1) and unknown schedules are refused."""
    import comfy.model_sampling as ms_types

    check_supported_model(mp, input_name)
    config = mp.model.model_config
    if config.unet_config.get("guidance_embed") or type(config).__name__ in GUIDANCE_DISTILLED:
        raise NPOError(
            f"{input_name}: {model_arch(mp)} is guidance-distilled: it samples at cfg 1, where there is no negative "
            "pass for an NPO offset to act on, so Self-NPO has nothing to train for. Use a model sampled with "
            "real CFG (e.g. Chroma or Flux.2 klein base instead of Flux.1 dev/schnell)."
        )
    ms = mp.get_model_object("model_sampling")
    table = getattr(ms, "sigmas", None)
    zsnr = getattr(ms_types, "V_PREDICTION_DDPM", None)
    if table is not None and table.dim() == 1 and table.shape[0] >= 100:
        if isinstance(ms, ms_types.CONST):
            return "flow"
        if zsnr is not None and isinstance(ms, zsnr) and isinstance(ms, ms_types.ModelSamplingDiscrete):
            return "vp_zsnr"
        if isinstance(ms, ms_types.ModelSamplingDiscrete) and isinstance(ms, ms_types.EPS):
            return "vp"
    bases = type(ms).__bases__  # ModelSampling* nodes build a class from (schedule, prediction type)
    kind = " + ".join(b.__name__ for b in bases) if len(bases) > 1 else type(ms).__name__
    raise NPOError(
        f"{input_name}: Self-NPO training knows discrete eps/v/x0 schedules, zero-terminal-SNR v-prediction and "
        f"flow matching (DiscreteFlow, Flux); this model samples with {kind}, a schedule the trainer does not "
        "know (e.g. a continuous EDM schedule). Use a model of another family, or without that ModelSampling node."
    )


# ComfyUI model configs of guidance- or step-distilled models that sample at cfg 1
GUIDANCE_DISTILLED = ("FluxSchnell",)


def schedule_kind_and_table(mp) -> tuple[str, torch.Tensor, float]:
    """(kind, the model's sigma table, noise scale) for ``training.schedules.make_schedule``."""
    ms = mp.get_model_object("model_sampling")
    return check_trainable(mp), schedule_sigmas(mp), float(getattr(ms, "noise_scale", 1.0))


def lora_pattern(mp, preset: str) -> str:
    """The module-name regex of a lora_layers preset for this model: the authors' UNet attention projections,
    or a DiT's attention linears (children of a module named *attn* / *attention*) and, with "+ff", its
    feed-forward linears. Families whose block holds those linears directly (no *attn* / *ff* parent) have
    their own patterns (DIT_PRESETS_BY_MODEL)."""
    from ...training.lora import TARGET_PRESETS

    if is_unet(mp) or preset not in DIT_PRESETS:
        return TARGET_PRESETS.get(preset, preset)
    return DIT_PRESETS_BY_MODEL.get(type(mp.model).__name__, {}).get(preset, DIT_PRESETS[preset])


_DIT_ATTENTION = r"(^|\.)[a-z0-9_]*(attn|attention)[a-z0-9_]*\.[a-z0-9_]+(\.0)?$"
_DIT_FF = r"(^|\.)(mlp|ff|ffn|feed_forward|ff_[a-z]+|[a-z_]*_mlp)(\.[a-z0-9_]+)+$"
DIT_PRESETS = {"attention": _DIT_ATTENTION, "attention+ff": f"({_DIT_ATTENTION})|({_DIT_FF})", "all": r".*"}
# per BaseModel class: presets of DiTs whose attention / feed-forward linears are direct children of the block.
# CogVideoX (comfy.ldm.cogvideo.model.CogVideoXBlock): blocks.N.q / k / v / attn_out (the joint text+video
# self-attention; diffusers' attn1.to_q / to_k / to_v / to_out.0) and blocks.N.ff_proj / ff_out.
_COGVIDEOX_ATTENTION = r"(^|\.)blocks\.[0-9]+\.(q|k|v|attn_out)$"
DIT_PRESETS_BY_MODEL = {
    "CogVideoX": {
        "attention": _COGVIDEOX_ATTENTION,
        "attention+ff": rf"({_COGVIDEOX_ATTENTION})|((^|\.)blocks\.[0-9]+\.(ff_proj|ff_out)$)",
    },
}


def training_layers(mp, preset: str) -> list[str]:
    """Linear layers (quantized ones included) the LoRA trains, leaving out layers whose rows mix the batch
    (an offset there could not be applied later)."""
    from ...training.lora import select_modules

    parts = MIXED_ROWS.get(type(mp.model).__name__, ((), ""))[0]
    names = select_modules(unet_of(mp), lora_pattern(mp, preset))
    return [n for n in names if not any(p in f".{n}." for p in parts)]


def ignored_sampling_patches(mp) -> list[str]:
    """The model's sampling-time UNet patches that training does not run (``apply_model`` is called
    without them): unet wrapper functions, transformer patches and replacements, APPLY_MODEL-style
    wrappers (FreeU, attention patches, Apply NPO, ...). Weight patches (LoRAs) and the model_sampling
    object patch *are* used."""
    mo = mp.model_options
    out = ["model_function_wrapper"] if mo.get("model_function_wrapper") else []
    to = mo.get("transformer_options", {})
    for kind in ("patches", "patches_replace"):
        out += [f"{kind}:{name}" for name, v in to.get(kind, {}).items() if v]
    out += [f"wrapper:{kind}" for kind, by_key in to.get("wrappers", {}).items() if any(by_key.values())]
    return out


def schedule_sigmas(mp) -> torch.Tensor:
    """The model's discrete k-diffusion sigmas ν_t, t = 0..T−1 (ModelSamplingDiscrete.sigmas)."""
    ms = mp.get_model_object("model_sampling")
    sig = getattr(ms, "sigmas", None)
    if sig is None or sig.dim() != 1 or sig.shape[0] < 100:
        raise NPOError("model: its model_sampling has no discrete sigma table; Self-NPO needs a discrete schedule.")
    return sig.detach().float().cpu()


def load_for_training(mp) -> torch.device:
    import comfy.model_management as mm

    mm.load_models_gpu([mp], memory_required=0, force_full_load=True)
    return mm.get_torch_device()


def conditioning_entries(conditioning, input_name: str) -> list:
    """One ComfyUI CONDITIONING entry per prompt (Conditioning (Combine) stacks several)."""
    if not conditioning:
        raise NPOError(f"{input_name}: empty conditioning; connect a CLIP Text Encode output.")
    return [[c[0], dict(c[1])] for c in conditioning]


def _cond_objects(mp, entry, latent_shape: tuple[int, ...], device, prompt_type: str) -> dict:
    """ComfyUI's model-cond objects (CONDRegular, CONDCrossAttn, ...) for one conditioning entry, as
    ``encode_model_conds`` makes them for sampling: c_crossattn, y, attention masks, pooled vectors, ..."""
    import comfy.sampler_helpers
    import comfy.samplers

    conds = comfy.sampler_helpers.convert_cond([entry])
    noise = torch.zeros(latent_shape)
    conds = comfy.samplers.encode_model_conds(mp.model.extra_conds, conds, noise, device, prompt_type)
    return conds[0]["model_conds"]


def model_conds(mp, entry, latent_shape: tuple[int, ...], device, prompt_type: str) -> dict[str, torch.Tensor]:
    """Batch-1 model inputs for one conditioning entry: ``{"c_crossattn": ..., "y": ...}`` (SDXL adds y)."""
    out = {}
    for k, v in _cond_objects(mp, entry, latent_shape, device, prompt_type).items():
        if k in ("c_crossattn", "y"):
            out[k] = v.cond.to(device)
    if "c_crossattn" not in out:
        raise NPOError("positive/negative: the conditioning has no cross-attention tensor for this model.")
    return out


def batched_model_conds(mp, entries: list, prompt_types: list[str], latent_shape, device) -> tuple[list[dict], dict]:
    """Model inputs for several conditioning entries (prompts and the negative), made the same length the
    way ComfyUI batches conds for sampling (``CONDCrossAttn.concat`` repeats text to a common length).
    Returns (one batch-1 dict of tensors per entry, the inputs that are not per-row tensors, e.g. constants)."""
    objs = [_cond_objects(mp, e, latent_shape, device, t) for e, t in zip(entries, prompt_types, strict=True)]
    keys = set(objs[0])
    if any(set(o) != keys for o in objs):
        raise NPOError("positive/negative: the prompts give the model different inputs; encode them the same way.")
    rows: dict[str, torch.Tensor] = {}
    constants: dict = {}
    for k in sorted(keys):
        first = objs[0][k]
        value = getattr(first, "cond", None)
        if not (torch.is_tensor(value) and value.shape[:1] == (1,)):
            constants[k] = value
            continue
        others = [o[k] for o in objs[1:]]
        if not all(first.can_concat(o) for o in others):
            import comfy.conds

            shapes = sorted({tuple(o.cond.shape) for o in [first, *others] if torch.is_tensor(o.cond)})
            pads = isinstance(first, comfy.conds.CONDCrossAttn)  # repeats text up to a common length
            why = ("their token lengths differ too much to be padded to one length" if pads else
                   "this model batches only prompts of exactly the same token length")
            raise NPOError(
                f"positive/negative: the prompts' '{k}' inputs cannot be batched for training ({why}; shapes "
                f"{', '.join(str(list(x)) for x in shapes)}). Shorten the longest prompt (or the negative) to the "
                "others' length."
            )
        try:
            rows[k] = first.concat(others).to(device)
        except RuntimeError as e:
            raise NPOError(f"positive/negative: the prompts' '{k}' inputs differ in shape ({e}).") from None
    return [{k: v[i : i + 1] for k, v in rows.items()} for i in range(len(objs))], constants


def training_denoiser(mp, compute_dtype: torch.dtype, constants: dict | None = None):
    """D(x, σ, cond) -> x0 over the ComfyUI model, in the model's own x-space and sigma (``apply_model``
    converts eps / v / flow velocity to x0). ``cond`` holds per-row tensors (``c_crossattn``, ``y``, masks,
    ...); ``constants`` the inputs shared by every row. A float16 or bfloat16 model runs under autocast
    (CUDA or CPU), so fp32 LoRA weights and fp32 masters mix with it; the returned x0 is float32."""
    base = mp.model
    constants = constants or {}

    def denoise(x, sigma, cond):
        kwargs = {k: (v.to(compute_dtype) if v.is_floating_point() else v) for k, v in cond.items()}
        autocast = x.device.type in ("cuda", "cpu") and compute_dtype in (torch.float16, torch.bfloat16)
        with torch.autocast(x.device.type, dtype=compute_dtype, enabled=autocast):
            out = base.apply_model(x.to(compute_dtype), sigma.float(), transformer_options={}, **constants, **kwargs)
        return out.float()

    return denoise


def latent_to_model_space(mp, samples: torch.Tensor) -> torch.Tensor:
    return mp.model.process_latent_in(samples)


def latent_channels(mp) -> int:
    return int(mp.model.latent_format.latent_channels)


def spatial_factor(mp) -> int:
    return int(getattr(mp.model.latent_format, "spacial_downscale_ratio", 8))


def latent_rank(mp) -> int:
    """4 for image latents [B, C, h, w], 5 for video latents [B, C, t, h, w] (the sampler's view)."""
    return 2 + int(getattr(mp.model.latent_format, "latent_dimensions", 2))


def pool_latent_shape(mp, width: int, height: int, frames: int) -> tuple[int, ...]:
    """The latent a data-free pool sample has, as ComfyUI's empty-latent nodes make it for the family."""
    fmt = mp.model.latent_format
    f = spatial_factor(mp)
    spatial = (height // f, width // f)
    if latent_rank(mp) == 5:
        t = (frames - 1) // int(getattr(fmt, "temporal_downscale_ratio", 1)) + 1
        return (1, latent_channels(mp), t, *spatial)
    return (1, latent_channels(mp), *spatial)


def sampler_latent(mp, samples: torch.Tensor) -> torch.Tensor:
    """A LATENT's samples as the sampler gets them (image latents of 3-D families get a time axis, as
    ComfyUI's KSampler does)."""
    import comfy.sample

    return comfy.sample.fix_empty_latent_channels(mp, samples)


def sample_pool(
    mp,
    positive_entries: list,
    negative,
    count: int,
    width: int,
    height: int,
    steps: int,
    cfg: float,
    seed: int,
    on_sample,
    frames: int = 1,
    on_step=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-free start pool: ``count`` latents sampled from the frozen model, prompts cycling.
    ``on_sample(i)`` runs after sample i, ``on_step()`` after every sampler step (a cancel check: one
    video sample can take minutes). Returns (latents in LATENT space [N,C,h,w] or [N,C,t,h,w], prompt
    index per latent)."""
    import comfy.sample

    shape = pool_latent_shape(mp, width, height, frames)
    out, prompt_of = [], []
    for i in range(count):
        p = i % len(positive_entries)
        gen = torch.Generator().manual_seed(seed + i)
        noise = torch.randn(shape, generator=gen)
        lat = comfy.sample.sample(
            mp,
            noise,
            steps,
            cfg,
            "euler",
            "normal",
            [positive_entries[p]],
            negative,
            torch.zeros(shape),
            seed=seed + i,
            disable_pbar=True,
            callback=None if on_step is None else (lambda step, x0, x, total: on_step()),
        )
        out.append(lat.float().cpu())
        prompt_of.append(p)
        on_sample(i + 1)
    return torch.cat(out), torch.tensor(prompt_of)


def is_unet_module(model: torch.nn.Module) -> bool:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return isinstance(model, UNetModel)


def _with_copied_inputs(fn):
    def run(*args, **kwargs):
        copy = lambda v: v.clone() if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
        return fn(*[copy(a) for a in args], **{k: copy(v) for k, v in kwargs.items()})

    return run


def checkpoint_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules gradient checkpointing wraps: a UNet's transformer and residual blocks; a DiT's
    transformer blocks (the members of its block lists: ``blocks``, ``joint_blocks``, ``double_blocks``,
    ``single_blocks``, ``transformer_blocks``, ``layers``, ...)."""
    from comfy.ldm.modules.attention import BasicTransformerBlock
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, UNetModel

    if isinstance(model, UNetModel):
        return [m for m in model.modules() if isinstance(m, (BasicTransformerBlock, ResBlock))]
    out = []
    for _, child in model.named_children():
        if isinstance(child, torch.nn.ModuleList) and len(child) and all(
            any(True for _ in b.parameters()) for b in child
        ):
            out.extend(child)
    return out


def _autograd_alias(t: torch.Tensor) -> torch.Tensor:
    """A normal tensor sharing ``t``'s memory. Inference tensors (what ComfyUI loads weights as, since
    nodes run under ``torch.inference_mode``) cannot be saved for backward; an alias made outside
    inference mode can, and costs no copy. Only for weights that are never written to."""
    out = torch.empty(0, dtype=t.dtype, device=t.device)
    return out.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


class TrainingSession:
    """Puts a loaded ComfyUI UNet into training shape and restores it exactly afterwards.

    Nodes run under ``torch.inference_mode``, so the model's Parameters are inference tensors that
    autograd can neither save nor version (even after ``.data`` is replaced). For the session every
    Parameter is replaced by a fresh normal Parameter: with ``copy_weights`` (``full`` mode, where these
    become the student) a copy of its values, ≈ one extra UNet in its own dtype; without (``lora`` mode,
    base weights frozen) an alias of the same memory, no copy. The original Parameter objects are never
    touched and are put back on exit, so the model is bit-identical afterwards. Mixed precision comes
    from autocast in ``training_denoiser``; gradient checkpointing wraps the transformer and residual
    blocks.
    """

    def __init__(self, mp, gradient_checkpointing: bool, copy_weights: bool = True) -> None:
        self.unet = unet_of(mp)
        self.gradient_checkpointing = gradient_checkpointing
        self.copy_weights = copy_weights
        self._originals: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
        self._by_name: dict[str, torch.nn.Parameter] = {}
        self._forwards: list[torch.nn.Module] = []

    def __enter__(self):
        import comfy.model_management as mm

        # ComfyUI's own flag for training (its LoRA trainer sets it): model code then takes the differentiable
        # paths instead of fused inference kernels without a backward (comfy-kitchen's rope, for one)
        if self.copy_weights:  # refused before anything is replaced
            for name, p in self.unet.named_parameters():
                if type(p.data) is not torch.Tensor:
                    raise NPOError(
                        f"mode: full trains every weight, but '{name}' is quantized ({type(p.data).__name__}); use "
                        "mode lora on quantized checkpoints."
                    )
        self._was_training = getattr(mm, "in_training", None)
        if self._was_training is not None:
            mm.in_training = True
        with torch.inference_mode(False):
            for mod_name, module in self.unet.named_modules():
                for pname, old in list(module._parameters.items()):
                    if old is None:
                        continue
                    if type(old.data) is not torch.Tensor:  # a quantized weight (ComfyUI's QuantizedTensor)
                        continue  # its layer dequantizes into a fresh tensor each call: nothing to alias
                    data = old.data.clone() if self.copy_weights else _autograd_alias(old.data)
                    module._parameters[pname] = torch.nn.Parameter(data, requires_grad=False)
                    self._originals.append((module, pname, old))
                    self._by_name[f"{mod_name}.{pname}" if mod_name else pname] = old
        if self.gradient_checkpointing:
            self._checkpoint_blocks()
        return self

    def _checkpoint_blocks(self) -> None:
        import torch.utils.checkpoint as ckpt

        # DiT blocks update their inputs in place (Flux: ``img += ...``), which would change the tensors the
        # checkpoint saved for recomputation: they get copies of their tensor inputs instead
        copy_inputs = not is_unet_module(self.unet)
        for m in checkpoint_units(self.unet):
            inner = m.forward

            def forward(*args, _inner=inner, _copy=copy_inputs, **kwargs):
                if not torch.is_grad_enabled():
                    return _inner(*args, **kwargs)
                run = _with_copied_inputs(_inner) if _copy else _inner
                return ckpt.checkpoint(run, *args, use_reentrant=False, **kwargs)

            m.forward = forward
            self._forwards.append(m)

    def full_params(self, dtype: torch.dtype) -> dict[str, torch.nn.Parameter]:
        """All UNet weights as trainable Parameters in ``dtype`` (the student of full fine-tuning)."""
        if not self.copy_weights:
            raise RuntimeError("full_params needs a session with copy_weights=True (the weights get trained)")
        out = {}
        with torch.inference_mode(False):
            for name, p in self.unet.named_parameters():
                if p.dtype != dtype:
                    p.data = p.data.to(dtype)
                out[name] = p
        return out

    def original(self, name: str) -> torch.Tensor:
        return self._by_name[name].data

    def __exit__(self, *exc):
        import comfy.model_management as mm

        if self._was_training is not None:
            mm.in_training = self._was_training
        for m in self._forwards:
            del m.forward
        for module, pname, old in self._originals:
            module._parameters[pname] = old
        self._originals.clear()
        self._by_name.clear()
        return False
