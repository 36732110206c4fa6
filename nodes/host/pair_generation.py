"""Self-generated preference pairs: K samples per prompt from the model, scored, the best and the worst a pair (a
video's score is the mean of its frames').

Sample k of prompt p starts from noise seeded ``seed + p·K + k`` (so any subset is reproducible) and is sampled
with ComfyUI's own ``comfy.sample.sample`` (the sampler, scheduler, steps and cfg given); the VAE decodes it for
the scorer (higher is better). The chosen latents are the pair's latents: no re-encoding. A run's pairs are
cached in output/npo_pairs/ under a key of every setting and the model's fingerprint, written atomically, so a
resumed training graph does not sample them again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ...npo_core.atomic import atomic_write
from ...npo_core.errors import NPOError
from ...training import pairs
from . import files, model_facts

CACHE_SUBDIR = "npo_pairs"
CACHE_FORMAT = "comfyui-npo-pairs/1"


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    prompts: tuple[str, ...]
    negative_prompt: str
    samples_per_prompt: int
    width: int
    height: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    seed: int
    scorer: str
    frames: int = 1  # video models: frames per sample (each scored, the sample's score their mean)


@dataclasses.dataclass
class Generated:
    preferred: torch.Tensor  # [P, C, ...] latents (LATENT space)
    rejected: torch.Tensor
    scores: torch.Tensor  # [P, K]
    best: list[int]
    worst: list[int]
    from_cache: bool


def model_fingerprint(mp) -> str:
    """The config, every parameter's shape, a checksum of a few weights and the weight patches (LoRAs and their
    strengths): another checkpoint or LoRA stack gives another fingerprint."""
    h = hashlib.sha256(model_facts.model_arch(mp).encode())
    params = list(model_facts.unet_of(mp).named_parameters())
    for name, p in params:
        h.update(f"{name}{tuple(p.shape)}".encode())
    for _name, p in params[:4] + params[-4:]:
        h.update(f"{float(p.detach().float().sum()):.9e}".encode())
    for key, patches in sorted(mp.patches.items()):
        h.update(f"{key}:{[float(p[0]) for p in patches]}".encode())
    return h.hexdigest()[:16]


def cache_path(settings: GenerationSettings, fingerprint: str) -> Path:
    key = hashlib.sha256(json.dumps([dataclasses.asdict(settings), fingerprint]).encode()).hexdigest()[:16]
    return Path(files.output_dir()) / CACHE_SUBDIR / f"pairs_{key}.pt"


def _read_cache(path: Path, settings: GenerationSettings, fingerprint: str) -> Generated | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:
        return None  # a damaged cache is sampled again (and rewritten)
    if state.get("format") != CACHE_FORMAT or state.get("settings") != json.dumps(dataclasses.asdict(settings)):
        return None
    if state.get("fingerprint") != fingerprint:
        return None
    return Generated(state["preferred"], state["rejected"], state["scores"], state["best"].tolist(),
                     state["worst"].tolist(), True)


def sample_scores(decoded: torch.Tensor, k: int, scorer, prompt: str) -> torch.Tensor:
    """Each of the k samples' score: its image's, or the mean over a video's frames (decoded [k, (T,) H, W, 3];
    a video VAE may give [k·T, H, W, 3])."""
    frames = decoded.reshape(-1, *decoded.shape[-3:])
    if frames.shape[0] % k:
        raise NPOError(f"vae: decoded {frames.shape[0]} frames for {k} samples; use the model's own VAE.")
    per_frame = scorer.score(frames, [prompt] * frames.shape[0]).float().cpu()
    return per_frame.reshape(k, -1).mean(dim=1)


def generate(
    mp, vae, scorer, positive: list, negative: list, settings: GenerationSettings, latent_shape: tuple[int, ...],
    use_cache: bool, on_sample: Callable[[], None],
) -> Generated:
    """The pairs of ``settings`` (``positive``: one CONDITIONING entry per prompt); ``on_sample`` after each
    sample (progress, cancel)."""
    import comfy.sample

    fingerprint = model_fingerprint(mp)
    path = cache_path(settings, fingerprint)
    if use_cache:
        cached = _read_cache(path, settings, fingerprint)
        if cached is not None:
            return cached
    k = settings.samples_per_prompt
    good, bad, all_scores, best_i, worst_i = [], [], [], [], []
    for p, (prompt, entry) in enumerate(zip(settings.prompts, positive, strict=True)):
        seeds = [settings.seed + p * k + j for j in range(k)]
        noise = torch.cat([torch.randn(latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
        latents = []
        for j in range(k):  # one sample at a time: the memory of one image, and a cancel check after each
            lat = comfy.sample.sample(
                mp, noise[j : j + 1], settings.steps, settings.cfg, settings.sampler_name, settings.scheduler,
                [entry], negative, torch.zeros(latent_shape), seed=seeds[j], disable_pbar=True,
            )
            latents.append(lat.float().cpu())
            on_sample()
        batch = torch.cat(latents)
        scores = sample_scores(vae.decode(batch), k, scorer, prompt)
        try:
            b, w = pairs.best_and_worst(scores.tolist(), prompt)
        except pairs.PairError as e:
            raise NPOError(f"scorer: {e}") from None
        good.append(batch[b])
        bad.append(batch[w])
        all_scores.append(scores)
        best_i.append(b)
        worst_i.append(w)
    out = Generated(torch.stack(good), torch.stack(bad), torch.stack(all_scores), best_i, worst_i, False)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "format": CACHE_FORMAT, "settings": json.dumps(dataclasses.asdict(settings)), "fingerprint": fingerprint,
            "preferred": out.preferred, "rejected": out.rejected, "scores": out.scores,
            "best": torch.tensor(best_i), "worst": torch.tensor(worst_i),
        }
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    return out


def relative_cache_name(path: Path) -> str:
    return os.path.relpath(path, files.output_dir()).replace(os.sep, "/")
