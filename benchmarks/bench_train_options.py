#!/usr/bin/env python
"""What Self-NPO Train's memory and preview options cost, on the full-size Wan 2.1 T2V 1.3B (random weights, CPU
fp32 by default), through the node's own training functions (``bench_tdft.DiTBench``):

- **accumulation**: batch B in one step against B micro-batches of 1 (``grad_accumulation_steps`` B): the same
  update; step time (interleaved, medians; the first step of each run not counted) and peak memory (one child
  process each, as ``bench_tdft.py --memory``);
- **preview**: one validation preview (``nodes/host/training_preview``: 8 Euler steps, plain and with the offset,
  the pool's latent at half size but at least 64 latent pixels) against one training step, and the share it costs at
  ``preview_every`` 100 (the default).

``partial_loading`` is not measured here: ComfyUI never loads partially on the CPU device (it loads whole), so a
CPU run would time the plain load again; ``scripts/gpu_check.py`` measures it on a GPU.

    python benchmarks/bench_train_options.py --batch 2 --json benchmarks/results/train_options_wan.json
    python benchmarks/bench_train_options.py --smoke      # 2 blocks, a minute or two
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dit import ARCHS, measure_peak, provenance  # noqa: E402
from bench_inference import machine  # noqa: E402
from bench_tdft import DiTBench, setup  # noqa: E402

ARCH = "wan21_1.3b"


def bench(a, accumulation: int) -> DiTBench:
    """Batch ``a.batch`` in one step (accumulation 1) or in ``accumulation`` micro-batches of a.batch / accumulation."""
    return DiTBench(ARCHS[ARCH], a.smoke, 0, a.batch // accumulation, a.device, a.dtype, accumulation=accumulation)


def time_accumulation(a) -> dict:
    """Step seconds of batch B vs B micro-batches of 1, interleaved over ``a.repeats``."""
    benches = {"batch": bench(a, 1), "accumulated": bench(a, a.batch)}
    out: dict[str, list[float]] = {k: [] for k in benches}
    for r in range(a.repeats):
        for name in list(benches) if r % 2 == 0 else list(benches)[::-1]:
            t0 = time.perf_counter()
            out[name] += benches[name].ours(a.steps)
            print(f"  repeat {r} {name:11s} {time.perf_counter() - t0:7.1f} s", flush=True)
    preview = time_preview(benches["batch"], a)
    del benches
    gc.collect()
    med = {k: statistics.median(v) for k, v in out.items()}
    return {"step_s": out, "median_s": med, "accumulated_over_batch": med["accumulated"] / med["batch"],
            "preview": {**preview, "share_at_100": preview["preview_s"] / (100 * med["batch"])}}


def time_preview(b: DiTBench, a) -> dict:
    """Seconds of one preview (median of ``a.repeats``) with the bench's model, data and LoRA."""
    import torch

    from comfyui_npo.nodes.host import training_preview as tp

    pool_shape = (1, *b.latent[1:])
    settings = tp.PreviewSettings(100, tp.preview_shape(pool_shape), 6.0, 0)
    preview = tp.TrainingPreview(b.mp, settings, None)
    times = []
    with b._trainable():  # the LoRA attached, as during training
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            with torch.inference_mode(False):
                preview.run(1, [1.0], b.denoiser, b.data.conds_pos[0], b.data.cond_neg, _no_offset_switch)
            times.append(time.perf_counter() - t0)
    return {"preview_s": statistics.median(times), "preview_runs_s": times, "preview_shape": list(settings.shape)}


def _no_offset_switch():
    """The LoRA of the bench's session stays attached in both passes: the cost is the same as detaching it."""
    import contextlib

    return contextlib.nullcontext()


def memory_child(a) -> dict:
    setup(a.device, a.threads)
    b = bench(a, a.batch if a.child == "accumulated" else 1)
    gc.collect()
    return {"mode": a.child, **measure_peak(lambda: b.ours(2), a.device)}


def run_child(a, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--batch", str(a.batch), "--device", a.device, "--dtype",
           a.dtype, "--threads", str(a.threads)] + (["--smoke"] if a.smoke else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"mode": mode, "error": out.stderr.strip()[-400:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=2, help="the batch B (accumulated: B micro-batches of 1)")
    ap.add_argument("--steps", type=int, default=2, help="training steps per run (the first is not counted)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="the 2-block model")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--child", choices=["batch", "accumulated"], help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if a.device == "cpu":
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # as bench_tdft.py: RSS follows live tensors
    if a.threads:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
    if a.child:
        print(json.dumps(memory_child(a)))
        return
    t_start = time.perf_counter()
    memory = {} if a.no_memory else {m: run_child(a, m) for m in ("batch", "accumulated")}
    setup(a.device, a.threads)
    timing = time_accumulation(a)
    report = {"provenance": {**provenance(), **machine()}, "config": vars(a) | {"json": str(a.json)},
              "timing": timing, "memory": memory}
    prov = report["provenance"]
    print(f"\nbench_train_options at commit {prov['commit']}, {prov['date']}, Wan 2.1 1.3B"
          f"{' (SMOKE)' if a.smoke else ''}, {a.device} {a.dtype}, batch {a.batch}; total "
          f"{time.perf_counter() - t_start:.0f} s")
    med = timing["median_s"]
    print(f"step: batch {a.batch} {med['batch']:.2f} s, {a.batch} × 1 accumulated {med['accumulated']:.2f} s "
          f"(× {timing['accumulated_over_batch']:.2f})")
    for m, r in memory.items():
        print(f"peak memory {m}: " + (r["error"] if "error" in r else
                                      f"{r['peak_rss_mib']:.0f} MiB (Δ {r['rss_delta_mib']:.0f} MiB)"))
    p = timing["preview"]
    print(f"preview {p['preview_shape']}: {p['preview_s']:.2f} s = {100 * p['share_at_100']:.2f} % of training at "
          "preview_every 100")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
