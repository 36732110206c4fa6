"""Helpers for the host tier: tiny and full-size (meta) UNets, LoRA files in the released formats,
hand-written references. Imported after tests/host/conftest.py has put ComfyUI on ``sys.path``.

Everything that serves as a reference here is written from the published structure of the models
(the diffusers/LDM block layout of SD1.5 and SDXL) and plain torch: it never calls the pack.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.samplers
import comfy.supported_models
import node_helpers
import torch
from families import seeded_init as init_weights  # noqa: F401  (seeded normal init, one definition)

CPU = torch.device("cpu")

# ---------------------------------------------------------------------------------------------
# model configurations
# ---------------------------------------------------------------------------------------------
_COMMON = {
    "image_size": 32,
    "use_checkpoint": False,
    "use_spatial_transformer": True,
    "legacy": False,
    "in_channels": 4,
    "out_channels": 4,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

UNET_CONFIGS = {
    # tiny, for sampling on the CPU
    "sd15": dict(
        _COMMON,
        adm_in_channels=None,
        model_channels=32,
        num_res_blocks=[1, 1],
        channel_mult=[1, 2],
        transformer_depth=[1, 1],
        transformer_depth_output=[1, 1, 1, 1],
        transformer_depth_middle=1,
        context_dim=64,
        use_linear_in_transformer=False,
        num_head_channels=8,
    ),
    "sdxl": dict(
        _COMMON,
        adm_in_channels=2816,
        num_classes="sequential",
        model_channels=32,
        num_res_blocks=[1, 1],
        channel_mult=[1, 2],
        transformer_depth=[0, 1],
        transformer_depth_output=[0, 0, 1, 1],
        transformer_depth_middle=1,
        context_dim=64,
        use_linear_in_transformer=True,
        num_head_channels=8,
    ),
    # full size, built on the meta device (key landing only)
    "sd15_full": dict(
        _COMMON,
        adm_in_channels=None,
        model_channels=320,
        num_res_blocks=[2, 2, 2, 2],
        channel_mult=[1, 2, 4, 4],
        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        transformer_depth_middle=1,
        context_dim=768,
        num_heads=8,
        use_linear_in_transformer=False,
    ),
    "sdxl_full": dict(
        _COMMON,
        adm_in_channels=2816,
        num_classes="sequential",
        model_channels=320,
        num_res_blocks=[2, 2, 2],
        channel_mult=[1, 2, 4],
        transformer_depth=[0, 0, 2, 2, 10, 10],
        transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
        transformer_depth_middle=10,
        context_dim=2048,
        num_head_channels=64,
        use_linear_in_transformer=True,
    ),
}
UNET_CONFIGS["sdxl_v"] = UNET_CONFIGS["sdxl"]

# The published block layout, written out by hand (independent of comfy.utils.unet_to_diffusers):
# channels per level, transformer depth per level (the same on the way down and up), middle depth,
# res blocks per level, text context width.
LAYOUT = {
    "sd15": dict(ch=[32, 64], depth=[1, 1], mid=1, nrb=1, ctx=64),
    "sdxl": dict(ch=[32, 64], depth=[0, 1], mid=1, nrb=1, ctx=64),
    "sd15_full": dict(ch=[320, 640, 1280, 1280], depth=[1, 1, 1, 0], mid=1, nrb=2, ctx=768),
    "sdxl_full": dict(ch=[320, 640, 1280], depth=[0, 2, 10], mid=10, nrb=2, ctx=2048),
}
LAYOUT["sdxl_v"] = LAYOUT["sdxl"]

ATTN_PROJ = ("to_q", "to_k", "to_v", "to_out.0")
LATENT = 8  # latent side (64 px): small enough for a 2-core CPU


def model_config(kind: str):
    cls = comfy.supported_models.SD15 if kind.startswith("sd15") else comfy.supported_models.SDXL
    cfg = cls(dict(UNET_CONFIGS[kind]))
    if kind in ("sdxl", "sdxl_v"):  # SDXL forces 64-channel heads; the tiny model is narrower
        cfg.unet_config["num_head_channels"] = 8
        cfg.unet_config["num_heads"] = -1
    return cfg


def build_model(kind: str):
    """A fresh, uninitialised BaseModel of ``kind`` (weights are torch.empty garbage)."""
    cfg = model_config(kind)
    return cfg.get_model({"v_pred": torch.tensor([])} if kind == "sdxl_v" else {})


def patcher(model) -> comfy.model_patcher.ModelPatcher:
    return comfy.model_patcher.ModelPatcher(model, CPU, CPU)


class TinyFactory:
    """``factory(kind, seed)`` → a new ModelPatcher on a newly built model holding the cached pristine
    weights of (kind, seed). ``factory.weights(kind, seed)`` → a copy of those pristine UNet weights."""

    def __init__(self) -> None:
        self._sd: dict[tuple[str, int], dict[str, torch.Tensor]] = {}

    def weights(self, kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
        key = (kind, seed)
        if key not in self._sd:
            m = build_model(kind)
            init_weights(m.diffusion_model, seed)
            self._sd[key] = {k: v.detach().clone() for k, v in m.diffusion_model.state_dict().items()}
        return {k: v.clone() for k, v in self._sd[key].items()}

    def from_weights(self, kind: str, unet_sd: dict[str, torch.Tensor]):
        m = build_model(kind)
        missing, unexpected = m.diffusion_model.load_state_dict(unet_sd, strict=True)
        assert not missing and not unexpected
        return patcher(m)

    def __call__(self, kind: str, seed: int = 0):
        return self.from_weights(kind, self.weights(kind, seed))


def meta_model(kind: str):
    with torch.device("meta"):
        return patcher(build_model(kind))


# ---------------------------------------------------------------------------------------------
# the attention layers of the published layouts (diffusers name, LDM name, out, in)
# ---------------------------------------------------------------------------------------------
def attention_blocks(kind: str) -> list[tuple[str, str, int, int]]:
    """(diffusers block, LDM block, channels, transformer depth) of every spatial transformer."""
    lay = LAYOUT[kind]
    ch, depth, nrb = lay["ch"], lay["depth"], lay["nrb"]
    out = []
    for i, d in enumerate(depth):
        if d:
            for j in range(nrb):
                out.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{i * (nrb + 1) + j + 1}.1", ch[i], d))
    out.append(("mid_block.attentions.0", "middle_block.1", ch[-1], lay["mid"]))
    levels = len(ch)
    for i in range(levels):
        level = levels - 1 - i
        if depth[level]:
            for j in range(nrb + 1):
                out.append(
                    (f"up_blocks.{i}.attentions.{j}", f"output_blocks.{i * (nrb + 1) + j}.1", ch[level], depth[level])
                )
    return out


def attention_linears(kind: str, which: tuple[str, ...] = ("attn1", "attn2")) -> list[tuple[str, str, int, int]]:
    ctx = LAYOUT[kind]["ctx"]
    out = []
    for dblock, lblock, c, d in attention_blocks(kind):
        for k in range(d):
            for attn in which:
                for proj in ATTN_PROJ:
                    fan_in = ctx if (attn == "attn2" and proj in ("to_k", "to_v")) else c
                    inner = f"transformer_blocks.{k}.{attn}.{proj}"
                    out.append((f"{dblock}.{inner}", f"{lblock}.{inner}", c, fan_in))
    return out


# ---------------------------------------------------------------------------------------------
# offset files in the formats found in the wild
# ---------------------------------------------------------------------------------------------
LORA_FORMATS = ("peft", "peft_ab", "kohya_diffusers", "kohya_ldm", "comfy")


def make_lora(
    kind: str,
    fmt: str = "peft",
    rank: int = 8,
    seed: int = 0,
    magnitude: float = 0.3,
    alpha: float | None = None,
    extras: bool = False,
    values: str = "randn",
):
    """A LoRA on every attention projection (attn1+attn2, to_q/k/v/out.0), as the authors' release.

    Returns (state dict in format ``fmt``, truth). ``alpha`` is written for the kohya and comfy formats
    only (PEFT/diffusers files carry none: scale 1). ``values``:
    - "randn": random factors; truth maps LDM parameter names (relative to the UNet) to the dense ΔW
      (fp32) the file means at strength 1;
    - "tag": cheap constant factors (down = t, up = −t for the module's tag t = 1, 2, ...); truth maps
      LDM parameter names to t, so a test can see which file module landed on which layer.
    ``extras`` (kohya_ldm/comfy, randn) adds a conv LoRA, dense conv/linear/norm ``.diff``/``.diff_b``.
    """
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    truth: dict = {}
    scale = 1.0 if alpha is None or fmt.startswith("peft") else alpha / rank

    for tag, (dmod, lmod, out_f, in_f) in enumerate(attention_linears(kind), start=1):
        if values == "tag":
            down, up = torch.full((rank, in_f), float(tag)), torch.full((out_f, rank), -float(tag))
            truth[f"{lmod}.weight"] = tag
        else:
            down = torch.randn(rank, in_f, generator=g) / in_f**0.5
            up = torch.randn(out_f, rank, generator=g) * (magnitude / rank**0.5)
            truth[f"{lmod}.weight"] = scale * (up @ down)
        if fmt == "peft":  # the released files: diffusers save_lora_weights of a PEFT model
            sd[f"unet.{dmod}.lora.down.weight"], sd[f"unet.{dmod}.lora.up.weight"] = down, up
        elif fmt == "peft_ab":  # raw get_peft_model_state_dict, no "unet." prefix
            sd[f"{dmod}.lora_A.weight"], sd[f"{dmod}.lora_B.weight"] = down, up
        elif fmt in ("kohya_diffusers", "kohya_ldm"):
            name = (dmod if fmt == "kohya_diffusers" else lmod).replace(".", "_")
            sd[f"lora_unet_{name}.lora_down.weight"], sd[f"lora_unet_{name}.lora_up.weight"] = down, up
            sd[f"lora_unet_{name}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
        elif fmt == "comfy":
            sd[f"diffusion_model.{lmod}.lora_down.weight"], sd[f"diffusion_model.{lmod}.lora_up.weight"] = down, up
            sd[f"diffusion_model.{lmod}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
        else:
            raise ValueError(fmt)
    if extras:
        _add_extras(kind, fmt, sd, truth, g, rank, magnitude, alpha)
    return sd, truth


def _add_extras(kind, fmt, sd, truth, g, rank, magnitude, alpha):
    ch0 = LAYOUT[kind]["ch"][0]
    conv = "input_blocks.1.0.in_layers.2"  # first ResBlock's 3×3 conv: [ch0, ch0, 3, 3]
    if fmt == "kohya_ldm":
        a = float(alpha if alpha is not None else rank)
        down = torch.randn(rank, ch0, 3, 3, generator=g) / (9 * ch0) ** 0.5
        up = torch.randn(ch0, rank, 1, 1, generator=g) * (magnitude / rank**0.5)
        name = conv.replace(".", "_")
        sd[f"lora_unet_{name}.lora_down.weight"], sd[f"lora_unet_{name}.lora_up.weight"] = down, up
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(a)
        truth[f"{conv}.weight"] = (a / rank) * (up.flatten(1) @ down.flatten(1)).reshape(ch0, ch0, 3, 3)
    elif fmt == "comfy":
        dense = {
            f"{conv}.weight": torch.randn(ch0, ch0, 3, 3, generator=g) * magnitude / (9 * ch0) ** 0.5,
            f"{conv}.bias": 0.05 * torch.randn(ch0, generator=g),
            "time_embed.0.weight": torch.randn(4 * ch0, ch0, generator=g) * magnitude / ch0**0.5,
        }
        # norms: a GroupNorm (ResBlock in_layers.0) and a LayerNorm inside a transformer block
        blk = attention_blocks(kind)[0]
        for norm, c in (("input_blocks.1.0.in_layers.0", ch0), (f"{blk[1]}.transformer_blocks.0.norm1", blk[2])):
            dense[f"{norm}.weight"] = 0.1 * torch.randn(c, generator=g)
            dense[f"{norm}.bias"] = 0.05 * torch.randn(c, generator=g)
        for k, v in dense.items():
            module, leaf = k.rsplit(".", 1)
            sd[f"diffusion_model.{module}.{'diff' if leaf == 'weight' else 'diff_b'}"] = v
            truth[k] = v.clone()
    else:
        raise ValueError(f"extras are written for kohya_ldm and comfy only, not {fmt}")


def lora_param_count(kind: str, rank: int) -> int:
    """Σ rank·(in + out) over the attention projections: the parameter count of a released-style file."""
    return sum(rank * (o + i) for _, _, o, i in attention_linears(kind))


# ---------------------------------------------------------------------------------------------
# hand-written references
# ---------------------------------------------------------------------------------------------
def merged(weights: dict[str, torch.Tensor], *terms: tuple[float, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """weights + Σ coef·delta, in fp32, by hand."""
    out = {k: v.clone().float() for k, v in weights.items()}
    for coef, delta in terms:
        for k, d in delta.items():
            out[k] = out[k] + coef * d.float().reshape(out[k].shape)
    return out


def reference_cfg(ref_mp, active: Callable[[float], bool] = lambda sigma: True):
    """A ``sampler_cfg_function`` that replaces the uncond prediction by the one of the separately
    built model ``ref_mp`` (same conds, same area/mask handling by ComfyUI's calc_cond_batch) and
    does CFG by hand: denoised = u + s·(c − u)."""

    def fn(args):
        x, sigma, s = args["input"], args["sigma"], args["cond_scale"]
        cond = args["cond_denoised"]
        uncond = args["uncond_denoised"]
        if args.get("input_uncond") is not None and active(float(sigma.flatten()[0])):
            ref_mp.model.current_patcher = ref_mp
            uncond = comfy.samplers.calc_cond_batch(ref_mp.model, [args["input_uncond"]], x, sigma, {})[0]
        return x - (uncond + s * (cond - uncond))

    return fn


def with_reference_cfg(base_mp, ref_mp, active: Callable[[float], bool] = lambda sigma: True):
    m = base_mp.clone()
    m.set_model_sampler_cfg_function(reference_cfg(ref_mp, active), disable_cfg1_optimization=False)
    return m


# ---------------------------------------------------------------------------------------------
# conditioning, sampling
# ---------------------------------------------------------------------------------------------
def make_conds(kind: str, variant: str = "plain", seed: int = 1, tokens: int = 16):
    """(positive, negative). SDXL conds carry pooled_output and size micro-conditioning; the SDXL negative
    is all zeros (pooled included), as the authors used. ``variant="regional"`` adds an area prompt
    to the positive and a masked prompt to the negative."""
    g = torch.Generator().manual_seed(seed)
    ctx = LAYOUT[kind]["ctx"]
    xl = kind.startswith("sdxl")

    def extra(zero=False):
        if not xl:
            return {}
        pooled = torch.zeros(1, 1280) if zero else torch.randn(1, 1280, generator=g)
        return {"pooled_output": pooled, "width": 64, "height": 64, "target_width": 64, "target_height": 64}

    pos = [[torch.randn(1, tokens, ctx, generator=g), extra()]]
    neg = [[torch.zeros(1, tokens, ctx) if xl else torch.randn(1, tokens, ctx, generator=g), extra(zero=xl)]]
    if variant == "regional":
        area = [[torch.randn(1, tokens, ctx, generator=g), extra()]]
        pos = pos + node_helpers.conditioning_set_values(
            area, {"area": (4, 4, 2, 4), "strength": 0.8, "set_area_to_bounds": False}
        )
        mask = torch.zeros(1, LATENT, LATENT)
        mask[:, 1:6, 0:5] = 1.0
        masked = [[torch.randn(1, tokens, ctx, generator=g), extra()]]
        neg = neg + node_helpers.conditioning_set_values(
            masked, {"mask": mask, "mask_strength": 0.7, "set_area_to_bounds": False}
        )
    elif variant != "plain":
        raise ValueError(variant)
    return pos, neg


def latents(batch: int, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    return torch.zeros(batch, 4, LATENT, LATENT), torch.randn(batch, 4, LATENT, LATENT, generator=g)


def ksample(
    model,
    pos,
    neg,
    cfg: float,
    batch: int = 1,
    steps: int = 4,
    sampler: str = "euler",
    scheduler: str = "normal",
    callback=None,
):
    """comfy.sample.sample, the function behind the KSampler node, under inference_mode as in ComfyUI."""
    latent, noise = latents(batch)
    with torch.inference_mode():
        return comfy.sample.sample(
            model, noise, steps, cfg, sampler, scheduler, pos, neg, latent, seed=0, disable_pbar=True, callback=callback
        )


def sigmas_for(model, steps: int = 4, scheduler: str = "normal"):
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)


def guider_sample(
    guider, batch: int = 1, steps: int = 4, sampler: str = "euler", scheduler: str = "normal", callback=None
):
    """What SamplerCustomAdvanced does with a GUIDER (same noise/sigmas as ``ksample``)."""
    latent, noise = latents(batch)
    with torch.inference_mode():
        sig = sigmas_for(guider.model_patcher, steps, scheduler)
        return guider.sample(
            noise, latent, comfy.samplers.sampler_object(sampler), sig, callback=callback, disable_pbar=True, seed=0
        )


def cfg_guider(model, pos, neg, cfg: float):
    g = comfy.samplers.CFGGuider(model)
    g.set_conds(pos, neg)
    g.set_cfg(cfg)
    return g


# ---------------------------------------------------------------------------------------------
# isolation probes
# ---------------------------------------------------------------------------------------------
def state_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        t = v.detach().cpu().contiguous()
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def hooked_modules(module: torch.nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if m._forward_hooks or m._forward_pre_hooks]


def loaded_weights(mp) -> dict[str, torch.Tensor]:
    """The UNet weights ``mp`` runs with, as ComfyUI materialises them (load → patch), then unloaded."""
    comfy.model_management.load_models_gpu([mp], force_full_load=True)
    try:
        return {k: v.detach().clone().float() for k, v in mp.model.diffusion_model.state_dict().items()}
    finally:
        comfy.model_management.unload_all_models()


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-4) -> bool:
    """max|a − b| ≤ atol + rtol·max|b|: float tolerance relative to the tensor's scale (random tiny UNets
    give latents of magnitude ~10²; an element-wise rtol would judge rounding noise near zero crossings)."""
    a, b = a.float(), b.float()
    return a.shape == b.shape and float((a - b).abs().max()) <= atol + rtol * float(b.abs().max())


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ---------------------------------------------------------------------------------------------
# Self-NPO Train through the node
# ---------------------------------------------------------------------------------------------
def self_npo_train(model, pos, neg, **kw):
    """SelfNPOTrain.execute with small test settings (3 lora steps, batch 2, pool of 2 at 64 px); ``kw`` overrides."""
    from comfyui_npo.nodes.train import SelfNPOTrain

    args = dict(
        steps=3,
        batch_size=2,
        learning_rate="auto",
        mode="lora",
        rank=4,
        truncation_steps=5,
        teacher_guidance=-1.0,
        ema_decay=0.999,
        loss="pseudo_huber",
        seed=0,
        gradient_checkpointing=True,
        training_dtype="fp32",
        save_every=0,
        filename_prefix="t",
        pool_size=2,
        width=64,
        height=64,
        pool_steps=2,
        pool_cfg=5.0,
    )
    args.update(kw)
    with torch.inference_mode():
        return SelfNPOTrain.execute(model=model, positive=pos, negative=neg, **args)


# ---------------------------------------------------------------------------------------------
# low VRAM, as ComfyUI sees it
# ---------------------------------------------------------------------------------------------
def low_vram(monkeypatch, free_bytes: float) -> None:
    """ComfyUI believes its device is a GPU with ``free_bytes`` free (the tiny model still runs on the CPU)."""
    mm = comfy.model_management
    monkeypatch.setattr(mm, "is_device_cpu", lambda device: False)
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NORMAL_VRAM)
    # model loading asks get_free_memory(dev); the CPU's sub-quadratic attention asks (dev, True) to size its
    # chunks, and its chunked path is not differentiable: it keeps seeing plenty of memory
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: (
        (2**40, 2**40) if torch_free_too else free_bytes))
    monkeypatch.setattr(mm, "minimum_inference_memory", lambda: 0)
    monkeypatch.setattr(mm, "extra_reserved_memory", lambda: 0)


def has_128mb_floor() -> bool:
    """ComfyUI before the 2025 memory rework loads at least 128 MB of a model in low VRAM."""
    import inspect

    return "128 * 1024 * 1024" in inspect.getsource(comfy.model_management.load_models_gpu)


class LoadWatch:
    """Records each TrainingModel.load (loaded bytes, model bytes, ComfyUI's lowvram flag) and each
    load_models_gpu request (force_full_load, memory_required > 0) while a test trains."""

    def __init__(self, monkeypatch) -> None:
        from comfyui_npo.nodes.host import training_model

        mm = comfy.model_management
        self.loads: list[tuple[int, int, bool]] = []
        self.requests: list[tuple[bool, bool]] = []
        self.floor = has_128mb_floor()  # read before load_models_gpu is wrapped
        real_load, real_lmg = training_model.TrainingModel.load, mm.load_models_gpu

        def load(tm, *a, **kw):
            device = real_load(tm, *a, **kw)
            self.loads.append((tm.mp.loaded_size(), tm.mp.model_size(), bool(getattr(tm.mp.model, "model_lowvram", 0))))
            return device

        def load_models_gpu(models, memory_required=0, force_full_load=False, **kw):
            self.requests.append((force_full_load, memory_required > 0))
            return real_lmg(models, memory_required=memory_required, force_full_load=force_full_load, **kw)

        monkeypatch.setattr(training_model.TrainingModel, "load", load)
        monkeypatch.setattr(mm, "load_models_gpu", load_models_gpu)

    def assert_partial(self) -> None:
        """The last load left part of the weights off the device (or, where ComfyUI loads at least 128 MB of any
        model so that the tiny one fits whole, it was asked for a partial load)."""
        loaded, total, lowvram = self.loads[-1]
        if total > 128 * 1024 * 1024 or not self.floor:
            assert loaded < total and lowvram, (loaded, total)
        else:
            assert self.requests and self.requests[-1] == (False, True), self.requests
