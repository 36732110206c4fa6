"""TDFT pieces against hand computations, and a short training run on a tiny network."""

import math
import os

import numpy as np
import pytest
import torch
from tiny_denoiser import TinyEps, denoiser_of

from comfyui_npo.npo_core.schedule import DiscreteSchedule, ddim_grid, ddim_step, renoise
from comfyui_npo.training import tdft
from comfyui_npo.training.data import StartData
from comfyui_npo.training.ema import EMATeacher
from comfyui_npo.training.lora import LoRASet, select_modules
from comfyui_npo.training.schedules import VPSchedule
from comfyui_npo.training.trainer import Callbacks, TrainConfig, TrainingError, train

SCHED = DiscreteSchedule.scaled_linear()
VP = VPSchedule(SCHED)  # what TDFT runs on: the VP schedule over ComfyUI's ν table


def test_schedule_matches_sd_scaled_linear_by_hand():
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    ac = np.cumprod(1 - betas)
    np.testing.assert_allclose(SCHED.alphas_cumprod.numpy(), ac, rtol=1e-12)
    # ν_t = σ_t/α_t; SD1.5's known sigma range in ComfyUI: ≈0.0292 .. ≈14.6146
    assert SCHED.nus[0].item() == pytest.approx(0.0292, abs=1e-4)
    assert SCHED.nus[-1].item() == pytest.approx(14.6146, abs=1e-3)
    back = DiscreteSchedule.from_sigmas(SCHED.nus)
    np.testing.assert_allclose(back.alphas_cumprod.numpy(), ac, rtol=1e-10)


def test_grid_is_the_authors():
    g = ddim_grid()
    assert g.tolist() == [40 * k + 39 for k in range(25)] and g[0] == 39 and g[-1] == 999


