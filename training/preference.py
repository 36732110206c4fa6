"""One step of Diffusion-NPO's preference training: Diffusion-DPO with the preference reversed, as in the authors'
``DPO-DPO-NPO/train_sd15.py`` / ``train_sdxl.py``.

A pair is (preferred, rejected) latents of one prompt. NPO swaps it (their ``if label_0 == 1: im_tup =
im_tup[::-1]``): the *rejected* image takes DPO's "winner" slot w, so the offset learns what people dislike.
Per pair, with the offset δ on (policy) and off (reference, the same weights: no second copy):

1. one level t ~ U{0..L−1} of the model's own table and one noise ε, shared by both images of the pair;
2. x = noise(z, t, ε) for z = z_w and z = z_l (VP: VE space x = z + ν_t·ε; flow: x = (1 − t)·z + t·λε);
3. each side's per-sample MSE (mean over all but the batch dim) between the prediction and its target, in the
   model's parameterisation: eps (target ε), v (target α_t·ε − σ_t·z, diffusers' ``get_velocity``), or flow
   velocity (target λε − z, the CONST model's output); the predictions come from the denoiser's x0 estimate;
4. diff = loss_w − loss_l for the policy (``model_diff``) and the reference (``ref_diff``, no grad);
   logits = ref_diff − model_diff;
5. loss = −log σ(β·logits) ("sigmoid", the authors' default), relu(1 − β·logits) ("hinge"), or
   (logits − 1/(2β))² ("ipo"; the authors' script names ``args.beta`` there, which it never defines, so
   its IPO branch cannot run: β is ``beta_dpo`` here as in the other two).

Levels on a flow schedule are uniform over the model's shifted table: the shift of its ModelSampling is how
the family places its training timesteps, and the table records nothing else (no logit-normal parameters).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from . import conds as C
from .schedules import TDFTSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor, C.Cond], torch.Tensor]  # (x, sigma [B], cond) -> x0
AdapterOff = Callable[[], contextlib.AbstractContextManager]  # switches the offset off for the reference pass

LOSS_TYPES = ("sigmoid", "hinge", "ipo")
PREDICTIONS = ("eps", "v", "flow")
BETA = {"sd15": 500.0, "sdxl": 2000.0}  # the released sd15_beta500_2kiter and sdxl_beta2k_2kiter


@dataclass
class PreferenceConfig:
    beta: float = BETA["sd15"]
    loss_type: str = "sigmoid"
    prediction: str = "eps"  # the model's parameterisation: eps, v (VP schedules) or flow (CONST)

    def validate(self, schedule: TDFTSchedule) -> None:
        """Checks the config against the schedule it will run on."""
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if (self.prediction == "flow") != (schedule.kind == "flow"):
            raise ValueError(
                f"prediction {self.prediction!r} does not fit a {schedule.kind!r} schedule (flow goes with flow, "
                "eps / v with the VP ones)"
            )

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PairDraws:
    """One step's random numbers, one per pair (not per image): the level index and the noise, on the CPU."""

    level: torch.Tensor  # [P] int64
    eps: torch.Tensor  # one side's latent shape [P, ...], float32

    @classmethod
    def draw(cls, shape: tuple[int, ...], num_levels: int, gen: torch.Generator) -> PairDraws:
        level = torch.randint(0, num_levels, (shape[0],), generator=gen)
        return cls(level, torch.randn(shape, generator=gen, dtype=torch.float32))

    def rows(self, lo: int, hi: int) -> PairDraws:
        return PairDraws(self.level[lo:hi], self.eps[lo:hi])


def pair_noise(draws: PairDraws, like: torch.Tensor) -> torch.Tensor:
    """The noise of the 2P rows [w; l]: each pair's one ε, on both of its images."""
    return draws.eps.to(like.device, like.dtype).repeat(2, *([1] * (like.dim() - 1)))


def reversed_pair(preferred: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_w, z_l) for NPO: the rejected image in DPO's winner slot, the preferred one in the loser slot."""
    return rejected, preferred


def _view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))


def prediction_and_target(
    prediction: str,
    schedule: TDFTSchedule,
    x: torch.Tensor,
    x0_hat: torch.Tensor,
    z: torch.Tensor,
    eps: torch.Tensor,
    idx: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model-output-space prediction (from the denoiser's x0 estimate at x) and its target."""
    sigma = _view(schedule.sigma(idx), x)
    if prediction == "flow":
        lam = float(getattr(schedule, "noise_scale", 1.0))
        return (x - x0_hat) / sigma, lam * eps - z
    eps_hat = (x - x0_hat) / sigma  # VE space: x = z + ν·ε
    if prediction == "eps":
        return eps_hat, eps
    alpha = (1.0 + sigma.double() ** 2).rsqrt().to(x.dtype)  # √ᾱ = 1/√(1 + ν²); σ_vp = ν·√ᾱ
    s = sigma * alpha
    return alpha * eps_hat - s * x0_hat, alpha * eps - s * z


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every dim but the batch, in fp32."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)


def preference_loss(model_diff: torch.Tensor, ref_diff: torch.Tensor, beta: float, loss_type: str):
    """(loss, logits) with logits = ref_diff − model_diff."""
    logits = ref_diff - model_diff
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * logits).mean(), logits
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits).mean(), logits
    if loss_type == "ipo":
        return ((logits - 1 / (2 * beta)) ** 2).mean(), logits
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


@dataclass
class PreferenceStep:
    loss: torch.Tensor  # scalar, with grad through the policy pass
    logits: torch.Tensor  # [P], detached
    model_losses: torch.Tensor  # [2P] policy MSE, w rows then l rows, detached
    ref_losses: torch.Tensor  # [2P] reference MSE
    denoiser_rows: int  # batch rows evaluated (policy + reference)

    @property
    def implicit_accuracy(self) -> float:
        """Share of pairs whose logit is > 0 (ties count half), as the authors log it."""
        n = self.logits.numel()
        return float(((self.logits > 0).sum() + 0.5 * (self.logits == 0).sum()) / n)


def preference_step(
    denoiser: Denoiser,
    adapter_off: AdapterOff,
    preferred: torch.Tensor,
    rejected: torch.Tensor,
    cond: C.Cond,
    schedule: TDFTSchedule,
    cfg: PreferenceConfig,
    draws: PairDraws,
) -> PreferenceStep:
    """The reversed-DPO loss of P pairs (``preferred`` / ``rejected`` [P, ...] latents, ``cond`` P rows). The
    denoiser runs once on the 2P noised images with the offset on and once, without grad, under
    ``adapter_off()``."""
    z_w, z_l = reversed_pair(preferred, rejected)
    z = torch.cat([z_w, z_l])
    eps = pair_noise(draws, z)
    idx = draws.level.repeat(2)
    x = schedule.noise(z, idx, eps)
    sigma = schedule.sigma(idx).to(z.device)
    c = C.cat([cond, cond])

    def losses(x0_hat: torch.Tensor) -> torch.Tensor:
        return per_sample_mse(*prediction_and_target(cfg.prediction, schedule, x, x0_hat, z, eps, idx))

    with torch.no_grad(), adapter_off():
        ref_losses = losses(denoiser(x, sigma, c))
    model_losses = losses(denoiser(x, sigma, c))
    model_w, model_l = model_losses.chunk(2)
    ref_w, ref_l = ref_losses.chunk(2)
    loss, logits = preference_loss(model_w - model_l, ref_w - ref_l, cfg.beta, cfg.loss_type)
    return PreferenceStep(loss, logits.detach(), model_losses.detach(), ref_losses, 2 * x.shape[0])
