#!/usr/bin/env python
"""Cost of one Self-NPO (TDFT) training step: the full-size SD1.5 UNet, Wan 2.1 T2V 1.3B or SD3.5 medium.

Random weights; CPU fp32 by default. ``--arch sd15`` (the default) is the UNet benchmark as it was;
``--arch wan21_1.3b`` / ``sd35_medium`` build the DiTs of ``bench_dit.py`` at full size (``--smoke``: its
2-block models) and train them through the Self-NPO Train node's own code.

Timed in one process, variants interleaved over repeats (A B C, C B A, ...), medians of per-step
wall time (the first step of every run is a warm-up and not counted):

- ``ours``     the pack's training loop (``training.trainer.train``) through the ComfyUI denoiser, as
               the Self-NPO Train node runs it: teacher = EMA swap, w = −1 (conditional pass skipped),
               frozen samples not re-evaluated, then student forward + backward, AdamW, EMA update;
- ``floor``    the same model passes timed alone: the teacher's no-grad forwards with exactly the batch
               sizes ``ours`` used (replayed from the same random draws on the same schedule, and checked
               against the calls ``ours`` made) + one student forward+backward (gradient checkpointing as
               in ``ours``);
- ``authors``  the authors' schedule (``Self-NPO/train.py``): 6 teacher evaluations, each a separate
               conditional and unconditional forward of the whole batch (12 passes), + student step.

Ratios: ours / floor (overhead of the loop; goal ≤ 1.15) and authors / ours (goal ≥ 1.8 at w = −1).
The same run also gives the **ceiling** authors / floor: no implementation of this schedule can beat
its own model passes, so authors / ours ≤ authors / floor. From the timed parts, F = one teacher
forward of the whole batch (authors' teacher time / 12) and S = the student's forward + backward;
authors / floor ≈ (12 F + S) / (6 F + S) when few samples freeze.

SD1.5 (``--arch sd15``): lora (rank 16, attention) or full mode, gradient checkpointing off, lr 1e-6,
batch 2, 8 start latents, 2 prompts. ``--memory`` runs one child process per mode (lora, full) that builds
the model, resets the peak counter and trains 2 steps.

DiT (``--arch wan21_1.3b`` / ``sd35_medium``): what Self-NPO Train runs, through the entry point it uses
(``nodes.host.training_run``) with its defaults (read from its schema): ``TrainingModel`` (the family record,
the flow schedule of the model's own table), ``plan_job`` (TrainConfig: batch 4, K = 5, w = −1, lr auto, seed
0; LoRA rank 16 on the family's "attention" preset; the model inputs of 2 prompts + the negative, batched as
ComfyUI batches conds: text [1, 512, 4096] for Wan, [1, 154, 4096] + pooled [1, 2048] for SD3), ``start_data``
(8 start latents given as the node's ``latents`` input: Wan [16, 1, 16, 16], SD3 [16, 32, 32]) and
``train_offset`` (the training session with gradient checkpointing on, the node's default). ``floor`` and
``authors`` open the same session and LoRA. ``--memory`` runs child processes: lora training 2 steps with
gradient checkpointing (at each ``--memory-latents`` side), without it (at the first side), and inference of
the same model (``bench_dit.py``'s plain arm: CFGGuider + euler, ``--mem-steps`` steps, batch 1 = cond and
uncond in one call). Reported: peak memory, the memory before the measured phase, the high-water delta (peak −
before), training / inference (goal ≤ 1.5), and an estimate of what a 24 GB GPU needs at a real latent (Wan
480×832, 33 frames: 14,040 tokens; SD3.5 1024²: 4,096 tokens), from the measured parts: ``gpu_estimate``
(``--estimate-from`` reruns it on a saved JSON). Full mode is not run on the DiTs.

Memory is peak RSS on CPU (``/proc/self/clear_refs`` ← 5, then ``VmHWM``), ``torch.cuda.max_memory_allocated``
on CUDA.

    python benchmarks/bench_tdft.py [--latent 8] [--batch 2] [--steps 3] [--repeats 3] [--mode lora] [--memory]
    python benchmarks/bench_tdft.py --memory-only      # lora vs full peak memory alone (full needs ~20 GB)
    python benchmarks/bench_tdft.py --device cuda --dtype bf16 --latent 64 --batch 4 --memory   # a GPU
    python benchmarks/bench_tdft.py --arch wan21_1.3b --smoke --memory           # 2-block Wan, minutes
    python benchmarks/bench_tdft.py --arch wan21_1.3b --threads 2 --memory --json tdft_wan.json   # full size
    python benchmarks/bench_tdft.py --arch sd35_medium --threads 2 --memory-only --json tdft_sd35_mem.json
    python benchmarks/bench_tdft.py --estimate-from tdft_wan.json [--target-batch 1]  # the 24 GB estimate again
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the ComfyUI set-up of the inference benchmarks and their models (benchmarks/ is on sys.path when run)
from bench_dit import ARCHS, build_model, dominant_dtype, measure_memory, measure_peak, provenance, random_cond
from bench_inference import SD15_UNET, import_env, machine

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
SD15_SMOKE = {"model_channels": 64}  # --smoke for sd15: the same layout, 1/25 of the weights
VARIANTS = ("ours", "floor", "authors")
LORA_STATE_BYTES = 20  # per LoRA parameter (training_dtype fp32): weight, gradient, AdamW's 2 moments, EMA copy
GPU_TARGETS = {  # the real-size latents of the 24 GB estimate (batch 1)
    "wan21_1.3b": ("480×832, 33 frames", [1, 16, 9, 60, 104]),
    "sd35_medium": ("1024×1024", [1, 16, 128, 128]),
}


def setup(device: str = "cpu", threads: int = 0):
    import_env(cpu=device == "cpu")  # ComfyUI (CPU mode unless a GPU is asked for) + the pack as comfyui_npo
    if threads:
        import torch

        torch.set_num_threads(threads)


def build(device: str, seed: int = 0, smoke: bool = False):
    """fp32 weights on ``device`` (as ComfyUI loads SD1.5 for training: the node trains in fp32 masters)."""
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    with torch.inference_mode():
        m = comfy.supported_models.SD15({**SD15_UNET, **(SD15_SMOKE if smoke else {})}).get_model({})
        g = torch.Generator().manual_seed(seed)
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        m.to(device)
    return comfy.model_patcher.ModelPatcher(m, torch.device(device), torch.device(device))


def sync(device: str) -> float:
    """perf_counter after the device has finished its queued work."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


