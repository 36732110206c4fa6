"""Self-NPO Train."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import torch
from comfy_api.latest import io, ui

from ..npo_core.errors import NPOError
from ..npo_core.offset import Dense, NPOOffset
from ..training import tdft
from ..training.data import StartData
from ..training.lora import TARGET_PRESETS, LoRASet
from ..training.schedules import make_schedule
from ..training.trainer import Callbacks, TrainConfig, TrainingError, load_checkpoint, train
from .common import CATEGORY, NPOOffsetType
from .host import files, model_facts, runtime, training_session
from .plot import loss_curve_image

CHECKPOINT_SUBDIR = "npo_training"
NONE = "none"
IGNORED_PATCHES_NOTE = (
    "the model's sampling patches are not run during training (teacher and student are the UNet with its "
    "weight patches, e.g. LoRAs)"
)
# Learning rates when learning_rate is 0 ("auto"). full: the authors' values (SD1.5 1e-6, SDXL 1e-7).
# lora: not from the paper (the authors train all weights); a starting point, see README "Tuning".
AUTO_LR = {("full", "SDXL"): 1e-7, ("full", "other"): 1e-6, ("lora", "SDXL"): 2e-5, ("lora", "other"): 1e-4}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TRAIN_OOM_REMEDIES = (
    "Lower batch_size or the resolution (width/height, or smaller latents), turn on gradient_checkpointing, "
    "use mode lora or a lower rank; resume_from the last checkpoint keeps the steps already done."
)
POOL_OOM_REMEDIES = "Lower width/height, or connect latents (e.g. VAE Encode of your images) instead of the pool."


def checkpoint_files() -> list[str]:
    """Checkpoints under output/npo_training, subfolders included (a prefix like ``sd15/run`` writes there),
    as paths relative to that folder with '/' separators."""
    folder = os.path.join(files.output_dir(), CHECKPOINT_SUBDIR)
    names = []
    for here, _dirs, found in os.walk(folder, followlinks=True):
        rel = os.path.relpath(here, folder)
        names += [f if rel == "." else f"{rel}/{f}".replace(os.sep, "/") for f in found if f.endswith(".pt")]
    return [NONE, *sorted(names)]


class SelfNPOTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SelfNPOTrain",
            display_name="Self-NPO Train",
            category=CATEGORY,
            description="Self-NPO: learns an NPO offset for the connected checkpoint from the model itself by "
            "truncated diffusion fine-tuning (TDFT): no preference data, no reward model. The model you "
            "connect is never changed; the result is an NPO_OFFSET for Apply NPO / NPO CFG Guider.",
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The model to make an NPO offset for: SD1.5/SD2/SDXL (eps or v-prediction) or a DiT / "
                    "video model sampled with real CFG (SD3.5, Wan, Qwen-Image, Chroma, ...; its own flow schedule, "
                    "after any ModelSampling node). Guidance-distilled models are refused.",
                ),
                io.Conditioning.Input(
                    "positive",
                    tooltip="Training prompts. Several prompts: combine them with Conditioning (Combine); each "
                    "entry is one prompt. With latents, latent i trains with prompt i (cycling when there are "
                    "fewer prompts); the data-free pool is sampled with the prompts in turn.",
                ),
                io.Conditioning.Input(
                    "negative",
                    tooltip="The unconditional/negative conditioning (SD1.5: empty "
                    "prompt; SDXL: zeroed, as the authors).",
                ),
                io.Latent.Input(
                    "latents",
                    optional=True,
                    tooltip="Start latents (e.g. your images through VAE Encode), as in the authors' code. "
                    "Leave empty for the data-free default: a pool sampled from the model.",
                ),
                io.Int.Input(
                    "steps",
                    default=1000,
                    min=1,
                    max=1_000_000,
                    tooltip="Optimizer steps in total (the authors: 1000). When resuming, the total to reach.",
                ),
                io.Int.Input(
                    "batch_size",
                    default=4,
                    min=1,
                    max=256,
                    tooltip="Samples per step (the authors: 20 for SD1.5, 10 for SDXL, on 80 GB GPUs).",
                ),
                io.String.Input(
                    "learning_rate",
                    default="auto",
                    tooltip="auto = the mode's default: full 1e-6 (SD1.5) / 1e-7 (SDXL) as the authors; "
                    "lora 1e-4 (SD1.5 and DiTs) / 2e-5 (SDXL). Or a number, e.g. 5e-5.",
                ),
                io.Combo.Input(
                    "mode",
                    options=["lora", "full"],
                    default="lora",
                    tooltip="lora: low-rank adapters, teacher = base + EMA of the LoRA (no second model), "
                    "fits consumer GPUs. full: all weights like the paper (needs ~6× the model's size in "
                    "memory; not on fp8 / quantized weights).",
                ),
                io.Int.Input(
                    "rank",
                    default=16,
                    min=0,
                    max=1024,
                    tooltip="lora: the LoRA rank. full: compress the dense result to this rank by SVD "
                    "(0 keeps it dense).",
                ),
                io.Combo.Input(
                    "lora_layers",
                    options=list(TARGET_PRESETS),
                    default="attention",
                    optional=True,
                    tooltip="lora: which layers get adapters (attention = to_q/k/v/out of every attention, "
                    "the layers of the released NPO LoRAs).",
                ),
                io.Int.Input(
                    "truncation_steps",
                    default=5,
                    min=1,
                    max=25,
                    tooltip="K: teacher steps per sample before the target is taken (the authors: 5): DDIM steps on "
                    "SD models, Euler steps on flow models.",
                ),
                io.Float.Input(
                    "teacher_guidance",
                    default=-1.0,
                    min=-20.0,
                    max=20.0,
                    step=0.5,
                    tooltip="w in x0_c + w(x0_c − x0_u) for the teacher. −1 (authors' SD1.5) = purely "
                    "unconditional (and skips the conditional pass); the authors used −5 for SDXL. "
                    "Positive values would teach a better model: the wrong direction.",
                ),
                io.Float.Input(
                    "ema_decay",
                    default=0.999,
                    min=0.0,
                    max=0.99999,
                    step=0.0001,
                    round=0.00001,
                    tooltip="The teacher is the EMA of the student with this decay (the authors: 0.999).",
                ),
                io.Combo.Input(
                    "loss",
                    options=list(tdft.LOSSES),
                    default="pseudo_huber",
                    tooltip="pseudo_huber (c = 1e-3, the authors') or mse, in x0 space.",
                ),
                io.Combo.Input(
                    "student_cond",
                    options=list(tdft.STUDENT_CONDS),
                    default="prompt",
                    optional=True,
                    tooltip="What the student is conditioned on: the prompt (the authors' code), the "
                    "negative/empty conditioning (the branch NPO later queries), or a 50/50 mix. Flow / DiT "
                    "models: negative (it helped on the pack's flow benchmark; prompt hardly did).",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFF,
                    control_after_generate=False,
                    tooltip="Seed for the pool, the noise and the sampled timesteps.",
                ),
                io.Boolean.Input(
                    "gradient_checkpointing",
                    default=True,
                    tooltip="Recompute activations in the backward pass: much less memory, ~30% slower.",
                ),
                io.Combo.Input(
                    "training_dtype",
                    options=list(DTYPES),
                    default="fp32",
                    tooltip="Dtype of the trainable weights (the forward runs in the model's dtype; an fp16 model "
                    "gets dynamic loss scaling). fp32 as the authors (fp32 master weights).",
                ),
                io.Int.Input(
                    "save_every",
                    default=100,
                    min=0,
                    max=1_000_000,
                    tooltip="Write a resumable checkpoint (weights, optimizer, EMA, step, RNG) every N steps "
                    "into output/npo_training. 0 = never.",
                ),
                io.String.Input(
                    "filename_prefix", default="self_npo", tooltip="Name of the checkpoint file in output/npo_training."
                ),
                io.Combo.Input(
                    "resume_from",
                    options=checkpoint_files(),
                    default=NONE,
                    optional=True,
                    tooltip="A checkpoint from output/npo_training (subfolders included) to continue (same model, "
                    "mode, rank, layers). Training continues to `steps` in total.",
                ),
                io.Int.Input(
                    "pool_size",
                    default=16,
                    min=1,
                    max=10_000,
                    optional=True,
                    tooltip="Data-free pool: how many start latents to sample from the model first.",
                ),
                io.Int.Input(
                    "width",
                    default=512,
                    min=64,
                    max=4096,
                    step=8,
                    optional=True,
                    tooltip="Data-free pool: image width (a multiple of the model's latent factor, 8 for most; "
                    "SDXL: 1024).",
                ),
                io.Int.Input(
                    "height",
                    default=512,
                    min=64,
                    max=4096,
                    step=8,
                    optional=True,
                    tooltip="Data-free pool: image height (a multiple of the model's latent factor, 8 for most; "
                    "SDXL: 1024).",
                ),
                io.Int.Input(
                    "pool_steps",
                    default=20,
                    min=1,
                    max=200,
                    optional=True,
                    tooltip="Data-free pool: sampling steps per pool latent (euler).",
                ),
                io.Float.Input(
                    "pool_cfg",
                    default=7.0,
                    min=1.0,
                    max=30.0,
                    step=0.5,
                    optional=True,
                    tooltip="Data-free pool: CFG scale used to sample the pool.",
                ),
                io.Int.Input(
                    "frames",
                    default=1,
                    min=1,
                    max=1024,
                    step=4,
                    optional=True,
                    tooltip="Data-free pool, video models (Wan, HunyuanVideo, LTX-Video, ...): frames per pool "
                    "sample (Wan: 4k+1, e.g. 1, 5, 9); image models ignore it.",
                ),
            ],
            outputs=[
                NPOOffsetType.Output(display_name="npo_offset"),
                io.Image.Output(display_name="loss_curve"),
                io.Int.Output(display_name="steps"),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(
        cls,
        model,
        positive,
        negative,
        steps: int,
        batch_size: int,
        learning_rate,
        mode: str,
        rank: int,
        truncation_steps: int,
        teacher_guidance: float,
        ema_decay: float,
        loss: str,
        seed: int,
        gradient_checkpointing: bool,
        training_dtype: str,
        save_every: int,
        filename_prefix: str,
        latents=None,
        lora_layers: str = "attention",
        student_cond: str = "prompt",
        resume_from: str = NONE,
        pool_size: int = 16,
        width: int = 512,
        height: int = 512,
        pool_steps: int = 20,
        pool_cfg: float = 7.0,
        frames: int = 1,
    ) -> io.NodeOutput:
        run = _plan(
            model, positive, negative, steps, batch_size, learning_rate, mode, rank, truncation_steps,
            teacher_guidance, ema_decay, loss, seed, training_dtype, save_every, filename_prefix, latents,
            lora_layers, student_cond, resume_from, width, height, frames,
        )
        mp = model.clone()
        pool = 0 if latents is not None else pool_size
        pbar = runtime.progress_bar(pool + steps)
        device = training_session.load_for_training(mp)
        if latents is None:
            samples, prompt_of, device = _sample_pool(
                mp, run, pool_size, width, height, pool_steps, pool_cfg, seed, pbar
            )
        else:
            samples = training_session.sampler_latent(mp, latents["samples"])
            # latent i trains with prompt i (cycling when there are fewer prompts), as the authors train each
            # image with its own caption
            prompt_of = torch.arange(samples.shape[0]) % len(run.positive)
        pbar.update_absolute(pool + run.done, pool + steps)  # a resumed run starts at the steps already done
        with torch.inference_mode(False), torch.enable_grad():
            data, constants = _start_data(mp, run, samples, prompt_of, seed, device)
            callbacks = Callbacks(
                on_step=lambda done, total, value: pbar.update_absolute(pool + done, pool + steps),
                should_stop=runtime.interrupted,
            )
            result, offset = _train(mp, run, data, constants, callbacks, gradient_checkpointing, device)
        if result.stopped_early:
            runtime.throw_if_interrupted()  # ComfyUI's cancel: the last checkpoint is kept for resume_from
        if mode == "full" and rank > 0 and offset.entries:
            offset, energy = offset.compressed(rank)
            runtime.log.info("Self-NPO full offset compressed to rank %d, energy kept %.4f", rank, energy)
        return io.NodeOutput(
            offset, loss_curve_image(result.losses), result.steps_done, ui=ui.PreviewText(_report(run, result))
        )


@dataclasses.dataclass
class _Run:
    """Everything Self-NPO Train checked before any sampling."""

    cfg: TrainConfig
    mode: str
    rank: int
    lora_layers: str
    training_dtype: str
    arch: str
    lr_text: str
    layer_names: list[str]
    signature: str
    positive: list
    negative: list
    channels: int
    checkpoint_path: str
    resume_path: str | None
    resume_state: dict | None
    ignored_patches: list[str]
    schedule_kind: str = "vp"  # training.schedules kind: vp, vp_zsnr or flow
    frames: int = 1  # data-free pool, video models

    @property
    def done(self) -> int:
        return int(self.resume_state["step"]) if self.resume_state else 0


def _plan(
    model, positive, negative, steps, batch_size, learning_rate, mode, rank, truncation_steps, teacher_guidance,
    ema_decay, loss, seed, training_dtype, save_every, filename_prefix, latents, lora_layers, student_cond,
    resume_from, width, height, frames,
) -> _Run:
    """Validate every input and read the resume checkpoint (once), so that bad input fails before sampling."""
    kind, sigmas, noise_scale = training_session.schedule_kind_and_table(model)
    if mode not in ("lora", "full"):
        raise NPOError(f"mode: '{mode}' is not one of lora, full.")
    if mode == "lora" and rank < 1:
        raise NPOError("rank: lora mode needs rank ≥ 1.")
    if training_dtype not in DTYPES:
        raise NPOError(f"training_dtype: '{training_dtype}' is not one of {list(DTYPES)}.")
    arch = model_facts.model_arch(model)
    chosen = parse_learning_rate(learning_rate)
    lr = chosen or AUTO_LR[(mode, "SDXL" if arch.startswith("SDXL") else "other")]
    lr_text = f"{lr:g}" if chosen else f"auto ({lr:g})"
    tcfg = tdft.TDFTConfig(
        truncation_steps=truncation_steps,
        teacher_guidance=float(teacher_guidance),
        loss=loss,
        student_cond=student_cond,
    )
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        learning_rate=lr,
        weight_decay=1e-3 if (mode == "full" and not arch.startswith("SDXL")) else 0.0,
        ema_decay=ema_decay,
        seed=seed,
        save_every=save_every,
        tdft=tcfg,
        fp16_loss_scaling=model_facts.compute_dtype(model) == torch.float16,  # fp16 gradients underflow unscaled
    )
    try:
        tcfg.validate(make_schedule(kind, sigmas, noise_scale))
    except ValueError as e:
        raise NPOError(str(e)) from None
    channels = training_session.latent_channels(model)
    rank_wanted = training_session.latent_rank(model)
    factor = training_session.spatial_factor(model)
    if latents is not None:
        samples = latents["samples"]
        ok_rank = samples.dim() == rank_wanted or (rank_wanted == 5 and samples.dim() == 4)
        if not ok_rank or samples.shape[1] != channels:
            kind_text = "video [B, C, frames, h, w]" if rank_wanted == 5 else "image [B, C, h, w]"
            raise NPOError(
                f"latents: {arch} takes {kind_text} latents with {channels} channels, got shape "
                f"{tuple(samples.shape)}. Encode with this model's VAE (an image latent does not fit a video "
                "model's channels, nor the reverse)."
            )
    elif width % factor or height % factor:
        raise NPOError(f"width/height: {width}×{height} is not divisible by this model's latent factor {factor}.")
    unet = model_facts.unet_of(model)
    layer_names = (
        training_session.training_layers(model, lora_layers)
        if mode == "lora"
        else [n for n, _ in unet.named_parameters()]
    )
    if not layer_names:
        raise NPOError(f"lora_layers: '{lora_layers}' matched no trainable layer of this model.")
    signature = _signature(arch, mode, rank, lora_layers, model_facts.param_shapes(model))
    resume_path, resume_state = _read_resume(resume_from, signature, steps)
    prefix_folder, prefix_name, counter = files.save_path(
        os.path.join(files.output_dir(), CHECKPOINT_SUBDIR), filename_prefix
    )
    checkpoint_path = resume_path or os.path.join(prefix_folder, f"{prefix_name}_{counter:05}_.pt")
    if resume_path is None:
        _check_free_name(checkpoint_path)
    positive_entries = training_session.conditioning_entries(positive, "positive")
    negative_entries = training_session.conditioning_entries(negative, "negative")
    if not model_facts.is_unet(model):  # a DiT takes all prompts in one batched call: can they batch?
        if latents is not None:
            spatial = training_session.sampler_latent(model, latents["samples"]).shape[2:]
        else:
            spatial = training_session.pool_latent_shape(model, width, height, frames)[2:]
        training_session.batched_model_conds(
            model, [*positive_entries, negative_entries[0]], ["positive"] * len(positive_entries) + ["negative"],
            (1, channels, *spatial), torch.device("cpu"),
        )
    ignored = training_session.ignored_sampling_patches(model)
    if ignored:
        runtime.log.warning("Self-NPO Train: %s: %s", IGNORED_PATCHES_NOTE, ", ".join(ignored))
    return _Run(
        cfg, mode, rank, lora_layers, training_dtype, arch, lr_text, layer_names, signature, positive_entries,
        negative_entries, channels, checkpoint_path, resume_path, resume_state, ignored, kind, frames=frames,
    )


def parse_learning_rate(value) -> float:
    """The learning_rate input: 'auto' (or 0, or empty) → 0.0, meaning the mode's default; else a number > 0."""
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        text = str(value).strip().lower()
        if text in ("", "auto", "0"):
            return 0.0
        try:
            number = float(text)
        except ValueError:
            raise NPOError(f"learning_rate: '{value}' is neither 'auto' nor a number (e.g. 1e-4).") from None
    if not (number >= 0.0 and number < 1.0):
        raise NPOError(f"learning_rate: {value} is out of range; use 'auto' or a value in (0, 1), e.g. 1e-4.")
    return number


