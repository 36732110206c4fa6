"""TDFT on the model's own schedule: flow (CONST, with the model's shift), Flux's sampling, zero terminal
SNR. Every expected value is computed by hand here (ComfyUI's shift formulas, the Euler step, the
re-noising formula), never taken from the code under test."""

import copy
import math

import numpy as np
import pytest
import torch
from tiny_denoiser import TinyEps, denoiser_of
from torch import nn

from comfyui_npo.npo_core.schedule import (
    ZSNR_TERMINAL_ALPHA_BAR,
    DiscreteSchedule,
    flow_renoise,
    flow_renoise_coefficients,
)
from comfyui_npo.training import tdft
from comfyui_npo.training.data import StartData
from comfyui_npo.training.schedules import FlowSchedule, VPSchedule, make_schedule
from comfyui_npo.training.trainer import Callbacks, TrainConfig, TrainingError, train


def discrete_flow_sigmas(shift: float, n: int = 1000) -> np.ndarray:
    """ComfyUI ModelSamplingDiscreteFlow.sigmas by hand: t = i/n, i = 1..n, sigma = shift·t/(1 + (shift−1)·t)."""
    t = np.arange(1, n + 1, dtype=np.float64) / n
    return shift * t / (1 + (shift - 1) * t)


def flux_sigmas(mu: float, n: int = 10000) -> np.ndarray:
    """ComfyUI ModelSamplingFlux.sigmas by hand (time_snr_shift with mu): e^mu / (e^mu + (1/t − 1)), t = i/n."""
    t = np.arange(1, n + 1, dtype=np.float64) / n
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def f32(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float32)  # ComfyUI keeps the table as a float32 buffer


SD3 = make_schedule("flow", f32(discrete_flow_sigmas(3.0)))


# ---------------------------------------------------------------------------------------------- the grid


def test_grid_on_a_shifted_discrete_flow_table_by_hand():
    table = discrete_flow_sigmas(3.0)
    g = SD3.grid(25, 40)
    assert g.tolist() == [40 * k + 39 for k in range(25)]  # N = 25 evenly spaced over 1000, top = noisiest
    want = [3 * (40 * (k + 1) / 1000) / (1 + 2 * (40 * (k + 1) / 1000)) for k in range(25)]
    np.testing.assert_allclose(SD3.sigma(g).numpy(), want, rtol=1e-6)
    np.testing.assert_allclose(SD3.sigma(g).numpy(), table[g.numpy()], rtol=1e-6)
    # literal values: top t = 1 → 1; t = 0.96 → 2.88/2.92; t = 0.04 → 0.12/1.08
    assert SD3.sigma(g[-1:]).item() == 1.0
    assert SD3.sigma(g[-2:-1]).item() == pytest.approx(2.88 / 2.92, rel=1e-6)
    assert SD3.sigma(g[:1]).item() == pytest.approx(0.12 / 1.08, rel=1e-6)
    # the shift moves the grid's sigmas: on shift 8 (Wan) the same indices are much noisier
    wan = make_schedule("flow", f32(discrete_flow_sigmas(8.0)))
    assert wan.sigma(g[:1]).item() == pytest.approx(8 * 0.04 / (1 + 7 * 0.04), rel=1e-6)
    # N that does not divide the table: ⌊(k+1)·1000/7⌋ − 1
    assert SD3.grid(7, 40).tolist() == [141, 284, 427, 570, 713, 856, 999]


def test_grid_on_the_flux_table_with_a_resolution_mu_by_hand():
    # ComfyUI's ModelSamplingFlux node at 768×768: mu = base + (max − base)·(tokens − 256)/(4096 − 256)
    tokens = 768 * 768 / (8 * 8 * 2 * 2)
    mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)
    assert mu == pytest.approx(0.846667, abs=1e-6)
    sched = make_schedule("flow", f32(flux_sigmas(mu)))
    assert sched.num_levels == 10000
    g = sched.grid(25, 40)  # the VP stride does not apply: spacing 10000/25 = 400
    assert g.tolist() == [400 * k + 399 for k in range(25)]
    t = 400 * (np.arange(25) + 1) / 10000
    want = math.exp(mu) / (math.exp(mu) + 1 / t - 1)
    np.testing.assert_allclose(sched.sigma(g).numpy(), want, rtol=1e-6)
    # mid grid point, t = 0.52, and the top point t = 1
    assert sched.sigma(g[12:13]).item() == pytest.approx(math.exp(mu) / (math.exp(mu) + 1 / 0.52 - 1), rel=1e-6)
    assert sched.sigma(g[-1:]).item() == 1.0


