"""One Self-NPO run on a ComfyUI model, the public entry point Self-NPO Train and the benchmarks share:
``plan_job`` checks everything and reads the prompts' model inputs once (before any sampling), ``start_data``
puts the start latents into model space, ``train_offset`` runs TDFT and returns the NPO offset (θ + δ is the
worse model the negative pass runs; δ is LoRA or dense)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from ...npo_core.errors import NPOError
from ...npo_core.offset import Dense, NPOOffset
from ...training import optimizers, tdft
from ...training.data import StartData
from ...training.lora import LoRASet
from ...training.trainer import Callbacks, TrainConfig, Trainer, TrainingError, TrainResult
from . import model_facts
from .runtime import explain_out_of_memory
from .training_model import TrainingModel
from .training_preview import TrainingPreview, full_weights_off, lora_off

MODES = ("lora", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TRAIN_OOM_REMEDIES = (
    "Lower batch_size or the resolution (width/height, or smaller latents), turn on gradient_checkpointing, "
    "use mode lora or a lower rank; resume_from the last checkpoint keeps the steps already done."
)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What to train and how (the node's widgets, checked): learning_rate 0 is the family's "auto"."""

    mode: str = "lora"
    rank: int = 16
    lora_layers: str = "attention"
    training_dtype: str = "fp32"
    steps: int = 1000
    batch_size: int = 4
    learning_rate: float = 0.0
    truncation_steps: int = 5
    teacher_guidance: float = -1.0
    ema_decay: float = 0.999
    loss: str = "pseudo_huber"
    student_cond: str = "prompt"
    seed: int = 0
    save_every: int = 0
    grad_accumulation_steps: int = 1
    optimizer: str = optimizers.ADAMW


@dataclasses.dataclass
class TrainingJob:
    """A checked Self-NPO run: the model, the trainer, the layers it trains and the prompts' model inputs
    (CPU, batch 1 each; ``constants`` are the inputs shared by every row)."""

    model: TrainingModel
    recipe: Recipe
    trainer: Trainer
    layer_names: list[str]
    signature: str
    positive: list[dict]
    negative: dict
    constants: dict
    checkpoint_path: Path | None = None

    @property
    def config(self) -> TrainConfig:
        return self.trainer.cfg

    @property
    def lr_is_auto(self) -> bool:
        return self.recipe.learning_rate == 0.0


def shapes_hash(tm: TrainingModel) -> str:
    """A short hash of the diffusion model's parameter names and shapes (part of every resume signature)."""
    shapes = model_facts.param_shapes(tm.mp)
    return hashlib.sha256(json.dumps(sorted((k, list(v)) for k, v in shapes.items())).encode()).hexdigest()[:12]


def signature(tm: TrainingModel, recipe: Recipe) -> str:
    """What a resume checkpoint must match: config class, mode, rank and layers, the weights' shapes."""
    h = shapes_hash(tm)
    detail = f"r{recipe.rank}-{recipe.lora_layers}" if recipe.mode == "lora" else "all"
    return f"{tm.facts.config}/{recipe.mode}/{detail}/{h}"


def plan_job(
    tm: TrainingModel,
    recipe: Recipe,
    positive: list,
    negative: list,
    spatial: tuple[int, ...],
    resume_from: str | Path | None = None,
    checkpoint_path: str | Path | None = None,
    metadata: dict[str, str] | None = None,
) -> TrainingJob:
    """Check the recipe against the model and read the resume checkpoint and the prompts' model inputs (for
    start latents of ``spatial``), so that bad input fails before any sampling. ``metadata`` (the prompt and
    workflow, ``files.provenance``) goes into every checkpoint."""
    if recipe.mode not in MODES:
        raise NPOError(f"mode: '{recipe.mode}' is not one of {', '.join(MODES)}.")
    if recipe.mode == "lora" and recipe.rank < 1:
        raise NPOError("rank: lora mode needs rank ≥ 1.")
    if recipe.training_dtype not in DTYPES:
        raise NPOError(f"training_dtype: '{recipe.training_dtype}' is not one of {list(DTYPES)}.")
    rates = tm.family.learning_rates
    auto = rates.full if recipe.mode == "full" else rates.lora
    cfg = TrainConfig(
        steps=recipe.steps,
        batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate or optimizers.auto_learning_rate(recipe.optimizer, auto),
        weight_decay=rates.full_weight_decay if recipe.mode == "full" else 0.0,
        ema_decay=recipe.ema_decay,
        seed=recipe.seed,
        save_every=recipe.save_every,
        grad_accumulation_steps=recipe.grad_accumulation_steps,
        optimizer=recipe.optimizer,
        tdft=tdft.TDFTConfig(
            truncation_steps=recipe.truncation_steps,
            teacher_guidance=float(recipe.teacher_guidance),
            loss=recipe.loss,
            student_cond=recipe.student_cond,
        ),
        fp16_loss_scaling=tm.compute_dtype == torch.float16,  # fp16 gradients underflow unscaled
    )
    layer_names = tm.lora_targets(recipe.lora_layers) if recipe.mode == "lora" else tm.weight_names()
    if not layer_names:
        raise NPOError(f"lora_layers: '{recipe.lora_layers}' matched no trainable layer of this model.")
    sig = signature(tm, recipe)
    try:
        with torch.inference_mode(False):  # a resumed run updates the checkpoint's tensors in place
            trainer = Trainer(tm.schedule, cfg, sig, resume_from)
    except (TrainingError, ValueError) as e:
        raise NPOError(str(e)) from None
    trainer.metadata = dict(metadata or {})
    pos, neg, constants = tm.model_inputs(positive, negative[0], spatial, recipe.seed)
    return TrainingJob(
        tm, recipe, trainer, layer_names, sig, pos, neg, constants, Path(checkpoint_path) if checkpoint_path else None
    )