def _read_resume(resume_from: str, signature: str, steps: int) -> tuple[str | None, dict | None]:
    """(path, checkpoint state) of ``resume_from``, read and checked once; (None, None) for a fresh run."""
    if not resume_from or resume_from == NONE:
        return None, None
    files.check_relative_name(resume_from, "resume_from")
    path = os.path.join(files.output_dir(), CHECKPOINT_SUBDIR, resume_from)
    if not os.path.isfile(path):
        raise NPOError(f"resume_from: '{resume_from}' not found in output/{CHECKPOINT_SUBDIR}.")
    try:
        with torch.inference_mode(False):  # training updates these tensors in place: no inference tensors
            state = load_checkpoint(path, signature)
    except TrainingError as e:
        raise NPOError(str(e)) from None
    done = int(state["step"])
    if steps < done:
        raise NPOError(
            f"steps ({steps}) is smaller than the {done} steps already done in resume_from; set steps ≥ {done}."
        )
    return path, state


def _sample_pool(mp, run: _Run, pool_size, width, height, pool_steps, pool_cfg, seed, pbar):
    """The data-free start pool sampled from the frozen model; returns (latents, prompt per latent, device)."""
    with runtime.explain_out_of_memory("the start-pool sampling", POOL_OOM_REMEDIES):
        samples, prompt_of = training_session.sample_pool(
            mp, run.positive, run.negative[:1], pool_size, width, height, pool_steps, pool_cfg, seed,
            lambda i: (pbar.update(1), runtime.throw_if_interrupted()), frames=run.frames,
            on_step=runtime.throw_if_interrupted,
        )
    return samples, prompt_of, training_session.load_for_training(mp)


