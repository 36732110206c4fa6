"""Self-NPO Train and Save NPO Offset."""

from __future__ import annotations

import hashlib
import json
import os

import torch
from comfy_api.latest import io, ui

from ..npo_core import formats
from ..npo_core.errors import NPOError
from ..npo_core.offset import Dense, NPOOffset
from ..npo_core.schedule import DiscreteSchedule
from ..training import tdft
from ..training.data import StartData
from ..training.lora import TARGET_PRESETS, LoRASet, select_modules
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
    folder = os.path.join(files.output_dir(), CHECKPOINT_SUBDIR)
    try:
        names = sorted(f for f in os.listdir(folder) if f.endswith(".pt"))
    except OSError:
        names = []
    return [NONE, *names]


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
                    tooltip="The checkpoint to make an NPO offset for (SD1.5/SD2/SDXL family, eps or v-prediction).",
                ),
                io.Conditioning.Input(
                    "positive",
                    tooltip="Training prompts. Several prompts: combine them with "
                    "Conditioning (Combine); each entry is one prompt, cycled "
                    "over the batch.",
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
                io.Float.Input(
                    "learning_rate",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=1e-7,
                    round=1e-9,
                    tooltip="0 = the mode's default: full 1e-6 (SD1.5) / 1e-7 (SDXL) as the authors; "
                    "lora 1e-4 (SD1.5) / 2e-5 (SDXL).",
                ),
                io.Combo.Input(
                    "mode",
                    options=["lora", "full"],
                    default="lora",
                    tooltip="lora: low-rank adapters, teacher = base + EMA of the LoRA (no second UNet), "
                    "fits consumer GPUs. full: all UNet weights like the paper (needs ~5× the "
                    "model's size in memory).",
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
                    tooltip="K: teacher DDIM steps per sample before the target is taken (the authors: 5).",
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
                    "negative/empty conditioning (the branch NPO later queries), or a 50/50 mix.",
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
                    tooltip="A checkpoint from output/npo_training to continue (same model, mode, rank, "
                    "layers). Training continues to `steps` in total.",
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
                    tooltip="Data-free pool: image width (a multiple of 8; SDXL: 1024).",
                ),
                io.Int.Input(
                    "height",
                    default=512,
                    min=64,
                    max=4096,
                    step=8,
                    optional=True,
                    tooltip="Data-free pool: image height (a multiple of 8; SDXL: 1024).",
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
        learning_rate: float,
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
    ) -> io.NodeOutput:
        training_session.check_trainable(model)
        if mode not in ("lora", "full"):
            raise NPOError(f"mode: '{mode}' is not one of lora, full.")
        if mode == "lora" and rank < 1:
            raise NPOError("rank: lora mode needs rank ≥ 1.")
        if training_dtype not in DTYPES:
            raise NPOError(f"training_dtype: '{training_dtype}' is not one of {list(DTYPES)}.")
        arch = model_facts.model_arch(model)
        lr = learning_rate or AUTO_LR[(mode, "SDXL" if arch.startswith("SDXL") else "other")]
        wd = 1e-3 if (mode == "full" and not arch.startswith("SDXL")) else 0.0
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
            weight_decay=wd,
            ema_decay=ema_decay,
            seed=seed,
            save_every=save_every,
            tdft=tcfg,
        )
        try:
            tcfg.validate(1000)
        except ValueError as e:
            raise NPOError(str(e)) from None
        channels = training_session.latent_channels(model)
        if latents is not None:
            samples = latents["samples"]
            if samples.dim() != 4 or samples.shape[1] != channels:
                raise NPOError(
                    f"latents: expected a LATENT batch with {channels} channels for this model, got shape "
                    f"{tuple(samples.shape)}. Encode images with this model's VAE."
                )
        elif width % 8 or height % 8:
            raise NPOError(f"width/height: {width}×{height} is not divisible by the latent factor 8.")

        unet = model_facts.unet_of(model)
        layer_names = select_modules(unet, lora_layers) if mode == "lora" else [n for n, _ in unet.named_parameters()]
        if not layer_names:
            raise NPOError(f"lora_layers: '{lora_layers}' matched no trainable layer of this model.")
        signature = _signature(arch, mode, rank, lora_layers, model_facts.param_shapes(model))
        resume_path = None
        if resume_from and resume_from != NONE:
            files.check_relative_name(resume_from, "resume_from")
            resume_path = os.path.join(files.output_dir(), CHECKPOINT_SUBDIR, resume_from)
            if not os.path.isfile(resume_path):
                raise NPOError(f"resume_from: '{resume_from}' not found in output/{CHECKPOINT_SUBDIR}.")
            try:  # checked before any sampling: a wrong file or a too-small `steps` fails at once
                done = int(load_checkpoint(resume_path, signature)["step"])
            except TrainingError as e:
                raise NPOError(str(e)) from None
            if steps < done:
                raise NPOError(
                    f"steps ({steps}) is smaller than the {done} steps already done in resume_from; set steps ≥ {done}."
                )

        prefix_folder, prefix_name, counter = files.save_path(  # checked before any sampling, like the rest
            os.path.join(files.output_dir(), CHECKPOINT_SUBDIR), filename_prefix
        )
        pos_entries = training_session.conditioning_entries(positive, "positive")
        neg_entries = training_session.conditioning_entries(negative, "negative")
        mp = model.clone()
        pbar = runtime.progress_bar(steps + (0 if latents is not None else pool_size))
        device = training_session.load_for_training(mp)
        if latents is None:
            with runtime.explain_out_of_memory("the start-pool sampling", POOL_OOM_REMEDIES):
                samples, prompt_of = training_session.sample_pool(
                    mp,
                    pos_entries,
                    neg_entries[:1],
                    pool_size,
                    width,
                    height,
                    pool_steps,
                    pool_cfg,
                    seed,
                    lambda i: (pbar.update(1), runtime.throw_if_interrupted()),
                )
            device = training_session.load_for_training(mp)
        else:
            prompt_of = None
        shape = (1, channels, samples.shape[2], samples.shape[3])
        schedule = DiscreteSchedule.from_sigmas(training_session.schedule_sigmas(mp))
        compute_dtype = mp.model.get_dtype()
        ignored = training_session.ignored_sampling_patches(mp)
        if ignored:
            runtime.log.warning("Self-NPO Train: %s: %s", IGNORED_PATCHES_NOTE, ", ".join(ignored))
        cfg.fp16_loss_scaling = compute_dtype == torch.float16  # fp16 activation gradients underflow unscaled
        ckpt_path = resume_path or os.path.join(prefix_folder, f"{prefix_name}_{counter:05}_.pt")
        if resume_path is None:
            _check_free_name(ckpt_path)

        with torch.inference_mode(False), torch.enable_grad():
            z0 = training_session.latent_to_model_space(mp, samples.clone().float()).to(device)
            conds_pos = [_plain(training_session.model_conds(mp, e, shape, device, "positive")) for e in pos_entries]
            cond_neg = _plain(training_session.model_conds(mp, neg_entries[0], shape, device, "negative"))
            data = StartData(z0, conds_pos, cond_neg, prompt_of, seed)
            denoiser = training_session.training_denoiser(mp, compute_dtype)
            callbacks = Callbacks(on_step=lambda s, total, value: pbar.update(1), should_stop=runtime.interrupted)
            with training_session.TrainingSession(mp, gradient_checkpointing, copy_weights=mode == "full") as session:
                lset = None
                if mode == "lora":
                    lset = LoRASet(
                        unet,
                        layer_names,
                        rank,
                        dtype=DTYPES[training_dtype],
                        device=device,
                        generator=torch.Generator().manual_seed(seed),
                    )
                    lset.attach()
                    params = lset.named_trainable()
                else:
                    params = session.full_params(DTYPES[training_dtype])
                try:
                    with runtime.explain_out_of_memory("Self-NPO training", TRAIN_OOM_REMEDIES):
                        result = train(
                            denoiser,
                            schedule,
                            params,
                            data,
                            cfg,
                            callbacks,
                            _path(ckpt_path) if save_every > 0 else None,
                            resume_path,
                            signature,
                        )
                except TrainingError as e:
                    raise NPOError(str(e)) from None
                finally:
                    if lset is not None:
                        lset.detach()
                if result.stopped_early:
                    runtime.throw_if_interrupted()  # ComfyUI's cancel: the last checkpoint is kept for resume_from
                meta = {
                    "npo.recipe": json.dumps(
                        {
                            "method": "self-npo-tdft",
                            "mode": mode,
                            "rank": rank,
                            "lora_layers": lora_layers if mode == "lora" else "all",
                            **cfg.as_dict(),
                        }
                    ),
                    "npo.steps": str(result.steps_done),
                    "npo.base_model": arch,
                }
                if mode == "lora":
                    offset = lset.to_offset(
                        source_format="self-npo", base_arch=_arch_name(arch), source="Self-NPO Train", metadata=meta
                    )
                else:
                    entries = {}
                    for name, p in params.items():
                        d = p.detach().float() - session.original(name).float()
                        if torch.count_nonzero(d):
                            entries[name] = Dense(d.cpu())
                    offset = NPOOffset(
                        entries,
                        source_format="self-npo",
                        base_arch=_arch_name(arch),
                        source="Self-NPO Train",
                        metadata=meta,
                    )
        if mode == "full" and rank > 0 and offset.entries:
            offset, energy = offset.compressed(rank)
            runtime.log.info("Self-NPO full offset compressed to rank %d, energy kept %.4f", rank, energy)
        curve = loss_curve_image(result.losses)
        last = result.losses[-1] if result.losses else float("nan")
        text = f"Self-NPO ({mode}) {result.steps_done}/{steps} steps, last loss {last:.5f}, lr {lr:g}" + (
            f"\ncheckpoint: {result.last_checkpoint.name}" if result.last_checkpoint else ""
        )
        if ignored:
            text += f"\nnote: {IGNORED_PATCHES_NOTE} ({', '.join(ignored)})"
        return io.NodeOutput(offset, curve, result.steps_done, ui=ui.PreviewText(text))


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