@contextlib.contextmanager
def model_calls(mp, out: list):
    """Records (rows, grad enabled) of every call of the diffusion model (teacher calls run without grad)."""
    import torch

    def pre_hook(module, args, kwargs):
        x = args[0] if args else kwargs.get("x")
        out.append((int(x.shape[0]), torch.is_grad_enabled()))

    handle = mp.model.diffusion_model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield out
    finally:
        handle.remove()


class Bench:
    """SD1.5: the model, start data, a TrainingSession kept open with the trainable weights."""

    TEACHER_SIGMA, STUDENT_SIGMA = 3.0, 5.0  # VP ν of the floor's and authors' passes

    def __init__(self, mode: str, latent: int, batch: int, device: str = "cpu", dtype: str = "fp32", smoke=False):
        import torch

        from comfyui_npo.nodes.host.training_model import TrainingModel, training_denoiser
        from comfyui_npo.training import tdft
        from comfyui_npo.training.data import StartData
        from comfyui_npo.training.lora import LoRASet

        self.torch, self.tdft = torch, tdft
        self.device, self.dtype = device, getattr(torch, DTYPES[dtype])
        self.mp = build(device, smoke=smoke)
        self.tm = TrainingModel(self.mp)  # the node's view of the model: VP schedule of its ν table, denoiser
        self.batch = batch
        self.schedule = self.tm.schedule
        self.tcfg, self.seed = tdft.TDFTConfig(), 0
        g = torch.Generator().manual_seed(1)
        self.data = StartData(  # on the device, as the node prepares them
            torch.randn(8, 4, latent, latent, generator=g).to(device),
            [{"c_crossattn": torch.randn(1, 77, 768, generator=g).to(device)} for _ in range(2)],
            {"c_crossattn": torch.zeros(1, 77, 768, device=device)},
        )
        self.session = self.tm.session(gradient_checkpointing=False, copy_weights=mode == "full")
        self.session.__enter__()
        unet = self.tm.diffusion_model
        if mode == "lora":
            targets = self.tm.lora_targets("attention")
            self.lset = LoRASet(unet, targets, 16, generator=torch.Generator().manual_seed(0))
            self.lset.attach()
            self.params = self.lset.named_trainable()
        else:
            self.params = self.session.full_params(torch.float32)
        self.denoiser = training_denoiser(self.mp, self.dtype)  # the node's denoiser, at --dtype
        self.mode = mode
        self.calls: list[tuple[int, bool]] = []  # the model calls of the last ``ours`` run

    def _train(self, steps: int, on_step) -> None:
        from comfyui_npo.training.trainer import Callbacks, TrainConfig, train

        cfg = TrainConfig(
            steps=steps, batch_size=self.batch, learning_rate=1e-6, seed=0,
            fp16_loss_scaling=self.dtype == self.torch.float16,  # as the node does for an fp16 model
        )
        train(self.denoiser, self.schedule, self.params, self.data, cfg, Callbacks(on_step=on_step))

    def ours(self, steps: int) -> list[float]:
        stamps = []
        self.calls = []
        with model_calls(self.mp, self.calls):
            t0 = sync(self.device)
            self._train(steps, lambda s, t, v: stamps.append(sync(self.device)))
        times = [b - a for a, b in zip([t0, *stamps[:-1]], stamps, strict=True)]
        return times[1:]

    def _rows_per_call(self, steps: int) -> list[list[int]]:
        """Replay ``ours``' random draws to get the teacher batch size of every call."""
        torch = self.torch
        gen = torch.Generator().manual_seed(self.seed)
        out = []
        for step in range(steps):
            z0, cp, cn = self.data.batch(step, self.batch)
            calls = []

            def fake(x, nu, cond, calls=calls):
                calls.append(x.shape[0])
                return x * 0.5

            roll = self.tdft.teacher_rollout(fake, self.schedule, z0, cp, cn, self.tcfg, gen)
            self.tdft.student_cond(cp, cn, self.tcfg, self.batch, gen)
            self.schedule.sample_level(roll.t_end, gen)
            torch.randn(z0.shape, generator=gen)  # ξ
            out.append(calls)
        return out

    def check_replay(self, steps: int) -> list[list[int]]:
        """The floor's plan, checked against the teacher calls the last ``ours`` run made."""
        plan = self._rows_per_call(steps)
        seen, step_calls = [], []
        for rows, grad in self.calls:
            if grad:  # the student's call ends a step
                seen.append(step_calls)
                step_calls = []
            else:
                step_calls.append(rows)
        if seen != plan:
            raise RuntimeError(f"the floor's replayed teacher calls {plan} differ from ours' {seen}")
        return plan

    @contextlib.contextmanager
    def _trainable(self):
        yield self.params  # the session and LoRA stay open for the whole run

    def _student(self, z0, cp, params) -> None:
        torch = self.torch
        for p in params.values():
            p.requires_grad_(True)
        nu = torch.full((z0.shape[0],), self.STUDENT_SIGMA, device=z0.device)
        pred = self.denoiser(z0, nu, cp)
        loss = (pred - z0).square().mean()
        loss.backward()
        for p in params.values():
            p.grad = None

    def floor(self, steps: int) -> list[tuple[float, float]]:
        """(teacher seconds, student seconds) per step."""
        from comfyui_npo.training import conds

        torch = self.torch
        plan = self._rows_per_call(steps)
        times = []
        with self._trainable() as params:
            for step, calls in enumerate(plan):
                z0, cp, cn = self.data.batch(step, self.batch)
                t0 = sync(self.device)
                with torch.no_grad():
                    for rows in calls:
                        nu = torch.full((rows,), self.TEACHER_SIGMA, device=z0.device)
                        self.denoiser(z0[:rows], nu, conds.index(cn, torch.arange(rows)))
                t1 = sync(self.device)
                self._student(z0, cp, params)
                times.append((t1 - t0, sync(self.device) - t1))
        return times[1:]

    def authors(self, steps: int) -> list[tuple[float, float]]:
        """(teacher seconds, student seconds) per step."""
        torch = self.torch
        times = []
        with self._trainable() as params:
            for step in range(steps):
                z0, cp, cn = self.data.batch(step, self.batch)
                t0 = sync(self.device)
                with torch.no_grad():
                    for _ in range(6):  # 5 DDIM steps + the final evaluation, cond and uncond separately
                        nu = torch.full((self.batch,), self.TEACHER_SIGMA, device=z0.device)
                        self.denoiser(z0, nu, cp)
                        self.denoiser(z0, nu, cn)
                t1 = sync(self.device)
                self._student(z0, cp, params)
                times.append((t1 - t0, sync(self.device) - t1))
        return times[1:]


