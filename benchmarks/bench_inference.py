#!/usr/bin/env python
"""Inference cost of NPO on the full-size SD1.5 UNet (random weights, CPU, fp32).

Variants, all sampled with ComfyUI's CFGGuider + euler (cond and uncond in one batch unless the
variant itself splits them):

- ``plain``      plain CFG (the reference: every ratio is variant / plain, measured in the same run);
- ``npo_r8``     NPOApply (``sampling.apply_offset``) with a rank-8 LoRA shaped like the authors' released
                 SD1.5 file: PEFT keys ``unet.<diffusers module>.{attn1,attn2}.{to_q,to_k,to_v,to_out.0}
                 .lora.{down,up}.weight``, 16 transformer blocks, 128 layers, 1,594,368 parameters, no alpha;
- ``npo_dense``  NPOApply with a dense, full-rank δ (``diffusion_model.<module>.diff``) on the same 128
                 attention projections (``--dense-scope all``: on every UNet weight and bias, like a
                 Self-NPO full-UNet δ);
- ``npo_svd64``  NPOApply with that dense δ compressed by SVD to rank 64 (``NPOOffset.compressed``,
                 what the Compress NPO Offset node does);
- ``hooks_r8``   ComfyUI's own path: ``comfy.hooks.create_hook_lora`` on the rank-8 LoRA converted to
                 ComfyUI keys (``formats.to_comfy_state_dict``) + ``set_hooks_for_conditioning`` on the
                 negative conditioning (= CreateHookLora → Cond Set Props on the negative → KSampler).

Time: each variant is sampled ``--repeats`` times after one untimed warm-up run, the variants
interleaved (order A B C D E, then E D C B A, ...) so machine noise hits all of them alike. Per step:
wall and process-CPU time between consecutive sampler callbacks (steady state, steps 2..N), and the
whole ``guider.sample`` call divided by the steps (end to end, includes per-run setup such as hook
registration and weight re-patching). Medians over all repeats; ratios are median / plain's median.

Memory: each variant runs in a fresh child process that builds the same model, loads the offset,
then resets the kernel's peak-RSS counter (``/proc/self/clear_refs`` ← 5) and samples once; the peak
is ``VmHWM`` from ``/proc/self/status``. PyTorch CPU tensors live in malloc/mmap memory, which RSS
counts (``tracemalloc`` would not: it only sees Python's own allocator). Peaks include the resident
model weights, like the memory a user sees.

    python benchmarks/bench_inference.py [--latent 16] [--steps 4] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "plain": "plain CFG",
    "npo_r8": "NPOApply, rank-8 LoRA",
    "npo_dense": "NPOApply, dense δ",
    "npo_svd64": "NPOApply, dense δ → SVD rank 64",
    "hooks_r8": "ComfyUI hooks (CreateHookLora on negative), rank-8",
}

# The full-size SD1.5 UNet (what comfy.model_detection finds in v1-5-pruned).
SD15_UNET = {
    "image_size": 32, "use_checkpoint": False, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "transformer_depth_middle": 1, "context_dim": 768, "use_linear_in_transformer": False,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
ATTN_PROJ = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight$")
RELEASED_SD15_PARAMS = 1_594_368  # the authors' sd15_beta500_2kiter.safetensors: rank 8, fp32, 6.41 MB


# ---------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------
def _headless():
    """scripts/npo_headless: finds ComfyUI and registers the repository as the package ``comfyui_npo``."""
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    import npo_headless

    return npo_headless


def find_comfyui() -> Path:
    root = _headless().find_comfyui()
    if root is None:
        sys.exit("ComfyUI not found: set COMFYUI_PATH to a ComfyUI checkout (or put it at ~/comfy/ComfyUI).")
    return root


def import_env(cpu: bool = True):
    """Import ComfyUI (CPU mode unless ``cpu`` is False) and the pack (as ``comfyui_npo``)."""
    sys.path.insert(0, str(find_comfyui()))
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = cpu
    import comfy.model_management  # noqa: F401  (must come after args.cpu)

    _headless().register_pack()


def build_model(seed: int, std: float = 0.02):
    """Full-size SD1.5 UNet as a ComfyUI ModelPatcher, fp32 on CPU, seeded random weights.

    Linear/conv weights and all biases ~ N(0, std²) (tiled from one seeded 16M-value buffer: fast, and
    the values do not matter for speed), norm scales 1, norm shifts 0."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    model = comfy.supported_models.SD15(dict(SD15_UNET)).get_model({})
    g = torch.Generator().manual_seed(seed)
    buf = torch.randn(1 << 24, generator=g) * std
    with torch.no_grad():
        for mod in model.diffusion_model.modules():
            if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                if mod.weight is not None:
                    mod.weight.fill_(1.0)
                    mod.bias.zero_()
                continue
            for p in mod.parameters(recurse=False):
                flat, pos = p.view(-1), 0
                start = int(torch.randint(0, buf.numel(), (1,), generator=g))
                while pos < flat.numel():
                    take = min(flat.numel() - pos, buf.numel() - start)
                    flat[pos:pos + take].copy_(buf[start:start + take])
                    pos, start = pos + take, 0
    del buf
    dev = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, dev, comfy.model_management.unet_offload_device())


