#!/usr/bin/env python
"""Inference cost of NPO on full-size DiTs: Wan 2.1 T2V 1.3B and SD3.5 medium (random weights; CPU by default).

Both models are built from ComfyUI's own config classes (``comfy.supported_models.WAN21_T2V`` and ``SD3``)
with the configs ``comfy.model_detection`` derives from the released checkpoints:

- **Wan 2.1 T2V 1.3B**: dim 1536, 30 blocks, 12 heads (dim // 128), ffn 8960, text_dim 4096, freq_dim 256,
  in/out 16, patch (1, 2, 2), qk_norm, cross_attn_norm; 1,419 M parameters. Latent [1, 16, 1, 16, 16]
  (one frame, 64 image tokens), text [1, 512, 4096] (umt5-xxl pads to 512 tokens).
- **SD3.5 medium** (MMDiT-X): depth 24 (hidden 64·24 = 1536, 24 heads), patch 2, pos_embed_max_size 384,
  adm_in 2048, context 4096, qk_norm rms, x_block self-attention (attn2) in blocks 0..12; 2,243 M
  parameters + a 226 M-value pos_embed buffer (filled with the sin-cos table). Latent [1, 16, 32, 32]
  (256 image tokens), text [1, 154, 4096] (CLIP-L/G 77 + T5 77), pooled [1, 2048].

Arms, sampled with ComfyUI's CFGGuider + euler (ComfyUI batches cond and uncond into one model call
unless an arm splits them):

- ``plain``  plain CFG (the reference: every ratio is arm / plain, measured in the same run);
- ``npo``    Apply NPO (``nodes.host.sampling.apply_offset``, strength 1) with the offset read by
             ``formats.load_offset`` (what Load NPO Offset does) from a rank-16 LoRA file on the attention
             linears (Wan: ``blocks.N.{self_attn,cross_attn}.{q,k,v,o}``, 240 layers; SD3.5 medium:
             ``joint_blocks.N.{context_block,x_block}.attn.{qkv,proj}`` + ``x_block.attn2.{qkv,proj}``,
             121 layers), ComfyUI's LoRA layout (``diffusion_model.<module>.lora_up/lora_down/alpha``);
- ``hooks``  ComfyUI's own path with the same file: ``comfy.utils.load_torch_file`` +
             ``comfy.hooks.create_hook_lora(lora, 1.0, 0.0)`` (what CreateHookLora does) and
             ``comfy.hooks.set_hooks_for_conditioning`` on the negative (Cond Set Props on the negative).

Time: one untimed warm-up run per arm, then ``--repeats`` runs per arm, interleaved (A B C, C B A, ...).
Per step: wall and process-CPU time between consecutive sampler callbacks (steps 2..N, steady state),
and the whole ``guider.sample`` call / steps (end to end, with per-run set-up). Medians over all repeats;
"paired" = the median over repeats of (arm's run median / the same repeat's plain run median).

Memory: one fresh child process per (model, arm) builds the model, loads the offset, resets the
kernel's peak-RSS counter (``/proc/self/clear_refs`` ← 5) and samples ``--mem-steps`` steps. Reported:
peak RSS (``VmHWM``: weights + everything else resident) and the high-water delta (peak − RSS before
sampling). tracemalloc does not see torch's allocations and torch keeps no CPU allocator statistics, so
RSS is what is measured. On CUDA: ``torch.cuda.max_memory_allocated`` over the sampling run.

Kernel launches: one more run per arm under ``torch.profiler``; the ops between two sampler callbacks
(one steady-state step) are counted: all ``aten::`` ops, and the *compute* ops (leaf aten ops that are not
views, reshapes or allocations: on a GPU each launches one or more kernels; a fast GPU at batch 1 pays
per launch, not per FLOP). On CUDA the CPU-side kernel launches (``cudaLaunchKernel`` and kin) are
counted too. The number and batch of model calls per step are recorded in the same run. The CPU count
is a proxy: e.g. ``out[rows] += d`` ends in an ``aten::copy_`` of the view onto itself, which returns at
once (no kernel) but is counted.

    python benchmarks/bench_dit.py --smoke                       # 2-block models, seconds
    python benchmarks/bench_dit.py --out benchmarks/results/dit_cpu.json          # full size, CPU fp32
    python benchmarks/bench_dit.py --dtype bf16 --device cuda --out dit_cuda.json # a GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

# the ComfyUI set-up and helpers of the SD1.5 inference benchmark (benchmarks/ is on sys.path when run)
from bench_inference import _wrap_forward_hooks, import_env, machine, proc_status_mib

ROOT = Path(__file__).resolve().parents[1]
ARMS = {
    "plain": "plain CFG",
    "npo": "Apply NPO, rank-16 LoRA",
    "hooks": "ComfyUI hooks (CreateHookLora on negative), rank-16",
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# ---------------------------------------------------------------------------------------------
# the two architectures
# ---------------------------------------------------------------------------------------------
@dataclass
class Arch:
    key: str
    title: str
    config_class: str  # in comfy.supported_models
    unet_config: dict
    smoke_overrides: dict
    latent: tuple  # the sampler's latent (batch 1)
    text: tuple  # (tokens, width) of the conditioning tensor
    pooled: int | None = None  # pooled_output width (SD3's adm input)
    cfg: float = 5.0
    smoke_text_tokens: int = 32
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def config(self, smoke: bool) -> dict:
        return {**self.unet_config, **(self.smoke_overrides if smoke else {})}

    def text_tokens(self, smoke: bool, override: int = 0) -> int:
        """Tokens of the text conditioning: ``override``, else the smoke or the real length."""
        return override or (self.smoke_text_tokens if smoke else self.text[0])

    def latent_shape(self, side: int = 0) -> list[int]:
        """The sampler's latent (batch 1), with the last two sides set to ``side`` when given."""
        latent = list(self.latent)
        if side:
            latent[-2:] = [side, side]
        return latent

    def image_tokens(self, latent) -> int:
        """Transformer tokens of a latent [B, C, (t,) h, w]: its spatial sizes over the patch size."""
        patch = self.unet_config["patch_size"]
        sizes = list(latent[2:])
        patch = list(patch) if isinstance(patch, (tuple, list)) else [1] * (len(sizes) - 2) + [patch, patch]
        n = 1
        for size, step in zip(sizes, patch, strict=True):
            n *= -(-size // step)
        return n

    def attention_linears(self, dm) -> list[str]:
        if self.key == "wan21_1.3b":
            return [
                f"blocks.{i}.{a}.{p}"
                for i in range(len(dm.blocks))
                for a in ("self_attn", "cross_attn")
                for p in ("q", "k", "v", "o")
            ]
        out = []
        for i, blk in enumerate(dm.joint_blocks):
            b = f"joint_blocks.{i}"
            out.append(f"{b}.context_block.attn.qkv")
            if hasattr(blk.context_block.attn, "proj"):  # the last context block is pre_only: no proj
                out.append(f"{b}.context_block.attn.proj")
            out += [f"{b}.x_block.attn.qkv", f"{b}.x_block.attn.proj"]
            if getattr(blk.x_block, "attn2", None) is not None:
                out += [f"{b}.x_block.attn2.qkv", f"{b}.x_block.attn2.proj"]
        return out


WAN21_13B = Arch(
    key="wan21_1.3b",
    title="Wan 2.1 T2V 1.3B",
    config_class="WAN21_T2V",
    unet_config={  # comfy/model_detection.py for a 1.3B checkpoint (text_len/text_dim: WanModel defaults)
        "image_model": "wan2.1",
        "model_type": "t2v",
        "patch_size": (1, 2, 2),
        "text_len": 512,
        "in_dim": 16,
        "dim": 1536,
        "ffn_dim": 8960,
        "freq_dim": 256,
        "text_dim": 4096,
        "out_dim": 16,
        "num_heads": 12,
        "num_layers": 30,
        "window_size": (-1, -1),
        "qk_norm": True,
        "cross_attn_norm": True,
        "eps": 1e-6,
    },
    smoke_overrides={"num_layers": 2},
    latent=(1, 16, 1, 16, 16),
    text=(512, 4096),
    cfg=6.0,
)

SD35_MEDIUM = Arch(
    key="sd35_medium",
    title="SD3.5 medium (MMDiT-X)",
    config_class="SD3",
    unet_config={  # comfy/model_detection.py for sd3.5_medium.safetensors
        "in_channels": 16,
        "out_channels": 16,
        "patch_size": 2,
        "depth": 24,
        "input_size": None,
        "adm_in_channels": 2048,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}},
        "num_patches": 384 * 384,
        "pos_embed_max_size": 384,
        "qk_norm": "rms",
        "pos_embed_scaling_factor": None,
        "x_block_self_attn_layers": list(range(13)),
    },
    # hidden = 64·depth is hard-wired in ComfyUI's MMDiT: the smoke model is 128 wide
    smoke_overrides={
        "depth": 2,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
        "num_patches": 64 * 64,
        "pos_embed_max_size": 64,
        "x_block_self_attn_layers": [0],
    },
    latent=(1, 16, 32, 32),
    text=(154, 4096),
    pooled=2048,
    cfg=4.5,
)