def _start_data(mp, run: _Run, samples, prompt_of, seed, device) -> tuple[StartData, dict]:
    """The start latents in model space and the model inputs per prompt; (data, inputs shared by every row)."""
    shape = (1, run.channels, *samples.shape[2:])
    z0 = training_session.latent_to_model_space(mp, samples.clone().float()).to(device)
    if model_facts.is_unet(mp):
        conds_pos = [_plain(training_session.model_conds(mp, e, shape, device, "positive")) for e in run.positive]
        cond_neg = _plain(training_session.model_conds(mp, run.negative[0], shape, device, "negative"))
        return StartData(z0, conds_pos, cond_neg, prompt_of, seed), {}
    entries = [*run.positive, run.negative[0]]
    types = ["positive"] * len(run.positive) + ["negative"]
    per_entry, constants = training_session.batched_model_conds(mp, entries, types, shape, device)
    conds = [_plain(c) for c in per_entry]
    return StartData(z0, conds[:-1], conds[-1], prompt_of, seed), constants


def _train(
    mp, run: _Run, data: StartData, constants: dict, callbacks: Callbacks, gradient_checkpointing: bool, device
):
    """TDFT on the model's trainable weights (LoRA adapters or all weights); returns (result, offset)."""
    kind, sigmas, noise_scale = training_session.schedule_kind_and_table(mp)
    schedule = make_schedule(kind, sigmas, noise_scale)
    denoiser = training_session.training_denoiser(mp, model_facts.compute_dtype(mp), constants)
    unet = model_facts.unet_of(mp)
    with training_session.TrainingSession(mp, gradient_checkpointing, copy_weights=run.mode == "full") as session:
        lset = None
        if run.mode == "lora":
            lset = LoRASet(
                unet, run.layer_names, run.rank, dtype=DTYPES[run.training_dtype], device=device,
                generator=torch.Generator().manual_seed(run.cfg.seed),
            )
            lset.attach()
            params = lset.named_trainable()
        else:
            params = session.full_params(DTYPES[run.training_dtype])
        try:
            with runtime.explain_out_of_memory("Self-NPO training", TRAIN_OOM_REMEDIES):
                result = train(
                    denoiser, schedule, params, data, run.cfg, callbacks,
                    _path(run.checkpoint_path) if run.cfg.save_every > 0 else None,
                    run.resume_path, run.signature, resume_state=run.resume_state,
                )
        except TrainingError as e:
            raise NPOError(str(e)) from None
        finally:
            if lset is not None:
                lset.detach()
        meta = {
            "npo.recipe": json.dumps(
                {
                    "method": "self-npo-tdft",
                    "mode": run.mode,
                    "rank": run.rank,
                    "lora_layers": run.lora_layers if run.mode == "lora" else "all",
                    **run.cfg.as_dict(),
                }
            ),
            "npo.steps": str(result.steps_done),
            "npo.base_model": run.arch,
        }
        if not model_facts.is_unet(mp):
            meta["npo.base_variant"] = model_facts.model_variant(mp)
        base_arch = _arch_name(run.arch)
        if run.mode == "lora":
            offset = lset.to_offset(
                source_format="self-npo", base_arch=base_arch, source="Self-NPO Train", metadata=meta
            )
        else:
            entries = {}
            for name, p in params.items():
                d = p.detach().float() - session.original(name).float()
                if torch.count_nonzero(d):
                    entries[name] = Dense(d.cpu())
            offset = NPOOffset(
                entries, source_format="self-npo", base_arch=base_arch, source="Self-NPO Train", metadata=meta
            )
    return result, offset