def node_defaults() -> dict:
    """The Self-NPO Train node's input defaults, from its schema."""
    from comfyui_npo.nodes.train import SelfNPOTrain

    return {i.id: i.default for i in SelfNPOTrain.define_schema().inputs if getattr(i, "default", None) is not None}


def node_recipe(defaults: dict, **overrides):
    """The training_run.Recipe Self-NPO Train makes from these widget values."""
    from comfyui_npo.nodes.host.training_run import Recipe
    from comfyui_npo.nodes.train import parse_learning_rate

    values = {f.name: defaults[f.name] for f in dataclasses.fields(Recipe) if f.name in defaults}
    values["learning_rate"] = parse_learning_rate(values.get("learning_rate", "auto"))
    return Recipe(**{**values, **overrides})



class DiTBench(Bench):
    """A DiT (bench_dit's model) trained by the Self-NPO Train node's own functions (see the module docstring)."""

    TEACHER_SIGMA, STUDENT_SIGMA = 0.6, 0.8  # flow t of the floor's and authors' passes

    def __init__(
        self, arch, smoke: bool, latent: int, batch: int, device: str = "cpu", dtype: str = "fp32",
        text_tokens: int = 0, gradient_checkpointing: bool | None = None, pool: int = 8, prompts: int = 2,
        accumulation: int = 1,
    ):
        import folder_paths
        import torch

        from comfyui_npo.nodes.host import training_conds, training_run
        from comfyui_npo.nodes.host.training_model import TrainingModel
        from comfyui_npo.training import tdft

        self.torch, self.tdft, self.training_run = torch, tdft, training_run
        self.arch, self.device = arch, device
        self._output = tempfile.TemporaryDirectory(prefix="bench_tdft_")  # nothing is written: save_every 0
        folder_paths.set_output_directory(self._output.name)
        defaults = node_defaults()
        self.gradient_checkpointing = (
            defaults["gradient_checkpointing"] if gradient_checkpointing is None else gradient_checkpointing
        )
        g = torch.Generator().manual_seed(1)
        tokens = arch.text_tokens(smoke, text_tokens)
        self.latent = arch.latent_shape(latent)
        with torch.inference_mode():  # as ComfyUI runs nodes: the weights are inference tensors
            self.mp = build_model(arch, smoke, dtype, device, seed=0)
            positive = [random_cond(arch, tokens, g)[0] for _ in range(prompts)]  # Conditioning (Combine)
            negative = random_cond(arch, tokens, g)
            latents = torch.randn([pool, *self.latent[1:]], generator=g)  # the node's latents input
            # Self-NPO Train with latents connected, through the entry point it uses:
            self.tm = TrainingModel(self.mp)
            recipe = node_recipe(
                defaults, batch_size=batch or defaults["batch_size"], save_every=0,
                grad_accumulation_steps=accumulation,
                student_cond=tdft.resolve_student_cond(defaults["student_cond"], self.tm.schedule_kind),  # as the node
            )
            samples = self.tm.sampler_latent(latents)
            self.job = training_run.plan_job(
                self.tm, recipe, training_conds.conditioning_entries(positive, "positive"),
                training_conds.conditioning_entries(negative, "negative"), tuple(samples.shape[2:]),
            )
            self.load_device = self.tm.load()
            prompt_of = torch.arange(samples.shape[0]) % len(self.job.positive)
        with torch.inference_mode(False), torch.enable_grad():
            self.data = training_run.start_data(self.job, samples, prompt_of)
        self.schedule = self.tm.schedule
        self.denoiser = self.tm.denoiser(training_run.on_device(self.job.constants, self.load_device))
        cfg = self.job.config
        self.batch, self.tcfg, self.seed = cfg.batch_size, cfg.tdft, cfg.seed
        self.mode, self.calls = "lora", []
        dm = self.mp.model.diffusion_model
        self.info = {
            "params": sum(p.numel() for p in dm.parameters()),
            "buffers": sum(b.numel() for b in dm.buffers()),
            "dtype": dominant_dtype(dm),
            "dtype_bytes": torch.empty(0, dtype=getattr(torch, DTYPES[dtype])).element_size(),
            "lora_layers": len(self.job.layer_names),
            "lora_params": sum(
                dm.get_submodule(n).in_features * recipe.rank + dm.get_submodule(n).out_features * recipe.rank
                for n in self.job.layer_names
            ),
            "lora_rank": recipe.rank,
            "schedule": self.tm.schedule_kind,
            "train_config": cfg.as_dict(),
            "gradient_checkpointing": self.gradient_checkpointing,
            "latent": [self.batch, *self.latent[1:]],
            "tokens": arch.image_tokens(self.latent),
            "text_tokens": tokens,
            "start_latents": pool,
            "prompts": prompts,
            "attention": _attention_name(),
        }

    def _train(self, steps: int, on_step) -> None:
        from comfyui_npo.training.trainer import Callbacks, Trainer

        trainer = Trainer(self.schedule, dataclasses.replace(self.job.config, steps=steps), self.job.signature)
        job = dataclasses.replace(self.job, trainer=trainer)
        with self.torch.inference_mode(False), self.torch.enable_grad():  # as SelfNPOTrain.execute
            self.training_run.train_offset(job, self.data, Callbacks(on_step=on_step), self.gradient_checkpointing)

    @contextlib.contextmanager
    def _trainable(self):
        """The session and LoRA ``train_offset`` opens (opened per run, as there)."""
        torch = self.torch
        from comfyui_npo.training.lora import LoRASet

        recipe = self.job.recipe
        session = self.tm.session(self.gradient_checkpointing, copy_weights=False)
        with torch.inference_mode(False), torch.enable_grad(), session:
            lset = LoRASet(
                self.tm.diffusion_model, self.job.layer_names, recipe.rank,
                dtype=self.training_run.DTYPES[recipe.training_dtype], device=self.load_device,
                generator=torch.Generator().manual_seed(recipe.seed),
            )
            lset.attach()
            try:
                yield lset.named_trainable()
            finally:
                lset.detach()