ARCHS = {a.key: a for a in (WAN21_13B, SD35_MEDIUM)}


# ---------------------------------------------------------------------------------------------
# models, LoRA file, conds
# ---------------------------------------------------------------------------------------------
def random_cond(arch: Arch, tokens: int, g) -> list:
    """A CONDITIONING of one random prompt: [[text [1, tokens, width], {pooled_output (SD3)}]]."""
    import torch

    extra = {} if arch.pooled is None else {"pooled_output": torch.randn(1, arch.pooled, generator=g)}
    return [[torch.randn(1, tokens, arch.text[1], generator=g), extra]]


def fill_weights(dm, seed: int) -> None:
    """Seeded random weights, fast: unit normals tiled from one 4 M-value buffer; matrices × fan_in^-½,
    1-D weights (norm scales) 1, biases × 0.02. The values only need sane scales (no inf/NaN/denormals)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    buf = torch.randn(1 << 22, generator=g)
    with torch.no_grad():
        for name, p in dm.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):
                p.fill_(1.0)
                continue
            flat = p.view(-1)
            scale = p[0].numel() ** -0.5 if p.dim() >= 2 else 0.02
            pos, start = 0, int(torch.randint(0, buf.numel(), (1,), generator=g))
            while pos < flat.numel():
                take = min(flat.numel() - pos, buf.numel() - start)
                flat[pos : pos + take].copy_(buf[start : start + take] * scale)
                pos, start = pos + take, 0


def build_model(arch: Arch, smoke: bool, dtype: str, device: str, seed: int):
    """The full-size (or smoke) diffusion model as a ModelPatcher, built by ComfyUI's config class."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    cfg = getattr(comfy.supported_models, arch.config_class)(arch.config(smoke))
    cfg.set_inference_dtype(getattr(torch, DTYPES[dtype]), None)
    base = cfg.get_model({})  # comfy ops: torch.empty weights
    dm = base.diffusion_model
    fill_weights(dm, seed)
    if hasattr(dm, "pos_embed") and dm.pos_embed is not None:  # SD3: the sin-cos table checkpoints ship
        from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed_torch

        side = dm.pos_embed_max_size
        with torch.no_grad():
            pe = get_2d_sincos_pos_embed_torch(dm.pos_embed.shape[-1], side, side)
            dm.pos_embed.copy_(pe.reshape(dm.pos_embed.shape).to(dm.pos_embed.dtype))
    load = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(base, load, comfy.model_management.unet_offload_device())