def released_style_lora(mp, seed: int, rank: int = 8) -> dict:
    """A rank-8 PEFT/diffusers LoRA with exactly the key set and shapes of the authors' SD1.5 file."""
    import torch

    from comfyui_npo.nodes.host import model_facts

    shapes = model_facts.param_shapes(mp)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for dk, lk in sorted(model_facts.diffusers_to_ldm(mp).items()):
        if not ATTN_PROJ.search(dk):
            continue
        out_f, in_f = shapes[lk]
        module = dk[: -len(".weight")]
        sd[f"unet.{module}.lora.down.weight"] = torch.empty(rank, in_f).normal_(0, in_f ** -0.5, generator=g)
        sd[f"unet.{module}.lora.up.weight"] = torch.empty(out_f, rank).normal_(0, 0.01, generator=g)
    n = sum(t.numel() for t in sd.values())
    if rank == 8 and (len(sd) != 256 or n != RELEASED_SD15_PARAMS):
        raise RuntimeError(f"LoRA layout differs from the released SD1.5 file: {len(sd)} tensors, {n:,} params")
    return sd


def dense_offset_sd(mp, seed: int, scope: str, std: float = 0.002) -> dict:
    """Full-rank random δ in ComfyUI keys (``diffusion_model.<module>.diff`` / ``.diff_b``)."""
    import torch

    from comfyui_npo.nodes.host import model_facts

    g = torch.Generator().manual_seed(seed)
    key_map = model_facts.diffusers_to_ldm(mp)
    targets = {key_map[dk] for dk in key_map if ATTN_PROJ.search(dk)}
    sd = {}
    for name, shape in sorted(model_facts.param_shapes(mp).items()):
        if scope == "attn" and name not in targets:
            continue
        module, leaf = name.rsplit(".", 1)
        key = f"diffusion_model.{module}.diff" if leaf == "weight" else f"diffusion_model.{module}.diff_b"
        sd[key] = torch.empty(shape).normal_(0, std, generator=g)
    return sd