def _attention_name() -> str:
    import comfy.ldm.modules.attention as attention

    return attention.optimized_attention.__name__


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def time_variants(bench: Bench, variants: list[str], steps: int, repeats: int) -> tuple[dict, dict]:
    """Interleaved runs; (per-step seconds of each variant, (teacher, student) parts of floor/authors)."""
    results: dict[str, list] = {v: [] for v in variants}
    for r in range(repeats):
        for name in variants if r % 2 == 0 else variants[::-1]:
            t0 = time.perf_counter()
            results[name] += getattr(bench, name)(steps)
            if name == "ours" and r == 0:
                plan = bench.check_replay(steps)
                print(f"  replay check: the floor's teacher calls match ours' ({plan})", flush=True)
            print(f"  repeat {r} {name:7s} {time.perf_counter() - t0:7.1f} s", flush=True)
    step = {k: [sum(t) if isinstance(t, tuple) else t for t in v] for k, v in results.items()}
    return step, {k: results[k] for k in ("floor", "authors") if k in results}


def timing_summary(step: dict, parts: dict) -> dict:
    med = {k: statistics.median(v) for k, v in step.items()}
    out = {"median_step_s": med}
    if "floor" in med and "ours" in med:
        out["ours_over_floor"] = med["ours"] / med["floor"]
    if "authors" in med:
        if "ours" in med:
            out["authors_over_ours"] = med["authors"] / med["ours"]
        if "floor" in med:
            out["ceiling_authors_over_floor"] = med["authors"] / med["floor"]
        f_teacher = statistics.median(t for t, _ in parts["authors"]) / 12  # one full-batch teacher forward
        s_student = statistics.median(s for v in parts.values() for _, s in v)
        out.update(teacher_forward_F_s=f_teacher, student_step_S_s=s_student, S_over_F=s_student / f_teacher)
    elif "floor" in parts:
        out["student_step_S_s"] = statistics.median(s for _, s in parts["floor"])
    out.update(samples={k: len(v) for k, v in step.items()}, step_s=step, parts_s=parts)
    return out