def test_ddim_step_equals_vp_formula():
    torch.manual_seed(0)
    z, x0 = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t, tp = torch.tensor([999, 519, 79]), torch.tensor([959, 479, 39])
    ac = SCHED.alphas_cumprod.float()
    a_t, a_p = ac[t].view(-1, 1, 1, 1), ac[tp].view(-1, 1, 1, 1)
    x_vp = a_t.sqrt() * z  # a VP state
    eps = (x_vp - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    want_vp = a_p.sqrt() * x0 + (1 - a_p).sqrt() * eps  # diffusers DDIM, eta 0
    got_ve = ddim_step(x_vp / a_t.sqrt(), x0, SCHED.nu(t), SCHED.nu(tp))
    torch.testing.assert_close(got_ve * a_p.sqrt(), want_vp, rtol=1e-4, atol=1e-5)


def test_renoise_reproduces_forward_marginal():
    """x_t = z0 + ν_t ε, then x_s = renoise(x_t) must be distributed as z0 + ν_s·N(0, 1)."""
    g = torch.Generator().manual_seed(0)
    n = 200_000
    z0 = torch.full((n,), 0.7)
    t, s = torch.full((n,), 300), torch.full((n,), 750)
    x_t = z0 + SCHED.nu(t) * torch.randn(n, generator=g)
    x_s = renoise(x_t, SCHED.nu(t), SCHED.nu(s), torch.randn(n, generator=g))
    r = ((x_s - z0) / SCHED.nu(s)).double().numpy()
    se = 1 / math.sqrt(n)
    assert abs(r.mean()) < 5 * se and abs(r.var() - 1) < 5 * math.sqrt(2) * se
    # quartiles of a standard normal (±0.6745), KS-style bound on the empirical CDF
    for q, z in ((0.25, -0.6745), (0.5, 0.0), (0.75, 0.6745)):
        assert abs((r <= z).mean() - q) < 5 * math.sqrt(q * (1 - q) / n)
    # VP form of the same step
    a = SCHED.alphas_cumprod.float()
    at, as_ = a[300].sqrt(), a[750].sqrt()
    xi = torch.randn(4, generator=g)
    xt_vp = torch.randn(4, generator=g)
    want = (as_ / at) * xt_vp + torch.sqrt((1 - a[750]) - (1 - a[300]) * as_**2 / at**2) * xi
    got = renoise(xt_vp / at, SCHED.nu(torch.tensor([300] * 4)), SCHED.nu(torch.tensor([750] * 4)), xi) * as_
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


class Recorder:
    """A fake denoiser with closed-form outputs, recording every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, nu, cond):
        self.calls.append((x.shape[0], cond.clone()))
        return 0.5 * x + cond.view(-1, 1, 1, 1)  # x0 depends on the cond value


def test_guided_x0_skips_cond_pass_at_w_minus_1_and_batches_otherwise():
    x = torch.randn(2, 1, 2, 2)
    nu = torch.ones(2)
    cp, cn = torch.full((2,), 3.0), torch.full((2,), -1.0)
    rec = Recorder()
    out, rows = tdft.guided_x0(rec, x, nu, cp, cn, -1.0)
    assert len(rec.calls) == 1 and torch.equal(rec.calls[0][1], cn) and rows == 2
    torch.testing.assert_close(out, 0.5 * x - 1.0)
    rec = Recorder()
    out, rows = tdft.guided_x0(rec, x, nu, cp, cn, -5.0)
    assert len(rec.calls) == 1 and rec.calls[0][0] == 4 and rows == 4  # cond + uncond in ONE batch
    x0_c, x0_u = 0.5 * x + 3.0, 0.5 * x - 1.0
    torch.testing.assert_close(out, 5 * x0_u - 4 * x0_c)  # x0_c + w (x0_c − x0_u), w = −5


def test_rollout_walks_the_grid_and_targets_teacher_x0_at_truncation():
    cfg = tdft.TDFTConfig()
    torch.manual_seed(0)
    z0 = torch.randn(64, 1, 2, 2)
    cn = torch.zeros(64)
    seen = []

    def teacher(x, nu, cond):
        seen.append(nu.clone())
        return 0.9 * x  # a fixed linear "teacher"

    g = torch.Generator().manual_seed(3)
    roll = tdft.teacher_rollout(teacher, VP, z0, cn, cn, cfg, g)
    want_end = torch.clamp(roll.t_start - 200, min=0)
    assert torch.equal(roll.t_end, want_end)
    # frozen samples (reached t = 0) are not evaluated again before the final target:
    # a sample starting at grid index k < K is evaluated k + 1 times in the loop, others K times
    k0 = (roll.t_start + 1) // 40 - 1
    assert len(seen) == cfg.truncation_steps + 1 and roll.teacher_calls == 6
    assert roll.teacher_rows == int(torch.clamp(k0 + 1, max=5).sum()) + 64
    assert sum(len(s) for s in seen) == roll.teacher_rows
    # replay by hand: same generator draws, plain-python loop per sample
    g = torch.Generator().manual_seed(3)
    k = torch.randint(0, 25, (64,), generator=g)
    eps = torch.randn(z0.shape, generator=g)
    for i in range(64):
        kk = int(k[i])
        t = 40 * kk + 39
        x = z0[i] + SCHED.nus[t].float() * eps[i]
        for _ in range(5):
            if kk < 0:
                break
            tp = 40 * (kk - 1) + 39 if kk >= 1 else 0
            x0 = 0.9 * x
            x = x0 + SCHED.nus[tp].float() * (x - x0) / SCHED.nus[t].float()
            t, kk = tp, kk - 1
        torch.testing.assert_close(roll.x_t[i], x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(roll.target[i], 0.9 * x, rtol=1e-5, atol=1e-5)
        assert int(roll.t_end[i]) == t


def test_student_level_is_strictly_noisier_and_uniform():
    g = torch.Generator().manual_seed(0)
    t_end = torch.tensor([0, 599, 959] * 20000)
    s = VP.sample_level(t_end, g)
    assert bool((s > t_end).all()) and int(s.max()) <= 999
    s599 = s[t_end == 599].double()
    assert s599.min() == 600 and s599.max() == 999
    assert abs(s599.mean().item() - (600 + 999) / 2) < 2.0


def test_pseudo_huber_and_mse_by_hand():
    p, t = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([0.5, 1.0, 0.0])
    c = 1e-3
    want = np.mean([math.sqrt(d * d + c * c) - c for d in (-0.5, 0.0, -2.0)])
    assert tdft.loss_fn(p, t, tdft.TDFTConfig()).item() == pytest.approx(want, rel=1e-6)
    assert tdft.loss_fn(p, t, tdft.TDFTConfig(loss="mse")).item() == pytest.approx((0.25 + 4) / 3, rel=1e-6)


def test_ema_update_and_swap_by_hand():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = EMATeacher({"p": p}, 0.9)
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 4.0]))
    ema.update()
    torch.testing.assert_close(ema.shadow["p"], torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 4]))
    with ema.swapped_in():
        torch.testing.assert_close(p.data, torch.tensor([1.2, 2.2]))
    torch.testing.assert_close(p.data, torch.tensor([3.0, 4.0]))


def _data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return StartData(
        torch.randn(n, 2, 4, 4, generator=g), [torch.randn(1, 3, generator=g) for _ in range(3)], torch.zeros(1, 3)
    )


def test_data_cycles_prompts_and_covers_latents_each_epoch():
    d = _data()
    z, cp, cn = d.batch(0, 4)
    assert z.shape == (4, 2, 4, 4) and cp.shape == (4, 3) and torch.equal(cn, torch.zeros(4, 3))
    torch.testing.assert_close(cp[3], d.conds_pos[0][0])  # prompt index (0*4+3) % 3 = 0
    seen = torch.cat([d.indices(s, 4) for s in range(2)])
    assert sorted(seen.tolist()) == list(range(8))  # one epoch = every latent once


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_short_run_lowers_the_loss(mode):
    torch.manual_seed(0)
    net = TinyEps()
    if mode == "lora":
        names = select_modules(net, r"conv_in|conv_out|to_q")
        assert names == ["conv_in", "to_q", "conv_out"]
        lset = LoRASet(net, names, rank=4, generator=torch.Generator().manual_seed(0))
        lset.attach()
        params = lset.named_trainable()
        lr = 3e-2
    else:
        params = dict(net.named_parameters())
        lr = 3e-3
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    cfg = TrainConfig(
        steps=60,
        batch_size=8,
        learning_rate=lr,
        weight_decay=0.0,
        ema_decay=0.9,
        seed=1,
        tdft=tdft.TDFTConfig(loss="mse"),
    )
    res = train(denoiser_of(net), VP, params, _data(16), cfg)
    assert res.steps_done == 60 and len(res.losses) == 60
    first, last = np.mean(res.losses[:10]), np.mean(res.losses[-10:])
    assert last < 0.7 * first, (first, last)
    if mode == "lora":  # base weights untouched; the LoRA became non-zero
        assert all(torch.equal(before[n], p) for n, p in net.named_parameters())
        assert any(float(p.abs().sum()) > 0 for n, p in params.items() if n.endswith("lora_up"))
        off = lset.to_offset()
        assert off.ranks() == [4] and set(off.entries) == {"conv_in.weight", "to_q.weight", "conv_out.weight"}


@pytest.mark.fault(
    "cancel half-way through training, then resume from the checkpoint",
    "stops within one step; the resumed run's loss curve and weights equal an uninterrupted run's; resuming "
    "with fewer steps or another model is refused",
)
def test_cancel_stops_within_one_step_and_resume_matches_uninterrupted(tmp_path):
    def run(steps, stop_at=None, resume=None, save_every=0):
        torch.manual_seed(0)
        net = TinyEps()
        params = dict(net.named_parameters())
        cfg = TrainConfig(steps=steps, batch_size=4, learning_rate=1e-3, seed=5, save_every=save_every)
        done = []
        cb = Callbacks(
            on_step=lambda s, t, loss: done.append(s), should_stop=lambda: stop_at is not None and len(done) >= stop_at
        )
        return train(denoiser_of(net), VP, params, _data(), cfg, cb, tmp_path / "ck.pt", resume, "tiny"), net

    full, net_full = run(10)
    part, _ = run(10, stop_at=6, save_every=3)
    assert part.stopped_early and part.steps_done == 6 and len(part.losses) == 6
    resumed, net_res = run(10, resume=tmp_path / "ck.pt")
    assert resumed.steps_done == 10
    np.testing.assert_allclose(resumed.losses, full.losses, rtol=1e-6, atol=1e-7)  # resumed from step 6
    for (_n, a), b in zip(net_full.named_parameters(), net_res.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(TrainingError, match=r"steps \(5\) is smaller than the 6 steps already done.*set steps ≥ 6"):
        run(5, resume=tmp_path / "ck.pt")
    same, _ = run(6, resume=tmp_path / "ck.pt")  # steps == steps done: nothing left to do, not an error
    assert same.steps_done == 6 and not same.stopped_early and len(same.losses) == 6
    torch.manual_seed(0)
    other = TinyEps()
    with pytest.raises(TrainingError, match="another model"):
        train(
            denoiser_of(other),
            VP,
            dict(other.named_parameters()),
            _data(),
            TrainConfig(steps=10),
            None,
            None,
            tmp_path / "ck.pt",
            "other",
        )


@pytest.mark.fault("the loss becomes NaN in the first step", "training stops with an error naming the step")
def test_nan_loss_stops_with_the_step():
    net = TinyEps()

    def bad(x, nu, cond):
        return denoiser_of(net)(x, nu, cond) * float("nan")

    with pytest.raises(TrainingError, match="step 1; no checkpoint"):
        train(bad, VP, dict(net.named_parameters()), _data(), TrainConfig(steps=3, batch_size=2))


def _fault_run(tmp_path, fault_step: int | None, fault, steps=8, resume=None):
    """TinyEps trained with save_every 2; from step ``fault_step`` on, the student's output goes through
    ``fault`` (the student is the one denoiser call per step made with grad enabled)."""
    torch.manual_seed(0)
    net = TinyEps()
    student_calls = [0]
    good = denoiser_of(net)

    def den(x, nu, cond):
        out = good(x, nu, cond)
        if torch.is_grad_enabled():
            student_calls[0] += 1
            if fault_step is not None and student_calls[0] >= fault_step:
                return fault(out)
        return out

    cfg = TrainConfig(steps=steps, batch_size=2, learning_rate=1e-3, seed=3, save_every=2)
    return train(den, VP, dict(net.named_parameters()), _data(), cfg, None, tmp_path / "ck.pt", resume, "t"), net


@pytest.mark.fault(
    "the loss becomes NaN after a checkpoint was written",
    "error names the step and the kept checkpoint; that checkpoint holds the last good state and resumes exactly",
)
def test_nan_loss_keeps_the_last_good_checkpoint_and_it_resumes(tmp_path):
    clean, _ = _fault_run(tmp_path / "clean", None, None)
    with pytest.raises(TrainingError, match=r"step 6; the last good checkpoint, ck\.pt, is kept"):
        _fault_run(tmp_path, 6, lambda out: out * float("nan"))
    state = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert state["step"] == 4 and all(torch.isfinite(p).all() for p in state["params"].values())
    resumed, _ = _fault_run(tmp_path, None, None, resume=tmp_path / "ck.pt")
    np.testing.assert_allclose(resumed.losses, clean.losses, rtol=1e-6, atol=1e-7)


@pytest.mark.fault(
    "the gradients become Inf while the loss is still finite",
    "training stops before the update: weights and the last checkpoint stay finite",
)
def test_non_finite_gradients_stop_before_the_update(tmp_path):
    with pytest.raises(TrainingError, match="gradients became .* at step 5"):
        _fault_run(tmp_path, 5, _InfGrad.apply)
    state = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert state["step"] == 4 and all(torch.isfinite(p).all() for p in state["params"].values())


class _InfGrad(torch.autograd.Function):
    """Identity forward (the loss stays finite), Inf gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


@pytest.mark.fault(
    "writing a training checkpoint fails half-way (an exception after a partial write)",
    "the previous checkpoint stays whole and loadable; the temporary file is removed",
)
def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    from comfyui_npo.training import trainer as T

    _fault_run(tmp_path, None, None, steps=4)
    before = (tmp_path / "ck.pt").read_bytes()
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:  # half written, then the crash
            fh.truncate(len(before) // 2)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(T.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        _fault_run(tmp_path, None, None, steps=8, resume=tmp_path / "ck.pt")
    monkeypatch.undo()
    assert (tmp_path / "ck.pt").read_bytes() == before and os.listdir(tmp_path) == ["ck.pt"]
    assert T.load_checkpoint(tmp_path / "ck.pt", "t")["step"] == 4


@pytest.mark.fault(
    "training ends between two save_every points",
    "the final state is checkpointed too, so steps can be raised and training resumed",
)
def test_final_state_is_checkpointed_even_off_the_save_grid(tmp_path):
    net = TinyEps()
    cfg = TrainConfig(steps=5, batch_size=2, learning_rate=1e-3, save_every=3)
    saved = []
    cb = Callbacks(on_checkpoint=lambda path, step: saved.append(step))
    res = train(denoiser_of(net), VP, dict(net.named_parameters()), _data(), cfg, cb, tmp_path / "c.pt", None, "s")
    assert saved == [3, 5] and res.last_checkpoint == tmp_path / "c.pt"
    assert torch.load(tmp_path / "c.pt", weights_only=True)["step"] == 5



KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
tests = Path(sys.argv[1])
sys.path[:0] = [str(tests), str(tests / "unit")]
import conftest  # registers the pack as comfyui_npo
import torch
from test_tdft import _fault_run
from comfyui_npo.training import trainer as T
real_save = torch.save

def dying_save(obj, f, *a, **k):
    real_save(obj, f, *a, **k)
    with open(f, "r+b") as fh:  # half written, on disk
        fh.truncate(os.path.getsize(f) // 2)
        os.fsync(fh.fileno())
    os.kill(os.getpid(), signal.SIGKILL)  # a real crash: no finally block, no cleanup

T.torch.save = dying_save
_fault_run(Path(sys.argv[2]), None, None, steps=8, resume=Path(sys.argv[2]) / "ck.pt")
"""


@pytest.mark.fault(
    "the process is killed (SIGKILL) in the middle of writing a training checkpoint",
    "the previous checkpoint stays whole and resumes; the killed writer's hidden .tmp is removed by the next "
    "save in that folder",
)
def test_process_killed_while_writing_a_checkpoint(tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    _fault_run(tmp_path, None, None, steps=4)
    before = (tmp_path / "ck.pt").read_bytes()
    tests = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(tests), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (tmp_path / "ck.pt").read_bytes() == before
    leftovers = sorted(set(os.listdir(tmp_path)) - {"ck.pt"})
    assert len(leftovers) == 1 and leftovers[0].startswith(".ck.pt.") and leftovers[0].endswith(".tmp"), leftovers
    assert leftovers[0].startswith(".ck.pt.") and leftovers[0].split(".")[3].split("-")[0].isdigit()  # writer's pid
    resumed, _ = _fault_run(tmp_path, None, None, steps=6, resume=tmp_path / "ck.pt")
    assert resumed.steps_done == 6 and len(resumed.losses) == 6
    assert os.listdir(tmp_path) == ["ck.pt"]  # the resumed run's save removed the dead writer's temporary


class _Evil:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


@pytest.mark.fault(
    "a resume_from checkpoint that is truncated, not a checkpoint, or a pickle whose unpickling would run code",
    "TrainingError naming resume_from and the file (weights_only loading: the code never runs)",
)
def test_hostile_resume_files_are_refused(tmp_path, monkeypatch):
    import pickle

    from comfyui_npo.training.trainer import load_checkpoint

    monkeypatch.chdir(tmp_path)
    _fault_run(tmp_path, None, None, steps=2)
    good = (tmp_path / "ck.pt").read_bytes()
    cases = {
        "cut.pt": (good[: len(good) // 2], "cannot read"),
        "empty.pt": (b"", "cannot read"),
        "other.pt": (None, "not a training checkpoint of this pack"),
        "evil.pt": (pickle.dumps({"format": "comfyui-npo-train/1", "x": _Evil()}), "cannot read"),
    }
    torch.save({"format": "something else", "step": 3}, tmp_path / "other.pt")
    for name, (data, match) in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(TrainingError, match=f"resume_from: .*'{name}'.*{match}|resume_from: .*{match}.*{name}"):
            load_checkpoint(tmp_path / name, "t")
    assert not (tmp_path / "PWNED").exists()


def test_student_cond_auto_resolves_by_schedule_kind():
    """auto: the unconditional student on flow schedules, the authors' prompt student on VP ones; others kept."""
    from comfyui_npo.training.tdft import AUTO, STUDENT_CONDS, resolve_student_cond

    assert resolve_student_cond(AUTO, "flow") == "negative"
    assert resolve_student_cond(AUTO, "vp") == "prompt" and resolve_student_cond(AUTO, "vp_zsnr") == "prompt"
    assert all(resolve_student_cond(c, k) == c for c in STUDENT_CONDS for k in ("flow", "vp"))


def _accumulation_run(batch_size: int, accumulation: int, student: str = "prompt", steps: int = 3, **kw):
    torch.manual_seed(0)
    net = TinyEps()
    cfg = TrainConfig(steps=steps, batch_size=batch_size, grad_accumulation_steps=accumulation, learning_rate=3e-3,
                      weight_decay=0.0, seed=4, tdft=tdft.TDFTConfig(student_cond=student), **kw.pop("cfg", {}))
    done = []
    cb = Callbacks(on_step=lambda s, t, loss: done.append(s), **kw.pop("callbacks", {}))
    res = train(denoiser_of(net), VP, dict(net.named_parameters()), _data(12), cfg, cb, **kw)
    return res, net, done


@pytest.mark.parametrize("student", ["prompt", "mix"])
def test_gradient_accumulation_equals_one_step_on_the_larger_batch(student):
    """3 micro-batches of 2 per optimizer step update the weights as one step on a batch of 6 does (the same samples
    and random numbers); progress counts optimizer steps; a single micro-batch per step is a different run."""
    acc, net_acc, done = _accumulation_run(2, 3, student)
    big, net_big, _ = _accumulation_run(6, 1, student)
    small, net_small, _ = _accumulation_run(2, 1, student)
    assert acc.steps_done == 3 and done == [1, 2, 3] and len(acc.losses) == 3
    np.testing.assert_allclose(acc.losses, big.losses, rtol=1e-5, atol=1e-7)
    for a, b in zip(net_acc.parameters(), net_big.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any((a - c).abs().max() > 1e-4 for a, c in zip(net_acc.parameters(), net_small.parameters(), strict=True))


def test_accumulated_gradient_is_the_larger_batch_gradient():
    """The gradient the optimizer steps on (AdamW hides a wrong scale in its update) is the 6-sample batch's."""

    def first_step_grads(batch_size, accumulation):
        grads = {}
        real_backward = torch.Tensor.backward

        def record(self, *a, **k):
            real_backward(self, *a, **k)
            for i, p in enumerate(net_params):
                grads[i] = p.grad.detach().clone()  # after the step's last micro-batch: its accumulated gradient

        torch.manual_seed(0)
        net = TinyEps()
        net_params = list(net.parameters())
        cfg = TrainConfig(steps=1, batch_size=batch_size, grad_accumulation_steps=accumulation, learning_rate=3e-3,
                          weight_decay=0.0, seed=4)
        torch.Tensor.backward = record
        try:
            train(denoiser_of(net), VP, dict(net.named_parameters()), _data(12), cfg)
        finally:
            torch.Tensor.backward = real_backward
        return grads

    acc, big = first_step_grads(2, 3), first_step_grads(6, 1)
    for i in big:
        torch.testing.assert_close(acc[i], big[i], rtol=1e-5, atol=1e-7)


def test_cancel_mid_accumulation_drops_the_partial_step_and_resume_is_exact_at_step_boundaries(tmp_path):
    """A cancel between micro-batches ends the run at the last whole step (its gradients are dropped, no update);
    resuming from the checkpoint of a step boundary equals an uninterrupted run."""
    full, net_full, _ = _accumulation_run(2, 3, steps=4)
    calls = []

    def stop_in_step_3():  # asked before each step and between micro-batches: True at step 3's second micro-batch
        calls.append(1)
        return len(calls) >= 3 + 3 + 1 + 1

    part, _, done = _accumulation_run(2, 3, steps=4, cfg={"save_every": 1}, checkpoint_path=tmp_path / "ck.pt",
                                      callbacks={"should_stop": stop_in_step_3})
    assert part.stopped_early and part.steps_done == 2 and done == [1, 2] and len(part.losses) == 2
    resumed, net_res, _ = _accumulation_run(2, 3, steps=4, resume_from=tmp_path / "ck.pt")
    np.testing.assert_allclose(resumed.losses, full.losses, rtol=1e-6, atol=1e-7)
    for a, b in zip(net_full.parameters(), net_res.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
