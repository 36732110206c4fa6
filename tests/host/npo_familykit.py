"""Host-tier helpers for the DiT / flow families: pristine tiny models, offsets in every LoRA layout
ComfyUI's key map offers, hand-merged references, sampling with a family's own latent.

References here never call the pack: ΔW is written into the weight (or its slice) by hand.
"""

from __future__ import annotations

import comfy.lora
import comfy.model_patcher
import comfy.sample
import torch
from families import TinyFamily, all_families, seeded_init

CPU = torch.device("cpu")
PREFIX = "diffusion_model."
_CACHE: dict[tuple[str, int], dict[str, torch.Tensor]] = {}


def families_here() -> list[TinyFamily]:
    return [f for f in all_families() if f.available()]


def refused_reason(fam: TinyFamily) -> str | None:
    """Why the pack refuses the family (its family record says unsupported), or None."""
    from comfyui_npo.nodes.host import model_facts

    return model_facts.family(comfy.model_patcher.ModelPatcher(_build(fam), CPU, CPU)).unsupported


def family(name: str) -> TinyFamily:
    return next(f for f in all_families() if f.name == name)


def _build(fam: TinyFamily):
    base = fam.build_model()
    return base


def pristine(fam: TinyFamily, seed: int = 0) -> dict[str, torch.Tensor]:
    """The seeded diffusion-model state dict of ``fam`` (cached), buffers included."""
    key = (fam.name, seed)
    if key not in _CACHE:
        base = _build(fam)
        seeded_init(base.diffusion_model, seed)
        if fam.fix_buffers is not None:
            fam.fix_buffers(base)
        _CACHE[key] = {k: v.detach().clone() for k, v in base.diffusion_model.state_dict().items()}
    return {k: v.clone() for k, v in _CACHE[key].items()}


def model_from(fam: TinyFamily, sd: dict[str, torch.Tensor]):
    base = _build(fam)
    missing, unexpected = base.diffusion_model.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    return comfy.model_patcher.ModelPatcher(base, CPU, CPU)


def tiny_model(fam: TinyFamily, seed: int = 0):
    return model_from(fam, pristine(fam, seed))


def all_linears(mp, skip: tuple[str, ...] = ()) -> list[str]:
    """Every Linear-like module (``in_features``/``out_features``) of the diffusion model, but ``skip`` parts."""
    return [
        n
        for n, m in mp.model.diffusion_model.named_modules()
        if isinstance(getattr(m, "in_features", None), int)
        and isinstance(getattr(m, "out_features", None), int)
        and not any(p in f".{n}." for p in skip)
    ]


def attention_lora(
    fam: TinyFamily, mp, rank: int = 4, seed: int = 3, magnitude: float = 0.5, modules: list[str] | None = None
):
    """{module: (up, down)} on the family's attention linears (or ``modules``), shapes read off the weights."""
    g = torch.Generator().manual_seed(seed)
    sd = mp.model.diffusion_model.state_dict()
    out = {}
    for m in fam.attention_linears if modules is None else modules:
        o, i = sd[f"{m}.weight"].shape
        down = torch.randn(rank, i, generator=g) / i**0.5
        up = torch.randn(o, rank, generator=g) * (magnitude / rank**0.5)
        out[m] = (up, down)
    return out


def comfy_lora_file(factors: dict, alpha: float | None = None) -> dict[str, torch.Tensor]:
    """ComfyUI's own layout: diffusion_model.<module>.lora_up/lora_down.weight (+ alpha)."""
    sd = {}
    for m, (up, down) in factors.items():
        sd[f"{PREFIX}{m}.lora_up.weight"], sd[f"{PREFIX}{m}.lora_down.weight"] = up, down
        if alpha is not None:
            sd[f"{PREFIX}{m}.alpha"] = torch.tensor(float(alpha))
    return sd


def dense_truth(factors: dict, scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {f"{m}.weight": scale * (up @ down) for m, (up, down) in factors.items()}


def merged(sd: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], coef: float) -> dict[str, torch.Tensor]:
    """sd + coef·delta by hand (fp32, cast back to each parameter's dtype)."""
    out = {k: v.clone() for k, v in sd.items()}
    for k, d in delta.items():
        out[k] = (out[k].float() + coef * d.float().reshape(out[k].shape)).to(out[k].dtype)
    return out


def noise_and_latent(fam: TinyFamily, batch: int, seed: int = 7):
    shape = fam.latent_shape(batch)
    g = torch.Generator().manual_seed(seed)
    return torch.zeros(shape), torch.randn(shape, generator=g)


def sample(
    mp,
    fam: TinyFamily,
    batch: int = 1,
    steps: int = 2,
    cfg: float | None = None,
    conds=None,
    seed: int = 1,
    sampler: str = "euler",
):
    """comfy.sample.sample (KSampler's function) with the family's latent, under inference_mode."""
    pos, neg = conds if conds is not None else fam.conds(seed)
    latent, noise = noise_and_latent(fam, batch)
    with torch.inference_mode():
        return comfy.sample.sample(
            mp,
            noise,
            steps,
            fam.cfg if cfg is None else cfg,
            "euler",
            "simple",
            pos,
            neg,
            latent,
            seed=0,
            disable_pbar=True,
        )


