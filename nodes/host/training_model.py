"""The model being trained, as Self-NPO training needs it: built once per run from a ComfyUI ModelPatcher.

It carries the family record and latent layout (``model_facts.describe``), the TDFT schedule of the model's
own sigma table, the compute dtype, the device once loaded, the LoRA targets, and makes the denoiser, the model
inputs, the data-free pool and the training session. Sigma is ComfyUI's (k-diffusion σ; flow: t), x0 comes out
of ``apply_model`` whatever the prediction type (eps / v / flow velocity).
"""

from __future__ import annotations

import torch

from ...npo_core.errors import NPOError
from ...training.lora import select_modules
from ...training.schedules import TDFTSchedule, make_schedule
from . import model_facts, training_conds
from .training_session import TrainingSession


class TrainingModel:
    """One ModelPatcher prepared for TDFT: checked trainable, schedule built, facts read once."""

    def __init__(self, mp, input_name: str = "model") -> None:
        facts = model_facts.describe(mp)
        model_facts.check_supported_model(mp, input_name, facts.family)
        if facts.guidance_distilled:
            raise NPOError(
                f"{input_name}: {facts.family.name} is guidance-distilled: it samples at cfg 1, where there is no "
                "negative pass for an NPO offset to act on, so Self-NPO has nothing to train for. Use a model "
                "sampled with real CFG (e.g. Chroma or Flux.2 klein base instead of Flux.1 dev/schnell)."
            )
        if facts.schedule_kind is None:
            raise NPOError(
                f"{input_name}: Self-NPO training knows discrete eps/v/x0 schedules, zero-terminal-SNR "
                f"v-prediction and flow matching (DiscreteFlow, Flux); this model samples with {facts.sampling}, a "
                "schedule the trainer does not know (e.g. a continuous EDM schedule). Use a model of another "
                "family, or without that ModelSampling node."
            )
        ms = mp.get_model_object("model_sampling")
        self.mp = mp
        self.facts = facts
        self.family = facts.family
        self.latent = facts.latent
        self.schedule_kind: str = facts.schedule_kind
        self.schedule: TDFTSchedule = make_schedule(
            facts.schedule_kind, ms.sigmas.detach().float().cpu(), float(getattr(ms, "noise_scale", 1.0))
        )
        self.compute_dtype: torch.dtype = mp.model.get_dtype()
        self.device: torch.device | None = None

    @property
    def diffusion_model(self) -> torch.nn.Module:
        return model_facts.unet_of(self.mp)

    def load(self, partial: bool = False, memory_required: float = 0.0) -> torch.device:
        """Unload every other model from ComfyUI's torch device (text encoders, VAE, earlier checkpoints), as core's
        Train LoRA does, then load this model there for training: whole, or with ``partial`` as ComfyUI loads a
        model that does not fit (``memory_required`` bytes kept free for training; the rest of the frozen weights
        stays on the offload device and is cast to the device layer by layer in each forward). ComfyUI's model
        management loads the others again when a later node needs them."""
        import comfy.model_management as mm

        device = mm.get_torch_device()
        mine = [m for m in mm.current_loaded_models if m.model is not None and self._is_this_model(m.model)]
        # partial: this model is unloaded too, so that ComfyUI loads it again within the budget
        mm.free_memory(1e30, device, keep_loaded=[] if partial else mine)
        if partial:
            mm.load_models_gpu([self.mp], memory_required=memory_required, force_full_load=False)
        else:
            mm.load_models_gpu([self.mp], memory_required=0, force_full_load=True)
        self.device = device
        return self.device

    def training_memory(self, batch_size: int, spatial: tuple[int, ...]) -> float:
        """Bytes to keep free for training a batch at ``spatial``: ComfyUI's own (conservative) activation estimate
        for a forward of the teacher's CFG batch. With gradient checkpointing the student's backward holds one
        block's activations plus each block's input, less than that forward (Wan 1.3B at 480×832, 33 frames:
        ComfyUI estimates 11.4 GiB for the CFG pass; the measured training activations come to about 2.3 GiB a
        sample in bf16)."""
        shape = [2 * batch_size, self.latent.channels, *spatial]
        return float(self.mp.model.memory_required(shape))

    def _is_this_model(self, patcher) -> bool:
        """The patcher being trained, or a clone of it (the same weights: keeping it loaded saves a reload)."""
        return patcher is self.mp or bool(getattr(patcher, "is_clone", lambda other: False)(self.mp))

    def lora_targets(self, preset: str) -> list[str]:
        """Linear layers (quantized ones included) a lora_layers preset (or regex) trains, leaving out layers
        whose rows mix the batch (an offset there could not be applied later)."""
        names = select_modules(self.diffusion_model, self.family.preset(preset))
        return [n for n in names if not any(p in f".{n}." for p in self.family.mixed_rows)]

    def weight_names(self) -> list[str]:
        return [n for n, _ in self.diffusion_model.named_parameters()]

    def sampler_latent(self, samples: torch.Tensor) -> torch.Tensor:
        """A LATENT's samples as the sampler gets them (image latents of 3-D families get a time axis, as
        ComfyUI's KSampler does)."""
        import comfy.sample

        return comfy.sample.fix_empty_latent_channels(self.mp, samples)

    def to_model_space(self, samples: torch.Tensor) -> torch.Tensor:
        return self.mp.model.process_latent_in(samples)

    def model_inputs(
        self, positive: list, negative, spatial: tuple[int, ...], seed: int = 0
    ) -> tuple[list[dict], dict, dict]:
        """The prompts' model inputs on the CPU (see ``training_conds.model_inputs``) for latents of ``spatial``."""
        shape = (1, self.latent.channels, *spatial)
        return training_conds.model_inputs(self.mp, positive, negative, shape, torch.device("cpu"), seed)

    def denoiser(self, constants: dict | None = None):
        return training_denoiser(self.mp, self.compute_dtype, constants)

    def session(self, gradient_checkpointing: bool, copy_weights: bool) -> TrainingSession:
        return TrainingSession(
            self.diffusion_model, gradient_checkpointing, copy_weights=copy_weights, is_unet=self.family.unet
        )

    def sample_pool(self, positive: list, negative, count: int, shape, steps: int, cfg: float, seed: int,
                    on_sample, on_step=None):
        return sample_pool(self.mp, positive, negative, count, shape, steps, cfg, seed, on_sample, on_step)

    def ignored_sampling_patches(self) -> list[str]:
        return ignored_sampling_patches(self.mp)


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


def sample_pool(
    mp,
    positive_entries: list,
    negative,
    count: int,
    shape: tuple[int, ...],
    steps: int,
    cfg: float,
    seed: int,
    on_sample,
    on_step=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-free start pool: ``count`` latents of ``shape`` (batch 1) sampled from the frozen model, prompts cycling.
    ``on_sample(i)`` runs after sample i, ``on_step()`` after every sampler step (a cancel check: one
    video sample can take minutes). Returns (latents in LATENT space [N,C,h,w] or [N,C,t,h,w], prompt
    index per latent)."""
    import comfy.sample

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
