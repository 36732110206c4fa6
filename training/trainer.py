"""The training loop of both ways to an offset: Self-NPO's TDFT (with its EMA teacher) and Diffusion-NPO's reversed
DPO (``training.preference``). AdamW (or Adafactor, 8-bit AdamW), gradient clipping, gradient accumulation,
checkpoints that resume exactly, progress and cancel callbacks. Host-agnostic: a denoiser callable and named
parameters. An objective (``_TDFTObjective``, ``_PreferenceObjective``) makes one optimizer step's gradients and
carries its own state into the checkpoints."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..npo_core.atomic import atomic_write
from . import conds as C
from .data import StartData
from .ema import EMATeacher
from .optimizers import ADAMW, make_optimizer, unavailable_reason
from .pairs import PairData
from .preference import AdapterOff, PairDraws, PreferenceConfig, preference_step
from .schedules import TDFTSchedule
from .tdft import Denoiser, Schedule, StepDraws, TDFTConfig, student_cond, student_loss, teacher_rollout

CHECKPOINT_FORMAT = "comfyui-npo-train/1"
OBJECTIVES = ("self-npo", "preference")
MAX_SKIPPED_STEPS = 30  # overflowing steps in a row (scale halved each time) before training is given up


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, bad resume file); the message says what to do."""


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-6
    weight_decay: float = 1e-3
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    save_every: int = 0
    # k micro-batches of batch_size per optimizer step: the update of one step on a k·batch_size batch (the same
    # samples and random numbers), in the activation memory of one micro-batch; checkpoints at step boundaries only
    grad_accumulation_steps: int = 1
    optimizer: str = ADAMW  # training.optimizers: AdamW (the authors'), Adafactor, AdamW 8-bit (bitsandbytes)
    # Dynamic loss scaling (torch.amp.GradScaler) for a forward computed in float16: without it the
    # backward's fp16 activation gradients (≈ 1/numel of the output each) underflow to zero. Steps whose
    # scaled gradients overflow are skipped and the scale halves, as in the authors' fp16 training.
    fp16_loss_scaling: bool = False
    tdft: TDFTConfig = field(default_factory=TDFTConfig)
    objective: str = "self-npo"  # OBJECTIVES: Self-NPO's TDFT, or Diffusion-NPO's reversed DPO ("preference")
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Callbacks:
    on_step: Callable[[int, int, float], None] = lambda step, total, loss: None
    should_stop: Callable[[], bool] = lambda: False
    on_checkpoint: Callable[[Path, int], None] = lambda path, step: None


@dataclass
class TrainResult:
    steps_done: int
    losses: list[float]
    stopped_early: bool
    last_checkpoint: Path | None