def test_flow_tables_are_checked():
    with pytest.raises(ValueError, match="is this a VP table"):
        make_schedule("flow", DiscreteSchedule.scaled_linear().nus.float())  # ν up to 14.6
    with pytest.raises(ValueError, match="increase strictly"):
        make_schedule("flow", torch.tensor([0.1, 0.5, 0.5, 1.0]))
    with pytest.raises(ValueError, match="kind"):
        make_schedule("edm", torch.tensor([0.1, 1.0]))
    with pytest.raises(ValueError, match="does not fit"):
        tdft.TDFTConfig(grid_points=11).validate(make_schedule("flow", torch.linspace(0.1, 1.0, 10)))
    tdft.TDFTConfig(grid_points=25).validate(SD3)  # stride 40 is the VP grid's; no check on flow


# ---------------------------------------------------------------------------------------------- one step


def test_one_euler_step_by_hand():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 4)
    a, b = 0.3, torch.tensor([0.5, -1.0]).view(1, 2, 1)
    i, j = torch.tensor([999, 519, 79]), torch.tensor([959, 479, 39])
    ti = torch.tensor([3 * u / (1 + 2 * u) for u in (1.0, 0.52, 0.08)]).view(3, 1, 1)
    tj = torch.tensor([3 * u / (1 + 2 * u) for u in (0.96, 0.48, 0.04)]).view(3, 1, 1)
    v = a * x + ti * b  # a velocity field v(x, t)
    x0 = x - ti * v  # the model's x0 (ComfyUI CONST: x0 = x_t − t·v)
    torch.testing.assert_close(SD3.step(x, x0, i, j), x + (tj - ti) * v, rtol=1e-5, atol=1e-6)
    # on the exact interpolation x = (1−t)·x0* + t·ε with the true x0*, the Euler step lands on the
    # same interpolation at t' (deterministic DDIM): (1−t')·x0* + t'·ε
    x_true, eps = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    x_t = (1 - ti) * x_true + ti * eps
    torch.testing.assert_close(SD3.step(x_t, x_true, i, j), (1 - tj) * x_true + tj * eps, rtol=1e-5, atol=1e-5)