def print_timing(title: str, report: dict) -> None:
    med = report["median_step_s"]
    print(f"\n{title}")
    print("| variant | median s/step | ratio |")
    print("|---|---|---|")
    if "ours" in med:
        print(f"| ours (pack) | {med['ours']:.3f} | 1.00 |")
    if "floor" in med:
        ratio = f"ours/floor = {report['ours_over_floor']:.3f}" if "ours_over_floor" in report else "–"
        print(f"| floor (same model passes alone) | {med['floor']:.3f} | {ratio} |")
    if "authors" in med:
        ratio = f"authors/ours = {report['authors_over_ours']:.3f}" if "authors_over_ours" in report else "–"
        print(f"| authors' schedule (12 teacher passes) | {med['authors']:.3f} | {ratio} |")
    if "S_over_F" in report:
        ceiling = report.get("ceiling_authors_over_floor", float("nan"))
        print(
            f"\nceiling authors/floor = {ceiling:.3f}; F = {report['teacher_forward_F_s']:.3f} s, "
            f"S = {report['student_step_S_s']:.3f} s, S/F = {report['S_over_F']:.2f}"
        )


# ---------------------------------------------------------------------------------------------
# memory (child processes)
# ---------------------------------------------------------------------------------------------
def peak_memory_child(a) -> dict:
    """Peak memory of 2 training steps after the model is built: RSS on CPU, allocated memory on CUDA."""
    setup(a.device, a.threads)
    if a.arch == "sd15":
        b = Bench(a.child, a.latent, a.batch, a.device, a.dtype, a.smoke)
    else:
        b = DiTBench(
            ARCHS[a.arch], a.smoke, a.latent, a.batch, a.device, a.dtype, a.text_tokens,
            gradient_checkpointing=a.child == "lora",
        )
    gc.collect()
    res = measure_peak(lambda: b.ours(2), a.device)
    peak = res["peak_cuda_mib"] if a.device == "cuda" else res["peak_rss_mib"]
    return {"mode": a.child, "peak_mb": peak, **res, **({} if a.arch == "sd15" else {"info": b.info})}


