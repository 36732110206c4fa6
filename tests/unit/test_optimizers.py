"""The optimizer choice of Self-NPO training: AdamW, torch's Adafactor, 8-bit AdamW only with bitsandbytes; each
one's state goes through the resume checkpoint so that a resumed run equals an uninterrupted one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_tdft import VP, _data
from tiny_denoiser import TinyEps, denoiser_of

from comfyui_npo.training import optimizers
from comfyui_npo.training.trainer import Callbacks, TrainConfig, TrainingError, train


def _run(name: str, tmp_path, steps: int, stop_at=None, resume=None, lr=3e-3):
    torch.manual_seed(0)
    net = TinyEps()
    cfg = TrainConfig(steps=steps, batch_size=4, learning_rate=lr, seed=2, save_every=2, optimizer=name)
    done = []
    cb = Callbacks(on_step=lambda s, t, v: done.append(s),
                   should_stop=lambda: stop_at is not None and len(done) >= stop_at)
    res = train(denoiser_of(net), VP, dict(net.named_parameters()), _data(), cfg, cb, tmp_path / f"{name}.pt", resume,
                "tiny")
    return res, net


@pytest.mark.parametrize("name", [optimizers.ADAMW, optimizers.ADAFACTOR])
def test_each_optimizer_trains_and_resumes_exactly(name, tmp_path):
    full, net_full = _run(name, tmp_path / "a", 6)
    (tmp_path / "b").mkdir()
    part, _ = _run(name, tmp_path / "b", 6, stop_at=4)
    assert part.stopped_early and part.steps_done == 4
    state = torch.load(tmp_path / "b" / f"{name}.pt", weights_only=True)
    assert state["optimizer_name"] == name and state["optimizer"]["state"], "no optimizer state was saved"
    resumed, net_res = _run(name, tmp_path / "b", 6, resume=tmp_path / "b" / f"{name}.pt")
    np.testing.assert_allclose(resumed.losses, full.losses, rtol=1e-6, atol=1e-7)
    for a, b in zip(net_full.parameters(), net_res.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.manual_seed(0)
    assert any((a - b).abs().max() > 1e-5 for a, b in zip(net_full.parameters(), TinyEps().parameters(), strict=True))


def test_the_choice_is_the_optimizer_that_steps(tmp_path):
    """Adafactor and AdamW are different runs; make_optimizer builds torch's own classes with the run's settings."""
    adamw, net_a = _run(optimizers.ADAMW, tmp_path, 3)
    adafactor, net_f = _run(optimizers.ADAFACTOR, tmp_path, 3)
    assert any((a - b).abs().max() > 1e-5 for a, b in zip(net_a.parameters(), net_f.parameters(), strict=True))
    p = [torch.nn.Parameter(torch.zeros(3))]
    opt = optimizers.make_optimizer(optimizers.ADAFACTOR, p, 0.02, 0.1)
    assert type(opt) is torch.optim.Adafactor and opt.defaults["lr"] == 0.02 and opt.defaults["weight_decay"] == 0.1
    opt = optimizers.make_optimizer(optimizers.ADAMW, p, 1e-4, 0.0)
    assert type(opt) is torch.optim.AdamW and opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8
    assert optimizers.auto_learning_rate(optimizers.ADAFACTOR, 1e-4) == 1e-2
    assert optimizers.auto_learning_rate(optimizers.ADAMW, 1e-4) == 1e-4


def test_resuming_with_another_optimizer_is_refused(tmp_path):
    _run(optimizers.ADAMW, tmp_path, 2)
    with pytest.raises(TrainingError, match="was trained with AdamW, this run uses Adafactor"):
        _run(optimizers.ADAFACTOR, tmp_path, 4, resume=tmp_path / "AdamW.pt")
    state = torch.load(tmp_path / "AdamW.pt", weights_only=True)
    del state["optimizer_name"]  # a checkpoint written before the choice existed: AdamW
    torch.save(state, tmp_path / "old.pt")
    resumed, _ = _run(optimizers.ADAMW, tmp_path, 4, resume=tmp_path / "old.pt")
    assert resumed.steps_done == 4


def test_8bit_adamw_needs_bitsandbytes(monkeypatch):
    monkeypatch.setattr(optimizers.importlib.util, "find_spec", lambda name: None)
    reason = optimizers.unavailable_reason(optimizers.ADAMW_8BIT)
    assert reason and "bitsandbytes" in reason and "never installs" in reason
    with pytest.raises(ValueError, match="optimizer: AdamW 8-bit cannot run here: it needs the bitsandbytes"):
        train(denoiser_of(TinyEps()), VP, {}, _data(), TrainConfig(steps=1, optimizer=optimizers.ADAMW_8BIT))
    assert optimizers.unavailable_reason("SGD").startswith("'SGD' is not one of")