def test_rollout_walks_the_table_with_guidance_and_targets_teacher_x0_by_hand():
    """K = 5 guided Euler steps (w = −5, cond + uncond) on the model's grid, replayed in plain python."""
    table = discrete_flow_sigmas(3.0)
    cfg = tdft.TDFTConfig(teacher_guidance=-5.0)
    n = 48
    torch.manual_seed(1)
    z0 = torch.randn(n, 2, 3)
    cp, cn = torch.randn(n, 1), torch.zeros(n, 1)
    seen = []

    def teacher(x, t, c):  # velocity 0.3·x + c, x0 = x − t·v
        seen.append(t.clone())
        return x - t.view(-1, 1, 1) * (0.3 * x + c.view(-1, 1, 1))

    roll = tdft.teacher_rollout(teacher, SD3, z0, cp, cn, cfg, torch.Generator().manual_seed(3))
    assert all(bool(np.isin(s.double().numpy(), table.astype(np.float32)).all()) for s in seen)  # t, never ν
    g = torch.Generator().manual_seed(3)
    k = torch.randint(0, 25, (n,), generator=g)
    eps = torch.randn(z0.shape, generator=g)
    for i in range(n):
        kk = int(k[i])
        idx = 40 * kk + 39
        t = float(np.float32(table[idx]))
        x = (1 - t) * z0[i] + t * eps[i]
        for _ in range(5):
            if kk < 0:
                break
            idx_p = 40 * (kk - 1) + 39 if kk >= 1 else 0
            tp = float(np.float32(table[idx_p]))
            x0c, x0u = x - t * (0.3 * x + cp[i]), x - t * (0.3 * x + cn[i])
            x0g = x0c - 5 * (x0c - x0u)
            x = x + (tp - t) * (x - x0g) / t
            idx, t, kk = idx_p, tp, kk - 1
        x0c, x0u = x - t * (0.3 * x + cp[i]), x - t * (0.3 * x + cn[i])
        assert int(roll.t_end[i]) == idx and int(roll.t_start[i]) == 40 * int(k[i]) + 39
        torch.testing.assert_close(roll.x_t[i], x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(roll.target[i], x0c - 5 * (x0c - x0u), rtol=1e-5, atol=1e-5)


def test_student_loss_in_x0_space_by_hand():
    """s drawn on the table strictly above t_end, x_s by the re-noising formula, the student's x0 = x_s − s·v,
    pseudo-Huber (c = 1e-3) in x0 space."""
    table = discrete_flow_sigmas(3.0)
    torch.manual_seed(2)
    n = 64
    t_end = torch.tensor([0, 39, 479, 959] * (n // 4))
    x_t, target = torch.randn(n, 2, 3), torch.randn(n, 2, 3)
    roll = tdft.Rollout(x_t, t_end, target, t_end, 0, 0)

    def student(x, s, c):
        return x - s.view(-1, 1, 1) * (0.5 * x + c.view(-1, 1, 1))

    c = torch.randn(n, 1)
    loss, s = tdft.student_loss(student, SD3, roll, c, tdft.TDFTConfig(), torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    lo = t_end + 1
    u = torch.rand(n, generator=g, dtype=torch.float64)
    want_s = lo + (u * (1000 - lo).double()).long()
    assert torch.equal(s, want_s) and bool((s > t_end).all()) and int(s.max()) <= 999
    xi = torch.randn(x_t.shape, generator=g)
    vals = []
    for i in range(n):
        tt, ss = table[int(t_end[i])], table[int(s[i])]
        a = (1 - ss) / (1 - tt)
        x_s = a * x_t[i].double() + math.sqrt(ss**2 - tt**2 * a**2) * xi[i].double()
        s32 = float(np.float32(ss))
        pred = x_s - s32 * (0.5 * x_s + float(c[i]))
        d = pred - target[i].double()
        vals.append((torch.sqrt(d**2 + 1e-6) - 1e-3).mean())
    assert loss.item() == pytest.approx(float(torch.stack(vals).mean()), rel=1e-5)


# ---------------------------------------------------------------------------------------------- re-noising


def _residual_checks(r: np.ndarray, x0: np.ndarray, std: float) -> list[str]:
    """The forward marginal x_s = (1−s)·x0 + s·λε, tested on r = x_s − (1−s)·x0: mean 0, std = s·λ, no
    correlation with x0, the same std on both halves of x0 (independence beyond correlation), normal
    quartiles. Bounds are 5 standard errors of the estimates at n samples (mean: std/√n; std: std/√(2n)
    for a normal; correlation: 1/√n; quartile frequency: √(q(1−q)/n)); a wrong formula misses them by far
    more (the VE formula below, for one)."""
    n = r.shape[0]
    bad = []
    if abs(r.mean()) > 5 * std / math.sqrt(n):
        bad.append(f"mean {r.mean():.4g}")
    if abs(r.std() / std - 1) > 5 / math.sqrt(2 * n):
        bad.append(f"std {r.std():.5g} vs {std:.5g}")
    corr = np.corrcoef(r, x0)[0, 1]
    if abs(corr) > 5 / math.sqrt(n):
        bad.append(f"corr {corr:.4g}")
    hi = x0 > np.median(x0)
    for half in (hi, ~hi):
        if abs(r[half].std() / std - 1) > 5 / math.sqrt(2 * half.sum()):
            bad.append(f"half std {r[half].std():.5g}")
    for q, z in ((0.25, -0.6745), (0.5, 0.0), (0.75, 0.6745)):
        if abs((r <= z * std).mean() - q) > 5 * math.sqrt(q * (1 - q) / n):
            bad.append(f"quartile {q}")
    return bad


@pytest.mark.parametrize(
    "i_t, i_s",
    [(39, 499), (499, 959), (799, 800), (959, 998)],  # t ≈ 0.111/0.75, 0.75/0.986, 0.9231/0.9235, 0.986/0.9993
)
def test_renoise_reproduces_the_forward_marginal(i_t, i_s):
    """At four (t, s) pairs of the shifted table, one of them adjacent levels (a near-identity step)."""
    table = discrete_flow_sigmas(3.0)
    n = 200_000
    g = torch.Generator().manual_seed(i_t)
    x0 = 1.5 * torch.sign(torch.rand(n, generator=g) - 0.3) + 0.2 * torch.randn(n, generator=g) + 0.4  # not normal
    t, s = table[i_t], table[i_s]
    x_t = (1 - t) * x0 + t * torch.randn(n, generator=g)
    xi = torch.randn(n, generator=g)
    x_s = SD3.renoise(x_t, torch.full((n,), i_t), torch.full((n,), i_s), xi)
    r = (x_s.double() - (1 - s) * x0.double()).numpy()
    assert _residual_checks(r, x0.double().numpy(), s) == []
    # the VE-space formula x_t + √(s² − t²)·ξ (right for VP in VE form, wrong here) fails the same checks
    # wherever its error (s − t)·x0 is measurable: all pairs but the adjacent levels (s − t = 4e-4)
    if i_s - i_t > 1:
        naive = x_t + math.sqrt(s * s - t * t) * xi
        assert _residual_checks((naive.double() - (1 - s) * x0.double()).numpy(), x0.double().numpy(), s) != []


def test_renoise_with_a_noise_scale_and_coefficients_by_hand():
    """HiDream-O1's noise_scale λ = 8: x_t = t·λε + (1−t)·x0, residual std λ·s; the coefficients by hand."""
    n = 200_000
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(n, generator=g) * 3 - 1
    t, s = 0.4, 0.7
    x_t = (1 - t) * x0 + t * 8 * torch.randn(n, generator=g)
    x_s = flow_renoise(x_t, torch.full((n,), t), torch.full((n,), s), torch.randn(n, generator=g), 8.0)
    r = (x_s.double() - (1 - s) * x0.double()).numpy()
    assert _residual_checks(r, x0.double().numpy(), 8 * s) == []
    a, b = flow_renoise_coefficients(torch.tensor([t]), torch.tensor([s]))
    assert a.item() == pytest.approx(0.3 / 0.6) and b.item() == pytest.approx(math.sqrt(0.49 - 0.16 * 0.25))
    # the schedule's start state and re-noising carry λ too
    sched = make_schedule("flow", f32(discrete_flow_sigmas(3.0)), noise_scale=8.0)
    z0, eps = torch.randn(2, 3), torch.randn(2, 3)
    t1 = 3 * 0.5 / 2  # index 499: t = 0.5
    torch.testing.assert_close(sched.noise(z0, torch.tensor([499, 499]), eps), t1 * 8 * eps + (1 - t1) * z0)
    x_s = sched.renoise(z0, torch.tensor([499, 499]), torch.tensor([999, 999]), eps)
    torch.testing.assert_close(x_s, 8 * eps)  # s = 1: pure noise of std λ


def test_guard_as_t_goes_to_one():
    # t = s = 1: x_t is pure noise and nothing is added (the identity), no 0/0
    a, b = flow_renoise_coefficients(torch.tensor([1.0, 0.5]), torch.tensor([1.0, 0.5]))
    assert a.tolist() == [1.0, 1.0] and b.tolist() == [0.0, 0.0]
    # s = 1 from t just below 1 (within and beyond the guard): a = 0, x_s = ξ, fresh pure noise
    a, b = flow_renoise_coefficients(torch.tensor([1 - 1e-6, 1 - 1e-13], dtype=torch.float64), torch.ones(2))
    assert a.tolist() == [0.0, 0.0] and b.tolist() == [1.0, 1.0]
    # t near 1, s between t and 1: a = (1 − s)/(1 − t) = 0.5 by hand, b = √(s² − t²/4)
    t, s = 1 - 1e-6, 1 - 5e-7
    a, b = flow_renoise_coefficients(torch.tensor([t], dtype=torch.float64), torch.tensor([s], dtype=torch.float64))
    assert a.item() == pytest.approx(0.5, rel=1e-9) and b.item() == pytest.approx(math.sqrt(s * s - t * t / 4))
    # below the guard (1 − t < 1e-12) the x0 share a·(1−t) is within 1e-12 of 1 − s and the noise variance
    # t²a² + b² is s² exactly: the marginal holds although a itself is off
    t, s = torch.tensor([1 - 1e-13], dtype=torch.float64), torch.tensor([1 - 0.5e-13], dtype=torch.float64)
    a, b = flow_renoise_coefficients(t, s)
    assert 0 <= a.item() <= 1 and abs(a.item() * (1 - t.item()) - (1 - s.item())) < 1e-12
    assert (t * a).square().item() + b.square().item() == pytest.approx(s.item() ** 2, rel=1e-12)
    # the state at t = 1 (the grid's top point) is pure noise: z0 drops out exactly
    z0, eps = torch.randn(4, 2, 3), torch.randn(4, 2, 3)
    assert torch.equal(SD3.noise(z0, torch.full((4,), 999), eps), eps)
    # a sharply shifted table (shift 12: top grid points 0.9965 and 1): rollouts and losses stay finite
    sharp = make_schedule("flow", f32(discrete_flow_sigmas(12.0)))
    torch.manual_seed(0)
    net = TinyFlow()
    cfg = tdft.TDFTConfig(truncation_steps=1)
    z0 = torch.randn(256, 2, 1)
    gen = torch.Generator().manual_seed(0)
    roll = tdft.teacher_rollout(net.denoiser(), sharp, z0, None, None, cfg, gen)
    assert int(roll.t_end.max()) == 959 and bool(torch.isfinite(roll.x_t).all() and torch.isfinite(roll.target).all())
    loss, s = tdft.student_loss(net.denoiser(), sharp, roll, None, cfg, gen)
    assert math.isfinite(loss.item())
    # re-noising from that top-but-one point (t = 11.52/11.56) to the last levels, by hand
    x_t, xi = torch.randn(2, 2, 1), torch.randn(2, 2, 1)
    x_s = sharp.renoise(x_t, torch.tensor([959, 959]), torch.tensor([998, 999]), xi)
    # the table is float32, as ComfyUI's buffer: 1 − t keeps only ~5 digits there, so take t and s as stored
    t, s = float(np.float32(11.52 / 11.56)), float(np.float32(12 * 0.999 / (1 + 11 * 0.999)))
    a = (1 - s) / (1 - t)
    torch.testing.assert_close(x_s[0], a * x_t[0] + math.sqrt(s * s - t * t * a * a) * xi[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_s[1], xi[1])  # s = 1: pure noise, x_t's share is exactly 0


# ---------------------------------------------------------------------------------------------- zero terminal SNR


def _zero_terminal_snr_sigmas() -> np.ndarray:
    """SD's scaled_linear betas rescaled to zero terminal SNR (Lin et al. 2023) by hand: √ᾱ shifted so its
    last value is 0 and scaled to keep the first; ν = √((1 − ᾱ)/ᾱ), ∞ at the last step."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    sq = np.sqrt(np.cumprod(1 - betas))
    sq = (sq - sq[-1]) * sq[0] / (sq[0] - sq[-1])
    ac = sq**2
    with np.errstate(divide="ignore"):
        return np.sqrt((1 - ac) / ac)


def test_v_prediction_ddpm_terminal_point_is_clamped_to_comfyuis():
    nu = _zero_terminal_snr_sigmas()
    assert np.isinf(nu[-1]) and np.isfinite(nu[:-1]).all()
    with pytest.raises(ValueError, match="zero terminal SNR"):
        make_schedule("vp", f32(nu))
    sched = make_schedule("vp_zsnr", f32(nu))
    got = sched.schedule.nus.numpy()
    np.testing.assert_allclose(got[:-1], nu[:-1].astype(np.float32), rtol=1e-6)
    c = 4.8973451890853435e-08  # ComfyUI: rescale_zero_terminal_snr_sigmas sets alphas_bar[-1] to this
    assert got[-1] == pytest.approx(math.sqrt((1 - c) / c), rel=1e-12) and got[-1] == pytest.approx(4518.76, abs=0.01)
    assert sched.grid(25, 40).tolist()[-1] == 999 and math.isfinite(sched.sigma(torch.tensor([999])).item())
    # ComfyUI's own zsnr table (already finite at the end) is taken as it is
    comfy = nu.copy()
    comfy[-1] = math.sqrt((1 - ZSNR_TERMINAL_ALPHA_BAR) / ZSNR_TERMINAL_ALPHA_BAR)
    np.testing.assert_allclose(make_schedule("vp_zsnr", f32(comfy)).schedule.nus.numpy(), f32(comfy).numpy(), rtol=1e-6)
    # start at the terminal point, one DDIM step with the true x0, re-noise back to it: in VP form
    # (α_s·x_ve) the re-noised state is N(α_s·z0, σ_s²) with σ_s ≈ 1, the pure noise of zero terminal SNR
    n = 200_000
    g = torch.Generator().manual_seed(0)
    z0 = torch.rand(n, 1, 1, generator=g) * 2 - 1
    x = sched.noise(z0, torch.full((n,), 999), torch.randn(n, 1, 1, generator=g))
    assert bool(torch.isfinite(x).all())
    eps = (x - z0) / got[-1]
    x_prev = sched.step(x, z0, torch.full((n,), 999), torch.full((n,), 959))
    torch.testing.assert_close(x_prev, z0 + float(f32(nu[959:960])) * eps, rtol=1e-5, atol=1e-4)
    x_s = sched.renoise(x_prev, torch.full((n,), 959), torch.full((n,), 999), torch.randn(n, 1, 1, generator=g))
    alpha = math.sqrt(1 / (1 + float(got[-1]) ** 2))
    r = (alpha * (x_s.double() - z0.double())).flatten().numpy()
    assert _residual_checks(r, z0.double().flatten().numpy(), math.sqrt(1 - alpha**2)) == []


def test_zero_terminal_snr_training_steps_are_finite():
    torch.manual_seed(0)
    net = TinyEps()
    sched = make_schedule("vp_zsnr", f32(_zero_terminal_snr_sigmas()))
    g = torch.Generator().manual_seed(0)
    data = StartData(
        torch.randn(8, 2, 4, 4, generator=g), [torch.randn(1, 3, generator=g) for _ in range(2)], torch.zeros(1, 3)
    )
    res = train(denoiser_of(net), sched, dict(net.named_parameters()), data, TrainConfig(steps=2, batch_size=32))
    assert all(math.isfinite(v) for v in res.losses)


# ---------------------------------------------------------------------------------------------- training


MEANS = torch.tensor([[2.0, 0.0], [-1.0, 1.5]])


class TinyFlow(nn.Module):
    """A small class-conditional MLP velocity model v(x, t, c) on 2-D points, c one-hot (zeros = null)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(5, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2)
        )

    def forward(self, x, t, c):
        return self.net(torch.cat([x, t[:, None], c], 1))

    def denoiser(self):
        """ComfyUI's CONST denoiser over it: x0 = x_t − t·v (x as [B, 2, 1] latents; cond None = null)."""

        def denoise(x, t, cond):
            xf = x.reshape(x.shape[0], 2)
            c = torch.zeros(x.shape[0], 2) if cond is None else cond
            return (xf - t[:, None] * self(xf, t, c)).view_as(x)

        return denoise


def _points(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    cls = torch.randint(0, 2, (n,), generator=g)
    return MEANS[cls] + 0.5 * torch.randn(n, 2, generator=g), cls


def _pretrained_flow() -> TinyFlow:
    """Flow matching on two 2-D Gaussians, 20% null conditioning, 200 Adam steps (about 1 s)."""
    torch.manual_seed(0)
    net = TinyFlow()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(200):
        x0, cls = _points(256, g)
        c = nn.functional.one_hot(cls, 2).float() * (torch.rand(256, 1, generator=g) > 0.2)
        eps, t = torch.randn(256, 2, generator=g), torch.rand(256, generator=g)
        x_t = t[:, None] * eps + (1 - t[:, None]) * x0
        loss = (net(x_t, t, c) - (eps - x0)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@pytest.fixture(scope="module")
def pretrained():
    return _pretrained_flow()


def _flow_data(n: int = 256) -> StartData:
    z, cls = _points(n, torch.Generator().manual_seed(1))
    return StartData(z.view(n, 2, 1), [torch.eye(2)[i : i + 1] for i in range(2)], torch.zeros(1, 2), cls, seed=0)


def _cond_gap(net: TinyFlow) -> float:
    """Mean squared gap between the conditional and the null-conditioned x0 at t = 0.8."""
    g = torch.Generator().manual_seed(7)
    x0, cls = _points(2000, g)
    t = torch.full((2000,), 0.8)
    x_t = (t[:, None] * torch.randn(2000, 2, generator=g) + 0.2 * x0).view(2000, 2, 1)
    c = nn.functional.one_hot(cls, 2).float()
    with torch.no_grad():
        return float((net.denoiser()(x_t, t, c) - net.denoiser()(x_t, t, torch.zeros_like(c))).square().mean())


def test_short_flow_run_lowers_the_loss_and_moves_the_prompt_branch_to_the_teachers_uncond(pretrained):
    """30 TDFT steps on an SD3-style shifted table (authors' recipe: teacher w = −1, student on the prompt).
    The loss falls, and the student's prompt-conditioned x0 moves to the null-conditioned one, the Self-NPO
    effect."""
    net = copy.deepcopy(pretrained)
    cfg = TrainConfig(
        steps=30, batch_size=256, learning_rate=3e-2, weight_decay=0.0, ema_decay=0.9, seed=1,
        tdft=tdft.TDFTConfig(loss="mse"),
    )  # fmt: skip
    gap_before = _cond_gap(net)
    res = train(net.denoiser(), SD3, dict(net.named_parameters()), _flow_data(), cfg)
    first, last = np.mean(res.losses[:3]), np.mean(res.losses[-5:])
    assert last < 0.6 * first, (first, last)  # measured 0.81 → 0.36
    assert _cond_gap(net) < 0.3 * gap_before, (gap_before, _cond_gap(net))  # measured 1.00 → 0.06


def test_flow_resume_is_exact_and_another_schedule_is_refused(pretrained, tmp_path):
    def run(steps, sched=SD3, stop_at=None, resume=None, save_every=0):
        net = copy.deepcopy(pretrained)
        cfg = TrainConfig(steps=steps, batch_size=64, learning_rate=1e-2, seed=5, save_every=save_every)
        done = []
        cb = Callbacks(
            on_step=lambda s, t, v: done.append(s), should_stop=lambda: stop_at is not None and len(done) >= stop_at
        )
        d = net.denoiser()
        return train(
            d, sched, dict(net.named_parameters()), _flow_data(64), cfg, cb, tmp_path / "f.pt", resume, "f"
        ), net

    full, net_full = run(6)
    part, _ = run(6, stop_at=3, save_every=3)
    assert part.stopped_early and part.steps_done == 3
    resumed, net_res = run(6, resume=tmp_path / "f.pt")
    assert resumed.losses == full.losses  # bit-exact: same rng state, optimizer, EMA
    assert all(torch.equal(a, b) for a, b in zip(net_full.parameters(), net_res.parameters(), strict=True))
    wan = make_schedule("flow", f32(discrete_flow_sigmas(8.0)))
    with pytest.raises(TrainingError, match="another noise schedule"):
        run(6, sched=wan, resume=tmp_path / "f.pt")


def test_vp_through_make_schedule_is_the_authors_path():
    """make_schedule('vp', ComfyUI's ν table, as float32) trains bit-identically to the VP schedule over the
    float64 DiscreteSchedule that test_tdft.py checks against the authors' formulas."""
    vp = DiscreteSchedule.scaled_linear()
    made = make_schedule("vp", vp.nus.float())
    assert isinstance(made, VPSchedule) and not isinstance(made, FlowSchedule)

    def run(sched):
        torch.manual_seed(0)
        net = TinyEps()
        g = torch.Generator().manual_seed(0)
        data = StartData(
            torch.randn(8, 2, 4, 4, generator=g), [torch.randn(1, 3, generator=g) for _ in range(3)], torch.zeros(1, 3)
        )
        cfg = TrainConfig(steps=4, batch_size=6, learning_rate=1e-3, seed=4, tdft=tdft.TDFTConfig(teacher_guidance=-5))
        return train(denoiser_of(net), sched, dict(net.named_parameters()), data, cfg).losses

    assert run(made) == run(VPSchedule(vp))
