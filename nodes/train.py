"""Self-NPO Train."""

from __future__ import annotations

import dataclasses
import os

import torch
from comfy_api.latest import io, ui

from ..npo_core.errors import NPOError
from ..npo_core.families import PRESET_NAMES
from ..training import optimizers, tdft
from ..training.trainer import Callbacks
from .common import NPOOffsetType, NPOScorerType, advanced, check_widgets, refusal, schema
from .host import files, runtime, training_conds, training_preview, training_run
from .host.training_model import TrainingModel
from .plot import loss_curve_image

CHECKPOINT_SUBDIR = "npo_training"
NONE = "none"
IGNORED_PATCHES_NOTE = (
    "the model's sampling patches are not run during training (teacher and student are the UNet with its "
    "weight patches, e.g. LoRAs)"
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
        return schema(
            node_id="SelfNPOTrain",
            display_name="Self-NPO Train",
            search_aliases=["self-npo", "train", "training", "negative", "offset", "tdft", "lora training"],
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
                    options=list(PRESET_NAMES),
                    default="attention",
                    optional=True,
                    tooltip="lora: which layers get adapters (attention = to_q/k/v/out of every attention, "
                    "the layers of the released NPO LoRAs).",
                    **advanced(),
                ),
                io.Int.Input(
                    "truncation_steps",
                    default=5,
                    min=1,
                    max=25,
                    tooltip="K: teacher steps per sample before the target is taken (the authors: 5): DDIM steps on "
                    "SD models, Euler steps on flow models.",
                    **advanced(),
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
                    **advanced(),
                ),
                io.Combo.Input(
                    "loss",
                    options=list(tdft.LOSSES),
                    default="pseudo_huber",
                    tooltip="pseudo_huber (c = 1e-3, the authors') or mse, in x0 space.",
                    **advanced(),
                ),
                io.Combo.Input(
                    "student_cond",
                    options=[tdft.AUTO, *tdft.STUDENT_CONDS],
                    default=tdft.AUTO,
                    optional=True,
                    tooltip="What the student is conditioned on. auto: negative on flow-matching models (SD3.5, "
                    "Wan, Flux.2, ...), prompt on SD-style ones. prompt: the authors' code. negative: the "
                    "negative/empty conditioning, the branch NPO later queries; on the pack's flow benchmarks it "
                    "beat tuned CFG (class-conditional FD -15 %, 6 of 6 units) where prompt was not significant "
                    "(-2 %). mix: 50/50 per sample.",
                    **advanced(),
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
                    **advanced(),
                ),
                io.Combo.Input(
                    "training_dtype",
                    options=list(training_run.DTYPES),
                    default="fp32",
                    tooltip="Dtype of the trainable weights (the forward runs in the model's dtype; an fp16 model "
                    "gets dynamic loss scaling). fp32 as the authors (fp32 master weights).",
                    **advanced(),
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
                    min=16,
                    max=4096,
                    step=8,
                    optional=True,
                    tooltip="Data-free pool: image width (a multiple of the model's latent factor, 8 for most; "
                    "SDXL: 1024).",
                ),
                io.Int.Input(
                    "height",
                    default=512,
                    min=16,
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
                    **advanced(),
                ),
                io.Float.Input(
                    "pool_cfg",
                    default=7.0,
                    min=1.0,
                    max=30.0,
                    step=0.5,
                    optional=True,
                    tooltip="Data-free pool: CFG scale used to sample the pool.",
                    **advanced(),
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
                io.Int.Input(
                    "grad_accumulation_steps",
                    default=1,
                    min=1,
                    max=1024,
                    optional=True,
                    tooltip="k micro-batches of batch_size per optimizer step: the update of one step on a batch of "
                    "k × batch_size, in the memory of batch_size; each step takes k times as long. steps and the "
                    "progress bar count optimizer steps; checkpoints are written between steps.",
                    **advanced(),
                ),
                io.Combo.Input(
                    "optimizer",
                    options=list(optimizers.OPTIMIZERS),
                    default=optimizers.ADAMW,
                    optional=True,
                    tooltip="AdamW: the authors'. Adafactor (torch's): factored second moments, less optimizer "
                    "memory in full mode; relative step sizes, so learning_rate auto is its own 1e-2. AdamW 8-bit: "
                    "bitsandbytes' 8-bit states, " + _bitsandbytes_status() + " A resume continues with the "
                    "optimizer it was trained with.",
                    **advanced(),
                ),
                io.Int.Input(
                    "preview_every",
                    default=100,
                    min=0,
                    max=1_000_000,
                    optional=True,
                    tooltip="Every N optimizer steps (and at the end) one fixed-seed pair is sampled, plain CFG and "
                    "with the current offset on the negative pass (8 Euler steps, half the pool's width and height "
                    "but at least 512 px, the first prompt, the negative, pool_cfg), shown as the progress preview "
                    "over the loss curve and saved beside the checkpoints (when save_every > 0). 0 = off.",
                    **advanced(),
                ),
                io.Vae.Input(
                    "preview_vae",
                    optional=True,
                    tooltip="Decode the previews with this VAE (exact images); without it ComfyUI's latent "
                    "previewer draws them (TAESD or a rough latent-to-RGB).",
                ),
                NPOScorerType.Input(
                    "preview_scorer",
                    optional=True,
                    tooltip="A scorer from NPO Load Scorer: each preview pair is scored, logged and plotted "
                    "(connect preview_vae: scores of rough latent previews mean little).",
                ),
                io.String.Input(
                    "preview_prompt",
                    default="",
                    optional=True,
                    tooltip="The text of the first training prompt, for preview_scorer (PickScore, HPS and "
                    "ImageReward score an image against its prompt; the aesthetic scorer ignores it).",
                ),
                io.Boolean.Input(
                    "partial_loading",
                    default=False,
                    optional=True,
                    tooltip="lora mode, for models larger than the GPU: ComfyUI loads what fits after keeping room "
                    "for training, and casts the rest of the frozen weights to the GPU layer by layer in each "
                    "forward, as it does for sampling in low VRAM. Slower in proportion to the weights left off the "
                    "GPU; needs gradient_checkpointing. Off: the whole model is loaded.",
                    **advanced(),
                ),
            ],
            outputs=[
                NPOOffsetType.Output(display_name="npo_offset"),
                io.Image.Output(display_name="loss_curve"),
                io.Int.Output(display_name="steps"),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(
        cls, learning_rate=None, filename_prefix=None, save_every=None, width=None, height=None,
        teacher_guidance=None, ema_decay=None, pool_cfg=None,
    ) -> bool | str:
        return refusal(lambda: check_settings(
            cls, learning_rate, filename_prefix, save_every, width=width, height=height,
            teacher_guidance=teacher_guidance, ema_decay=ema_decay, pool_cfg=pool_cfg,
        ))

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
        student_cond: str = tdft.AUTO,
        resume_from: str = NONE,
        pool_size: int = 16,
        width: int = 512,
        height: int = 512,
        pool_steps: int = 20,
        pool_cfg: float = 7.0,
        frames: int = 1,
        grad_accumulation_steps: int = 1,
        optimizer: str = optimizers.ADAMW,
        preview_every: int = 100,
        preview_vae=None,
        preview_scorer=None,
        preview_prompt: str = "",
        partial_loading: bool = False,
    ) -> io.NodeOutput:
        check_settings(
            cls, learning_rate, filename_prefix, save_every, width=width, height=height,
            teacher_guidance=teacher_guidance, ema_decay=ema_decay, pool_cfg=pool_cfg,
        )
        hidden = cls.hidden
        provenance = files.provenance(getattr(hidden, "prompt", None), getattr(hidden, "extra_pnginfo", None))
        run = _plan(model, positive, negative, latents, _Settings.of(locals()), provenance)
        preview = _preview(run, preview_vae, preview_scorer)  # its inputs checked before any sampling
        job, tm = run.job, run.job.model
        pool = 0 if latents is not None else pool_size
        pbar = runtime.progress_bar(pool + steps)
        if latents is None:
            samples, prompt_of = _sample_pool(run, pbar)
        else:
            samples = run.samples
            # latent i trains with prompt i (cycling when there are fewer prompts), as the authors train each
            # image with its own caption
            prompt_of = torch.arange(samples.shape[0]) % len(job.positive)
        tm.load(partial_loading, tm.training_memory(batch_size, run.spatial) if partial_loading else 0.0)
        done = job.trainer.done
        pbar.update_absolute(pool + done, pool + steps)  # a resumed run starts at the steps already done
        with torch.inference_mode(False), torch.enable_grad():
            data = training_run.start_data(job, samples, prompt_of)
            callbacks = Callbacks(
                on_step=lambda done, total, value: pbar.update_absolute(
                    pool + done, pool + steps, preview.progress_preview(done) if preview else None
                ),
                should_stop=runtime.interrupted,
            )
            result, offset = training_run.train_offset(job, data, callbacks, gradient_checkpointing, preview)
        if result.stopped_early:
            runtime.throw_if_interrupted()  # ComfyUI's cancel: the last checkpoint is kept for resume_from
        if mode == "full" and rank > 0 and offset.entries:
            offset, energy = offset.compressed(rank)
            runtime.log.info("Self-NPO full offset compressed to rank %d, energy kept %.4f", rank, energy)
        return io.NodeOutput(
            offset, loss_curve_image(result.losses), result.steps_done, ui=ui.PreviewText(_report(run, result))
        )


@dataclasses.dataclass(frozen=True)
class _Settings:
    """Self-NPO Train's widget values."""

    steps: int
    batch_size: int
    learning_rate: object
    mode: str
    rank: int
    truncation_steps: int
    teacher_guidance: float
    ema_decay: float
    loss: str
    seed: int
    gradient_checkpointing: bool
    training_dtype: str
    save_every: int
    filename_prefix: str
    lora_layers: str
    student_cond: str
    resume_from: str
    pool_size: int
    width: int
    height: int
    pool_steps: int
    pool_cfg: float
    frames: int
    grad_accumulation_steps: int
    optimizer: str
    preview_every: int
    preview_prompt: str
    partial_loading: bool

    @classmethod
    def of(cls, values: dict) -> _Settings:
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass
class _Run:
    """Everything Self-NPO Train checked before any sampling."""

    job: training_run.TrainingJob
    settings: _Settings
    positive: list  # CONDITIONING entries, one per prompt
    negative: list
    samples: torch.Tensor | None  # the connected latents as the sampler gets them, or None (data-free pool)
    ignored_patches: list[str]
    spatial: tuple[int, ...]  # the training latents' spatial shape ((T,) H, W)

    @property
    def lr_text(self) -> str:
        lr = f"{self.job.config.learning_rate:g}"
        return f"auto ({lr})" if self.job.lr_is_auto else lr


def check_settings(cls, learning_rate, filename_prefix, save_every, **numbers) -> None:
    """The widget values Self-NPO Train checks before anything runs (at validation, and again in execute for
    values that came through links): numbers inside their widget's bounds (not NaN), learning_rate, and the
    checkpoint prefix when checkpoints are written. The latent factor needs the model: ``_plan``."""
    check_widgets(cls, {"save_every": save_every, **numbers})
    if learning_rate is not None:
        parse_learning_rate(learning_rate)
    if filename_prefix is not None and save_every != 0:
        files.check_prefix(filename_prefix)


def _plan(model, positive, negative, latents, settings: _Settings, provenance: dict | None = None) -> _Run:
    """Validate every input and read the resume checkpoint and the prompts' model inputs (once), so that bad
    input fails before sampling."""
    tm = TrainingModel(model.clone())
    s = settings
    layout = tm.latent
    samples = None
    if latents is not None:
        if not layout.takes(latents["samples"]):
            raise NPOError(
                f"latents: {tm.family.name} takes {layout.text} latents with {layout.channels} channels, got shape "
                f"{tuple(latents['samples'].shape)}. Encode with this model's VAE (an image latent does not fit a "
                "video model's channels, nor the reverse)."
            )
        samples = tm.sampler_latent(latents["samples"])
        spatial = tuple(samples.shape[2:])
    else:
        f = layout.spatial_factor
        if s.width % f or s.height % f:
            raise NPOError(f"width/height: {s.width}×{s.height} is not divisible by this model's latent factor {f}.")
        spatial = layout.pool_shape(s.width, s.height, s.frames)[2:]
    if s.partial_loading and s.mode != "lora":
        raise NPOError("partial_loading: full mode trains every weight, so all of them must be on the device; use "
                       "mode lora (or turn partial_loading off).")
    if s.partial_loading and not s.gradient_checkpointing:
        raise NPOError("partial_loading: needs gradient_checkpointing on (without it the backward keeps every "
                       "weight cast to the device alive, which is what partial loading avoids).")
    recipe = training_run.Recipe(
        mode=s.mode, rank=s.rank, lora_layers=s.lora_layers, training_dtype=s.training_dtype, steps=s.steps,
        batch_size=s.batch_size, learning_rate=parse_learning_rate(s.learning_rate),
        truncation_steps=s.truncation_steps, teacher_guidance=s.teacher_guidance, ema_decay=s.ema_decay,
        loss=s.loss, student_cond=tdft.resolve_student_cond(s.student_cond, tm.schedule_kind), seed=s.seed,
        save_every=s.save_every, grad_accumulation_steps=s.grad_accumulation_steps, optimizer=s.optimizer,
    )
    resume_path = _resume_path(s.resume_from)
    checkpoint_path = resume_path or (_new_checkpoint_path(s.filename_prefix) if s.save_every > 0 else None)
    positive_entries = training_conds.conditioning_entries(positive, "positive")
    negative_entries = training_conds.conditioning_entries(negative, "negative")
    job = training_run.plan_job(
        tm, recipe, positive_entries, negative_entries, spatial, resume_from=resume_path,
        checkpoint_path=checkpoint_path if s.save_every > 0 else None,  # resume_from with save_every 0 writes none
        metadata=provenance,
    )
    ignored = tm.ignored_sampling_patches()
    if ignored:
        runtime.log.warning("Self-NPO Train: %s: %s", IGNORED_PATCHES_NOTE, ", ".join(ignored))
    return _Run(job, settings, positive_entries, negative_entries, samples, ignored, spatial)


def _preview(run: _Run, vae, scorer) -> training_preview.TrainingPreview | None:
    """The validation preview of the run (None when preview_every is 0)."""
    s, tm = run.settings, run.job.model
    if s.preview_every <= 0:
        return None
    if scorer is not None and not s.preview_prompt.strip() and getattr(scorer, "uses_prompt", True):
        raise NPOError(
            f"preview_prompt: {scorer.name} scores an image against its prompt; write the text of the first training "
            "prompt (or disconnect preview_scorer)."
        )
    shape = training_preview.preview_shape(tm.latent.pool_shape(s.width, s.height, s.frames))
    settings = training_preview.PreviewSettings(s.preview_every, shape, s.pool_cfg, s.seed, vae, scorer,
                                                s.preview_prompt.strip())
    return training_preview.TrainingPreview(tm.mp, settings, training_preview.preview_stem(run.job.checkpoint_path))


def _bitsandbytes_status() -> str:
    reason = optimizers.unavailable_reason(optimizers.ADAMW_8BIT)
    return f"unavailable here: {reason}." if reason else "bitsandbytes is installed here."


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


def _resume_path(resume_from: str) -> str | None:
    """The path of ``resume_from`` in output/npo_training, or None for a fresh run."""
    if not resume_from or resume_from == NONE:
        return None
    files.check_relative_name(resume_from, "resume_from")
    path = os.path.join(files.output_dir(), CHECKPOINT_SUBDIR, resume_from)
    if not os.path.isfile(path):
        raise NPOError(f"resume_from: '{resume_from}' not found in output/{CHECKPOINT_SUBDIR}.")
    return path


def _new_checkpoint_path(filename_prefix: str) -> str:
    folder, name, counter = files.save_path(os.path.join(files.output_dir(), CHECKPOINT_SUBDIR), filename_prefix)
    path = os.path.join(folder, f"{name}_{counter:05}_.pt")
    if os.path.lexists(path):  # a dangling symlink counts as taken too
        raise NPOError(f"filename_prefix: '{os.path.basename(path)}' exists already; choose another prefix.")
    return path


def _sample_pool(run: _Run, pbar) -> tuple[torch.Tensor, torch.Tensor]:
    """The data-free start pool sampled from the frozen model; returns (latents, prompt per latent)."""
    s, tm = run.settings, run.job.model
    with runtime.explain_out_of_memory("the start-pool sampling", POOL_OOM_REMEDIES):
        return tm.sample_pool(
            run.positive, run.negative[:1], s.pool_size, tm.latent.pool_shape(s.width, s.height, s.frames),
            s.pool_steps, s.pool_cfg, s.seed, lambda i: (pbar.update(1), runtime.throw_if_interrupted()),
            on_step=runtime.throw_if_interrupted,
        )


def _report(run: _Run, result) -> str:
    last = result.losses[-1] if result.losses else float("nan")
    text = (
        f"Self-NPO ({run.settings.mode}) {result.steps_done}/{run.job.config.steps} steps, last loss {last:.5f}, "
        f"lr {run.lr_text}, student_cond {run.job.config.tdft.student_cond}"
        + (" (auto)" if run.settings.student_cond == tdft.AUTO else "")
    )
    if result.last_checkpoint:
        folder = os.path.join(files.output_dir(), CHECKPOINT_SUBDIR)
        text += f"\ncheckpoint: {os.path.relpath(result.last_checkpoint, folder).replace(os.sep, '/')}"
    if run.ignored_patches:
        text += f"\nnote: {IGNORED_PATCHES_NOTE} ({', '.join(run.ignored_patches)})"
    return text
