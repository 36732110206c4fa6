"""Diffusion-NPO's reversed-DPO step against a hand transcription of the authors' ``DPO-DPO-NPO/train_sd15.py`` step.

The transcription below follows their loop line by line in their (diffusers) terms: a Pick-a-Pic row
(jpg_0, jpg_1, label_0) → ``if label_0 == 1: im_tup = im_tup[::-1]`` → latents [first; second] → one noise per
pair repeated → one timestep per pair repeated → ``add_noise`` (VP: √ᾱ·z + √(1−ᾱ)·ε) → the eps (or v) network on
that input → per-sample MSE to ε (or ``get_velocity``) → the same network with the adapter disabled under no_grad
→ logits = ref_diff − model_diff → the loss. The pack's step gets the same network wrapped as ComfyUI wraps an
eps / v model (a VE-space x0 denoiser), so any difference is the pack's. Mutations of the pack's step that a
faithful port must not make (pairs not reversed, independent noise per image, reference with the adapter on)
change the loss and fail the comparison.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_denoiser import TinyEps

from comfyui_npo.npo_core.schedule import DiscreteSchedule
from comfyui_npo.training import preference as P
from comfyui_npo.training.lora import LoRASet
from comfyui_npo.training.schedules import FlowSchedule, VPSchedule

SCHED = DiscreteSchedule.scaled_linear()
VP = VPSchedule(SCHED)


def _net(seed=0):
    torch.manual_seed(seed)
    net = TinyEps()
    lset = LoRASet(net, ["to_q", "conv_in"], rank=2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # trained adapters (B = 0 at init would make policy = reference)
        for u in lset.ups:
            u.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    lset.attach()
    return net, lset


@contextlib.contextmanager
def _off(lset):
    lset.detach()
    try:
        yield
    finally:
        lset.attach()


def _pickapic(seed=3, pairs=3):
    g = torch.Generator().manual_seed(seed)
    jpg_0, jpg_1 = torch.randn(pairs, 2, 8, 8, generator=g), torch.randn(pairs, 2, 8, 8, generator=g)
    label_0 = torch.tensor([1, 0, 1][:pairs])
    cond = torch.randn(pairs, 3, generator=g)
    noise = torch.randn(pairs, 2, 8, 8, generator=g)
    t = torch.tensor([17, 503, 961][:pairs])
    return jpg_0, jpg_1, label_0, cond, noise, t


def _authors_step(net, lset, jpg_0, jpg_1, label_0, cond, noise_half, t_half, beta, loss_type, prediction="epsilon"):
    """Their loop, transcribed (latents stand in for VAE-encoded pixels; the net's 'timestep' input is log ν_t)."""
    firsts, seconds = [], []
    for a, b, lab in zip(jpg_0, jpg_1, label_0, strict=True):
        im_tup = (a, b)
        if lab == 1:  # here for adjusting the order of good and bad images
            im_tup = im_tup[::-1]
        firsts.append(im_tup[0])
        seconds.append(im_tup[1])
    latents = torch.cat([torch.stack(firsts), torch.stack(seconds)])
    noise = noise_half.repeat(2, 1, 1, 1)
    timesteps = t_half.repeat(2)
    ac = SCHED.alphas_cumprod[timesteps].float()
    sa, s1 = ac.sqrt().view(-1, 1, 1, 1), (1 - ac).sqrt().view(-1, 1, 1, 1)
    noisy = sa * latents + s1 * noise
    t_in = torch.log(SCHED.nu(timesteps).float())
    ehs = cond.repeat(2, 1)
    target = noise if prediction == "epsilon" else sa * noise - s1 * latents

    def mse(pred):
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])

    model_losses = mse(net(noisy, t_in, ehs))
    mw, ml = model_losses.chunk(2)
    lset.detach()
    with torch.no_grad():
        rw, rl = mse(net(noisy, t_in, ehs).detach()).chunk(2)
    lset.attach()
    logits = (rw - rl) - (mw - ml)
    if loss_type == "sigmoid":
        return -1 * F.logsigmoid(beta * logits).mean()
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits).mean()
    return ((logits - 1 / (2 * beta)) ** 2).mean()


