"""The rows (worker side): Self-NPO Train through the node and its offset through Apply NPO, Apply NPO vs plain CFG
step time, and out of memory during training. Each returns (numbers, checks, note); ``run_row`` turns that, or the
error, into the row's result."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import statistics
import time
import traceback

import torch

from . import measure, models
from .plan import NOT_IN_VERSION, README_WAN_ESTIMATE_GIB, ModelSpec, Profile, Row


@dataclasses.dataclass(frozen=True)
class Context:
    """What every row gets: the profile, whether ComfyUI runs on CUDA, the memory mode, a scratch folder."""

    profile: Profile
    cuda: bool
    mode: str
    workdir: str


class NotInThisVersion(Exception):
    """The pack lacks what the row checks (e.g. an input another change adds)."""


def run_row(ctx: Context, row: Row) -> dict:
    """The row's result: status ("ok", "check failed: ...", "error", NOT_IN_VERSION), seconds, numbers, checks."""
    t0 = time.perf_counter()
    numbers, checks, note, error = {}, {}, "", None
    try:
        numbers, checks, note = KINDS[row.kind](ctx, row)
        failed = [k for k, ok in checks.items() if not ok]
        status = "ok" if not failed else "check failed: " + ", ".join(failed)
    except NotInThisVersion as e:
        status, note = NOT_IN_VERSION, str(e)
    except Exception as e:  # a failing row is reported; the others still run
        status, error = "error", f"{type(e).__name__}: {e}"
        note = traceback.format_exc(limit=-6)
    finally:
        _release()
    return {"title": row.title, "kind": row.kind, "model": row.model, "dtype": row.dtype, "status": status,
            "seconds": round(time.perf_counter() - t0, 2), "numbers": numbers, "checks": checks, "note": note,
            "error": error}


def _release() -> None:
    """Unload every model and return cached memory, so that the next row starts from nothing."""
    import comfy.model_management as mm

    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()


# ---------------------------------------------------------------------------------------------
# Self-NPO Train
# ---------------------------------------------------------------------------------------------
def node_inputs() -> set[str]:
    """The input names of Self-NPO Train in this version of the pack."""
    from comfyui_npo.nodes.train import SelfNPOTrain

    return {i.id for i in SelfNPOTrain.define_schema().inputs}


def train_kwargs(p: Profile, spec: ModelSpec, batch: int, **overrides) -> dict:
    """Self-NPO Train's widget values for a short lora run (node defaults otherwise; no checkpoints, no preview),
    keeping only the inputs this version of the node has."""
    kw = dict(steps=p.train_steps, batch_size=batch, learning_rate="auto", mode="lora", rank=spec.rank,
              truncation_steps=5, teacher_guidance=-1.0, ema_decay=0.999, loss="pseudo_huber", seed=0,
              gradient_checkpointing=True, training_dtype="fp32", save_every=0, filename_prefix="gpu_check",
              preview_every=0)
    kw.update(overrides)
    names = node_inputs()
    return {k: v for k, v in kw.items() if k in names}


def train(ctx: Context, mp, spec: ModelSpec, samples: torch.Tensor, kwargs: dict):
    """SelfNPOTrain.execute on start latents ``samples`` with random prompts, under inference mode as ComfyUI runs
    nodes; returns (node output, TrainSpy, VramMeter)."""
    from comfyui_npo.nodes.train import SelfNPOTrain

    pos, neg = models.conds(spec)
    with measure.TrainSpy(mp) as spy, measure.VramMeter(ctx.cuda) as meter, torch.inference_mode():
        out = SelfNPOTrain.execute(model=mp, positive=pos, negative=neg, latents={"samples": samples}, **kwargs)
    return out, spy, meter


