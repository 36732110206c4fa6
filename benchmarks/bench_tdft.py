#!/usr/bin/env python
"""Cost of one Self-NPO (TDFT) training step on the full-size SD1.5 UNet (random weights; CPU fp32 by default).

Timed in one process, variants interleaved over repeats (A B C, C B A, ...), medians of per-step
wall time (the first step of every run is a warm-up and not counted):

- ``ours``     the pack's training loop (``training.trainer.train``) through the ComfyUI denoiser, as
               the Self-NPO Train node runs it: teacher = EMA swap, w = −1 (conditional pass skipped),
               frozen samples not re-evaluated, then student forward + backward, AdamW, EMA update;
- ``floor``    the same UNet passes timed alone: the teacher's no-grad forwards with exactly the batch
               sizes ``ours`` used (replayed from the same random draws) + one student forward+backward;
- ``authors``  the authors' schedule (``Self-NPO/train.py``): 6 teacher evaluations, each a separate
               conditional and unconditional forward of the whole batch (12 passes), + student step.

Ratios: ours / floor (overhead of the loop; goal ≤ 1.15) and authors / ours (goal ≥ 1.8 at w = −1).
The same run also gives the **ceiling** authors / floor: no implementation of this schedule can beat
its own UNet passes, so authors / ours ≤ authors / floor. From the timed parts, F = one teacher
forward of the whole batch (authors' teacher time / 12) and S = the student's forward + backward;
authors / floor ≈ (12 F + S) / (6 F + S) when few samples freeze.

Memory: ``--memory`` runs one child process per mode (lora, full) that builds the model, resets the
peak counter and trains 2 steps. CPU: peak RSS (``/proc/self/clear_refs`` ← 5, then ``VmHWM``);
CUDA: ``torch.cuda.max_memory_allocated``.

    python benchmarks/bench_tdft.py [--latent 8] [--batch 2] [--steps 3] [--repeats 3] [--mode lora] [--memory]
    python benchmarks/bench_tdft.py --memory-only      # lora vs full peak memory alone (full needs ~20 GB)
    python benchmarks/bench_tdft.py --device cuda --dtype bf16 --latent 64 --batch 4 --memory   # a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# the same full-size SD1.5 UNet and ComfyUI set-up as the inference benchmark (benchmarks/ is on sys.path when run)
from bench_inference import SD15_UNET, import_env

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def setup(device: str = "cpu"):
    import_env(cpu=device == "cpu")  # ComfyUI (CPU mode unless a GPU is asked for) + the pack as comfyui_npo


def build(device: str, seed: int = 0):
    """fp32 weights on ``device`` (as ComfyUI loads SD1.5 for training: the node trains in fp32 masters)."""
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    with torch.inference_mode():
        m = comfy.supported_models.SD15(dict(SD15_UNET)).get_model({})
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


class Bench:
    def __init__(self, mode: str, latent: int, batch: int, device: str = "cpu", dtype: str = "fp32"):
        import torch

        from comfyui_npo.nodes.host import model_facts, training_session
        from comfyui_npo.npo_core.schedule import DiscreteSchedule
        from comfyui_npo.training import tdft
        from comfyui_npo.training.data import StartData
        from comfyui_npo.training.lora import LoRASet, select_modules

        self.torch, self.tdft, self.session_module = torch, tdft, training_session
        self.device, self.dtype = device, getattr(torch, DTYPES[dtype])
        self.mp = build(device)
        self.batch = batch
        self.schedule = DiscreteSchedule.from_sigmas(training_session.schedule_sigmas(self.mp))
        g = torch.Generator().manual_seed(1)
        self.data = StartData(  # on the device, as the node prepares them
            torch.randn(8, 4, latent, latent, generator=g).to(device),
            [{"c_crossattn": torch.randn(1, 77, 768, generator=g).to(device)} for _ in range(2)],
            {"c_crossattn": torch.zeros(1, 77, 768, device=device)},
        )
        self.session = training_session.TrainingSession(
            self.mp, gradient_checkpointing=False, copy_weights=mode == "full"
        )
        self.session.__enter__()
        unet = model_facts.unet_of(self.mp)
        if mode == "lora":
            self.lset = LoRASet(unet, select_modules(unet, "attention"), 16, generator=torch.Generator().manual_seed(0))
            self.lset.attach()
            self.params = self.lset.named_trainable()
        else:
            self.params = self.session.full_params(torch.float32)
        self.denoiser = training_session.training_denoiser(self.mp, self.dtype)
        self.mode = mode

    def ours(self, steps: int) -> list[float]:
        from comfyui_npo.training.trainer import Callbacks, TrainConfig, train

        stamps = []
        cfg = TrainConfig(
            steps=steps, batch_size=self.batch, learning_rate=1e-6, seed=0,
            fp16_loss_scaling=self.dtype == self.torch.float16,  # as the node does for an fp16 model
        )
        t0 = sync(self.device)
        train(
            self.denoiser,
            self.schedule,
            self.params,
            self.data,
            cfg,
            Callbacks(on_step=lambda s, t, v: stamps.append(sync(self.device))),
        )
        times = [b - a for a, b in zip([t0, *stamps[:-1]], stamps, strict=True)]
        return times[1:]

    def _rows_per_call(self, steps: int) -> list[list[int]]:
        """Replay ``ours``' random draws to get the teacher batch size of every call."""
        torch = self.torch
        gen = torch.Generator().manual_seed(0)
        out = []
        for step in range(steps):
            z0, cp, cn = self.data.batch(step, self.batch)
            calls = []

            def fake(x, nu, cond, calls=calls):
                calls.append(x.shape[0])
                return x * 0.5

            roll = self.tdft.teacher_rollout(fake, self.schedule, z0, cp, cn, self.tdft.TDFTConfig(), gen)
            self.tdft.student_cond(cp, cn, self.tdft.TDFTConfig(), self.batch, gen)
            self.tdft.sample_student_level(roll.t_end, 1000, gen)
            torch.randn(z0.shape, generator=gen)  # ξ
            out.append(calls)
        return out

    def _student(self, z0, cp) -> None:
        torch = self.torch
        for p in self.params.values():
            p.requires_grad_(True)
        nu = torch.full((z0.shape[0],), 5.0, device=z0.device)
        pred = self.denoiser(z0, nu, cp)
        loss = (pred - z0).square().mean()
        loss.backward()
        for p in self.params.values():
            p.grad = None

    def floor(self, steps: int) -> list[tuple[float, float]]:
        """(teacher seconds, student seconds) per step."""
        torch = self.torch
        plan = self._rows_per_call(steps)
        times = []
        for step, calls in enumerate(plan):
            z0, cp, cn = self.data.batch(step, self.batch)
            t0 = sync(self.device)
            with torch.no_grad():
                for rows in calls:
                    nu = torch.full((rows,), 3.0, device=z0.device)
                    self.denoiser(z0[:rows], nu, {"c_crossattn": cn["c_crossattn"][:rows]})
            t1 = sync(self.device)
            self._student(z0, cp)
            times.append((t1 - t0, sync(self.device) - t1))
        return times[1:]

    def authors(self, steps: int) -> list[tuple[float, float]]:
        """(teacher seconds, student seconds) per step."""
        torch = self.torch
        times = []
        for step in range(steps):
            z0, cp, cn = self.data.batch(step, self.batch)
            t0 = sync(self.device)
            with torch.no_grad():
                for _ in range(6):  # 5 DDIM steps + the final evaluation, cond and uncond separately
                    nu = torch.full((self.batch,), 3.0, device=z0.device)
                    self.denoiser(z0, nu, cp)
                    self.denoiser(z0, nu, cn)
            t1 = sync(self.device)
            self._student(z0, cp)
            times.append((t1 - t0, sync(self.device) - t1))
        return times[1:]


