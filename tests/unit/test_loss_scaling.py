"""fp16 training: dynamic loss scaling keeps the gradients that an fp16 backward otherwise flushes to zero.

ComfyUI loads SD1.5/SDXL in float16 on most GPUs, so the Self-NPO student's forward and backward run in
fp16 there. Each element of the loss gradient is about 1/numel of the output (≈ 1e-5 at a 64² latent), and
through a few layers the activation gradients fall below fp16's smallest subnormal (6e-8). The CPU's fp16
autocast reproduces this, so it is tested here. (At a 64² latent the same network keeps its gradients
but gets 10–17 % of the first layer's signs wrong; at 128² it loses them all.)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from comfyui_npo.npo_core.schedule import DiscreteSchedule
from comfyui_npo.training import trainer as T
from comfyui_npo.training.data import StartData
from comfyui_npo.training.schedules import VPSchedule
from comfyui_npo.training.trainer import Callbacks, TrainConfig, TrainingError, train

SCHED = DiscreteSchedule.scaled_linear()
VP = VPSchedule(SCHED)  # what TDFT runs on: the VP schedule over ComfyUI's ν table


class DeepEps(nn.Module):
    """8 plain 3×3 convolutions (PyTorch's default init), eps-prediction; ignores the conditioning."""

    def __init__(self, width: int = 16):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(4, width, 3, padding=1)]
        for _ in range(6):
            layers += [nn.SiLU(), nn.Conv2d(width, width, 3, padding=1)]
        layers += [nn.SiLU(), nn.Conv2d(width, 4, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x, nu):
        return self.net(x / (1 + nu.view(-1, 1, 1, 1) ** 2).sqrt())


def fp16_denoiser(net: DeepEps, fp16: bool, grad_fault=None):
    """x0 = x − ν·eps, the network run under CPU fp16 autocast when ``fp16``; ``grad_fault(step)`` may
    return a factor that multiplies the student's output gradient (to force an overflow)."""
    student_calls = [0]

    def den(x, nu, cond):
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            eps = net(x, nu)
        out = x - nu.view(-1, 1, 1, 1) * eps.float()
        if torch.is_grad_enabled():
            student_calls[0] += 1
            factor = grad_fault(student_calls[0]) if grad_fault else None
            if factor is not None:
                out.register_hook(lambda g: g * factor)
        return out

    return den


def _data(hw: int) -> StartData:
    g = torch.Generator().manual_seed(0)
    return StartData(torch.randn(4, 4, hw, hw, generator=g), [torch.zeros(1, 3)], torch.zeros(1, 3))


class HalfBoundaryEps(nn.Module):
    """eps = s·conv(x) whose activation, and so its gradient, passes through float16 storage: the forward
    rounds conv(x) to fp16 and the backward rounds the incoming gradient to fp16 (IEEE rounding of a cast,
    the same on every CPU and GPU), while every product is computed in float32. With s = 1e-5 the
    gradient at that boundary is below fp16's smallest subnormal (6e-8) everywhere, as the activation
    gradients of a deep fp16 UNet become a few layers down."""

    def __init__(self, scale: float = 1e-5):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.scale = scale

    def forward(self, x, nu, fp16: bool):
        h = self.conv(x / (1 + nu.view(-1, 1, 1, 1) ** 2).sqrt())
        if fp16:
            h = h.half().float()
        return self.scale * h


def _one_step(fp16: bool, scaling: bool) -> torch.Tensor:
    """Change of the conv weight after one step at a 64² latent."""
    torch.manual_seed(0)
    net = HalfBoundaryEps()
    before = net.conv.weight.detach().clone()

    def den(x, nu, cond):
        return x - nu.view(-1, 1, 1, 1) * net(x, nu, fp16)

    cfg = TrainConfig(steps=1, batch_size=2, learning_rate=1e-3, weight_decay=0.0, seed=1, fp16_loss_scaling=scaling)
    train(den, VP, dict(net.named_parameters()), _data(64), cfg)
    return net.conv.weight.detach() - before  # AdamW's first step: −lr·sign(grad) where grad ≠ 0


def test_fp16_gradient_underflow_is_restored_by_loss_scaling():
    ref, unscaled, scaled = _one_step(False, False), _one_step(True, False), _one_step(True, True)
    assert (ref != 0).float().mean() > 0.99  # fp32: every weight moves
    assert torch.count_nonzero(unscaled) == 0  # fp16 boundary, no scaling: the gradient rounded to exactly zero
    agree = (torch.sign(scaled) == torch.sign(ref)).float().mean()
    assert agree > 0.95, f"scaled fp16 update agrees with fp32 on {agree:.3f} of the signs"
    torch.testing.assert_close(scaled.abs().mean(), ref.abs().mean(), rtol=0.05, atol=0)


def _run(tmp_path, steps, grad_fault=None, resume=None, scaling=True):
    torch.manual_seed(0)
    net = DeepEps(width=4)
    seen = []
    cfg = TrainConfig(steps=steps, batch_size=2, learning_rate=1e-3, seed=2, save_every=2, fp16_loss_scaling=scaling)
    cb = Callbacks(on_step=lambda s, total, v: seen.append(net.net[0].weight.detach().clone()))
    res = train(
        fp16_denoiser(net, True, grad_fault), VP, dict(net.named_parameters()), _data(8), cfg, cb,
        tmp_path / "ck.pt", resume, "t",
    )
    return res, seen


@pytest.mark.fault(
    "with fp16 loss scaling, the scaled gradients overflow at one step",
    "that step is skipped (weights unchanged), the loss scale halves, training goes on; checkpoints keep the scale",
)
def test_an_overflowing_step_is_skipped_and_halves_the_scale(tmp_path):
    res, seen = _run(tmp_path, 4, grad_fault=lambda call: 1e36 if call == 3 else None)
    assert res.steps_done == 4
    assert torch.equal(seen[2], seen[1]) and not torch.equal(seen[1], seen[0]) and not torch.equal(seen[3], seen[2])
    assert torch.load(tmp_path / "ck.pt", weights_only=True)["grad_scaler"]["scale"] == 2.0**15


def test_resume_restores_the_loss_scale(tmp_path):
    fault = lambda call: 1e36 if call == 1 else None  # noqa: E731  (overflow at step 1: scale 2^15 from then on)
    whole, _ = _run(tmp_path / "a", 4, fault)
    _run(tmp_path / "b", 2, fault)
    resumed, _ = _run(tmp_path / "b", 4, resume=tmp_path / "b" / "ck.pt")
    assert resumed.losses == whole.losses
    a = torch.load(tmp_path / "a" / "ck.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ck.pt", weights_only=True)
    assert a["grad_scaler"] == b["grad_scaler"] and b["grad_scaler"]["scale"] == 2.0**15
    assert all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])


@pytest.mark.fault(
    "with fp16 loss scaling, the gradients overflow at every step",
    "after MAX_SKIPPED_STEPS skipped steps in a row: TrainingError naming the step, the loss scale reached and the fix",
)
def test_persistent_overflow_gives_up_with_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "MAX_SKIPPED_STEPS", 3)
    want = r"in 4 steps in a row, down to loss scale 8192 at step 5.*checkpoint, ck\.pt"
    with pytest.raises(TrainingError, match=want):
        _run(tmp_path, 8, grad_fault=lambda call: 1e36 if call >= 2 else None)


def test_without_scaling_an_overflow_still_stops_at_once(tmp_path):
    with pytest.raises(TrainingError, match=r"gradients became (inf|nan) at step 2 "):
        _run(tmp_path, 4, grad_fault=lambda call: float("inf") if call == 2 else None, scaling=False)