class Bench:
    """The model, conds and offsets shared by all variants, and a way to make each variant's guider."""

    def __init__(self, args, needed: list[str]) -> None:
        import comfy.samplers
        import torch

        from comfyui_npo.npo_core import formats

        self.args = args
        self.mp = build_model(args.seed)
        g = torch.Generator().manual_seed(args.seed + 1)
        self.pos = [[torch.randn(1, 77, 768, generator=g), {}]]
        self.neg = [[torch.randn(1, 77, 768, generator=g), {}]]
        self.noise = torch.randn(1, 4, args.latent, args.latent, generator=g)
        self.latent = torch.zeros_like(self.noise)
        self.sigmas = comfy.samplers.calculate_sigmas(self.mp.get_model_object("model_sampling"), "normal",
                                                      args.steps)
        self.sampler = comfy.samplers.sampler_object("euler")
        self.offsets: dict = {}
        self.info: dict = {}
        if {"npo_r8", "hooks_r8"} & set(needed):
            sd = released_style_lora(self.mp, args.seed + 2)
            self.offsets["r8"] = formats.parse_state_dict(sd, {}, "sd15-rank8-peft (random)")
            self.info["r8_params"] = sum(t.numel() for t in sd.values())
        if {"npo_dense", "npo_svd64"} & set(needed):
            sd = dense_offset_sd(self.mp, args.seed + 3, args.dense_scope)
            dense = formats.parse_state_dict(sd, {}, f"dense-{args.dense_scope} (random)")
            self.info["dense_params"] = sum(t.numel() for t in sd.values())
            self.info["dense_tensors"] = len(sd)
            if "npo_dense" in needed:
                self.offsets["dense"] = dense
            if "npo_svd64" in needed:
                self.offsets["svd64"] = self._svd64(dense)
            del sd, dense

    def _svd64(self, dense):
        """The dense δ compressed to rank 64 by ``NPOOffset.compressed`` (what Compress NPO Offset does).

        The SVDs are slow on some CPUs (MKL's LAPACK on AMD: ~25 s per 1280×1280 matrix here), so the
        result is computed once, saved with ``formats.save_offset`` and loaded by later runs, as a user
        would save a compressed offset."""
        from comfyui_npo.nodes.host import model_facts
        from comfyui_npo.npo_core import formats

        path = svd_cache_path(self.args)
        if not path.is_file():
            t0 = time.perf_counter()
            svd, energy = model_facts.resolve_for_model(dense, self.mp).compressed(64)
            seconds = {"npo.bench_seconds": f"{time.perf_counter() - t0:.1f}"}
            formats.save_offset(svd.replace(metadata={**svd.metadata, **seconds}), path)
            del svd
        out = formats.load_offset(path)
        self.info["svd64_energy"] = float(out.metadata.get("npo.svd_energy", "nan"))
        self.info["svd64_compress_s"] = float(out.metadata.get("npo.bench_seconds", "nan"))
        self.info["svd64_params"] = out.numel()
        return out

    def guider(self, variant: str):
        import comfy.hooks
        import comfy.samplers

        from comfyui_npo.nodes.host import model_facts, sampling
        from comfyui_npo.npo_core import formats

        model, neg = self.mp, self.neg
        if variant == "npo_r8":
            model = sampling.apply_offset(self.mp, self.offsets["r8"], 1.0)
        elif variant == "npo_dense":
            model = sampling.apply_offset(self.mp, self.offsets["dense"], 1.0)
        elif variant == "npo_svd64":
            model = sampling.apply_offset(self.mp, self.offsets["svd64"], 1.0)
        elif variant == "hooks_r8":
            comfy_sd = formats.to_comfy_state_dict(model_facts.resolve_for_model(self.offsets["r8"], self.mp))
            hooks = comfy.hooks.create_hook_lora(comfy_sd, strength_model=1.0, strength_clip=0.0)
            neg = comfy.hooks.set_hooks_for_conditioning(self.neg, hooks)
        elif variant != "plain":
            raise ValueError(variant)
        g = comfy.samplers.CFGGuider(model)
        g.set_conds(self.pos, neg)
        g.set_cfg(self.args.cfg)
        return g

    def sample(self, guider, instrument: bool = False) -> dict:
        """One sampling run: per-step wall/CPU times from the sampler callback, and the total.

        ``instrument``: after the first step, wrap every forward hook on the UNet with a timer, so the
        time spent inside NPO's per-layer hooks (steps 2..N) can be compared with the step time of the
        same run (immune to machine drift). Used on a separate, untimed run."""
        marks: list[tuple[float, float]] = []
        acc = [0.0, 0.0]
        wrapped: list = []

        def callback(step, denoised, x, total):
            marks.append((time.perf_counter(), time.process_time()))
            if instrument and step == 0:
                wrapped.extend(_wrap_forward_hooks(self.mp.model.diffusion_model, acc))
                marks[-1] = (time.perf_counter(), time.process_time())

        t0, c0 = time.perf_counter(), time.process_time()
        try:
            out = guider.sample(self.noise, self.latent, self.sampler, self.sigmas, callback=callback,
                                disable_pbar=True, seed=self.args.seed)
        finally:
            for hooks, key, fn in wrapped:
                if key in hooks:
                    hooks[key] = fn
        t1, c1 = time.perf_counter(), time.process_time()
        wall = [b[0] - a[0] for a, b in zip(marks, marks[1:], strict=False)]
        cpu = [b[1] - a[1] for a, b in zip(marks, marks[1:], strict=False)]
        res = {"total_s": t1 - t0, "total_cpu_s": c1 - c0, "step_wall_s": wall, "step_cpu_s": cpu, "out": out}
        if instrument:
            res.update(hooks=len(wrapped), hook_wall_s=acc[0], hook_cpu_s=acc[1])
        return res


