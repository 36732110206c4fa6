#!/usr/bin/env python
"""What only a GPU can show about the pack, in one command (≤ 8 minutes on one H100, no downloads).

Rows (one table, one JSON file):

- Self-NPO Train, lora mode, on full-size SD1.5 in fp16 (autocast + GradScaler) and bf16, and on Wan 2.1 T2V 1.3B
  in bf16 at 480×832, 33 frames, batch 1, gradient checkpointing on: random weights loaded by ComfyUI's own
  diffusion-model loader (the class detected from the weights), random conditioning (no text encoder). Each: a
  few steps with finite losses, the offset changes an Apply NPO sample (finite, differs from plain CFG), peak VRAM
  (torch's allocator peak and the device's used memory) beside the README's estimate.
- The same training with ComfyUI's default memory mode (DynamicVRAM where ComfyUI has it) and with
  --disable-dynamic-vram ("n/a" where ComfyUI lacks the flag): one worker process per mode, ComfyUI imported with
  those arguments the way its main.py starts. Also Self-NPO Train's partial_loading (ComfyUI made to see half the
  weights plus the training reserve as free), "not in this version" where the node lacks the input.
- Apply NPO vs plain CFG step time at batch 1 (SD1.5 512², Wan 1.3B 480×832 33 frames): warm-up, alternating runs,
  CUDA-synchronised per-step times, medians and the NPO/plain ratio.
- Out of memory: an oversized Self-NPO Train batch (SD1.5 2048², batch 64) raises the pack's NPOError naming the
  remedies, and ComfyUI samples afterwards.

Every row has a time cap ("timed out", and a fresh worker runs the rest); a failing row is reported with its
error. --smoke runs the same rows with tiny models on the CPU (ComfyUI's --cpu; the OOM is injected into the
student's forward; VRAM numbers read "skipped: no CUDA"), in about a minute.

    python scripts/gpu_check.py --out results/          # on the GPU machine, with ComfyUI's Python
    python scripts/gpu_check.py --smoke --out /tmp/     # anywhere, CPU

Exit status 0 when every row passed (or is n/a), 1 when one failed, 2 when ComfyUI was not found.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import shutil
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from npo_gpucheck import plan

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU (the test suite runs this)")
    ap.add_argument("--out", help="JSON file, or a folder for gpu_check_<date>.json (default: the current folder)")
    ap.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH, else ~/comfy/ComfyUI)")
    ap.add_argument("--budget", type=float, help="seconds for the whole run (default: 480 GPU, 240 --smoke)")
    ap.add_argument("--rows", help=f"comma-separated subset of: {', '.join(r.id for r in plan.ROWS)}")
    ap.add_argument("--cap", action="append", default=[], metavar="ROW=SECONDS",
                    help="override a row's time cap (repeatable)")
    ap.add_argument("--keep-workdir", action="store_true", help="keep the workers' logs and progress files")
    ap.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)  # internal: one worker process
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        from npo_gpucheck import worker

        return worker.run(args.worker)
    return check(args)


def check(args: argparse.Namespace) -> int:
    """The parent: find ComfyUI, run every mode's worker, print the table, write the JSON."""
    from npo_gpucheck import parent, plan, report
    from npo_headless import REPO, find_comfyui
    from npo_headless.runner import environment_problem

    comfy = find_comfyui(args.comfyui)
    problem = environment_problem(comfy, "scripts/gpu_check.py")
    if problem:
        print(problem, file=sys.stderr)
        return 2
    profile = plan.PROFILES["smoke" if args.smoke else "gpu"]
    row_ids = [r.id for r in plan.ROWS] if not args.rows else [x.strip() for x in args.rows.split(",")]
    unknown = [x for x in row_ids if x not in plan.ROW_BY_ID]
    if unknown:
        print(f"error: unknown row(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    try:
        profile = with_caps(profile, args.cap)
    except ValueError as e:
        print(f"error: --cap: {e}", file=sys.stderr)
        return 2
    profile = dataclasses.replace(profile, budget=args.budget or profile.budget)
    budget = profile.budget
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    t0 = time.time()
    s = parent.Session(comfy, profile, workdir, t0 + budget, row_ids)
    s.say(f"gpu_check ({profile.name}): ComfyUI {comfy}, budget {budget:.0f} s, scratch {workdir}")
    try:
        parent.run_all(s)
    finally:
        doc = report.document(s, REPO, time.time() - t0)
        path = report.out_path(args.out, datetime.date.today())
        report.write(doc, path)
        print("\n" + report.table(doc) + f"\n\nJSON: {path}")
        if args.keep_workdir or report.exit_code(doc):
            print(f"worker logs: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return report.exit_code(doc)


def with_caps(profile, caps: list[str]):
    """``profile`` with the --cap ROW=SECONDS overrides."""
    from npo_gpucheck import plan

    new = dict(profile.caps)
    for item in caps:
        row, _, seconds = item.partition("=")
        if row not in plan.ROW_BY_ID:
            raise ValueError(f"unknown row {row!r}")
        new[row] = float(seconds)
    return dataclasses.replace(profile, caps=new)


if __name__ == "__main__":
    sys.exit(main())
