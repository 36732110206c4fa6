"""One step of truncated diffusion fine-tuning (TDFT), as in the authors' ``Self-NPO/train.py``.

The schedule (``training.schedules``: discrete VP, zero-terminal-SNR VP or flow, built from the model's
own sigma table) supplies the levels, the start noising, the teacher step and the re-noising; a denoiser
D(x, sigma, cond) returns the x0 estimate in the model's own x-space (VP: VE space x_ve = x_0 + ν·ε,
sigma = ν, eps and v alike, the host converts; flow: x_t = t·ε + (1 − t)·x_0, sigma = t). Levels are
indices into the table. Per sample, on the discrete VP schedule (the authors' case):

1. start: k ~ U{0..N−1} on the grid t_k = 40(k+1) − 1; x = z0 + ν_{t_k}·ε   (the authors' data start)
2. teacher (EMA of the student, no grad), K deterministic DDIM steps with guidance weight w:
   x0_g = x0_c + w·(x0_c − x0_u); step to the previous grid point (k = 0 steps to t = 0, then frozen)
3. target = the teacher's guided x0 at the truncated state (x_t, t_end)         — not the clean latent
4. s ~ U{t_end+1 .. T−1}; x_s = x_t + √(ν_s² − ν_t²)·ξ                         — re-noise x_t, not x0
5. loss = pseudo-Huber(D_student(x_s, ν_s, c_student) − target), c = 1e-3 (or MSE)

On a flow schedule the same five steps run on the model's table of L shifted sigmas: grid index
⌊(k+1)L/N⌋ − 1; start x = (1 − t)·z0 + t·ε; K Euler steps x ← x + (t' − t)·(x − x0_g)/t (deterministic DDIM
on the interpolation); s ~ U{t_end+1 .. L−1}; x_s = ((1 − s)/(1 − t))·x_t + √(s² − t²(1 − s)²/(1 − t)²)·ξ;
the student's x0 = D(x_s, s) = x_s − s·v.

With w = −1 the guided prediction equals the unconditional one, so the conditional pass is skipped;
otherwise cond and uncond run as one batch (the authors' code makes 12 unbatched calls per sample).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from . import conds as C
from .schedules import TDFTSchedule, level_above

Denoiser = Callable[[torch.Tensor, torch.Tensor, C.Cond], torch.Tensor]  # (x, sigma [B], cond) -> x0
Schedule = TDFTSchedule

STUDENT_CONDS = ("prompt", "negative", "mix")
AUTO = "auto"  # the node's default: resolved per schedule kind by resolve_student_cond


def resolve_student_cond(choice: str, schedule_kind: str) -> str:
    """``auto`` → the unconditional ("negative") student on flow (CONST) schedules, the authors' prompt student on
    VP schedules (eps / v / x0, zero-terminal-SNR v); any other choice is kept."""
    if choice != AUTO:
        return choice
    return "negative" if schedule_kind == "flow" else "prompt"
LOSSES = ("pseudo_huber", "mse")


@dataclass
class TDFTConfig:
    truncation_steps: int = 5  # K
    grid_points: int = 25  # N
    grid_stride: int = 40  # VP grid only; a flow grid spans its whole table (N points, spacing L/N)
    teacher_guidance: float = -1.0  # w: −1 (SD1.5 code), −5 (SDXL code)
    loss: str = "pseudo_huber"
    huber_c: float = 1e-3
    student_cond: str = "prompt"  # what the student is conditioned on: the prompt (authors), the negative, or a mix
    mix_prob: float = 0.5  # P(prompt) per sample when student_cond == "mix"

    def validate(self, schedule: Schedule) -> None:
        """Checks the config against the schedule it will run on."""
        if self.truncation_steps < 1:
            raise ValueError(f"truncation_steps must be ≥ 1, got {self.truncation_steps}")
        schedule.check_grid(self.grid_points, self.grid_stride)
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.student_cond not in STUDENT_CONDS:
            raise ValueError(f"student_cond must be one of {STUDENT_CONDS}, got {self.student_cond!r}")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StepDraws:
    """One optimizer step's random numbers, per sample, drawn on the CPU in the order the loop consumes them (start
    grid index ``k``, start noise ``eps``, the student's prompt-or-negative ``mix`` mask for student_cond mix, the
    uniform ``u`` of the student's level, the re-noise ``xi``), so a step's samples get the same numbers however its
    batch is split into micro-batches."""

    k: torch.Tensor  # [N] int64
    eps: torch.Tensor  # z0's shape, float32
    mix: torch.Tensor | None  # [N] bool (True: the prompt), student_cond mix only
    u: torch.Tensor  # [N] float64 in [0, 1)
    xi: torch.Tensor  # z0's shape, float32

    @classmethod
    def draw(cls, shape: tuple[int, ...], cfg: TDFTConfig, gen: torch.Generator) -> StepDraws:
        b = shape[0]
        k = torch.randint(0, cfg.grid_points, (b,), generator=gen)
        eps = torch.randn(shape, generator=gen, dtype=torch.float32)
        mix = torch.rand(b, generator=gen) < cfg.mix_prob if cfg.student_cond == "mix" else None
        u = torch.rand((b,), generator=gen, dtype=torch.float64)
        xi = torch.randn(shape, generator=gen, dtype=torch.float32)
        return cls(k, eps, mix, u, xi)

    def rows(self, lo: int, hi: int) -> StepDraws:
        """The draws of samples lo..hi−1 (one micro-batch)."""
        return StepDraws(self.k[lo:hi], self.eps[lo:hi], None if self.mix is None else self.mix[lo:hi],
                         self.u[lo:hi], self.xi[lo:hi])


@dataclass
class Rollout:
    x_t: torch.Tensor  # truncated state (the model's x-space: VE for VP, x_t for flow)
    t_end: torch.Tensor  # its level index (VP: integer timestep) per sample
    target: torch.Tensor  # teacher's guided x0 estimate at (x_t, t_end)
    t_start: torch.Tensor
    teacher_calls: int  # denoiser calls made
    teacher_rows: int  # total batch rows evaluated by the teacher


def guided_x0(
    denoiser: Denoiser, x: torch.Tensor, nu: torch.Tensor, cond_pos: C.Cond, cond_neg: C.Cond, w: float
) -> tuple[torch.Tensor, int]:
    """x0_c + w·(x0_c − x0_u) and the number of rows evaluated. w = −1 → x0_u alone, w = 0 → x0_c alone."""
    if w == -1.0:
        return denoiser(x, nu, cond_neg), x.shape[0]
    if w == 0.0:
        return denoiser(x, nu, cond_pos), x.shape[0]
    out = denoiser(torch.cat([x, x]), torch.cat([nu, nu]), C.cat([cond_pos, cond_neg]))
    x0_c, x0_u = out.chunk(2)
    return x0_c + w * (x0_c - x0_u), 2 * x.shape[0]


def sample_start(
    z0: torch.Tensor, schedule: Schedule, cfg: TDFTConfig, gen: torch.Generator, draws: StepDraws | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid index k per sample and the noised start (VP: x = z0 + ν_{t_k}·ε; flow: (1 − t)·z0 + t·ε),
    randomness from ``draws`` or else ``gen``, on CPU."""
    b = z0.shape[0]
    if draws is None:
        k = torch.randint(0, cfg.grid_points, (b,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen, dtype=torch.float32)
    else:
        k, eps = draws.k, draws.eps
    t = schedule.grid(cfg.grid_points, cfg.grid_stride)[k]
    return k, schedule.noise(z0, t, eps.to(z0.device, z0.dtype))


@torch.no_grad()
def teacher_rollout(
    teacher: Denoiser,
    schedule: Schedule,
    z0: torch.Tensor,
    cond_pos: C.Cond,
    cond_neg: C.Cond,
    cfg: TDFTConfig,
    gen: torch.Generator,
    draws: StepDraws | None = None,
) -> Rollout:
    """K guided DDIM (VP) / Euler (flow) steps from the noised start, then the target. Samples that
    reached level 0 are frozen (as in the authors' code) and, unlike there, not evaluated again until the
    final target."""
    grid = schedule.grid(cfg.grid_points, cfg.grid_stride)
    k, x = sample_start(z0, schedule, cfg, gen, draws)
    t = grid[k]
    t_start = t.clone()
    dev, dt = z0.device, z0.dtype
    calls = rows = 0
    for _ in range(cfg.truncation_steps):
        active = k >= 0
        idx = active.nonzero().flatten()
        if idx.numel() == 0:
            break
        ta = t[idx]
        xa = x[idx.to(dev)]
        x0_g, n = guided_x0(
            teacher,
            xa,
            schedule.sigma(ta).to(dev, dt),
            C.index(cond_pos, idx),
            C.index(cond_neg, idx),
            cfg.teacher_guidance,
        )
        calls, rows = calls + 1, rows + n
        ka = k[idx]
        t_prev = torch.where(ka >= 1, grid[(ka - 1).clamp_min(0)], torch.zeros_like(ta))
        x = x.index_copy(0, idx.to(dev), schedule.step(xa, x0_g, ta, t_prev))
        t = t.index_copy(0, idx, t_prev)
        k = k.index_copy(0, idx, ka - 1)
    target, n = guided_x0(teacher, x, schedule.sigma(t).to(dev, dt), cond_pos, cond_neg, cfg.teacher_guidance)
    return Rollout(x, t, target, t_start, calls + 1, rows + n)


def loss_fn(pred: torch.Tensor, target: torch.Tensor, cfg: TDFTConfig) -> torch.Tensor:
    d = pred.float() - target.float()
    if cfg.loss == "mse":
        return d.square().mean()
    c = cfg.huber_c
    return (torch.sqrt(d.square() + c * c) - c).mean()


def student_cond(
    cond_pos: C.Cond, cond_neg: C.Cond, cfg: TDFTConfig, batch: int, gen: torch.Generator,
    draws: StepDraws | None = None,
) -> C.Cond:
    if cfg.student_cond == "prompt":
        return cond_pos
    if cfg.student_cond == "negative":
        return cond_neg
    mask = torch.rand(batch, generator=gen) < cfg.mix_prob if draws is None else draws.mix
    return C.where(mask, cond_pos, cond_neg)


def student_loss(
    student: Denoiser, schedule: Schedule, roll: Rollout, cond: C.Cond, cfg: TDFTConfig, gen: torch.Generator,
    draws: StepDraws | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of the student on the re-noised truncated state (the mean over the batch's elements); returns (loss, s).
    The student's x0 comes from the denoiser at level s (flow: x_s − s·v), the loss is in x0 space."""
    x_t = roll.x_t
    dev, dt = x_t.device, x_t.dtype
    if draws is None:
        s = schedule.sample_level(roll.t_end, gen)
        xi = torch.randn(x_t.shape, generator=gen, dtype=torch.float32)
    else:
        s = level_above(roll.t_end, schedule.num_levels, draws.u)
        xi = draws.xi
    xi = xi.to(dev, dt)
    x_s = schedule.renoise(x_t, roll.t_end, s, xi)
    pred = student(x_s, schedule.sigma(s).to(dev, dt), cond)
    return loss_fn(pred, roll.target, cfg), s