def _wrap_forward_hooks(root, acc: list) -> list:
    """Replace each forward hook under ``root`` by a timed wrapper; returns (dict, key, original) to undo."""
    undo = []
    for mod in root.modules():
        hooks = mod._forward_hooks
        for key, fn in list(hooks.items()):
            def timed(m, args, out, fn=fn):
                t, c = time.perf_counter(), time.process_time()
                r = fn(m, args, out)
                acc[0] += time.perf_counter() - t
                acc[1] += time.process_time() - c
                return r
            hooks[key] = timed
            undo.append((hooks, key, fn))
    return undo


def svd_cache_path(args) -> Path:
    return ROOT / "benchmarks" / "results" / f"svd64_dense-{args.dense_scope}_seed{args.seed}.safetensors"


# ---------------------------------------------------------------------------------------------
# memory (child process per variant)
# ---------------------------------------------------------------------------------------------
def proc_status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) / 1024


def memory_child(args) -> None:
    import gc

    import torch

    variant = args.mem_child
    import_env()
    bench = Bench(args, [variant])
    guider = bench.guider(variant)
    gc.collect()
    before = proc_status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    with torch.inference_mode():  # as ComfyUI runs nodes
        bench.sample(guider)
    print("MEMJSON " + json.dumps({"variant": variant, "rss_before_mib": before,
                                   "peak_rss_mib": proc_status_mib("VmHWM"), "info": bench.info}), flush=True)


def prepare_child(args) -> None:
    """Compute and save the SVD-compressed offset (so neither the memory run nor the timing run pays for it)."""
    import_env()
    Bench(args, ["npo_svd64"])


def child_cmd(args, *extra: str) -> list[str]:
    return [sys.executable, __file__, *extra, "--latent", str(args.latent), "--steps", str(args.mem_steps),
            "--seed", str(args.seed), "--cfg", str(args.cfg), "--dense-scope", args.dense_scope,
            "--omp-wait", args.omp_wait, "--threads", str(args.threads)]


