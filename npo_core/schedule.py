"""Noise schedules for TDFT: discrete VP in k-diffusion (VE) form, and flow matching (CONST).

Discrete VP. Conventions: integer timestep t ∈ [0, T); ᾱ_t = alphas_cumprod[t]; α_t = √ᾱ_t,
σ_t = √(1 − ᾱ_t); ν_t = σ_t / α_t is the k-diffusion / ComfyUI "sigma" of eps- and v-prediction models.
In VE space x_ve = x_t / α_t = x_0 + ν_t·ε, and a denoiser D(x_ve, ν, c) returns the x0 estimate.

Flow (ComfyUI's CONST): x_t = t·λε + (1 − t)·x_0 with t = sigma ∈ (0, 1] after the model's shift and
λ = ``noise_scale`` (1 for every family but HiDream-O1); the model's x0 = x_t − t·v and the denoiser
D(x_t, t, c) returns it.
"""

from __future__ import annotations

import torch

# ᾱ of the terminal step of a zero-terminal-SNR schedule, as ComfyUI writes it
# (``rescale_zero_terminal_snr_sigmas``: alphas_bar[-1] = 4.8973451890853435e-08, so ν_max ≈ 4518.8).
ZSNR_TERMINAL_ALPHA_BAR = 4.8973451890853435e-08


class DiscreteSchedule:
    """A VP schedule on T integer timesteps (SD: scaled_linear, T = 1000).

    ``zero_terminal_snr``: the schedule of a zero-terminal-SNR model (ComfyUI ``V_PREDICTION_DDPM``,
    CogVideoX; ``zsnr`` SD checkpoints), whose last ᾱ may be exactly 0 (ν = ∞: x_T is pure noise and has no
    finite VE form). A last ᾱ of 0 is clamped to :data:`ZSNR_TERMINAL_ALPHA_BAR`, the value ComfyUI itself
    samples such models with; every other entry must still lie in (0, 1). Clamping rather than dropping
    the point keeps the authors' grid (its top point t = T−1 is the data-free start x_T) and lets the
    student train at s = T−1, the level sampling starts from. At that level α ≈ 2.2e-4, so the VP state
    is pure noise up to 2e-4 of signal, exactly as in ComfyUI's sampling; VE values there are ≈ 4519·ε,
    which float32 holds with a relative error of 6e-8."""

    def __init__(self, alphas_cumprod: torch.Tensor, zero_terminal_snr: bool = False) -> None:
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if zero_terminal_snr and ac.dim() == 1 and ac.shape[0] > 1 and float(ac[-1]) == 0.0:
            ac = ac.clone()
            ac[-1] = ZSNR_TERMINAL_ALPHA_BAR
        if ac.dim() != 1 or not bool(((ac > 0) & (ac < 1)).all()):
            if ac.dim() == 1 and ac.shape[0] > 1 and float(ac[-1]) == 0.0:
                raise ValueError(
                    "alphas_cumprod ends at 0 (zero terminal SNR, sigma = inf at the last step): build the "
                    "schedule with zero_terminal_snr=True (kind 'vp_zsnr')"
                )
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
    def from_sigmas(cls, sigmas: torch.Tensor, zero_terminal_snr: bool = False) -> DiscreteSchedule:
        """From k-diffusion sigmas ν_t (ComfyUI ``model_sampling.sigmas``): ᾱ = 1 / (1 + ν²).
        ν = inf gives ᾱ = 0 (see ``zero_terminal_snr``)."""
        nu = torch.as_tensor(sigmas, dtype=torch.float64)
        return cls(1.0 / (1.0 + nu**2), zero_terminal_snr)

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


def flow_noise(z0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, noise_scale: float = 1.0) -> torch.Tensor:
    """The forward state of a flow model (ComfyUI ``CONST.noise_scaling``): x_t = t·λε + (1 − t)·x0."""
    shape = (-1,) + (1,) * (z0.dim() - 1)
    t = t.view(shape)
    return t * (noise_scale * eps) + (1.0 - t) * z0


def flow_euler_step(x: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor) -> torch.Tensor:
    """One Euler step of the probability-flow ODE from t to t_prev with the denoiser's x0:
    v = (x − x0)/t, x_prev = x + (t_prev − t)·v (ComfyUI ``sample_euler`` on a CONST model; the flow form of
    a deterministic DDIM step). ``t``, ``t_prev`` have shape [B]; t > 0."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    v = (x - x0) / t.view(shape)
    return x + (t_prev - t).view(shape) * v


# the floor of the denominator 1 − t in flow_renoise_coefficients (t within 1e-12 of 1 counts as 1)
FLOW_T1_GUARD = 1e-12


def flow_renoise_coefficients(t: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of the marginal-preserving re-noising x_s = a·x_t + b·λξ from t to a noisier s ≥ t:
    a = (1 − s)/(1 − t), b = √(s² − t²·a²) (the authors' formula with α = 1 − t, σ = t; ComfyUI's
    ``sample_euler_ancestral_RF`` re-noise). Computed in float64.

    Guard 1 − t → 0. Near t = 1, x_t = λε + (1 − t)(x0 − λε) is (almost) pure noise. For s > t,
    1 − t > 1 − s ≥ 0, so a ∈ [0, 1) stays bounded however close t is to 1, and b² = s² − t²a² ≥ s² − t² > 0;
    in floating point a is clamped to [0, 1] and b² to ≥ 0, and 1 − t is held at ≥ :data:`FLOW_T1_GUARD`, so
    no inf or NaN is ever formed (not even in the branch that s ≤ t discards). What the guard changes
    (1 − t < 1e-12, float64 only: a float32 t is 1 or ≥ 6e-8 below it) keeps the marginal: whatever
    a ∈ [0, 1] results, b keeps the noise variance at s² (t²a² + b² = s²) and the x0 share a(1 − t) stays
    within 1e-12 of 1 − s. s = 1 (reachable from any t < 1 on a table) gives a = 0: x_s = λξ, fresh pure
    noise, the formula's own value. s ≤ t is not a re-noising: the identity (a = 1, b = 0), which covers
    t = 1 exactly, where only s = t = 1 exists (x_t is pure noise and stays as it is)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    s = torch.as_tensor(s, dtype=torch.float64)
    a = ((1.0 - s) / (1.0 - t).clamp_min(FLOW_T1_GUARD)).clamp(0.0, 1.0)
    a = torch.where(s <= t, torch.ones_like(a), a)
    b = (s.square() - (t * a).square()).clamp_min(0.0).sqrt()
    return a, b


def flow_renoise(
    x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, noise: torch.Tensor, noise_scale: float = 1.0
) -> torch.Tensor:
    """Forward re-noising of a flow state x_t (not of an x0 estimate) to the noisier level s > t:
    x_s = ((1 − s)/(1 − t))·x_t + √(s² − t²(1 − s)²/(1 − t)²)·λξ; see :func:`flow_renoise_coefficients`."""
    shape = (-1,) + (1,) * (x_t.dim() - 1)
    a, b = flow_renoise_coefficients(t, s)
    a = a.to(x_t.device, x_t.dtype).view(shape)
    b = b.to(x_t.device, x_t.dtype).view(shape)
    return a * x_t + b * (noise_scale * noise)