def train_row(ctx: Context, row: Row) -> tuple[dict, dict, str]:
    """Train a lora offset for a few steps; check the losses are finite and the offset changes Apply NPO's sample."""
    p, spec = ctx.profile, ctx.profile.model(row.model)
    if row.partial and "partial_loading" not in node_inputs():
        raise NotInThisVersion("Self-NPO Train has no partial_loading input")
    mp = models.load(spec, row.dtype)
    numbers = {"model": spec.title, **models.describe(mp), "size": spec.size, "batch": spec.train_batch,
               "steps": p.train_steps, "rank": spec.rank}
    budget: contextlib.AbstractContextManager = contextlib.nullcontext("")
    extra = {}
    if row.partial:
        extra["partial_loading"] = True
        reserve = 3.0 * float(mp.model.memory_required([2 * spec.train_batch, *spec.latent]))
        budget = measure.comfy_vram_budget(0.5 * mp.model_size() + reserve, ctx.cuda)
    t0 = time.perf_counter()
    with budget as budget_note:
        out, spy, meter = train(ctx, mp, spec, models.latents(spec, spec.train_batch),
                                train_kwargs(p, spec, spec.train_batch, **extra))
    numbers["train_s"] = round(time.perf_counter() - t0, 2)
    offset = out.result[0]
    losses = [float(v) for v in spy.result.losses] if spy.result is not None else []
    numbers.update(
        losses=[_num(v) for v in losses], step_s=spy.step_seconds, loaded_fraction_min=min(spy.loaded_fractions,
        default=None), loaded_fraction_max=max(spy.loaded_fractions, default=None), offset_entries=len(offset.entries),
        offset_params=offset.numel(), **meter.numbers("train"),
    )
    if budget_note:
        numbers["vram_budget"] = budget_note
    if spec.key == "wan":
        numbers["estimate_gib"] = README_WAN_ESTIMATE_GIB
    applies = offset_applies(ctx, mp, spec, offset)
    numbers.update(applies)
    checks = {
        "steps_done": spy.result is not None and spy.result.steps_done == p.train_steps,
        "loss_finite": bool(losses) and all(math.isfinite(v) for v in losses),
        "offset_finite": _offset_finite(offset),
        "offset_applies": applies["offset_applies"],
    }
    return numbers, checks, f"{spec.size}, batch {spec.train_batch}"


def offset_applies(ctx: Context, mp, spec: ModelSpec, offset) -> dict:
    """Sample with and without Apply NPO (strength 1, same seed): both finite and different."""
    from comfyui_npo.nodes.models import NPOApply

    pos, neg = models.conds(spec)
    steps = ctx.profile.sample_steps
    plain = models.sample(mp, spec, pos, neg, steps)
    with torch.inference_mode():
        npo_mp = NPOApply.execute(model=mp, npo_offset=offset, strength=1.0).result[0]
    with measure.VramMeter(ctx.cuda) as meter:
        npo = models.sample(npo_mp, spec, pos, neg, steps)
    diff = float((npo.float() - plain.float()).abs().max() / plain.float().abs().max().clamp_min(1e-12))
    ok = models.finite(plain) and models.finite(npo) and not torch.equal(npo, plain)
    return {"offset_applies": ok, "sample_rel_max_diff": _num(diff), **meter.numbers("npo_sample")}


def _offset_finite(offset) -> bool:
    tensors = [getattr(e, f.name) for e in offset.entries.values() for f in dataclasses.fields(e)]
    return all(models.finite(t) for t in tensors if torch.is_tensor(t))


def _num(v: float) -> float | str:
    """A float for the JSON: finite as is (rounded), NaN/Inf as text."""
    return float(f"{v:.6g}") if math.isfinite(v) else str(v)