def measure_memory(args, variants: list[str]) -> dict:
    out = {}
    for v in variants:
        cmd = child_cmd(args, "--mem-child", v)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMJSON ")]
        if proc.returncode or not line:
            sys.exit(f"memory run for {v} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        out[v] = json.loads(line[-1][len("MEMJSON "):])
        print(f"  memory {v:10s} peak RSS {out[v]['peak_rss_mib']:8.0f} MiB ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def median(xs):
    return statistics.median(xs) if xs else float("nan")


def summarize(timing: dict, memory: dict, shares: dict, variants: list[str]) -> dict:
    rows = {}
    for v in variants:
        runs = timing.get(v, [])
        rows[v] = {
            "label": VARIANTS[v],
            "step_wall_s": median([s for r in runs for s in r["step_wall_s"]]),
            "step_cpu_s": median([s for r in runs for s in r["step_cpu_s"]]),
            "e2e_wall_s": median([r["total_s"] / r["steps"] for r in runs]),
            "peak_rss_mib": memory.get(v, {}).get("peak_rss_mib", float("nan")),
            "hook_share_cpu": shares.get(v, {}).get("hook_share_cpu", float("nan")),
            "hook_share_wall": shares.get(v, {}).get("hook_share_wall", float("nan")),
        }
    ref = rows.get("plain")
    plain_runs = {r["repeat"]: median(r["step_wall_s"]) for r in timing.get("plain", [])}
    for v, r in rows.items():
        for k in ("step_wall_s", "step_cpu_s", "e2e_wall_s", "peak_rss_mib"):
            r[k + "_ratio"] = r[k] / ref[k] if ref else float("nan")
        r["peak_rss_extra_mib"] = r["peak_rss_mib"] - ref["peak_rss_mib"] if ref else float("nan")
        # the same repeat's plain run as reference (the two ran minutes apart at most)
        r["step_wall_paired_ratio"] = median([median(x["step_wall_s"]) / plain_runs[x["repeat"]]
                                              for x in timing.get(v, []) if x["repeat"] in plain_runs])
    return rows


def markdown(rows: dict) -> str:
    def pct(x):
        return "–" if x != x else f"{100 * x:.1f} %"

    lines = [
        "| variant | s/step (wall) | × plain | × plain, paired | s/step (CPU) | × plain | end-to-end s/step | × plain "
        "| in NPO hooks | peak RSS MiB | × plain | + MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows.values():
        lines.append(
            f"| {r['label']} | {r['step_wall_s']:.2f} | {r['step_wall_s_ratio']:.3f} "
            f"| {r['step_wall_paired_ratio']:.3f} | {r['step_cpu_s']:.2f} | {r['step_cpu_s_ratio']:.3f} "
            f"| {r['e2e_wall_s']:.2f} | {r['e2e_wall_s_ratio']:.3f} "
            f"| {pct(r['hook_share_cpu'])} | {r['peak_rss_mib']:.0f} | {r['peak_rss_mib_ratio']:.3f} "
            f"| {r['peak_rss_extra_mib']:+.0f} |")
    return "\n".join(lines)


def machine() -> dict:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "(glibc default)"),
            "python": platform.python_version(), "platform": platform.platform()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latent", type=int, default=16, help="latent side (16 = 128 px, 32 = 256 px)")
    ap.add_argument("--steps", type=int, default=4, help="sampling steps per timed run (≥ 2)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per variant (after one warm-up)")
    ap.add_argument("--mem-steps", type=int, default=2, help="sampling steps of the memory run")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--dense-scope", choices=("attn", "all"), default="attn",
                    help="dense δ on the 128 attention projections (default) or on every UNet weight and bias")
    ap.add_argument("--omp-wait", choices=("passive", "active", "default"), default="default",
                    help="OMP_WAIT_POLICY for torch's OpenMP threads; 'default' leaves it unset (see "
                         "benchmarks/README.md: on an oversubscribed CPU, spin-waiting makes every small op slow)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, one per core)")
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-memory", action="store_true", help="skip the memory child processes")
    ap.add_argument("--no-hook-share", action="store_true",
                    help="skip the extra instrumented run that times NPOApply's hooks inside each step")
    ap.add_argument("--json", help="write all measurements to this file")
    ap.add_argument("--mem-child", help=argparse.SUPPRESS)
    ap.add_argument("--prepare-svd", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    # Must be set before torch (and its libgomp) is first imported; child processes inherit it.
    if args.omp_wait != "default":
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait.upper()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.mem_child:
        return memory_child(args)
    if args.prepare_svd:
        return prepare_child(args)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or args.steps < 2:
        ap.error(f"unknown variants {unknown}" if unknown else "--steps must be ≥ 2")
    if "plain" not in variants:
        variants.insert(0, "plain")

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    print(f"SD1.5 UNet, latent {args.latent}x{args.latent}, {args.steps} steps, {args.repeats} repeats, "
          f"variants {variants}", flush=True)
    if "npo_svd64" in variants and not svd_cache_path(args).is_file():
        print(f"compressing the dense offset to rank 64 once (saved to {svd_cache_path(args)}) ...", flush=True)
        t0 = time.perf_counter()
        subprocess.run(child_cmd(args, "--prepare-svd"), check=True)
        print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    memory = {}
    if not args.no_memory:
        print("memory (one child process per variant):", flush=True)
        memory = measure_memory(args, variants)

    import_env()
    import torch

    bench = Bench(args, variants)
    print(f"model built; offsets: {bench.info}", flush=True)
    guiders = {v: bench.guider(v) for v in variants}
    timing: dict = {v: [] for v in variants}
    warmup: dict = {}
    outputs: dict = {}
    with torch.inference_mode():
        for v in variants:
            r = bench.sample(guiders[v])
            warmup[v] = r["total_s"]
            outputs[v] = r.pop("out")
            print(f"  warm-up {v:10s} {r['total_s']:.1f} s", flush=True)
        for rep in range(args.repeats):
            order = variants if rep % 2 == 0 else variants[::-1]
            for v in order:
                r = bench.sample(guiders[v])
                r.pop("out")
                r["steps"] = args.steps
                r["repeat"] = rep
                r["loadavg_1min"] = os.getloadavg()[0]  # this process alone adds about one per torch thread
                timing[v].append(r)
                print(f"  repeat {rep} {v:10s} steps {[round(s, 2) for s in r['step_wall_s']]} "
                      f"total {r['total_s']:.1f} s (load {r['loadavg_1min']:.1f})", flush=True)

        # where NPOApply's time goes: share of each step spent inside its per-layer hooks (same run)
        shares: dict = {}
        if not args.no_hook_share:
            for v in variants:
                if not v.startswith("npo_"):
                    continue
                r = bench.sample(guiders[v], instrument=True)
                r.pop("out")
                r["hook_share_cpu"] = r["hook_cpu_s"] / sum(r["step_cpu_s"])
                r["hook_share_wall"] = r["hook_wall_s"] / sum(r["step_wall_s"])
                shares[v] = r
                print(f"  hooks   {v:10s} {r['hooks']} hooks, {100 * r['hook_share_cpu']:.1f} % of step CPU time, "
                      f"{100 * r['hook_share_wall']:.1f} % of wall time", flush=True)

    # sanity: NPOApply and ComfyUI's hooks must agree (both run θ + δ on the uncond pass), and differ from plain
    checks = {}
    ref = outputs["plain"]
    for v, out in outputs.items():
        checks[f"{v}_vs_plain_rel"] = float((out - ref).norm() / ref.norm())
    if "npo_r8" in outputs and "hooks_r8" in outputs:
        a, b = outputs["npo_r8"], outputs["hooks_r8"]
        checks["npo_r8_vs_hooks_r8_rel"] = float((a - b).norm() / (a - ref).norm())

    rows = summarize(timing, memory, shares, variants)
    mach = machine()
    table = markdown(rows)
    print()
    print(f"Machine: {mach['cpu']}, {mach['cores']} cores, torch {mach['torch']} ({mach['torch_threads']} threads, "
          f"OMP_WAIT_POLICY {mach['omp_wait_policy']}); "
          f"load average at start {load_start[0]:.2f}, at end {os.getloadavg()[0]:.2f}")
    print(f"SD1.5 UNet (859.5 M params, fp32), latent {args.latent}x{args.latent} (batch 1, cond+uncond), euler, "
          f"{args.steps} steps, cfg {args.cfg}, {args.repeats} interleaved repeats; dense scope: {args.dense_scope}")
    print(table)
    print("checks:", {k: f"{v:.3g}" for k, v in checks.items()})
    print(f"offsets: {bench.info}")
    print(f"total run time {time.perf_counter() - t_start:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": mach, "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                       "rows": rows, "timing": timing, "warmup_total_s": warmup, "memory": memory,
                       "hook_share": shares,
                       "checks": checks, "offsets": bench.info, "table": table}, f, indent=1)


if __name__ == "__main__":
    main()