def save_checkpoint(
    path: Path,
    step: int,
    params: dict[str, nn.Parameter],
    objective_state: dict,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    losses: list[float],
    cfg: TrainConfig,
    signature: str,
    scaler: torch.amp.GradScaler | None = None,
    schedule: str = "",
    metadata: dict[str, str] | None = None,
) -> Path:
    """Atomic write (``npo_core.atomic``): a crash leaves the old file or the new one. ``objective_state``: the
    objective's own entries (TDFT: its ``ema``). ``metadata``: strings kept as they are (the host's provenance:
    prompt, workflow)."""
    state = {
        **objective_state,
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "params": {n: p.detach().cpu().clone() for n, p in params.items()},
        "optimizer": opt.state_dict(),
        "rng": gen.get_state(),
        "losses": torch.tensor(losses, dtype=torch.float64),
        "config": json.dumps(cfg.as_dict()),
        "signature": signature,
        "grad_scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else {},
        "schedule": schedule,
        "optimizer_name": cfg.optimizer,
        "metadata": dict(metadata or {}),
    }
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike, signature: str) -> dict:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainingError(f"resume_from: cannot read '{Path(path).name}' ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"resume_from: '{Path(path).name}' is not a training checkpoint of this pack.")
    if state.get("signature") != signature:
        raise TrainingError(
            f"resume_from: '{Path(path).name}' was made for another model or training setup "
            f"({state.get('signature')!r}, this run is {signature!r}); resume with the same model, "
            "mode, rank and layers, or start fresh."
        )
    return state


def _last(ckpt: Path | None) -> str:
    return f"; the last good checkpoint, {ckpt.name}, is kept" if ckpt else "; no checkpoint was written yet"


class Trainer:
    """One TDFT run, checked before anything runs: the config against the schedule, the resume checkpoint
    (read once) against the signature, the schedule and ``cfg.steps``. ``schedule``: a ``training.schedules``
    schedule (``make_schedule(kind, model_sampling.sigmas)``: VP, zero terminal SNR VP or flow)."""

    def __init__(
        self,
        schedule: Schedule,
        cfg: TrainConfig,
        signature: str = "",
        resume_from: str | os.PathLike | None = None,
        resume_state: dict | None = None,
    ) -> None:
        if not isinstance(schedule, TDFTSchedule):
            raise TypeError(f"not a TDFT schedule: {type(schedule).__name__} (use training.schedules.make_schedule)")
        if cfg.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {cfg.objective!r}")
        if cfg.objective == "preference":
            cfg.preference.validate(schedule)
        else:
            cfg.tdft.validate(schedule)
        if cfg.steps < 1 or cfg.batch_size < 1 or cfg.grad_accumulation_steps < 1:
            raise ValueError("steps, batch_size and grad_accumulation_steps must be ≥ 1")
        reason = unavailable_reason(cfg.optimizer)
        if reason:
            raise ValueError(f"optimizer: {cfg.optimizer} cannot run here: {reason}.")
        self.schedule, self.cfg, self.signature = schedule, cfg, signature
        self.resume_from = resume_from
        self.metadata: dict[str, str] = {}  # written into every checkpoint (the host's provenance)
        self.resume_state = None
        if resume_from:
            state = resume_state if resume_state is not None else load_checkpoint(resume_from, signature)
            made_on = state.get("schedule", "")
            if made_on and made_on != schedule.fingerprint():  # checkpoints written before flow support carry none
                raise TrainingError(
                    f"resume_from: '{Path(resume_from).name}' was trained on another noise schedule ({made_on}; "
                    f"this model's is {schedule.fingerprint()}): a ModelSampling node or the shift changed. Resume "
                    "with the same schedule, or start fresh."
                )
            trained_with = state.get("optimizer_name", ADAMW)  # checkpoints written before the choice: AdamW
            if trained_with != cfg.optimizer:
                raise TrainingError(
                    f"resume_from: '{Path(resume_from).name}' was trained with {trained_with}, this run uses "
                    f"{cfg.optimizer}; resume with optimizer {trained_with}, or start fresh."
                )
            trained_for = json.loads(state.get("config", "{}")).get("objective", "self-npo")
            if trained_for != cfg.objective:
                raise TrainingError(
                    f"resume_from: '{Path(resume_from).name}' is a {trained_for} checkpoint; this run trains "
                    f"{cfg.objective}. Resume it with the node that wrote it, or start fresh."
                )
            done = int(state["step"])
            if done > cfg.steps:
                raise TrainingError(
                    f"steps ({cfg.steps}) is smaller than the {done} steps already done in resume_from; set "
                    f"steps ≥ {done}."
                )
            self.resume_state = state

    @property
    def done(self) -> int:
        """Steps already done (those of the resume checkpoint)."""
        return int(self.resume_state["step"]) if self.resume_state else 0

    def run(
        self,
        denoiser: Denoiser,
        params: dict[str, nn.Parameter],
        data: StartData,
        callbacks: Callbacks | None = None,
        checkpoint_path: Path | None = None,
    ) -> TrainResult:
        """TDFT from the resumed step (or 0) to ``cfg.steps``; the teacher is the EMA of ``params``;
        ``denoiser`` works in the schedule's x-space and sigma."""
        if self.cfg.objective != "self-npo":
            raise ValueError("run() trains Self-NPO (TDFT); use run_preference() for objective 'preference'")
        objective = _TDFTObjective(self, denoiser, data, EMATeacher(params, self.cfg.ema_decay))
        return _run(self, objective, params, callbacks or Callbacks(), checkpoint_path)

    def run_preference(
        self,
        denoiser: Denoiser,
        adapter_off: AdapterOff,
        params: dict[str, nn.Parameter],
        data: PairData,
        callbacks: Callbacks | None = None,
        checkpoint_path: Path | None = None,
    ) -> TrainResult:
        """Reversed DPO on ``data``'s pairs from the resumed step (or 0) to ``cfg.steps``; the reference is the
        denoiser under ``adapter_off()`` (the same weights without the trained offset)."""
        if self.cfg.objective != "preference":
            raise ValueError("run_preference() needs objective 'preference'")
        objective = _PreferenceObjective(self, denoiser, adapter_off, data)
        return _run(self, objective, params, callbacks or Callbacks(), checkpoint_path)


def train(
    denoiser: Denoiser,
    schedule: Schedule,
    params: dict[str, nn.Parameter],
    data: StartData,
    cfg: TrainConfig,
    callbacks: Callbacks | None = None,
    checkpoint_path: Path | None = None,
    resume_from: str | os.PathLike | None = None,
    signature: str = "",
    resume_state: dict | None = None,
) -> TrainResult:
    """``Trainer(schedule, cfg, signature, resume_from, resume_state).run(denoiser, params, data, ...)``."""
    return Trainer(schedule, cfg, signature, resume_from, resume_state).run(
        denoiser, params, data, callbacks, checkpoint_path
    )


def _check_finite(value: float, step: int, last_ckpt: Path | None) -> None:
    if not math.isfinite(value):
        raise TrainingError(
            f"the loss became {value} at step {step + 1}{_last(last_ckpt)}. Lower learning_rate, use "
            "training_dtype fp32, or resume from the last checkpoint."
        )


def _accumulate(t: Trainer, objective, step: int, gen: torch.Generator, scaler, dev: torch.device, cb: Callbacks,
                last_ckpt: Path | None) -> float | None:
    """The (scaled) gradients of one optimizer step on its batch_size·k samples, k micro-batches of batch_size each
    backpropagating loss / k (the mean over the step's samples); the step's loss, None if cancelled between
    micro-batches. The objective draws the step's random numbers once, then yields one micro-batch's loss at a time."""
    k = t.cfg.grad_accumulation_steps
    losses = objective.micro_batch_losses(step, gen, dev)
    total = 0.0
    for j in range(k):
        if j and cb.should_stop():
            return None
        loss = next(losses)
        value = float(loss.detach())
        _check_finite(value, step, last_ckpt)
        scaler.scale(loss / k).backward()
        total += value / k
    return total


class _TDFTObjective:
    """Self-NPO: the TDFT student loss against the EMA teacher's truncated rollout."""

    def __init__(self, t: Trainer, denoiser: Denoiser, data: StartData, ema: EMATeacher) -> None:
        self.t, self.denoiser, self.data, self.ema = t, denoiser, data, ema

    def micro_batch_losses(self, step: int, gen: torch.Generator, dev: torch.device) -> Iterator[torch.Tensor]:
        t, cfg = self.t, self.t.cfg
        micro, k = cfg.batch_size, cfg.grad_accumulation_steps
        z0_all, c_pos_all, c_neg_all = self.data.batch(step, micro * k)
        draws_all = StepDraws.draw(tuple(z0_all.shape), cfg.tdft, gen)
        for j in range(k):
            rows = torch.arange(j * micro, (j + 1) * micro)
            z0 = z0_all[rows].to(dev)
            c_pos, c_neg = C.index(c_pos_all, rows), C.index(c_neg_all, rows)
            draws = draws_all.rows(j * micro, (j + 1) * micro)
            with self.ema.swapped_in():
                roll = teacher_rollout(self.denoiser, t.schedule, z0, c_pos, c_neg, cfg.tdft, gen, draws)
            c_student = student_cond(c_pos, c_neg, cfg.tdft, micro, gen, draws)
            yield student_loss(self.denoiser, t.schedule, roll, c_student, cfg.tdft, gen, draws)[0]

    def after_update(self) -> None:
        self.ema.update()

    def state(self) -> dict:
        return {"ema": self.ema.state_dict()}

    def load(self, state: dict) -> None:
        self.ema.load_state_dict(state["ema"])


class _PreferenceObjective:
    """Diffusion-NPO: the reversed-DPO loss of ``batch_size`` pairs per micro-batch (one level and one noise per
    pair, drawn for the whole step), against the same denoiser with the offset off."""

    def __init__(self, t: Trainer, denoiser: Denoiser, adapter_off: AdapterOff, data: PairData) -> None:
        self.t, self.denoiser, self.adapter_off, self.data = t, denoiser, adapter_off, data

    def micro_batch_losses(self, step: int, gen: torch.Generator, dev: torch.device) -> Iterator[torch.Tensor]:
        t, cfg = self.t, self.t.cfg
        micro, k = cfg.batch_size, cfg.grad_accumulation_steps
        pref_all, rej_all, cond_all = self.data.batch(step, micro * k)
        draws_all = PairDraws.draw(tuple(pref_all.shape), t.schedule.num_levels, gen)
        for j in range(k):
            rows = torch.arange(j * micro, (j + 1) * micro)
            yield preference_step(
                self.denoiser, self.adapter_off, pref_all[rows].to(dev), rej_all[rows].to(dev),
                C.index(cond_all, rows), t.schedule, cfg.preference, draws_all.rows(j * micro, (j + 1) * micro),
            ).loss

    def after_update(self) -> None:
        pass

    def state(self) -> dict:
        return {}

    def load(self, state: dict) -> None:
        pass


def _run(t: Trainer, objective, params: dict, cb: Callbacks, checkpoint_path: Path | None) -> TrainResult:
    schedule, cfg, signature, resume_from = t.schedule, t.cfg, t.signature, t.resume_from
    fingerprint = schedule.fingerprint()
    plist = list(params.values())
    for p in plist:
        p.requires_grad_(True)
    opt = make_optimizer(cfg.optimizer, plist, cfg.learning_rate, cfg.weight_decay)
    scaler = torch.amp.GradScaler(plist[0].device.type, enabled=cfg.fp16_loss_scaling)
    skipped_in_a_row = 0
    gen = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    start = t.done
    if t.resume_state is not None:
        state = t.resume_state
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state["params"][n])
        objective.load(state)
        opt.load_state_dict(state["optimizer"])
        if scaler.is_enabled() and state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        gen.set_state(state["rng"])
        losses = [float(v) for v in state["losses"].tolist()]
    last_ckpt: Path | None = Path(resume_from) if resume_from else None
    stopped = False
    step = start
    for step in range(start, cfg.steps):
        if cb.should_stop():
            stopped = True
            break
        opt.zero_grad(set_to_none=True)
        value = _accumulate(t, objective, step, gen, scaler, plist[0].device, cb, last_ckpt)
        if value is None:  # cancelled between micro-batches: this step's gradients are dropped
            stopped = True
            break
        scaler.unscale_(opt)
        norm = float(torch.nn.utils.clip_grad_norm_(plist, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
        if not math.isfinite(norm):  # checked before the update: weights and checkpoint stay good
            skipped_in_a_row += 1
            if not scaler.is_enabled() or skipped_in_a_row > MAX_SKIPPED_STEPS:
                why = f" in {skipped_in_a_row} steps in a row, down to loss scale {scaler.get_scale():g}"
                raise TrainingError(
                    f"the gradients became {norm}{why if scaler.is_enabled() else ''} at step {step + 1} "
                    f"(loss {value:.4g}){_last(last_ckpt)}. Lower learning_rate, use training_dtype fp32, or "
                    "resume from the last checkpoint."
                )
        else:
            skipped_in_a_row = 0
        scaler.step(opt)  # with loss scaling on, an overflowing step is skipped here and the scale halves
        scaler.update()
        objective.after_update()
        losses.append(value)
        cb.on_step(step + 1, cfg.steps, value)
        if checkpoint_path is not None and cfg.save_every > 0 and (step + 1) % cfg.save_every == 0:
            last_ckpt = save_checkpoint(
                checkpoint_path, step + 1, params, objective.state(), opt, gen, losses, cfg, signature, scaler,
                fingerprint, t.metadata,
            )
            cb.on_checkpoint(last_ckpt, step + 1)
    else:
        step = cfg.steps
    done = step if stopped else cfg.steps
    if checkpoint_path is not None and cfg.save_every > 0 and not stopped and done > start and done % cfg.save_every:
        last_ckpt = save_checkpoint(
            checkpoint_path, done, params, objective.state(), opt, gen, losses, cfg, signature, scaler, fingerprint,
            t.metadata,
        )
        cb.on_checkpoint(last_ckpt, done)  # the final state too, so `steps` can be raised and training resumed
    for p in plist:
        p.requires_grad_(False)
    return TrainResult(done, losses, stopped, last_ckpt)
