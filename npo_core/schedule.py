"""Discrete VP noise schedules in k-diffusion (VE) form, DDIM steps and forward re-noising.

Conventions: integer timestep t ∈ [0, T); ᾱ_t = alphas_cumprod[t]; α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t);
ν_t = σ_t / α_t is the k-diffusion / ComfyUI "sigma" of eps- and v-prediction models. In VE space
x_ve = x_t / α_t = x_0 + ν_t·ε, and a denoiser D(x_ve, ν, c) returns the x0 estimate.
"""

from __future__ import annotations

import torch


class DiscreteSchedule:
    """A VP schedule on T integer timesteps (SD: scaled_linear, T = 1000)."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if ac.dim() != 1 or not bool(((ac > 0) & (ac < 1)).all()):
            raise ValueError("alphas_cumprod must be a 1-D tensor with values in (0, 1) (a VP schedule)")
        self.alphas_cumprod = ac
        self.nus = ((1 - ac) / ac).sqrt()

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @classmethod
    def scaled_linear(
        cls, timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
    ) -> DiscreteSchedule:
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1 - betas, 0))

    @classmethod
    def from_sigmas(cls, sigmas: torch.Tensor) -> DiscreteSchedule:
        """From k-diffusion sigmas ν_t (ComfyUI ``model_sampling.sigmas``): ᾱ = 1 / (1 + ν²)."""
        nu = torch.as_tensor(sigmas, dtype=torch.float64)
        return cls(1.0 / (1.0 + nu**2))

    def nu(self, t: torch.Tensor) -> torch.Tensor:
        """ν_t for integer timesteps ``t`` (any shape), float32."""
        return self.nus[t.long().cpu()].float().to(t.device)


def ddim_grid(points: int = 25, stride: int = 40) -> torch.Tensor:
    """The authors' DDIM grid t_k = stride·(k + 1) − 1, k = 0..points−1 (39, 79, …, 999)."""
    return torch.arange(points, dtype=torch.long) * stride + (stride - 1)


def ddim_step(x: torch.Tensor, x0: torch.Tensor, nu_t: torch.Tensor, nu_prev: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta 0) step in VE space: x_prev = x0 + ν_prev·(x − x0)/ν_t, i.e. an Euler step
    in ν. ``nu_*`` broadcast over the batch (shape [B])."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    eps = (x - x0) / nu_t.view(shape)
    return x0 + nu_prev.view(shape) * eps


def renoise(x_t: torch.Tensor, nu_t: torch.Tensor, nu_s: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Forward re-noising of x_t (not of an x0 estimate) to the noisier level s > t, in VE space:
    x_s = x_t + √(ν_s² − ν_t²)·ξ. In VP form: x_s = (α_s/α_t)·x_t + √(σ_s² − σ_t²·α_s²/α_t²)·ξ."""
    shape = (-1,) + (1,) * (x_t.dim() - 1)
    var = (nu_s**2 - nu_t**2).clamp_min(0)
    return x_t + var.sqrt().view(shape) * noise