# ---------------------------------------------------------------------------------------------
# Apply NPO vs plain CFG, step time
# ---------------------------------------------------------------------------------------------
def timing_row(ctx: Context, row: Row) -> tuple[dict, dict, str]:
    """Warm-up, then plain and Apply NPO runs alternating (ABBA...), per-step wall times between synchronised
    sampler callbacks (steps 2..N); medians and their ratio, and the median of the per-repeat ratios."""
    from comfyui_npo.nodes.models import NPOApply

    spec = ctx.profile.model(row.model)
    steps, repeats = ctx.profile.timing[spec.key]
    mp = models.load(spec, row.dtype)
    offset, layers = models.random_lora_offset(mp, spec.rank)
    with torch.inference_mode():
        arms = {"plain": mp, "npo": NPOApply.execute(model=mp, npo_offset=offset, strength=1.0).result[0]}
    pos, neg = models.conds(spec)
    numbers = {"model": spec.title, **models.describe(mp), "size": spec.size, "latent": [1, *spec.latent],
               "steps": steps, "repeats": repeats, "lora_layers": layers, "rank": spec.rank}
    finite = {}
    for name, m in arms.items():  # warm-up run per arm, with its peak VRAM
        with measure.VramMeter(ctx.cuda) as meter:
            finite[name] = models.finite(models.sample(m, spec, pos, neg, steps))
        numbers.update(meter.numbers(f"{name}_sample"))
    runs: dict[str, list[list[float]]] = {"plain": [], "npo": []}
    for r in range(repeats):
        for name in ("plain", "npo") if r % 2 == 0 else ("npo", "plain"):
            runs[name].append(step_times(ctx, arms[name], spec, pos, neg, steps))
    med = {n: statistics.median(t for run in v for t in run) for n, v in runs.items()}
    ratio = med["npo"] / med["plain"]
    paired = statistics.median(statistics.median(a) / statistics.median(b)
                               for a, b in zip(runs["npo"], runs["plain"], strict=True))
    numbers.update(plain_step_s=round(med["plain"], 5), npo_step_s=round(med["npo"], 5), ratio=round(ratio, 4),
                   paired_ratio=round(paired, 4), runs_s=runs)
    checks = {"outputs_finite": all(finite.values()), "ratio_positive": math.isfinite(ratio) and ratio > 0}
    return numbers, checks, f"{spec.size}, {steps} steps × {repeats} repeats per arm"


def step_times(ctx: Context, mp, spec: ModelSpec, pos, neg, steps: int) -> list[float]:
    """Seconds of sampler steps 2..N of one run (CUDA synchronised at every callback)."""
    stamps: list[float] = []

    def callback(step, x0, x, total_steps):
        measure.cuda_sync(ctx.cuda)
        stamps.append(time.perf_counter())

    models.sample(mp, spec, pos, neg, steps, callback=callback)
    return [round(b - a, 6) for a, b in zip(stamps, stamps[1:], strict=False)]


# ---------------------------------------------------------------------------------------------
# out of memory
# ---------------------------------------------------------------------------------------------
def oom_row(ctx: Context, row: Row) -> tuple[dict, dict, str]:
    """An oversized training batch: Self-NPO Train must raise the pack's NPOError naming the remedies, and ComfyUI
    must sample afterwards. On the CPU the student's forward raises torch.OutOfMemoryError (injected)."""
    from comfyui_npo.nodes.host.training_run import TRAIN_OOM_REMEDIES
    from comfyui_npo.npo_core.errors import NPOError

    p, spec = ctx.profile, ctx.profile.model(row.model)
    mp = models.load(spec, row.dtype)
    samples = models.latents(spec, 0, shape=p.oom_latent)
    kwargs = train_kwargs(p, spec, p.oom_latent[0], steps=1, truncation_steps=1, gradient_checkpointing=False)
    inject = not ctx.cuda
    message, other = "", None
    before = _allocated(ctx.cuda)
    with measure.injected_oom(mp) if inject else contextlib.nullcontext():
        try:
            train(ctx, mp, spec, samples, kwargs)
        except NPOError as e:
            message = str(e)
        except Exception as e:  # not the pack's error: reported as such
            other = f"{type(e).__name__}: {str(e)[:500]}"
    gc.collect()
    after = _allocated(ctx.cuda)
    pos, neg = models.conds(spec)
    out = models.sample(mp, spec, pos, neg, ctx.profile.sample_steps)
    numbers = {"model": spec.title, **models.describe(mp), "size": p.oom_size, "injected": inject,
               "message": message, "other_error": other, "allocated_before_gib": before,
               "allocated_after_gib": after, "sample_after": f"{spec.size}, {ctx.profile.sample_steps} steps"}
    checks = {
        "npo_error": bool(message),
        "names_out_of_memory": "out of memory" in message,
        "names_remedies": TRAIN_OOM_REMEDIES in message,
        "sample_after_oom": models.finite(out),
    }
    return numbers, checks, "OOM injected in the student's forward" if inject else "a real CUDA out-of-memory"


def _allocated(cuda: bool) -> float | str:
    from .plan import NO_CUDA

    return round(torch.cuda.memory_allocated() / measure.GIB, 3) if cuda else NO_CUDA


KINDS = {"train": train_row, "timing": timing_row, "oom": oom_row}