def peak_memory_child(mode: str, latent: int, batch: int, device: str, dtype: str) -> dict:
    """Peak memory of 2 training steps after the model is built: RSS on CPU, allocated memory on CUDA."""
    setup(device)
    import torch

    b = Bench(mode, latent, batch, device, dtype)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        b.ours(2)
        return {"mode": mode, "peak_mb": torch.cuda.max_memory_allocated() / 2**20}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    b.ours(2)
    status = Path("/proc/self/status").read_text()
    hwm = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
    return {"mode": mode, "peak_mb": hwm / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latent", type=int, default=8, help="latent side (8 → 64 px images)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="training steps per run (the first is not counted)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mode", choices=["lora", "full"], default="lora")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="compute dtype (autocast on CUDA)")
    ap.add_argument("--memory", action="store_true", help="also measure peak memory of lora vs full (child processes)")
    ap.add_argument("--memory-only", action="store_true", help="only the peak-memory comparison (implies --memory)")
    ap.add_argument("--child", choices=["lora", "full"], help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    a.memory = a.memory or a.memory_only
    if a.child:
        print(json.dumps(peak_memory_child(a.child, a.latent, a.batch, a.device, a.dtype)))
        return
    mem = {}
    if a.memory:  # first, while this process holds no model (full mode needs ~20 GB of the 24 here)
        for mode in ("lora", "full"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--latent", str(a.latent), "--batch", str(a.batch),
                 "--device", a.device, "--dtype", a.dtype],
                capture_output=True,
                text=True,
            )
            if out.returncode != 0:
                mem[mode] = f"failed (exit {out.returncode}): {out.stderr.strip()[-300:]}"
            else:
                mem[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
            print(f"peak memory {mode}: {mem[mode]}", flush=True)
    setup(a.device)
    import torch

    mem_key = "peak_cuda_allocated_mb" if a.device == "cuda" else "peak_rss_mb"
    if a.memory_only:
        print(json.dumps({mem_key: mem}, indent=2))
        if a.json:
            a.json.write_text(json.dumps({"config": vars(a) | {"json": str(a.json)}, mem_key: mem}, indent=2))
        return
    bench = Bench(a.mode, a.latent, a.batch, a.device, a.dtype)
    results: dict[str, list] = {"ours": [], "floor": [], "authors": []}
    order = list(results)
    for r in range(a.repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            results[name] += getattr(bench, name)(a.steps)
    step = {k: [sum(t) if isinstance(t, tuple) else t for t in v] for k, v in results.items()}
    med = {k: statistics.median(v) for k, v in step.items()}
    f_teacher = statistics.median(t for t, _ in results["authors"]) / 12  # one full-batch teacher forward
    s_student = statistics.median(s for _, s in results["floor"] + results["authors"])
    report = {
        "machine": (
            torch.cuda.get_device_name() if a.device == "cuda" else f"{os.cpu_count()} CPU cores"
        ) + f", torch {torch.__version__}, {torch.get_num_threads()} threads",
        "config": vars(a) | {"json": str(a.json) if a.json else None},
        "median_step_s": med,
        "ours_over_floor": med["ours"] / med["floor"],
        "authors_over_ours": med["authors"] / med["ours"],
        "ceiling_authors_over_floor": med["authors"] / med["floor"],
        "teacher_forward_F_s": f_teacher,
        "student_step_S_s": s_student,
        "S_over_F": s_student / f_teacher,
        "samples": {k: len(v) for k, v in step.items()},
        "step_s": step,  # every timed step, in run order
        "parts_s": {k: results[k] for k in ("floor", "authors")},  # (teacher, student) seconds per step
    }
    if a.memory:
        report[mem_key] = mem
        if all(isinstance(v, float) for v in mem.values()):
            report["full_over_lora_memory"] = mem["full"] / mem["lora"]
    print(
        f"\nSelf-NPO TDFT step, SD1.5 UNet (860M params, random weights), {a.device} {a.dtype}, "
        f"latent {a.latent}², batch {a.batch}, mode {a.mode}, w = −1, K = 5"
    )
    print("| variant | median s/step | ratio |")
    print("|---|---|---|")
    print(f"| ours (pack) | {med['ours']:.3f} | 1.00 |")
    print(f"| floor (same UNet passes alone) | {med['floor']:.3f} | ours/floor = {report['ours_over_floor']:.3f} |")
    print(
        f"| authors' schedule (12 teacher passes) | {med['authors']:.3f} | authors/ours = "
        f"{report['authors_over_ours']:.3f} |"
    )
    print(
        f"\nceiling authors/floor = {report['ceiling_authors_over_floor']:.3f}; F = {f_teacher:.3f} s, "
        f"S = {s_student:.3f} s, S/F = {report['S_over_F']:.2f}"
    )
    if "full_over_lora_memory" in report:
        print(
            f"\npeak memory: lora {mem['lora']:.0f} MB, full {mem['full']:.0f} MB "
            f"(full/lora = {report['full_over_lora_memory']:.2f})"
        )
    if a.json:
        a.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
