"""One Diffusion-NPO run on a ComfyUI model: an NPO offset from preference pairs by the authors' reversed DPO
(``training.preference``), in lora mode on the family's layers. θ + δ is the worse model the negative pass runs:
the offset learns to fit the rejected images better than the model does."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ...npo_core.errors import NPOError
from ...npo_core.offset import NPOOffset
from ...training import optimizers
from ...training.lora import LoRASet
from ...training.pairs import PairData
from ...training.preference import BETA, PreferenceConfig
from ...training.trainer import Callbacks, TrainConfig, Trainer, TrainingError, TrainResult
from . import model_facts, training_preview
from .runtime import explain_out_of_memory
from .training_model import TrainingModel
from .training_preview import lora_off
from .training_run import DTYPES, TRAIN_OOM_REMEDIES, on_device, shapes_hash, with_preview

AUTHORS_LEARNING_RATE = 5e-6  # DPO-DPO-NPO/run_sd15.sh (constant, 8-bit Adam, batch 64)
AUTHORS_WEIGHT_DECAY = 1e-2  # the script's adam_weight_decay default


@dataclasses.dataclass
class PairSet:
    """The NPO_PAIRS socket: encoded pairs as the sampler's latents [N, C, ...] (preferred and rejected), the
    CONDITIONING entry of each prompt, and which prompt each pair belongs to; ``items`` names pairs in messages.
    ``negative`` (one CONDITIONING entry, or None) is the negative prompt the training preview samples with."""

    preferred: torch.Tensor
    rejected: torch.Tensor
    positive: list
    prompt_of: torch.Tensor
    items: list[str]
    source: str
    negative: list | None = None

    def __post_init__(self) -> None:
        n = self.preferred.shape[0]
        if self.rejected.shape != self.preferred.shape:
            raise NPOError(
                f"{self.source}: preferred {tuple(self.preferred.shape)} and rejected {tuple(self.rejected.shape)} "
                "latents differ in shape; every image of a pair set must have one size."
            )
        if n < 1 or self.prompt_of.shape[0] != n or len(self.items) != n:
            raise NPOError(f"{self.source}: {n} pairs but {self.prompt_of.shape[0]} prompt indices.")


@dataclasses.dataclass(frozen=True)
class PreferenceRecipe:
    """What NPO Preference Train runs (its widgets, checked): learning_rate 0 and beta 0 mean the authors' values."""

    rank: int = 8
    lora_layers: str = "attention"
    training_dtype: str = "fp32"
    steps: int = 2000
    batch_size: int = 4
    learning_rate: float = 0.0
    beta: float = 0.0
    loss_type: str = "sigmoid"
    seed: int = 0
    save_every: int = 0
    grad_accumulation_steps: int = 1
    optimizer: str = optimizers.ADAMW


@dataclasses.dataclass
class PreferenceJob:
    model: TrainingModel
    recipe: PreferenceRecipe
    trainer: Trainer
    layer_names: list[str]
    data: PairData
    constants: dict
    checkpoint_path: Path | None
    negative: object | None = None  # the preview's negative cond in model space, or None: no preview possible


def prediction_of(tm: TrainingModel) -> str:
    """The parameterisation the DPO loss is measured in: flow velocity (CONST), v (V_PREDICTION), else eps."""
    import comfy.model_sampling as ms_types

    if tm.schedule_kind == "flow":
        return "flow"
    ms = tm.mp.get_model_object("model_sampling")
    return "v" if isinstance(ms, ms_types.V_PREDICTION) else "eps"


def authors_beta(tm: TrainingModel) -> float:
    """β of the released offsets: 2000 for SDXL and its lineage, 500 for everything else (SD1.5's value)."""
    return BETA["sdxl"] if tm.family.lr_group == "sdxl" else BETA["sd15"]


def signature(tm: TrainingModel, recipe: PreferenceRecipe) -> str:
    """What a resume checkpoint must match: config class, the objective, rank and layers, the weights' shapes."""
    return f"{tm.facts.config}/preference/r{recipe.rank}-{recipe.lora_layers}/{shapes_hash(tm)}"