def run_child(a, mode: str, latent: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--arch", a.arch, "--latent", str(latent)]
    cmd += ["--batch", str(a.batch), "--device", a.device, "--dtype", a.dtype, "--threads", str(a.threads)]
    cmd += ["--text-tokens", str(a.text_tokens)] + (["--smoke"] if a.smoke else [])
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": f"failed (exit {out.returncode}): {out.stderr.strip()[-300:]}"}
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t0
    return res


def sd15_memory(a) -> dict:
    mem = {}
    for mode in ("lora", "full"):
        res = run_child(a, mode, a.latent)
        mem[mode] = res.get("error") or res["peak_mb"]
        print(f"peak memory {mode}: {mem[mode]}", flush=True)
    return mem


def _row(what: str, arch, latent: list, batch: int, rows: int, res: dict, cuda: bool) -> dict:
    key = "cuda" if cuda else "rss"
    return {
        "what": what,
        "latent": latent,
        "tokens": arch.image_tokens(latent),
        "batch": batch,
        "rows": rows,
        "peak_mib": res[f"peak_{key}_mib"],
        "before_mib": res[f"{key}_before_mib"],
        "delta_mib": res[f"{key}_delta_mib"],
        "peak_rss_mib": res["peak_rss_mib"],
        "wall_s": res.get("wall_s"),
    }


def dit_memory(a, arch) -> tuple[list[dict], dict]:
    """The memory rows (training with and without checkpointing, inference) and the model info."""
    cuda = a.device == "cuda"
    rows, info = [], {}
    for i, side in enumerate(a.memory_latents):
        latent = arch.latent_shape(side)
        for mode in ("lora", "lora_nockpt") if i == 0 else ("lora",):
            res = run_child(a, mode, side)
            if "error" in res:
                print(f"  memory {mode} latent {side}: {res['error']}", flush=True)
                continue
            info = info or res["info"]
            what = "train" if mode == "lora" else "train_nockpt"
            batch = res["info"]["latent"][0]
            rows.append(_row(what, arch, [batch, *latent[1:]], batch, batch, res, cuda))
            print(
                f"  memory {what:12s} latent {side}: peak {rows[-1]['peak_mib']:.0f} MiB, before "
                f"{rows[-1]['before_mib']:.0f} MiB, Δ {rows[-1]['delta_mib']:.0f} MiB ({res['wall_s']:.0f} s)",
                flush=True,
            )
        ns = argparse.Namespace(
            dtype=a.dtype, device=a.device, seed=0, rank=16, steps=a.mem_steps, mem_steps=a.mem_steps,
            omp_wait="default", threads=a.threads, latent=side, text_tokens=a.text_tokens, smoke=a.smoke,
        )
        t0 = time.perf_counter()
        try:  # bench_dit's plain arm: CFGGuider + euler, cond and uncond in one call
            res = measure_memory(ns, arch, ["plain"], Path(os.devnull))["plain"]
        except SystemExit as e:
            print(f"  memory inference latent {side}: {str(e)[-300:]}", flush=True)
            continue
        res["wall_s"] = time.perf_counter() - t0
        rows.append(_row("inference", arch, latent, 1, 2, res, cuda))
    return rows, info


def memory_table(rows: list[dict], cuda: bool) -> str:
    """Markdown: one line per measured latent; training / inference of peak and of delta."""
    kind = "peak CUDA allocated" if cuda else "peak RSS"
    lines = [
        f"| latent (tokens) | inference {kind} (Δ) | lora training, checkpointing (Δ) | × inference (Δ ×) "
        f"| lora training, no checkpointing (Δ) | × inference (Δ ×) |",
        "|---|---|---|---|---|---|",
    ]
    by_tokens: dict[int, dict] = {}
    for r in rows:
        by_tokens.setdefault(r["tokens"], {})[r["what"]] = r
    for tokens, got in sorted(by_tokens.items()):
        inf = got.get("inference")
        cells = [f"{inf['peak_mib']:.0f} MiB ({inf['delta_mib']:.0f})" if inf else "–"]
        for what in ("train", "train_nockpt"):
            r = got.get(what)
            if r is None:
                cells += ["–", "–"]
                continue
            cells.append(f"{r['peak_mib']:.0f} MiB ({r['delta_mib']:.0f})")
            cells.append(
                f"{r['peak_mib'] / inf['peak_mib']:.3f} ({r['delta_mib'] / max(inf['delta_mib'], 1e-9):.2f})"
                if inf else "–"
            )
        latent = next(iter(got.values()))["latent"][1:]
        lines.append(f"| {latent} ({tokens}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_ratios(rows: list[dict]) -> dict:
    out = {}
    infer = {r["tokens"]: r for r in rows if r["what"] == "inference"}
    for r in rows:
        inf = infer.get(r["tokens"])
        if r["what"] != "inference" and inf:
            key = f"{r['what']}_over_inference_tokens{r['tokens']}"
            out[key] = {"peak": r["peak_mib"] / inf["peak_mib"], "delta": r["delta_mib"] / max(inf["delta_mib"], 1e-9)}
    return out


# ---------------------------------------------------------------------------------------------
# what a 24 GB GPU needs
# ---------------------------------------------------------------------------------------------
def _fit(points: list[tuple[int, float]]) -> tuple[float, float, str]:
    """y = c0 + c1·tokens through the points (least squares); one token count: c0 = 0 (proportional)."""
    xs = [x for x, _ in points]
    if len(set(xs)) < 2:
        c1 = statistics.mean(y / x for x, y in points)
        return 0.0, c1, "one latent size measured: scaled in proportion to the tokens (no constant part): errs high"
    mx, my = statistics.mean(xs), statistics.mean(y for _, y in points)
    c1 = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    if c1 < 0:
        return max(y for _, y in points), 0.0, "the delta fell with the tokens (noise): its largest value is used"
    return my - c1 * mx, c1, f"line through {len(points)} measurements ({sorted(set(xs))} tokens)"


def gpu_estimate(
    inp: dict, target_tokens: int, batch: int = 1, weight_bytes: int = 2, act_bytes: int = 2, budget_gib: float = 24
) -> dict:
    """What a GPU needs for lora training (gradient checkpointing on) and CFG inference at ``target_tokens``.
    An estimate from the measured parts, not a measurement:

    - weights: (parameters + buffers) × ``weight_bytes`` (bf16: 2);
    - LoRA state: LoRA parameters × 20 B (fp32 weight, gradient, AdamW's two moments, the EMA copy);
    - activations per sample: the measured high-water deltas (peak − memory before training; minus the
      LoRA state, per sample), fitted as c0 + c1·tokens over the measured latents and evaluated at
      ``target_tokens``, × ``act_bytes`` / the measured dtype's bytes (fp32 on CPU → bf16: × ½).
      Checkpointed training keeps each block's inputs (linear in tokens) and one block's internals at a
      time (linear in tokens with memory-efficient attention: no tokens² matrix); the text context is part
      of c0. Inference: the same fit of the sampling runs' deltas (cond + uncond rows, batch 1).

    Left out: the CUDA context and allocator slack (~0.5–1 GB), the text encoder and VAE (ComfyUI unloads or
    offloads them while the diffusion model trains), fp32 parts ComfyUI keeps in a bf16 model."""
    gib, mib = 2**30, 2**20
    scale = act_bytes / inp["dtype_bytes"]
    weights = (inp["params"] + inp["buffers"]) * weight_bytes
    lora = inp["lora_params"] * LORA_STATE_BYTES
    runs = inp["runs"]
    train = [(r["tokens"], (r["delta_mib"] * mib - lora) / r["batch"]) for r in runs if r["what"] == "train"]
    infer = [(r["tokens"], r["delta_mib"] * mib / r["batch"]) for r in runs if r["what"] == "inference"]
    out = {
        "target_tokens": target_tokens,
        "batch": batch,
        "weights_gib": weights / gib,
        "lora_state_gib": lora / gib,
        "assumptions": f"weights {weight_bytes} B, activations × {scale:g} of the measured dtype, "
        f"LoRA state {LORA_STATE_BYTES} B/param; CUDA context, text encoder and VAE not included",
    }
    for name, points, base in (("train", train, weights + lora), ("infer", infer, weights)):
        if not points:
            continue
        c0, c1, note = _fit(points)
        per_sample = (c0 + c1 * target_tokens) * scale
        out[f"{name}_fit"] = {"c0_mib": c0 / mib, "c1_kib_per_token": c1 / 1024, "note": note}
        out[f"{name}_act_per_sample_gib"] = per_sample / gib
        out[f"{name}_total_gib"] = (base + batch * per_sample) / gib
        out[f"{name}_max_batch_in_budget"] = max(0, math.floor((budget_gib * gib - base) / max(per_sample, 1.0)))
    return out


def estimate_input(arch_key: str, info: dict, rows: list[dict]) -> dict:
    keys = ("params", "buffers", "lora_params", "dtype_bytes")
    return {"arch": arch_key, **{k: info[k] for k in keys}, "runs": rows}


def print_estimate(inp: dict, target_batch: int = 1, target_tokens: int = 0) -> dict:
    arch = ARCHS[inp["arch"]]
    label, latent = GPU_TARGETS[inp["arch"]]
    tokens = target_tokens or arch.image_tokens(latent)
    est = gpu_estimate(inp, tokens, target_batch)
    where = f"{label}, latent {latent[1:]}" if not target_tokens else f"{tokens} tokens"
    print(f"\nWhat a 24 GB GPU needs for {arch.title} ({where}: {tokens} tokens, batch {target_batch}), ESTIMATED")
    print(
        "from the parts measured here: need = weights (params + buffers) × 2 B + LoRA params × 20 B + batch × "
        "(c0 + c1·tokens) × ½, (c0, c1) fitted to the per-sample high-water deltas of the measured latents "
        "(fp32 → bf16 halves them); memory-efficient attention assumed, CUDA context (~0.5–1 GB) not included."
    )
    print("| part | GiB |")
    print("|---|---|")
    print(f"| weights, bf16 ({(inp['params'] + inp['buffers']) / 1e6:.0f} M values) | {est['weights_gib']:.2f} |")
    print(f"| LoRA state ({inp['lora_params'] / 1e6:.2f} M params × 20 B) | {est['lora_state_gib']:.3f} |")
    measured = f"{8 * inp['dtype_bytes']}-bit as measured"
    for name, what in (("train", "lora training"), ("infer", "inference (CFG: cond + uncond rows)")):
        if f"{name}_total_gib" not in est:
            continue
        f = est[f"{name}_fit"]
        print(
            f"| {what}: activations per sample (c0 = {f['c0_mib']:.0f} MiB, c1 = {f['c1_kib_per_token']:.1f} "
            f"KiB/token, {measured}; {f['note']}) | {est[f'{name}_act_per_sample_gib']:.2f} |"
        )
        print(f"| **{what}, batch {target_batch}** | **{est[f'{name}_total_gib']:.2f}** |")
        print(f"| {what}: largest batch in 24 GB | {est[f'{name}_max_batch_in_budget']} |")
    return est


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def run_sd15(a) -> None:
    mem = sd15_memory(a) if a.memory else {}  # first, while this process holds no model (full needs ~20 GB)
    setup(a.device, a.threads)
    import torch

    mem_key = "peak_cuda_allocated_mb" if a.device == "cuda" else "peak_rss_mb"
    if a.memory_only:
        print(json.dumps({mem_key: mem}, indent=2))
        if a.json:
            a.json.write_text(json.dumps({"config": vars(a) | {"json": str(a.json)}, mem_key: mem}, indent=2))
        return
    bench = Bench(a.mode, a.latent, a.batch, a.device, a.dtype, a.smoke)
    step, parts = time_variants(bench, a.variants, a.steps, a.repeats)
    report = {
        "machine": (
            torch.cuda.get_device_name() if a.device == "cuda" else f"{os.cpu_count()} CPU cores"
        ) + f", torch {torch.__version__}, {torch.get_num_threads()} threads",
        "provenance": {**provenance(), **machine()},
        "config": vars(a) | {"json": str(a.json) if a.json else None},
        **timing_summary(step, parts),
    }
    if a.memory:
        report[mem_key] = mem
        if all(isinstance(v, float) for v in mem.values()):
            report["full_over_lora_memory"] = mem["full"] / mem["lora"]
    print_timing(
        f"Self-NPO TDFT step, SD1.5 UNet ({'SMOKE: 64 channels' if a.smoke else '860M params'}, random weights), "
        f"{a.device} {a.dtype}, latent {a.latent}², batch {a.batch}, mode {a.mode}, w = −1, K = 5",
        report,
    )
    if "full_over_lora_memory" in report:
        print(
            f"\npeak memory: lora {mem['lora']:.0f} MB, full {mem['full']:.0f} MB "
            f"(full/lora = {report['full_over_lora_memory']:.2f})"
        )
    if a.json:
        a.json.write_text(json.dumps(report, indent=2))


def run_dit(a) -> None:
    arch = ARCHS[a.arch]
    cuda = a.device == "cuda"
    prov = {**provenance()}
    t_start = time.perf_counter()
    rows, info = dit_memory(a, arch) if a.memory else ([], {})  # first, while this process holds no model
    setup(a.device, a.threads)
    import torch

    prov.update(machine(), **({"gpu": torch.cuda.get_device_name()} if cuda else {}))
    report = {"provenance": prov, "config": vars(a) | {"json": str(a.json) if a.json else None}}
    title = f"{arch.title}{' (SMOKE: 2 blocks)' if a.smoke else ''}"
    timing = None
    if not a.memory_only:
        bench = DiTBench(arch, a.smoke, a.latent, a.batch, a.device, a.dtype, a.text_tokens, a.checkpointing)
        info = bench.info
        print(
            f"{title}: {info['params'] / 1e6:.1f} M params, {info['lora_layers']} LoRA layers "
            f"({info['lora_params'] / 1e6:.2f} M params), latent {info['latent']} ({info['tokens']} tokens), "
            f"text {info['text_tokens']} tokens, attention {info['attention']}",
            flush=True,
        )
        step, parts = time_variants(bench, a.variants, a.steps, a.repeats)
        timing = timing_summary(step, parts)
        report.update(timing)
        del bench
        gc.collect()
    report["model"] = info
    if rows:
        report["memory"] = {"kind": "cuda_max_allocated" if cuda else "peak_rss", "unit": "MiB", "runs": rows}
        report["memory_ratios"] = memory_ratios(rows)
    print(
        f"\nbench_tdft at commit {prov['commit']}, {prov['date']}: {prov['cpu']}, {prov['cores']} cores, torch "
        f"{prov['torch']} ({prov['torch_threads']} threads); total {time.perf_counter() - t_start:.0f} s"
    )
    ckpt = "on" if info.get("gradient_checkpointing", True) else "off"
    if timing:
        cfg = info["train_config"]
        print_timing(
            f"Self-NPO TDFT step, {title} ({info['params'] / 1e6:.0f} M params, random weights), {a.device} "
            f"{a.dtype}, latent {info['latent']}, lora rank {info['lora_rank']}, "
            f"w = {cfg['tdft']['teacher_guidance']:g}, K = {cfg['tdft']['truncation_steps']}, "
            f"gradient checkpointing {ckpt}",
            report,
        )
        if "ours_over_floor" in report:
            ok = "met" if report["ours_over_floor"] <= 1.15 else "NOT met"
            print(f"goal step ≤ 1.15 × floor: {report['ours_over_floor']:.3f} ({ok}{', smoke' if a.smoke else ''})")
        if "authors" not in a.variants:
            print("(authors' schedule not run: add --variants ours,floor,authors)")
    if rows:
        batch = next((r["batch"] for r in rows if r["what"] != "inference"), "–")
        print(f"\nPeak memory, {title}, {a.device} {a.dtype}, batch {batch} (training) / 1 (inference, 2 rows); Δ = "
              "peak − memory before the measured phase, MiB")
        print(memory_table(rows, cuda))
        for key, r in report["memory_ratios"].items():
            ok = "met" if r["peak"] <= 1.5 else "NOT met"
            print(f"goal lora training ≤ 1.5 × inference peak ({key}): {r['peak']:.3f} ({ok}); Δ × {r['delta']:.2f}")
        if info:
            report["estimate_input"] = estimate_input(a.arch, info, rows)
            report["gpu_estimate"] = print_estimate(report["estimate_input"], a.target_batch, a.target_tokens)
            if a.smoke:
                print("(smoke model: the estimate is for the 2-block model, not the real one)")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=1, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=["sd15", *ARCHS], default="sd15")
    ap.add_argument(
        "--smoke", action="store_true", help="small models (sd15: 64 channels; DiT: 2 blocks), ≤ 2 repeats: minutes"
    )
    ap.add_argument("--latent", type=int, default=0, help="latent side (sd15: 8 → 64 px images; Wan 16, SD3 32)")
    ap.add_argument("--batch", type=int, default=0, help="training batch (sd15: 2; DiT: the node's default, 4)")
    ap.add_argument("--steps", type=int, default=3, help="training steps per run (the first is not counted)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--mode", choices=["lora", "full"], default="lora", help="sd15 only (DiT: lora)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="compute dtype (autocast on CUDA)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--text-tokens", type=int, default=0, help="DiT text tokens (default: Wan 512, SD3 154; smoke 32)")
    ap.add_argument(
        "--no-checkpointing", dest="checkpointing", action="store_false", default=None,
        help="DiT timing without gradient checkpointing (default: the node's default, on)",
    )
    ap.add_argument("--memory", action="store_true", help="also measure peak memory (child processes)")
    ap.add_argument("--memory-only", action="store_true", help="only the peak-memory comparison (implies --memory)")
    ap.add_argument("--memory-latents", default="", help="DiT: latent sides of the memory runs (default: latent, 2×)")
    ap.add_argument("--mem-steps", type=int, default=2, help="DiT: sampling steps of the inference memory run")
    ap.add_argument("--target-batch", type=int, default=1, help="batch of the 24 GB estimate")
    ap.add_argument("--target-tokens", type=int, default=0, help="tokens of the 24 GB estimate (default: real size)")
    ap.add_argument("--estimate-from", type=Path, help="print the 24 GB estimate from a JSON of this script")
    ap.add_argument("--child", choices=["lora", "full", "lora_nockpt"], help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if a.device == "cpu":
        # glibc keeps freed blocks below its dynamic mmap threshold in the heap, so a process's peak RSS counts
        # memory freed long before (Wan 1.3B lora training at 64 tokens: Δ 2669 MiB with glibc's default,
        # 521 MiB with this): big tensors are mmapped and returned on free, and RSS follows the live tensors.
        # The child processes inherit it (glibc reads it at start-up); an explicit setting is kept.
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    if a.estimate_from:
        print_estimate(json.loads(a.estimate_from.read_text())["estimate_input"], a.target_batch, a.target_tokens)
        return
    if a.threads:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
    dit = a.arch != "sd15"
    a.latent = a.latent or (0 if dit else 8)  # DiT: 0 = the arch's latent
    a.batch = a.batch or (0 if dit else 2)  # DiT: 0 = the node's default
    a.memory = a.memory or a.memory_only
    if a.smoke:
        a.repeats = min(a.repeats, 2)
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in a.variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}")
    if dit and a.mode != "lora":
        ap.error("the DiT archs train lora only (full mode is not measured on them)")
    if a.child:
        print(json.dumps(peak_memory_child(a)))
        return
    if not dit:
        run_sd15(a)
        return
    side = ARCHS[a.arch].latent_shape(a.latent)[-1]
    a.memory_latents = [int(s) for s in a.memory_latents.split(",") if s.strip()] or [side, 2 * side]
    run_dit(a)


if __name__ == "__main__":
    main()
