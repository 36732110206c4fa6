"""Per-row injection against a separately built network with hand-merged weights."""

import copy

import pytest
import torch
from torch import nn

from comfyui_npo.npo_core.errors import NPOError
from comfyui_npo.npo_core.inject import OffsetInjector, RowGate, chunk_row_mask, mask_to_slices
from comfyui_npo.npo_core.offset import Dense, LowRank, NPOOffset


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, stride=1)
        self.norm = nn.GroupNorm(2, 8)
        self.proj = nn.Conv2d(8, 8, 1)
        self.lin = nn.Linear(8, 6)
        self.ln = nn.LayerNorm(6)

    def forward(self, x):
        h = self.proj(self.norm(self.conv(x)))
        return self.ln(self.lin(h.mean((2, 3))))


def make_offset():
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    return NPOOffset(
        {
            "conv.weight": LowRank(r(8, 2, 1, 1), r(2, 4, 3, 3), 1.0),
            "conv.bias": Dense(r(8)),
            "norm.weight": Dense(r(8)),
            "norm.bias": Dense(r(8)),
            "proj.weight": Dense(r(8, 8, 1, 1)),
            "lin.weight": LowRank(r(6, 3), r(3, 8)),
            "ln.weight": Dense(r(6)),
            "ln.bias": Dense(r(6)),
        }
    )


def merged(net, off, s):
    ref = copy.deepcopy(net)
    sd = ref.state_dict()
    with torch.no_grad():
        for k, e in off.entries.items():
            d = e.delta() if isinstance(e, LowRank) else e.delta
            sd[k] += s * d.reshape(sd[k].shape)
    ref.load_state_dict(sd)
    return ref


def test_chunk_rows_and_slices():
    assert chunk_row_mask([0, 1], 4).tolist() == [False, False, True, True]
    assert chunk_row_mask([1, 0, 1], 3).tolist() == [True, False, True]
    assert chunk_row_mask(None, 3).tolist() == [False] * 3
    assert mask_to_slices(torch.tensor([True, True, False, True])) == [slice(0, 2), slice(3, 4)]
    with pytest.raises(NPOError):
        chunk_row_mask([0, 1], 3)


@pytest.mark.parametrize("cou", [[0, 1], [1, 0], [1], [0], [0, 1, 1]])
def test_offset_lands_on_uncond_rows_only(cou):
    torch.manual_seed(0)
    net = Net().eval()
    off, s = make_offset(), 0.8
    ref_neg = merged(net, off, s)
    x = torch.randn(2 * len(cou), 4, 6, 6)
    gate = RowGate()
    inj = OffsetInjector(off, s, gate)
    inj.attach(net)
    with torch.no_grad():
        plain = net(x)  # gate inactive: hooks do nothing
        with gate.active(mask_to_slices(chunk_row_mask(cou, x.shape[0]))):
            got = net(x)
        want_neg, want_pos = ref_neg(x), copy.deepcopy(net)(x)
    mask = chunk_row_mask(cou, x.shape[0])
    torch.testing.assert_close(plain, want_pos)
    torch.testing.assert_close(got[mask], want_neg[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[~mask], want_pos[~mask], rtol=0, atol=0)
    inj.detach()
    assert all(not m._forward_hooks for m in net.modules())


def test_strength_zero_is_identity_and_attached_to_cleans_up():
    net = Net().eval()
    x = torch.randn(2, 4, 5, 5)
    gate = RowGate()
    inj = OffsetInjector(make_offset(), 0.0, gate)
    with torch.no_grad(), inj.attached_to(net), gate.active([slice(0, 2)]):
        assert any(m._forward_hooks for m in net.modules())
        got = net(x)
    torch.testing.assert_close(got, net(x))
    assert all(not m._forward_hooks for m in net.modules())


def test_half_precision_inputs_use_cast_copies():
    net = Net().eval().to(torch.bfloat16)
    off = make_offset()
    ref = merged(net.float(), off, 1.0).to(torch.bfloat16)
    net = net.to(torch.bfloat16)
    gate = RowGate()
    inj = OffsetInjector(off, 1.0, gate)
    inj.attach(net)
    x = torch.randn(2, 4, 5, 5, dtype=torch.bfloat16)
    with torch.no_grad(), gate.active([slice(0, 2)]):
        got = net(x)
    torch.testing.assert_close(got.float(), ref(x).float(), rtol=0.1, atol=0.1)


def test_unsupported_layer_and_unresolved_offset_are_refused():
    net = nn.Sequential(nn.Embedding(4, 4))
    with pytest.raises(NPOError, match="Embedding"):
        OffsetInjector(NPOOffset({"0.weight": Dense(torch.zeros(4, 4))}), 1.0, RowGate()).attach(net)
    with pytest.raises(NPOError, match="resolve"):
        OffsetInjector(NPOOffset({"0.weight": Dense(torch.zeros(4, 4))}, naming="diffusers"), 1.0, RowGate())
    with pytest.raises(NPOError, match="not found"):
        OffsetInjector(NPOOffset({"nope.weight": Dense(torch.zeros(4, 4))}), 1.0, RowGate()).attach(net)


def test_one_injector_on_two_copies_in_parallel_threads():
    """Multi-GPU CFG split: two copies of the model, each in its own thread; each copy adds the offset to the
    rows its own thread selected, and to no other."""
    import threading

    torch.manual_seed(0)
    net_a = Net().eval()
    net_b = copy.deepcopy(net_a)
    off, s = make_offset(), 1.2
    ref_neg = merged(net_a, off, s)
    gate = RowGate()
    inj = OffsetInjector(off, s, gate)
    inj.attach(net_a)
    inj.attach(net_b)
    x = torch.randn(4, 4, 6, 6)
    results, barrier = {}, threading.Barrier(2)

    def run(name, net, rows):
        with torch.no_grad(), gate.active(rows):
            barrier.wait()  # both threads are inside their gate before either computes
            results[name] = [net(x) for _ in range(5)]

    threads = [
        threading.Thread(target=run, args=("a", net_a, [slice(0, 2)])),
        threading.Thread(target=run, args=("b", net_b, [slice(2, 4)])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert gate.rows is None  # this thread never opened the gate
    with torch.no_grad():
        plain, neg = merged(net_a, off, 0.0)(x), ref_neg(x)
    for y in results["a"]:
        torch.testing.assert_close(y[:2], neg[:2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y[2:], plain[2:], rtol=1e-5, atol=1e-5)
    for y in results["b"]:
        torch.testing.assert_close(y[:2], plain[:2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y[2:], neg[2:], rtol=1e-5, atol=1e-5)
    inj.detach(net_a)
    assert not any(m._forward_hooks for m in net_a.modules())
    assert any(m._forward_hooks for m in net_b.modules()) and inj.is_attached(net_b)
    inj.detach()
    assert not any(m._forward_hooks for m in net_b.modules()) and not inj.attached