def with_reference_batch(base_mp, ref_mp):
    """A clone of ``base_mp`` whose CFG batch computes the cond chunk on ``base_mp`` and the uncond chunk on the
    separately built ``ref_mp`` (ComfyUI's sampler_calc_cond_batch_function), so everything downstream (CFG,
    post-CFG functions, CFG++ samplers, extra guidance passes on the model) sees the reference's uncond."""
    import comfy.samplers

    def calc(args):
        conds, x, sigma, opts = args["conds"], args["input"], args["sigma"], args["model_options"]
        out = comfy.samplers.calc_cond_batch(args["model"], [conds[0], None], x, sigma, opts)
        if len(conds) > 1 and conds[1] is not None:
            ref_mp.model.current_patcher = ref_mp
            out[1] = comfy.samplers.calc_cond_batch(ref_mp.model, [None, conds[1]], x, sigma, {})[1]
        return out

    m = base_mp.clone()
    m.model_options["sampler_calc_cond_batch_function"] = calc
    return m


def key_map(mp) -> dict:
    return comfy.lora.model_lora_keys_unet(mp.model, {})


STYLE_PREFIXES = (
    "diffusion_model.",
    "lora_unet_",
    "lora_transformer_",
    "lycoris_",
    "transformer.",
    "base_model.model.",
    "unet.base_model.model.",
    "lora_prior_unet_",
)


def out_of_bounds(mp, target) -> bool:
    """A slice entry of the key map that reaches past its weight (ComfyUI's Z-Image map on Lumina 2, whose
    k/v are narrower than q)."""
    if isinstance(target, str) or target[1] is None:
        return False
    dim, start, length = target[1]
    weight = mp.model.diffusion_model.state_dict().get(target[0][len(PREFIX) :])
    return weight is not None and start + length > weight.shape[dim]


def layouts(mp, modules: list[str]) -> dict[str, dict[str, object]]:
    """ComfyUI's key map for ``modules`` (weights), split into layouts: {layout: {file module: target}}.

    A layout is a key prefix plus whether the rest names the model's own module ("own"), another naming
    ("renamed"), or a slice of a fused weight ("slice"). Within a layout each target is taken once, so one
    file per layout patches every module at most once."""
    wanted = {f"{PREFIX}{m}.weight" for m in modules}
    out: dict[str, dict[str, object]] = {}
    taken: dict[str, set] = {}
    for lora_key, target in sorted(key_map(mp).items()):
        name = target if isinstance(target, str) else target[0]
        if name not in wanted or out_of_bounds(mp, target):
            continue
        prefix = next((p for p in sorted(STYLE_PREFIXES, key=len, reverse=True) if lora_key.startswith(p)), "")
        rest = lora_key[len(prefix) :]
        module = name[len(PREFIX) : -len(".weight")]
        if not isinstance(target, str):
            kind = "slice" if target[1] is not None else "function"
        elif rest in (module, module.replace(".", "_")):
            kind = "own"
        else:
            kind = "renamed"
        layout = f"{prefix or '(bare)'}:{kind}"
        region = (name, None if isinstance(target, str) or target[1] is None else tuple(target[1]))
        if region in taken.setdefault(layout, set()):
            continue
        taken[layout].add(region)
        out.setdefault(layout, {})[lora_key] = target
    return out


def layout_file(entries: dict[str, object], shapes: dict[str, tuple], rank: int = 2, seed: int = 5):
    """A LoRA file (lora_up/lora_down/alpha) for one layout, and the ΔW it means per parameter, placed by
    hand into the fused weight for slice targets."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    truth: dict[str, torch.Tensor] = {}
    for lora_key, target in entries.items():
        name = target if isinstance(target, str) else target[0]
        rel = name[len(PREFIX) :]
        full = list(shapes[rel])
        part = None if isinstance(target, str) else target[1]
        sub = list(full)
        if part is not None:
            sub[part[0]] = part[2]
        down = torch.randn(rank, sub[1], generator=g) / sub[1] ** 0.5
        up = torch.randn(sub[0], rank, generator=g) * 0.3
        alpha = 1.0
        sd[f"{lora_key}.lora_up.weight"], sd[f"{lora_key}.lora_down.weight"] = up, down
        sd[f"{lora_key}.alpha"] = torch.tensor(alpha)
        delta = (alpha / rank) * (up @ down)
        if not isinstance(target, str) and len(target) > 2 and target[2] is not None:
            delta = target[2](delta)
        acc = truth.setdefault(rel, torch.zeros(full))
        if part is None:
            acc += delta
        else:
            acc.narrow(part[0], part[1], part[2]).add_(delta)
    return sd, truth


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    a, b = a.float(), b.float()
    return a.shape == b.shape and float((a - b).abs().max()) <= atol + rtol * float(b.abs().max())


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())
