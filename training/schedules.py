"""The noise schedules TDFT runs on, behind one small interface, built from the model's own sigma table.

Every schedule is a table of L noise levels indexed 0..L−1 from the least to the most noisy (ComfyUI's
``model_sampling.sigmas``, in that order). TDFT only ever works with *indices* into that table: the grid,
the truncated level t_end and the student's level s are indices; the schedule turns them into the value
the denoiser receives, the start state, the teacher step and the re-noising.

- :class:`VPSchedule` (kind ``"vp"``, ``"vp_zsnr"``): discrete VP eps / v / x0 models in VE space,
  x_ve = x0 + ν·ε, denoiser D(x_ve, ν, c). It wraps :class:`npo_core.schedule.DiscreteSchedule` and the
  authors' DDIM grid (25 points, stride 40) and computes exactly what ``training.tdft`` computed before
  the abstraction (the same operations in the same order: bit-identical). ``"vp_zsnr"`` accepts a
  zero-terminal-SNR table (V_PREDICTION_DDPM, CogVideoX) whose last ν is ∞ (see ``DiscreteSchedule``).
- :class:`FlowSchedule` (kind ``"flow"``): ComfyUI CONST models (SD3, Wan, HiDream, Lumina2, Flux,
  Chroma, Qwen-Image, LTX, …), x_t = t·λε + (1 − t)·x0, denoiser D(x_t, t, c) → x0 = x_t − t·v. The table
  is the model's shifted sigmas (1000 for ModelSamplingDiscreteFlow, 10000 for ModelSamplingFlux, with
  whatever shift or resolution-dependent mu the model carries). Its grid mirrors the authors' one: N
  points evenly spaced over the table's indices, top point the noisiest (index L−1), i.e. index
  ⌊(k+1)·L/N⌋ − 1 for k = 0..N−1 (= 40k + 39 for L = 1000, N = 25; 400k + 399 for L = 10000).

Make one with :func:`make_schedule` (kind, sigma table).
"""

from __future__ import annotations

import hashlib
from typing import Protocol, runtime_checkable

import torch

from ..npo_core.schedule import (
    DiscreteSchedule,
    ddim_grid,
    ddim_step,
    flow_euler_step,
    flow_noise,
    flow_renoise,
    renoise,
)

KINDS = ("vp", "vp_zsnr", "flow")


def level_above(t_end: torch.Tensor, num_levels: int, u: torch.Tensor) -> torch.Tensor:
    """s = the level ⌊u·(L − lo)⌋ above lo = t_end + 1 per sample, for u ~ U[0, 1) float64: s ~ U{t_end+1, …, L−1}
    (strictly noisier than t_end; t_end = L−1 cannot occur on a grid after ≥ 1 teacher step)."""
    lo = (t_end + 1).clamp_max(num_levels - 1)
    return (lo + (u * (num_levels - lo).double()).long()).clamp_max(num_levels - 1)


def sample_level_above(t_end: torch.Tensor, num_levels: int, gen: torch.Generator) -> torch.Tensor:
    """``level_above`` with u drawn from ``gen`` (one float64 per sample)."""
    return level_above(t_end, num_levels, torch.rand(t_end.shape, generator=gen, dtype=torch.float64))