def _denoiser(net, prediction):
    """The network as ComfyUI wraps it: VE input x scaled by 1/√(ν²+1); eps: x − ν·ε̂; v: x/(ν²+1) − ν·v̂/√(ν²+1)."""

    def d(x, nu, cond):
        shape = (-1, 1, 1, 1)
        out = net(x / torch.sqrt(nu**2 + 1).view(shape), torch.log(nu), cond)
        if prediction == "eps":
            return x - nu.view(shape) * out
        return x / (nu**2 + 1).view(shape) - out * (nu / torch.sqrt(nu**2 + 1)).view(shape)

    return d


def _pack_step(net, lset, data, beta, loss_type, prediction="eps"):
    jpg_0, jpg_1, label_0, cond, noise, t = data
    pick = (label_0 == 1).view(-1, 1, 1, 1)
    preferred, rejected = torch.where(pick, jpg_0, jpg_1), torch.where(pick, jpg_1, jpg_0)
    cfg = P.PreferenceConfig(beta=beta, loss_type=loss_type, prediction=prediction)
    cfg.validate(VP)
    return P.preference_step(
        _denoiser(net, prediction), lambda: _off(lset), preferred, rejected, cond, VP, cfg, P.PairDraws(t, noise)
    )


def _grads(lset, loss):
    params = list(lset.parameters())
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 500.0), ("hinge", 500.0), ("ipo", 2000.0)])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_the_step_equals_the_authors_loop(loss_type, beta, prediction):
    net, lset = _net()
    data = _pickapic()
    want = _authors_step(net, lset, *data, beta, loss_type, "epsilon" if prediction == "eps" else "v_prediction")
    got = _pack_step(net, lset, data, beta, loss_type, prediction)
    assert got.denoiser_rows == 12  # 3 pairs × 2 images × (policy + reference)
    assert torch.allclose(got.loss, want, rtol=1e-4, atol=1e-6), (got.loss.item(), want.item())
    for a, b in zip(_grads(lset, got.loss), _grads(lset, want), strict=True):
        # fp32: β = 500–2000 multiplies the rounding of the two loss orders; compare against the gradient's scale
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()))
    assert float(got.logits.abs().max()) > 1e-4  # the adapter changes the losses: a comparison that can fail


@pytest.mark.parametrize(
    "mutation", ["pairs not reversed", "independent noise per image", "reference with the adapter on"]
)
def test_mutations_of_the_step_fail_the_comparison(monkeypatch, mutation):
    net, lset = _net()
    data = _pickapic()
    want = _authors_step(net, lset, *data, 500.0, "sigmoid")
    if mutation == "pairs not reversed":
        monkeypatch.setattr(P, "reversed_pair", lambda preferred, rejected: (preferred, rejected))
    elif mutation == "independent noise per image":
        g = torch.Generator().manual_seed(9)
        monkeypatch.setattr(P, "pair_noise", lambda d, like: torch.randn(like.shape, generator=g))
    else:
        draws = P.PairDraws(data[5], data[4])
        den = _denoiser(net, "eps")
        got = P.preference_step(den, contextlib.nullcontext, *_sides(data), data[3], VP, P.PreferenceConfig(), draws)
        assert float(got.loss) == pytest.approx(math.log(2), abs=1e-6)  # logits ≡ 0: −log σ(0)
        assert not torch.allclose(got.loss, want, rtol=1e-3)
        return
    got = _pack_step(net, lset, data, 500.0, "sigmoid")
    assert not torch.allclose(got.loss, want, rtol=1e-3), mutation


def _sides(data):
    jpg_0, jpg_1, label_0 = data[:3]
    pick = (label_0 == 1).view(-1, 1, 1, 1)
    return torch.where(pick, jpg_0, jpg_1), torch.where(pick, jpg_1, jpg_0)