def start_data(job: TrainingJob, samples: torch.Tensor, prompt_of: torch.Tensor) -> StartData:
    """The start latents (sampler space) in model space on the training device, with the model inputs."""
    device = job.model.device or job.model.load()
    z0 = job.model.to_model_space(samples.clone().float()).to(device)
    pos = [on_device(c, device) for c in job.positive]
    return StartData(z0, pos, on_device(job.negative, device), prompt_of, job.recipe.seed)


def train_offset(
    job: TrainingJob, data: StartData, callbacks: Callbacks, gradient_checkpointing: bool,
    preview: TrainingPreview | None = None,
) -> tuple[TrainResult, NPOOffset]:
    """TDFT on the job's trainable weights (LoRA adapters or all weights); returns (result, offset), with the
    ``preview`` pair sampled every ``preview.settings.every`` steps. Call under ``torch.inference_mode(False)`` and
    ``torch.enable_grad()`` (ComfyUI runs nodes in inference mode)."""
    tm, recipe = job.model, job.recipe
    device = tm.device or tm.load()
    dtype = DTYPES[recipe.training_dtype]
    denoiser = tm.denoiser(on_device(job.constants, device))
    with tm.session(gradient_checkpointing, copy_weights=recipe.mode == "full") as session:
        lset = None
        if recipe.mode == "lora":
            lset = LoRASet(
                tm.diffusion_model, job.layer_names, recipe.rank, dtype=dtype, device=device,
                generator=torch.Generator().manual_seed(recipe.seed),
            )
            lset.attach()
            params = lset.named_trainable()
        else:
            params = session.full_params(dtype)
        if preview is not None:
            callbacks = _with_preview(callbacks, preview, denoiser, data, lset, params, session)
        try:
            with explain_out_of_memory("Self-NPO training", TRAIN_OOM_REMEDIES):
                result = job.trainer.run(denoiser, params, data, callbacks, job.checkpoint_path)
        except TrainingError as e:
            raise NPOError(str(e)) from None
        finally:
            if lset is not None:
                lset.detach()
        meta = _metadata(job, result)
        name = tm.family.name
        if lset is not None:
            offset = lset.to_offset(source_format="self-npo", base_arch=name, source="Self-NPO Train", metadata=meta)
        else:
            entries = {}
            for key, p in params.items():
                d = p.detach().float() - session.original(key).float()
                if torch.count_nonzero(d):
                    entries[key] = Dense(d.cpu())
            offset = NPOOffset(
                entries, source_format="self-npo", base_arch=name, source="Self-NPO Train", metadata=meta
            )
    return result, offset


def _with_preview(callbacks: Callbacks, preview: TrainingPreview, denoiser, data: StartData, lset, params,
                  session) -> Callbacks:
    """``callbacks`` whose on_step also runs the preview when it is due (first prompt, the negative)."""
    if lset is not None:
        def offset_off():
            return lora_off(lset)
    else:
        def offset_off():
            return full_weights_off(params, session.original)
    return with_preview(callbacks, preview, denoiser, data.conds_pos[0], data.cond_neg, offset_off)


def with_preview(callbacks: Callbacks, preview: TrainingPreview, denoiser, cond_pos, cond_neg, offset_off) -> Callbacks:
    """``callbacks`` whose on_step also samples the preview pair when it is due (``offset_off()``: a context in which
    the denoiser is the model without the offset)."""
    losses: list[float] = []

    def on_step(done: int, total: int, value: float) -> None:
        losses.append(value)
        if preview.due(done, total):  # before the progress update, which shows it
            preview.run(done, losses, denoiser, cond_pos, cond_neg, offset_off)
        callbacks.on_step(done, total, value)

    return Callbacks(on_step=on_step, should_stop=callbacks.should_stop, on_checkpoint=callbacks.on_checkpoint)


def _metadata(job: TrainingJob, result: TrainResult) -> dict[str, str]:
    recipe = job.recipe
    meta = {
        "npo.recipe": json.dumps(
            {
                "method": "self-npo-tdft",
                "mode": recipe.mode,
                "rank": recipe.rank,
                "lora_layers": recipe.lora_layers if recipe.mode == "lora" else "all",
                **job.config.as_dict(),
            }
        ),
        "npo.steps": str(result.steps_done),
        "npo.base_model": job.model.facts.config,
    }
    if not job.model.family.unet:
        meta["npo.base_variant"] = model_facts.model_variant(job.model.mp)
    return meta


def on_device(inputs: dict, device) -> dict:
    """Copies of the tensors of ``inputs`` on ``device`` (other values as they are)."""
    return {k: (v.to(device, copy=True) if torch.is_tensor(v) else v) for k, v in inputs.items()}
