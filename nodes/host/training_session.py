"""Self-NPO training, the ComfyUI side: schedule, denoiser, conds, data-free pool, trainable weights.
"""

from __future__ import annotations

import torch

from ...npo_core.errors import NPOError
from .model_facts import check_unet_model, unet_of


def check_trainable(mp, input_name: str = "model") -> None:
    """TDFT needs a discrete VP schedule (eps, v or x0 prediction); flow matching and continuous schedules
    are refused. Judged on the model_sampling the model will really run with, so a ModelSampling* node
    that turned an SD model into a flow model is caught too."""
    import comfy.model_sampling as ms_types

    check_unet_model(mp, input_name)
    ms = mp.get_model_object("model_sampling")
    discrete_vp = isinstance(ms, ms_types.ModelSamplingDiscrete) and isinstance(ms, ms_types.EPS)
    if not discrete_vp or isinstance(ms, ms_types.CONST):
        bases = type(ms).__bases__  # ModelSampling* nodes build a class from (schedule, prediction type)
        kind = " + ".join(b.__name__ for b in bases) if len(bases) > 1 else type(ms).__name__
        raise NPOError(
            f"{input_name}: Self-NPO training supports discrete eps-, v- and x0-prediction models (SD1.5/SD2/"
            f"SDXL); this model samples with {kind} (flow matching or a continuous schedule, e.g. "
            "after a ModelSampling node), which TDFT's DDIM rollout does not handle. Connect the model "
            "without that node, or a model of a supported family."
        )


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
            raise NPOError(
                f"positive/negative: the prompts' '{k}' inputs cannot be batched (their lengths differ too much); "
                "use prompts of similar length."
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-free start pool: ``count`` latents sampled from the frozen model, prompts cycling.
    Returns (latents in LATENT space [N,C,h,w], prompt index per latent)."""
    import comfy.sample

    c = latent_channels(mp)
    shape = (1, c, height // 8, width // 8)
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
        )
        out.append(lat.float().cpu())
        prompt_of.append(p)
        on_sample(i + 1)
    return torch.cat(out), torch.tensor(prompt_of)


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
        with torch.inference_mode(False):
            for mod_name, module in self.unet.named_modules():
                for pname, old in list(module._parameters.items()):
                    if old is None:
                        continue
                    data = old.data.clone() if self.copy_weights else _autograd_alias(old.data)
                    module._parameters[pname] = torch.nn.Parameter(data, requires_grad=False)
                    self._originals.append((module, pname, old))
                    self._by_name[f"{mod_name}.{pname}" if mod_name else pname] = old
        if self.gradient_checkpointing:
            self._checkpoint_blocks()
        return self

    def _checkpoint_blocks(self) -> None:
        import torch.utils.checkpoint as ckpt

        for m in checkpoint_units(self.unet):
            inner = m.forward

            def forward(*args, _inner=inner, **kwargs):
                if not torch.is_grad_enabled():
                    return _inner(*args, **kwargs)
                return ckpt.checkpoint(_inner, *args, use_reentrant=False, **kwargs)

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
        for m in self._forwards:
            del m.forward
        for module, pname, old in self._originals:
            module._parameters[pname] = old
        self._originals.clear()
        self._by_name.clear()
        return False