@runtime_checkable
class TDFTSchedule(Protocol):
    """What TDFT needs of a schedule. Level indices are CPU int64 tensors [B]."""

    kind: str

    @property
    def num_levels(self) -> int:
        """L, the length of the sigma table."""
        ...

    def grid(self, points: int, stride: int) -> torch.Tensor:
        """The N grid level indices, ascending; the teacher steps from grid[k] to grid[k−1] (k = 0: to 0)."""
        ...

    def check_grid(self, points: int, stride: int) -> None:
        """ValueError if that grid does not fit the table."""
        ...

    def sigma(self, idx: torch.Tensor) -> torch.Tensor:
        """The noise level the denoiser receives at these indices (VP: ν; flow: t), float32, on idx's device."""
        ...

    def noise(self, z0: torch.Tensor, idx: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The forward state of clean z0 at level idx with standard noise eps."""
        ...

    def step(self, x: torch.Tensor, x0: torch.Tensor, idx: torch.Tensor, idx_prev: torch.Tensor) -> torch.Tensor:
        """One deterministic teacher step from idx to the less noisy idx_prev, given the (guided) x0."""
        ...

    def renoise(self, x_t: torch.Tensor, idx_t: torch.Tensor, idx_s: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        """Forward re-noising of x_t (level idx_t) to the noisier idx_s with standard noise xi."""
        ...

    def sample_level(self, idx_t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The student's level s, strictly noisier than idx_t, drawn on the table."""
        ...

    def fingerprint(self) -> str:
        """A short text naming the kind and the table (stored in checkpoints, compared on resume)."""
        ...


def _table_hash(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().to(torch.float64).cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


class VPSchedule:
    """Discrete VP in VE space; exactly the pre-abstraction TDFT arithmetic (see the module docstring)."""

    def __init__(self, schedule: DiscreteSchedule, kind: str = "vp") -> None:
        self.schedule = schedule
        self.kind = kind

    @property
    def num_levels(self) -> int:
        return self.schedule.num_timesteps

    def grid(self, points: int, stride: int) -> torch.Tensor:
        return ddim_grid(points, stride)

    def check_grid(self, points: int, stride: int) -> None:
        if points < 1 or stride < 1 or points * stride > self.num_levels:
            raise ValueError(
                f"the DDIM grid ({points} points, stride {stride}) does not fit {self.num_levels} timesteps"
            )

    def sigma(self, idx: torch.Tensor) -> torch.Tensor:
        return self.schedule.nu(idx)

    def noise(self, z0: torch.Tensor, idx: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        nu = self.schedule.nu(idx).to(z0.device, z0.dtype)
        return z0 + nu.view(-1, *([1] * (z0.dim() - 1))) * eps

    def step(self, x: torch.Tensor, x0: torch.Tensor, idx: torch.Tensor, idx_prev: torch.Tensor) -> torch.Tensor:
        dev, dt = x.device, x.dtype
        return ddim_step(x, x0, self.schedule.nu(idx).to(dev, dt), self.schedule.nu(idx_prev).to(dev, dt))

    def renoise(self, x_t: torch.Tensor, idx_t: torch.Tensor, idx_s: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        dev, dt = x_t.device, x_t.dtype
        return renoise(x_t, self.schedule.nu(idx_t).to(dev, dt), self.schedule.nu(idx_s).to(dev, dt), xi)

    def sample_level(self, idx_t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return sample_level_above(idx_t, self.num_levels, gen)

    def fingerprint(self) -> str:
        return f"{self.kind}/{self.num_levels}/{_table_hash(self.schedule.alphas_cumprod)}"


class FlowSchedule:
    """Flow matching (ComfyUI CONST) on the model's own shifted sigma table ``sigmas`` (ascending, in
    (0, 1]); ``noise_scale`` is the model's ``model_sampling.noise_scale`` (λ, 1 but for HiDream-O1)."""

    kind = "flow"

    def __init__(self, sigmas: torch.Tensor, noise_scale: float = 1.0) -> None:
        t = torch.as_tensor(sigmas).detach().to(torch.float64).cpu()
        if t.dim() != 1 or t.shape[0] < 2:
            raise ValueError(f"flow sigmas must be a 1-D table of ≥ 2 levels, got shape {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()) or not bool(((t > 0) & (t <= 1)).all()):
            raise ValueError(
                "flow sigmas must lie in (0, 1] (ComfyUI CONST sigmas t after the shift); got "
                f"{float(t.min()):.4g} .. {float(t.max()):.4g}: is this a VP table (kind 'vp')?"
            )
        if not bool((t[1:] > t[:-1]).all()):
            raise ValueError("flow sigmas must increase strictly from the least to the most noisy level")
        if not noise_scale > 0:
            raise ValueError(f"noise_scale must be > 0, got {noise_scale}")
        self.sigmas = t
        self.noise_scale = float(noise_scale)

    @property
    def num_levels(self) -> int:
        return int(self.sigmas.shape[0])

    def grid(self, points: int, stride: int) -> torch.Tensor:
        """⌊(k+1)·L/N⌋ − 1, k = 0..N−1. ``stride`` is the VP grid's and is not used: the flow grid always
        spans the whole table (the authors' stride 40 is 1000/25)."""
        k = torch.arange(1, points + 1, dtype=torch.long)
        return k * self.num_levels // points - 1

    def check_grid(self, points: int, stride: int) -> None:
        if points < 1 or points > self.num_levels:
            raise ValueError(f"the grid ({points} points) does not fit the {self.num_levels} levels of the table")

    def sigma(self, idx: torch.Tensor) -> torch.Tensor:
        return self.sigmas[idx.long().cpu()].float().to(idx.device)

    def noise(self, z0: torch.Tensor, idx: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return flow_noise(z0, self.sigma(idx).to(z0.device, z0.dtype), eps, self.noise_scale)

    def step(self, x: torch.Tensor, x0: torch.Tensor, idx: torch.Tensor, idx_prev: torch.Tensor) -> torch.Tensor:
        dev, dt = x.device, x.dtype
        return flow_euler_step(x, x0, self.sigma(idx).to(dev, dt), self.sigma(idx_prev).to(dev, dt))

    def renoise(self, x_t: torch.Tensor, idx_t: torch.Tensor, idx_s: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        # coefficients from the float64 table, not from float32 copies: 1 − t stays exact near t = 1
        t, s = self.sigmas[idx_t.long().cpu()], self.sigmas[idx_s.long().cpu()]
        return flow_renoise(x_t, t, s, xi, self.noise_scale)

    def sample_level(self, idx_t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return sample_level_above(idx_t, self.num_levels, gen)

    def fingerprint(self) -> str:
        return f"flow/{self.num_levels}/{self.noise_scale:g}/{_table_hash(self.sigmas)}"


def make_schedule(kind: str, sigmas: torch.Tensor, noise_scale: float = 1.0) -> TDFTSchedule:
    """The TDFT schedule of a model from its ``model_sampling.sigmas`` (ascending) and its kind:

    - ``"vp"``: discrete eps / v / x0 (ModelSamplingDiscrete + EPS / V_PREDICTION / X0); sigmas = ν.
    - ``"vp_zsnr"``: V_PREDICTION_DDPM or any zero-terminal-SNR discrete table; a last ν = ∞ is clamped
      to ComfyUI's own terminal value (``DiscreteSchedule``'s docstring says why).
    - ``"flow"``: CONST (ModelSamplingDiscreteFlow, ModelSamplingFlux and their subclasses); sigmas = t
      after the shift; ``noise_scale`` = ``model_sampling.noise_scale`` where it exists."""
    if kind not in KINDS:
        raise ValueError(f"schedule kind must be one of {KINDS}, got {kind!r}")
    if kind == "flow":
        return FlowSchedule(sigmas, noise_scale)
    if noise_scale != 1.0:
        raise ValueError("noise_scale applies to flow schedules only")
    return VPSchedule(DiscreteSchedule.from_sigmas(sigmas, zero_terminal_snr=kind == "vp_zsnr"), kind)