class NPOSaveOffset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NPOSaveOffset",
            display_name="Save NPO Offset",
            category=CATEGORY,
            description="Writes an NPO offset into models/npo in ComfyUI's LoRA key format (readable by the stock "
            "LoraLoader too) with NPO metadata. Never overwrites: a counter is added.",
            inputs=[
                NPOOffsetType.Input(
                    "npo_offset", tooltip="From Self-NPO Train, Load NPO Offset or Compress NPO Offset."
                ),
                io.String.Input(
                    "filename_prefix",
                    default="self_npo",
                    tooltip="File name inside models/npo (subfolders allowed, no '..').",
                ),
                io.Model.Input(
                    "model",
                    optional=True,
                    tooltip="Needed only when the offset still has diffusers/kohya key names or full "
                    "weights: the model it belongs to, to convert them.",
                ),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, npo_offset, filename_prefix: str, model=None) -> io.NodeOutput:
        offset = npo_offset
        if not offset.is_resolved:
            if model is None:
                raise NPOError(
                    "npo_offset: this offset still has non-ComfyUI key names or full weights; connect model "
                    "so they can be converted before saving."
                )
            offset = model_facts.resolve_for_model(offset, model)
        folder, name, counter = files.save_path(files.npo_dir(), filename_prefix)
        path = os.path.join(folder, f"{name}_{counter:05}_.safetensors")
        _check_free_name(path)
        formats.save_offset(offset, path)
        rel = os.path.relpath(path, files.npo_dir())
        runtime.log.info("NPO offset saved to %s", path)
        return io.NodeOutput(ui=ui.PreviewText(f"saved models/npo/{rel}\n{offset.summary()}"))