def test_lower_loss_on_the_rejected_image_is_what_the_offset_is_rewarded_for():
    """The sign, by hand: a policy that fits the rejected image better than the reference does (and the preferred
    one no better) has logits > 0 and a loss below log 2."""
    logits_loss, logits = P.preference_loss(torch.tensor([-0.01]), torch.tensor([0.0]), 500.0, "sigmoid")
    assert float(logits) == pytest.approx(0.01)
    assert float(logits_loss) == pytest.approx(-math.log(1 / (1 + math.exp(-5))))
    assert float(P.preference_loss(torch.tensor([0.0]), torch.tensor([0.0]), 500.0, "hinge")[0]) == 1.0
    assert float(P.preference_loss(torch.tensor([0.0]), torch.tensor([0.0]), 500.0, "ipo")[0]) == pytest.approx(1e-6)
    assert P.reversed_pair("good", "bad") == ("bad", "good")


def test_flow_step_uses_the_velocity_target_and_one_level_per_pair():
    """CONST: x = (1 − t)·z + t·ε, target ε − z, the model's velocity (x − x0)/t; levels index the shifted table."""
    sig = torch.linspace(1e-3, 1.0, 1000, dtype=torch.float64)
    flow = FlowSchedule(sig)
    net, lset = _net()
    _, _, _, cond, noise, t = _pickapic()
    g = torch.Generator().manual_seed(5)
    pref, rej = torch.randn(3, 2, 8, 8, generator=g), torch.randn(3, 2, 8, 8, generator=g)

    def den(x, s, c):
        return x - s.view(-1, 1, 1, 1) * net(x, s, c)

    cfg = P.PreferenceConfig(beta=500.0, prediction="flow")
    cfg.validate(flow)
    got = P.preference_step(den, lambda: _off(lset), pref, rej, cond, flow, cfg, P.PairDraws(t, noise))
    z = torch.cat([rej, pref])
    s = sig[t].float().repeat(2).view(-1, 1, 1, 1)
    x = (1 - s) * z + s * noise.repeat(2, 1, 1, 1)
    ts = s.flatten()
    m = ((net(x, ts, cond.repeat(2, 1)) - (noise.repeat(2, 1, 1, 1) - z)) ** 2).mean(dim=[1, 2, 3])
    lset.detach()
    with torch.no_grad():
        r = ((net(x, ts, cond.repeat(2, 1)) - (noise.repeat(2, 1, 1, 1) - z)) ** 2).mean(dim=[1, 2, 3])
    lset.attach()
    logits = (r[:3] - r[3:]) - (m[:3] - m[3:])
    assert torch.allclose(got.loss, -F.logsigmoid(500.0 * logits).mean(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        P.PreferenceConfig(prediction="eps").validate(flow)


def test_draws_are_one_level_and_one_noise_per_pair():
    d = P.PairDraws.draw((4, 2, 8, 8), 1000, torch.Generator().manual_seed(0))
    assert d.level.shape == (4,) and d.eps.shape == (4, 2, 8, 8)
    assert int(d.level.min()) >= 0 and int(d.level.max()) < 1000
    both = P.pair_noise(d, torch.zeros(8, 2, 8, 8))
    assert torch.equal(both[:4], both[4:])


# ---------------------------------------------------------------------------------------------
# the training loop (training.trainer with objective "preference")
# ---------------------------------------------------------------------------------------------
def _pair_data(n=6, seed=11):
    from comfyui_npo.training.pairs import PairData

    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 2, 8, 8, generator=g)
    preferred = base + 0.3 * torch.randn(n, 2, 8, 8, generator=g)
    rejected = base.flip(-1) * 0.5  # a systematically different "bad" image per pair
    conds = [torch.randn(1, 3, generator=g) for _ in range(3)]
    return PairData(preferred, rejected, conds, torch.arange(n) % 3, seed=seed)


def _trainer(steps, tmp_path=None, resume=None, accumulation=1, batch=2, objective="preference"):
    from comfyui_npo.training.trainer import TrainConfig, Trainer

    cfg = TrainConfig(
        steps=steps, batch_size=batch, grad_accumulation_steps=accumulation, learning_rate=3e-3, weight_decay=0.0,
        seed=5, save_every=2 if tmp_path else 0, objective=objective,
        preference=P.PreferenceConfig(beta=50.0),
    )
    return Trainer(VP, cfg, "sig", resume), (tmp_path / "pref.pt" if tmp_path else None)


def _fresh_lora():
    torch.manual_seed(0)
    net = TinyEps()
    lset = LoRASet(net, ["to_q", "conv_in", "conv_out"], rank=2, generator=torch.Generator().manual_seed(1))
    lset.attach()
    return net, lset


def _run(trainer, ckpt, net, lset, data, callbacks=None):
    return trainer.run_preference(
        _denoiser(net, "eps"), lambda: _off(lset), lset.named_trainable(), data, callbacks, ckpt
    )


def test_training_moves_the_offset_toward_the_rejected_images():
    """After training, the offset's model fits the rejected image better relative to the preferred one than the
    model without it does (mean logit > 0 on fresh noise), and the loss fell below log 2."""
    net, lset = _fresh_lora()
    data = _pair_data()
    trainer, _ = _trainer(60)
    res = _run(trainer, None, net, lset, data)
    assert res.steps_done == 60 and res.losses[0] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: policy = reference
    assert sum(res.losses[-10:]) / 10 < math.log(2) - 0.02
    g = torch.Generator().manual_seed(99)
    draws = P.PairDraws.draw(tuple(data.preferred.shape), 1000, g)
    cond = torch.cat([data.conds[int(i)] for i in data.prompt_of])
    with torch.no_grad():
        out = P.preference_step(_denoiser(net, "eps"), lambda: _off(lset), data.preferred, data.rejected, cond, VP,
                                P.PreferenceConfig(beta=50.0), draws)
    assert float(out.logits.mean()) > 0 and out.implicit_accuracy > 0.5


def test_accumulation_equals_the_larger_batch():
    results = []
    for batch, k in ((4, 1), (2, 2), (1, 4)):
        net, lset = _fresh_lora()
        trainer, _ = _trainer(3, batch=batch, accumulation=k)
        res = _run(trainer, None, net, lset, _pair_data())
        results.append(([p.detach().clone() for p in lset.parameters()], res.losses))
    (w0, l0) = results[0]
    for w, losses in results[1:]:
        assert losses == pytest.approx(l0, abs=1e-5)
        for a, b in zip(w, w0, strict=True):
            assert torch.allclose(a, b, atol=1e-5)


def test_a_stopped_run_resumes_exactly(tmp_path):
    net, lset = _fresh_lora()
    straight_trainer, _ = _trainer(6)
    straight = _run(straight_trainer, None, net, lset, _pair_data())
    want = [p.detach().clone() for p in lset.parameters()]

    from comfyui_npo.training.trainer import Callbacks

    net, lset = _fresh_lora()
    first, ckpt = _trainer(6, tmp_path)
    calls = [0]

    def stop():
        calls[0] += 1
        return calls[0] > 4  # two optimizer steps (one should_stop per step and per extra micro-batch)

    part = _run(first, ckpt, net, lset, _pair_data(), Callbacks(should_stop=stop))
    assert part.stopped_early and part.last_checkpoint == ckpt
    net, lset = _fresh_lora()
    rest, _ = _trainer(6, tmp_path, resume=ckpt)
    done = _run(rest, ckpt, net, lset, _pair_data())
    assert done.steps_done == 6 and done.losses == pytest.approx(straight.losses, abs=1e-7)
    for a, b in zip(lset.parameters(), want, strict=True):
        assert torch.equal(a.detach(), b)


def test_a_checkpoint_of_the_other_objective_is_refused(tmp_path):
    from comfyui_npo.training.trainer import TrainingError

    net, lset = _fresh_lora()
    trainer, ckpt = _trainer(2, tmp_path)
    _run(trainer, ckpt, net, lset, _pair_data())
    with pytest.raises(TrainingError, match="is a preference checkpoint; this run trains self-npo"):
        _trainer(4, tmp_path, resume=ckpt, objective="self-npo")
    with pytest.raises(ValueError, match="run_preference"):
        _trainer(2, objective="self-npo")[0].run_preference(None, None, {}, None)