def lora_file(arch: Arch, smoke: bool, rank: int, seed: int, path: Path) -> dict:
    """A rank-``rank`` LoRA on the attention linears, ComfyUI's layout, alpha = rank (scale 1), fp32.
    The shapes come from the model built on the meta device (no memory)."""
    import comfy.supported_models
    import torch
    from safetensors.torch import save_file

    with torch.device("meta"):
        dm = getattr(comfy.supported_models, arch.config_class)(arch.config(smoke)).get_model({}).diffusion_model
    shapes = {k: tuple(v.shape) for k, v in dm.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    modules = arch.attention_linears(dm)
    for m in modules:
        out_f, in_f = shapes[f"{m}.weight"]
        sd[f"diffusion_model.{m}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) * in_f**-0.5
        sd[f"diffusion_model.{m}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * (0.05 * rank**-0.5)
        sd[f"diffusion_model.{m}.alpha"] = torch.tensor(float(rank))
    save_file(sd, str(path))
    n = sum(t.numel() for k, t in sd.items() if not k.endswith(".alpha"))
    return {
        "lora_layers": len(modules),
        "lora_params": n,
        "lora_rank": rank,
        "lora_file_mb": path.stat().st_size / 2**20,
    }


def dominant_dtype(dm) -> str:
    """The dtype most parameters have (Wan keeps its patch_embedding in fp32 whatever the model's dtype)."""
    count: dict = {}
    for p in dm.parameters():
        count[p.dtype] = count.get(p.dtype, 0) + p.numel()
    return str(max(count, key=count.get))


class Bench:
    """One architecture: the model, conds, LoRA file and a guider per arm."""

    def __init__(self, args, arch: Arch, lora_path: Path, arms: list[str]) -> None:
        import comfy.samplers
        import torch

        self.args, self.arch, self.torch = args, arch, torch
        self.mp = build_model(arch, args.smoke, args.dtype, args.device, args.seed)
        dm = self.mp.model.diffusion_model
        self.info = {
            "params": sum(p.numel() for p in dm.parameters()),
            "buffers": sum(b.numel() for b in dm.buffers()),
            "dtype": dominant_dtype(dm),
            "unet_config": {k: v for k, v in arch.config(args.smoke).items()},
        }
        self.lora_path = lora_path
        g = torch.Generator().manual_seed(args.seed + 1)
        tokens = arch.text_tokens(args.smoke, args.text_tokens)
        self.pos, self.neg = random_cond(arch, tokens, g), random_cond(arch, tokens, g)
        self.info["text_tokens"] = tokens
        latent = arch.latent_shape(args.latent)
        self.info["latent"] = latent
        self.noise = torch.randn(latent, generator=g)
        self.latent = torch.zeros_like(self.noise)
        ms = self.mp.get_model_object("model_sampling")
        self.sigmas = comfy.samplers.calculate_sigmas(ms, "simple", args.steps)
        self.sampler = comfy.samplers.sampler_object("euler")
        self.npo_offset = None
        if "npo" in arms:
            from comfyui_npo.npo_core import formats

            self.npo_offset = formats.load_offset(lora_path)  # what Load NPO Offset does
        self.hook_lora = None
        if "hooks" in arms:
            import comfy.utils

            self.hook_lora = comfy.utils.load_torch_file(str(lora_path), safe_load=True)  # what CreateHookLora does

    def guider(self, arm: str):
        import comfy.hooks
        import comfy.samplers

        from comfyui_npo.nodes.host import sampling

        model, neg = self.mp, self.neg
        if arm == "npo":
            model = sampling.apply_offset(self.mp, self.npo_offset, 1.0)
        elif arm == "hooks":
            hooks = comfy.hooks.create_hook_lora(self.hook_lora, strength_model=1.0, strength_clip=0.0)
            neg = comfy.hooks.set_hooks_for_conditioning(self.neg, hooks)
        elif arm != "plain":
            raise ValueError(arm)
        g = comfy.samplers.CFGGuider(model)
        g.set_conds(self.pos, neg)
        g.set_cfg(self.arch.cfg)
        return g

    def sync(self) -> None:
        if self.args.device == "cuda":
            self.torch.cuda.synchronize()

    def sample(self, guider, sigmas=None, on_step=None, instrument: bool = False) -> dict:
        """One sampling run: per-step wall/CPU time between sampler callbacks, and the total.
        ``on_step(i)`` runs in the callback after step i (untimed runs only). ``instrument``: after step 0,
        time every forward hook on the diffusion model (NPO's per-layer hooks)."""
        marks: list[tuple[float, float]] = []
        acc = [0.0, 0.0]
        wrapped: list = []

        def callback(step, denoised, x, total):
            self.sync()
            marks.append((time.perf_counter(), time.process_time()))
            if on_step is not None:
                on_step(step)
            if instrument and step == 0:
                wrapped.extend(_wrap_forward_hooks(self.mp.model.diffusion_model, acc))
                marks[-1] = (time.perf_counter(), time.process_time())

        sigmas = self.sigmas if sigmas is None else sigmas
        self.sync()
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            out = guider.sample(
                self.noise, self.latent, self.sampler, sigmas, callback=callback, disable_pbar=True, seed=self.args.seed
            )
        finally:
            for hooks, key, fn in wrapped:
                if key in hooks:
                    hooks[key] = fn
        self.sync()
        t1, c1 = time.perf_counter(), time.process_time()
        wall = [b[0] - a[0] for a, b in zip(marks, marks[1:], strict=False)]
        cpu = [b[1] - a[1] for a, b in zip(marks, marks[1:], strict=False)]
        res = {"total_s": t1 - t0, "total_cpu_s": c1 - c0, "steps": len(sigmas) - 1, "step_wall_s": wall}
        res.update(step_cpu_s=cpu, out=out.float().cpu())
        if instrument:
            res.update(hooks=len(wrapped), hook_wall_s=acc[0], hook_cpu_s=acc[1])
        return res


# ---------------------------------------------------------------------------------------------
# op counting (torch.profiler)
# ---------------------------------------------------------------------------------------------
# Leaf aten ops that launch no kernel: views, reshapes, metadata, allocations.
NO_KERNEL = {
    "aten::view",
    "aten::_unsafe_view",
    "aten::reshape",
    "aten::_reshape_alias",
    "aten::view_as",
    "aten::t",
    "aten::transpose",
    "aten::permute",
    "aten::expand",
    "aten::expand_as",
    "aten::slice",
    "aten::select",
    "aten::narrow",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::as_strided",
    "aten::alias",
    "aten::split",
    "aten::split_with_sizes",
    "aten::chunk",
    "aten::unbind",
    "aten::unflatten",
    "aten::flatten",
    "aten::movedim",
    "aten::contiguous",
    "aten::detach",
    "aten::lift_fresh",
    "aten::resolve_conj",
    "aten::resolve_neg",
    "aten::empty",
    "aten::empty_strided",
    "aten::empty_like",
    "aten::numpy_T",
    "aten::item",
    "aten::_local_scalar_dense",
    "aten::is_nonzero",
    "aten::size",
    "aten::stride",
    "aten::dim",
    "aten::result_type",
    "aten::_has_compatible_shallow_copy_type",
    "aten::set_",
    "aten::to",
    "aten::_to_copy",
    "aten::broadcast_tensors",
    "aten::_nested_tensor_from_mask_left_aligned",
    "aten::view_as_real",
    "aten::view_as_complex",
    "aten::real",
    "aten::imag",
    "aten::_conj",
    "aten::conj",
    "aten::dropout",
    "aten::type_as",
}
# Ops that run a kernel of their own besides their children's (addmm: copies the bias, then the GEMM).
OWN_KERNEL = {"aten::addmm", "aten::addbmm", "aten::baddbmm", "aten::addmv", "aten::addmm_", "aten::baddbmm_"}
MARK = "npo_bench_step"
LAUNCH = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch")


def is_kernel(e, memo: dict) -> bool:
    """A compute op: an aten op that is no view/allocation and none of whose aten descendants is one (the
    composites linear, matmul, _to_copy, layer_norm... count through their children), or an OWN_KERNEL op.
    A proxy for kernel launches: on CUDA, ``kernel_launches`` counts the launches themselves.
    ``memo``: {id(event): (is_kernel, has_kernel_in_subtree)} for one profile's events."""
    return _kernel_info(e, memo)[0]


def _kernel_info(e, memo: dict) -> tuple[bool, bool]:
    key = id(e)
    if key not in memo:
        below = False
        for c in e.cpu_children:
            below = _kernel_info(c, memo)[1] or below
        own = e.name.startswith("aten::") and e.name not in NO_KERNEL and (e.name in OWN_KERNEL or not below)
        memo[key] = (own, own or below)
    return memo[key]


def count_ops(bench: Bench, guider, steps: int = 3) -> dict:
    """Ops of one steady-state step (between two sampler callbacks), under torch.profiler."""
    import collections

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    calls: list[list[int]] = []
    current: dict = {"rf": None}

    def on_step(i):
        if current["rf"] is not None:
            current["rf"].__exit__(None, None, None)
            current["rf"] = None
        calls.append([])
        if i < steps - 1:
            current["rf"] = record_function(f"{MARK}{i + 1}")
            current["rf"].__enter__()

    def pre_hook(mod, args, kwargs):
        x = args[0] if args else kwargs.get("x")
        if calls and torch.is_tensor(x):
            calls[-1].append(int(x.shape[0]))

    dm = bench.mp.model.diffusion_model
    handle = dm.register_forward_pre_hook(pre_hook, with_kwargs=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.args.device == "cuda" else [])
    ms = bench.mp.get_model_object("model_sampling")
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(ms, "simple", steps)
    try:
        with profile(activities=acts) as prof:
            bench.sample(guider, sigmas=sigmas, on_step=on_step)
    finally:
        handle.remove()
        if current["rf"] is not None:
            current["rf"].__exit__(None, None, None)
    events = prof.events()
    memo: dict = {}  # holds the events' ids while ``events`` keeps them alive
    windows = {}
    for e in events:
        if e.name.startswith(MARK):
            windows[int(e.name[len(MARK) :])] = (e.time_range.start, e.time_range.end, e.thread)
    per_window = {}
    for w, (a, b, thread) in sorted(windows.items()):
        aten = compute = launches = 0
        names: collections.Counter = collections.Counter()
        for e in events:
            if e.time_range.start < a or e.time_range.end > b or e.name.startswith(MARK):
                continue
            if e.name.startswith(LAUNCH):
                launches += 1
            if e.thread != thread or not e.name.startswith("aten::"):
                continue
            aten += 1
            if is_kernel(e, memo):
                compute += 1
                names[e.name] += 1
        per_window[w] = {"aten_ops": aten, "compute_ops": compute, "kernel_launches": launches, "by_name": dict(names)}
    # calls[i] collects the model calls made after callback i, i.e. during step i + 1 (window i + 1)
    step = per_window.get(1) or next(iter(per_window.values()), {})
    return {
        **step,
        "model_calls_batches": calls[0] if calls else [],
        "windows": {w: {k: v for k, v in r.items() if k != "by_name"} for w, r in per_window.items()},
    }


# ---------------------------------------------------------------------------------------------
# memory (child process per model and arm)
# ---------------------------------------------------------------------------------------------
def memory_child(args) -> None:
    import torch

    arch_key, arm = args.mem_child.split(":")
    arch = ARCHS[arch_key]
    import_env(cpu=args.device == "cpu")
    with torch.inference_mode():
        bench = Bench(args, arch, Path(args.lora_path), [arm])
        guider = bench.guider(arm)
    gc.collect()

    def sample():
        with torch.inference_mode():  # as ComfyUI runs nodes
            import comfy.samplers

            ms = bench.mp.get_model_object("model_sampling")
            bench.sample(guider, sigmas=comfy.samplers.calculate_sigmas(ms, "simple", args.mem_steps))

    res = {"arch": arch_key, "arm": arm, **measure_peak(sample, args.device)}
    print("MEMJSON " + json.dumps(res), flush=True)


def measure_peak(fn, device: str) -> dict:
    """Runs ``fn()`` and returns its memory high-water mark: peak RSS (``VmHWM`` after resetting it to the
    current RSS through ``/proc/self/clear_refs``), the RSS before and the delta; on CUDA also
    ``torch.cuda.max_memory_allocated`` and the memory allocated before (MiB)."""
    import torch

    res = {"rss_before_mib": proc_status_mib("VmRSS")}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        res["cuda_before_mib"] = torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    fn()
    res["peak_rss_mib"] = proc_status_mib("VmHWM")
    res["rss_delta_mib"] = res["peak_rss_mib"] - res["rss_before_mib"]
    if device == "cuda":
        torch.cuda.synchronize()
        res["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        res["cuda_delta_mib"] = res["peak_cuda_mib"] - res["cuda_before_mib"]
    return res


def passthrough(args) -> list[str]:
    out = ["--dtype", args.dtype, "--device", args.device, "--seed", str(args.seed), "--rank", str(args.rank)]
    out += ["--steps", str(args.steps), "--mem-steps", str(args.mem_steps), "--omp-wait", args.omp_wait]
    out += ["--threads", str(args.threads), "--latent", str(args.latent), "--text-tokens", str(args.text_tokens)]
    return out + (["--smoke"] if args.smoke else [])


def measure_memory(args, arch: Arch, arms: list[str], lora_path: Path) -> dict:
    out = {}
    for arm in arms:
        cmd = [sys.executable, __file__, "--mem-child", f"{arch.key}:{arm}", "--lora-path", str(lora_path)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd + passthrough(args), capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMJSON ")]
        if proc.returncode or not line:
            sys.exit(
                f"memory run {arch.key}:{arm} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                f"{proc.stderr[-3000:]}"
            )
        out[arm] = json.loads(line[-1][len("MEMJSON ") :])
        print(
            f"  memory {arch.key:12s} {arm:6s} peak RSS {out[arm]['peak_rss_mib']:8.0f} MiB "
            f"(+{out[arm]['rss_delta_mib']:.0f} MiB while sampling; {time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    return out


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def median(xs):
    return statistics.median(xs) if xs else float("nan")


def provenance() -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return {"commit": commit + ("+dirty" if dirty else ""), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}


def summarize(timing: dict, memory: dict, ops: dict, shares: dict, arms: list[str]) -> dict:
    rows = {}
    for a in arms:
        runs = timing.get(a, [])
        m = memory.get(a, {})
        rows[a] = {
            "label": ARMS[a],
            "step_wall_s": median([s for r in runs for s in r["step_wall_s"]]),
            "step_cpu_s": median([s for r in runs for s in r["step_cpu_s"]]),
            "e2e_wall_s": median([r["total_s"] / r["steps"] for r in runs]),
            "peak_rss_mib": m.get("peak_rss_mib", float("nan")),
            "rss_delta_mib": m.get("rss_delta_mib", float("nan")),
            "peak_cuda_mib": m.get("peak_cuda_mib", float("nan")),
            "aten_ops": ops.get(a, {}).get("aten_ops", float("nan")),
            "compute_ops": ops.get(a, {}).get("compute_ops", float("nan")),
            "kernel_launches": ops.get(a, {}).get("kernel_launches", float("nan")),
            "model_calls_batches": ops.get(a, {}).get("model_calls_batches", []),
            "hook_share_cpu": shares.get(a, {}).get("hook_share_cpu", float("nan")),
        }
    ref = rows.get("plain")
    plain_runs = {r["repeat"]: median(r["step_wall_s"]) for r in timing.get("plain", [])}
    for a, r in rows.items():
        for k in ("step_wall_s", "step_cpu_s", "e2e_wall_s", "peak_rss_mib", "rss_delta_mib", "peak_cuda_mib"):
            r[k + "_ratio"] = r[k] / ref[k] if ref and ref[k] else float("nan")
        for k in ("peak_rss_mib", "aten_ops", "compute_ops", "kernel_launches"):
            r[k + "_extra"] = r[k] - ref[k] if ref else float("nan")
        r["step_wall_paired_ratio"] = median(
            [median(x["step_wall_s"]) / plain_runs[x["repeat"]] for x in timing.get(a, []) if x["repeat"] in plain_runs]
        )
    return rows


def fmt(x, spec: str) -> str:
    return "–" if x != x else format(x, spec)


def markdown(arch_title: str, rows: dict, prov: dict, cuda: bool) -> str:
    tag = f"{prov['commit']}, {prov['date']}"
    mem = "peak CUDA MiB" if cuda else "peak RSS MiB"
    lines = [
        f"| {arch_title} ({tag}) | s/step wall | × plain | × plain, paired | s/step CPU | × plain | e2e s/step "
        f"| × plain | {mem} | × plain | + MiB | Δ while sampling MiB | × plain | compute ops/step (aten ops) "
        f"| + vs plain | model calls/step (batch) | in NPO hooks |",
        "|---|" + "---:|" * 16,
    ]
    for r in rows.values():
        peak = r["peak_cuda_mib"] if cuda else r["peak_rss_mib"]
        peak_ratio = r["peak_cuda_mib_ratio"] if cuda else r["peak_rss_mib_ratio"]
        calls = r["model_calls_batches"]
        share = r["hook_share_cpu"]
        lines.append(
            f"| {r['label']} | {fmt(r['step_wall_s'], '.3f')} | {fmt(r['step_wall_s_ratio'], '.3f')} "
            f"| {fmt(r['step_wall_paired_ratio'], '.3f')} | {fmt(r['step_cpu_s'], '.3f')} "
            f"| {fmt(r['step_cpu_s_ratio'], '.3f')} | {fmt(r['e2e_wall_s'], '.3f')} "
            f"| {fmt(r['e2e_wall_s_ratio'], '.3f')} "
            f"| {fmt(peak, '.0f')} | {fmt(peak_ratio, '.3f')} | {fmt(r['peak_rss_mib_extra'], '+.0f')} "
            f"| {fmt(r['rss_delta_mib'], '.0f')} | {fmt(r['rss_delta_mib_ratio'], '.2f')} "
            f"| {fmt(r['compute_ops'], '.0f')} ({fmt(r['aten_ops'], '.0f')}) | {fmt(r['compute_ops_extra'], '+.0f')} "
            f"| {len(calls)} ({'+'.join(map(str, calls)) or '–'}) "
            f"| {'–' if share != share else f'{100 * share:.1f} %'} |"
        )
    return "\n".join(lines)


def verdict(rows: dict, cuda: bool, smoke: bool = False) -> str:
    r = rows.get("npo")
    if not r:
        return ""
    t, m = r["step_wall_s_ratio"], r["peak_cuda_mib_ratio" if cuda else "peak_rss_mib_ratio"]
    if smoke:
        return (
            f"(smoke run, 2-block models: the ratios are not meaningful for the goals) Apply NPO vs plain: "
            f"time × {fmt(t, '.3f')}, peak memory × {fmt(m, '.3f')}, {fmt(r['compute_ops_extra'], '+.0f')} "
            f"compute ops per step"
        )
    ok = lambda x, lim: "–" if x != x else ("met" if x <= lim else "NOT met")  # noqa: E731
    return (
        f"Apply NPO vs plain CFG: time × {fmt(t, '.3f')} (goal ≤ 1.05: {ok(t, 1.05)}), peak memory "
        f"× {fmt(m, '.3f')} (goal ≤ 1.02: {ok(m, 1.02)}); {fmt(r['compute_ops_extra'], '+.0f')} compute ops "
        f"per step"
    )


def run_arch(args, arch: Arch, arms: list[str], lora_path: Path, prov: dict) -> dict:
    import torch

    print(
        f"\n== {arch.title}{' (smoke)' if args.smoke else ''}: {args.device} {args.dtype}, {args.steps} steps, "
        f"{args.repeats} repeats, arms {arms}",
        flush=True,
    )
    lora_info = lora_file(arch, args.smoke, args.rank, args.seed + 2, lora_path)
    memory = {}
    if not args.no_memory:  # first, while this process holds no model; each child builds its own
        memory = measure_memory(args, arch, arms, lora_path)
    t0 = time.perf_counter()
    with torch.inference_mode():
        bench = Bench(args, arch, lora_path, arms)
    build_s = time.perf_counter() - t0
    bench.info.update(lora_info)
    print(
        f"  built in {build_s:.1f} s: {bench.info['params'] / 1e6:.1f} M params "
        f"(+{bench.info['buffers'] / 1e6:.1f} M buffer), {bench.info['dtype']}, latent {bench.info['latent']}, "
        f"text {bench.info['text_tokens']} tokens",
        flush=True,
    )
    guiders = {a: bench.guider(a) for a in arms}
    timing: dict = {a: [] for a in arms}
    warmup: dict = {}
    outputs: dict = {}
    with torch.inference_mode():
        import comfy.samplers

        ms = bench.mp.get_model_object("model_sampling")
        warm_sigmas = comfy.samplers.calculate_sigmas(ms, "simple", args.warmup_steps)
        for a in arms:
            r = bench.sample(guiders[a], sigmas=warm_sigmas)
            warmup[a] = {"total_s": r["total_s"], "steps": r["steps"], "step_wall_s": r["step_wall_s"]}
            print(f"  warm-up {a:6s} {r['steps']} step(s) {r['total_s']:.2f} s", flush=True)
        for rep in range(args.repeats):
            for a in arms if rep % 2 == 0 else arms[::-1]:
                r = bench.sample(guiders[a])
                outputs.setdefault(a, []).append(r.pop("out"))
                r["repeat"] = rep
                r["loadavg_1min"] = os.getloadavg()[0]
                timing[a].append(r)
                print(
                    f"  repeat {rep} {a:6s} steps {[round(s, 3) for s in r['step_wall_s']]} total "
                    f"{r['total_s']:.2f} s (load {r['loadavg_1min']:.1f})",
                    flush=True,
                )
        shares: dict = {}
        if not args.no_hook_share and "npo" in arms and args.steps >= 2:
            r = bench.sample(guiders["npo"], instrument=True)
            r.pop("out")
            r["hook_share_cpu"] = r["hook_cpu_s"] / sum(r["step_cpu_s"])
            r["hook_share_wall"] = r["hook_wall_s"] / sum(r["step_wall_s"])
            shares["npo"] = r
            print(
                f"  NPO hooks: {r['hooks']} forward hooks, {100 * r['hook_share_cpu']:.1f} % of step CPU time",
                flush=True,
            )
        ops: dict = {}
        if not args.no_profile:
            for a in arms:
                ops[a] = count_ops(bench, guiders[a])
                print(
                    f"  ops/step {a:6s} compute {ops[a]['compute_ops']} (aten {ops[a]['aten_ops']}, launches "
                    f"{ops[a]['kernel_launches']}), model calls {ops[a]['model_calls_batches']}",
                    flush=True,
                )
    checks = {}
    if outputs.get("plain"):
        ref = outputs["plain"][0]
        checks["plain_repeats_max_abs_diff"] = max(float((o - ref).abs().max()) for o in outputs["plain"])
        for a, outs in outputs.items():
            checks[f"{a}_vs_plain_rel"] = float((outs[0] - ref).norm() / ref.norm())
        if outputs.get("npo") and outputs.get("hooks"):
            n, h = outputs["npo"][0], outputs["hooks"][0]
            checks["npo_vs_hooks_rel"] = float((n - h).norm() / max(float((n - ref).norm()), 1e-30))
    rows = summarize(timing, memory, ops, shares, arms)
    if "npo" in ops and "plain" in ops:
        extra = {
            k: ops["npo"]["by_name"].get(k, 0) - ops["plain"]["by_name"].get(k, 0)
            for k in set(ops["npo"]["by_name"]) | set(ops["plain"]["by_name"])
        }
        rows["npo"]["extra_ops_by_name"] = {k: v for k, v in sorted(extra.items(), key=lambda kv: -abs(kv[1])) if v}
        layers = bench.info.get("lora_layers") or len(arch.attention_linears(bench.mp.model.diffusion_model))
        rows["npo"]["extra_compute_ops_per_layer"] = rows["npo"]["compute_ops_extra"] / layers
    if "hooks" in ops and "plain" in ops:
        extra = {
            k: ops["hooks"]["by_name"].get(k, 0) - ops["plain"]["by_name"].get(k, 0)
            for k in set(ops["hooks"]["by_name"]) | set(ops["plain"]["by_name"])
        }
        rows["hooks"]["extra_ops_by_name"] = {k: v for k, v in sorted(extra.items(), key=lambda kv: -abs(kv[1])) if v}
    result = {
        "arch": arch.key,
        "title": arch.title,
        "smoke": args.smoke,
        "info": bench.info,
        "build_s": build_s,
        "rows": rows,
        "timing": timing,
        "warmup": warmup,
        "memory": memory,
        "ops": ops,
        "hook_share": shares,
        "checks": checks,
        **prov,
    }
    del bench, guiders, outputs
    import comfy.model_management

    comfy.model_management.unload_all_models()  # the next model must not share the memory with this one
    gc.collect()
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default=",".join(ARCHS), help=f"comma list of {', '.join(ARCHS)}")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {', '.join(ARMS)} (plain always runs)")
    ap.add_argument("--smoke", action="store_true", help="2-block models and a short run: seconds")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights and compute dtype")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--steps", type=int, default=4, help="sampling steps per timed run (steps 2..N are timed)")
    ap.add_argument("--warmup-steps", type=int, default=2, help="steps of the untimed warm-up run per arm")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per arm (interleaved)")
    ap.add_argument("--mem-steps", type=int, default=2, help="sampling steps of each memory child")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--latent", type=int, default=0, help="latent side (default: Wan 16, SD3 32)")
    ap.add_argument("--text-tokens", type=int, default=0, help="text tokens (default: Wan 512, SD3 154; smoke 32)")
    ap.add_argument(
        "--omp-wait",
        choices=("passive", "active", "default"),
        default="default",
        help="OMP_WAIT_POLICY for torch's OpenMP threads ('default' leaves it unset)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-memory", action="store_true", help="skip the memory child processes")
    ap.add_argument("--no-profile", action="store_true", help="skip the op-counting (torch.profiler) runs")
    ap.add_argument("--no-hook-share", action="store_true", help="skip the run that times NPO's hooks")
    ap.add_argument("--out", help="write all measurements to this JSON file")
    ap.add_argument("--mem-child", help=argparse.SUPPRESS)
    ap.add_argument("--lora-path", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps = min(args.steps, 3)
        args.repeats = min(args.repeats, 2)
    if args.omp_wait != "default":
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait.upper()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.mem_child:
        return memory_child(args)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in archs if a not in ARCHS] + [a for a in arms if a not in ARMS]
    if bad or args.steps < 1:
        ap.error(f"unknown arch/arm {bad}" if bad else "--steps must be ≥ 1")
    if "plain" not in arms:
        arms.insert(0, "plain")

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    prov = provenance()
    import_env(cpu=args.device == "cpu")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    mach = machine()
    if args.device == "cuda":
        mach["gpu"] = torch.cuda.get_device_name()
    print(
        f"bench_dit at commit {prov['commit']}, {prov['date']}; {mach['cpu']}, {mach['cores']} cores, torch "
        f"{mach['torch']} ({mach['torch_threads']} threads){', ' + mach['gpu'] if 'gpu' in mach else ''}",
        flush=True,
    )
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_dit_") as tmp:
        for key in archs:
            results[key] = run_arch(args, ARCHS[key], arms, Path(tmp) / f"{key}_r{args.rank}.safetensors", prov)

    cuda = args.device == "cuda"
    print(
        f"\nbench_dit, commit {prov['commit']}, {prov['date']}: {mach['cpu']}, {mach['cores']} cores, torch "
        f"{mach['torch']} ({mach['torch_threads']} threads, OMP_WAIT_POLICY {mach['omp_wait_policy']}); load "
        f"average at start {load_start[0]:.2f}, at end {os.getloadavg()[0]:.2f}"
    )
    tables = {}
    for key, res in results.items():
        info = res["info"]
        print(
            f"\n{res['title']}{' (SMOKE: 2 blocks)' if args.smoke else ''}: {info['params'] / 1e6:.1f} M params, "
            f"{args.device} {info['dtype']}, latent {info['latent']} (batch 1, cond+uncond), text "
            f"{info['text_tokens']} tokens, euler {args.steps} steps, {args.repeats} interleaved repeats; "
            f"LoRA rank {args.rank} on {info.get('lora_layers')} attention linears "
            f"({info.get('lora_params', 0) / 1e6:.2f} M params)"
        )
        tables[key] = markdown(res["title"], res["rows"], prov, cuda)
        print(tables[key])
        print(verdict(res["rows"], cuda, args.smoke))
        if "npo" in res["rows"] and "extra_compute_ops_per_layer" in res["rows"]["npo"]:
            top = list(res["rows"]["npo"]["extra_ops_by_name"].items())[:6]
            print(
                f"NPO extra compute ops per hooked layer: {res['rows']['npo']['extra_compute_ops_per_layer']:.2f}; "
                f"by op: {dict(top)}"
            )
        if "hooks" in res["rows"] and res["rows"]["hooks"].get("extra_ops_by_name"):
            print(f"hooks extra compute ops by op: {dict(list(res['rows']['hooks']['extra_ops_by_name'].items())[:6])}")
        print("checks:", {k: f"{v:.3g}" for k, v in res["checks"].items()})
    print(f"\ntotal run time {time.perf_counter() - t_start:.0f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "machine": mach,
                    "loadavg_start": load_start,
                    "loadavg_end": os.getloadavg(),
                    **prov,
                    "results": results,
                    "tables": tables,
                },
                f,
                indent=1,
                default=str,
            )


if __name__ == "__main__":
    main()