def _report(run: _Run, result) -> str:
    last = result.losses[-1] if result.losses else float("nan")
    text = f"Self-NPO ({run.mode}) {result.steps_done}/{run.cfg.steps} steps, last loss {last:.5f}, lr {run.lr_text}"
    if result.last_checkpoint:
        folder = os.path.join(files.output_dir(), CHECKPOINT_SUBDIR)
        text += f"\ncheckpoint: {os.path.relpath(result.last_checkpoint, folder).replace(os.sep, '/')}"
    if run.ignored_patches:
        text += f"\nnote: {IGNORED_PATCHES_NOTE} ({', '.join(run.ignored_patches)})"
    return text


def _plain(cond: dict) -> dict:
    return {k: v.clone() for k, v in cond.items()}


def _path(p: str):
    from pathlib import Path

    return Path(p)


def _check_free_name(path: str) -> None:
    if os.path.lexists(path):  # a dangling symlink counts as taken too
        raise NPOError(f"filename_prefix: '{os.path.basename(path)}' exists already; choose another prefix.")


def _arch_name(arch: str) -> str:
    return {"SD15": "SD15", "SDXL": "SDXL", "SD20": "SD2", "SD21UnclipL": "SD2"}.get(arch, arch)


def _signature(arch: str, mode: str, rank: int, layers: str, shapes: dict) -> str:
    h = hashlib.sha256(json.dumps(sorted((k, list(v)) for k, v in shapes.items())).encode()).hexdigest()[:12]
    detail = f"r{rank}-{layers}" if mode == "lora" else "all"
    return f"{arch}/{mode}/{detail}/{h}"