def plan(
    tm: TrainingModel,
    recipe: PreferenceRecipe,
    pairs: PairSet,
    resume_from: str | Path | None = None,
    checkpoint_path: str | Path | None = None,
    metadata: dict[str, str] | None = None,
    preview_negative: list | None = None,
) -> PreferenceJob:
    """Check the recipe and the pairs against the model, read the resume checkpoint and the prompts' model inputs
    (and the preview's negative: ``preview_negative``, else the pairs' own), so that bad input fails before
    training."""
    if recipe.rank < 1:
        raise NPOError("rank: the LoRA rank must be ≥ 1.")
    if recipe.training_dtype not in DTYPES:
        raise NPOError(f"training_dtype: '{recipe.training_dtype}' is not one of {list(DTYPES)}.")
    if not tm.latent.takes(pairs.preferred):
        raise NPOError(
            f"pairs: {tm.family.name} takes {tm.latent.text} latents with {tm.latent.channels} channels; the pairs "
            f"are {tuple(pairs.preferred.shape)}. Encode them with this model's VAE."
        )
    preferred, rejected = tm.sampler_latent(pairs.preferred), tm.sampler_latent(pairs.rejected)
    cfg = TrainConfig(
        steps=recipe.steps,
        batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate or optimizers.auto_learning_rate(recipe.optimizer, AUTHORS_LEARNING_RATE),
        weight_decay=AUTHORS_WEIGHT_DECAY,
        seed=recipe.seed,
        save_every=recipe.save_every,
        grad_accumulation_steps=recipe.grad_accumulation_steps,
        optimizer=recipe.optimizer,
        objective="preference",
        preference=PreferenceConfig(
            beta=recipe.beta or authors_beta(tm), loss_type=recipe.loss_type, prediction=prediction_of(tm)
        ),
        fp16_loss_scaling=tm.compute_dtype == torch.float16,
    )
    layer_names = tm.lora_targets(recipe.lora_layers)
    if not layer_names:
        raise NPOError(f"lora_layers: '{recipe.lora_layers}' matched no trainable layer of this model.")
    try:
        with torch.inference_mode(False):
            trainer = Trainer(tm.schedule, cfg, signature(tm, recipe), resume_from)
    except (TrainingError, ValueError) as e:
        raise NPOError(str(e)) from None
    trainer.metadata = dict(metadata or {})
    spatial = tuple(preferred.shape[2:])
    negative = preview_negative if preview_negative is not None else pairs.negative
    pos, neg, constants = tm.model_inputs(
        pairs.positive, negative if negative is not None else pairs.positive[0], spatial, recipe.seed
    )
    data = PairData(
        tm.to_model_space(preferred.clone().float()), tm.to_model_space(rejected.clone().float()), pos,
        pairs.prompt_of.clone(), recipe.seed,
    )
    path = Path(checkpoint_path) if checkpoint_path else None
    return PreferenceJob(tm, recipe, trainer, layer_names, data, constants, path, neg if negative is not None else None)


def training_memory(job: PreferenceJob) -> float:
    """Bytes a step needs beyond the weights (for partial loading): ComfyUI's estimate for a batch of 2 · batch_size
    (the policy pass runs both images of each pair)."""
    return job.model.training_memory(job.recipe.batch_size, tuple(job.data.preferred.shape[2:]))


def preview_shape(job: PreferenceJob) -> tuple[int, ...]:
    """The preview sample's latent shape: one pair image's, halved as Self-NPO Train's (not below 64 latent px)."""
    return training_preview.preview_shape((1, *job.data.preferred.shape[1:]))


def train(
    job: PreferenceJob, callbacks: Callbacks, gradient_checkpointing: bool,
    preview: training_preview.TrainingPreview | None = None,
) -> tuple[TrainResult, NPOOffset]:
    """Reversed DPO on the job's LoRA adapters (rank r, alpha r, PEFT's gaussian init as the authors); returns
    (result, offset), with the ``preview`` pair (the first prompt, the job's negative) sampled when due. Call under
    ``torch.inference_mode(False)`` and ``torch.enable_grad()``."""
    tm, recipe = job.model, job.recipe
    device = tm.device or tm.load()
    data = dataclasses.replace(
        job.data,
        preferred=job.data.preferred.to(device),
        rejected=job.data.rejected.to(device),
        conds=[on_device(c, device) for c in job.data.conds],
    )
    denoiser = tm.denoiser(on_device(job.constants, device))
    with tm.session(gradient_checkpointing, copy_weights=False):
        lset = LoRASet(
            tm.diffusion_model, job.layer_names, recipe.rank, dtype=DTYPES[recipe.training_dtype], device=device,
            generator=torch.Generator().manual_seed(recipe.seed), init="gaussian",
        )
        lset.attach()
        if preview is not None:
            if job.negative is None:
                raise NPOError("preview: the job has no negative prompt to sample the preview with.")
            callbacks = with_preview(
                callbacks, preview, denoiser, data.conds[0], on_device(job.negative, device), lambda: lora_off(lset)
            )
        try:
            with explain_out_of_memory("NPO preference training", TRAIN_OOM_REMEDIES):
                result = job.trainer.run_preference(
                    denoiser, lambda: lora_off(lset), lset.named_trainable(), data, callbacks, job.checkpoint_path
                )
        except TrainingError as e:
            raise NPOError(str(e)) from None
        finally:
            lset.detach()
        meta = _metadata(job, result)
        offset = lset.to_offset(
            source_format="diffusion-npo", base_arch=tm.family.name, source="NPO Preference Train", metadata=meta
        )
    return result, offset


def _metadata(job: PreferenceJob, result: TrainResult) -> dict[str, str]:
    recipe = job.recipe
    meta = {
        "npo.recipe": json.dumps(
            {
                "method": "diffusion-npo-reversed-dpo",
                "rank": recipe.rank,
                "lora_layers": recipe.lora_layers,
                "pairs": int(job.data.preferred.shape[0]),
                **{k: v for k, v in job.trainer.cfg.as_dict().items() if k not in ("tdft", "ema_decay")},
            }
        ),
        "npo.steps": str(result.steps_done),
        "npo.base_model": job.model.facts.config,
    }
    if not job.model.family.unet:
        meta["npo.base_variant"] = model_facts.model_variant(job.model.mp)
    return meta
