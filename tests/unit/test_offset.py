"""NPOOffset arithmetic against hand computations."""

import numpy as np
import pytest
import torch

from comfyui_npo.npo_core.errors import NPOError
from comfyui_npo.npo_core.offset import Dense, FullWeight, LowRank, NPOOffset, negative_offset


def test_lowrank_delta_is_scaled_up_at_down():
    up, down = torch.randn(6, 2), torch.randn(2, 5)
    e = LowRank(up, down, alpha=1.0)
    np.testing.assert_allclose(e.delta().numpy(), (up.numpy() @ down.numpy()) * 0.5, rtol=1e-6, atol=1e-6)
    assert LowRank(up, down).scale == 1.0  # no alpha tensor: alpha = rank (the authors' files)


def test_conv_lowrank_delta_shape_and_value():
    up, down = torch.randn(4, 3, 1, 1), torch.randn(3, 2, 3, 3)
    d = LowRank(up, down, 3.0).delta()
    assert d.shape == (4, 2, 3, 3)
    ref = np.einsum("or,rikl->oikl", up[:, :, 0, 0].numpy(), down.numpy())
    np.testing.assert_allclose(d.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_scaled_and_plus_are_exact():
    a = LowRank(torch.randn(5, 2), torch.randn(2, 3), 4.0)
    b = LowRank(torch.randn(5, 1), torch.randn(1, 3))
    off = NPOOffset({"m.weight": a}).scaled(0.5).plus(NPOOffset({"m.weight": b, "n.bias": Dense(torch.ones(5))}))
    got = off.entries["m.weight"]
    assert isinstance(got, LowRank) and got.rank == 3
    ref = 0.5 * (a.up.numpy() @ a.down.numpy()) * 2.0 + b.up.numpy() @ b.down.numpy()
    np.testing.assert_allclose(got.delta().numpy(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(off.entries["n.bias"].delta, torch.ones(5))


def test_svd_compression_keeps_energy_reported_independently():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(16, 4, generator=g))
    v, _ = torch.linalg.qr(torch.randn(12, 4, generator=g))
    sing = torch.tensor([4.0, 2.0, 1.0, 0.5])
    mat = (u * sing) @ v.T
    off = NPOOffset({"w.weight": Dense(mat), "w.bias": Dense(torch.ones(16))})
    full, e_full = off.compressed(4)
    np.testing.assert_allclose(full.entries["w.weight"].delta().numpy(), mat.numpy(), atol=1e-5)
    assert e_full == pytest.approx(1.0, abs=1e-6)
    one, e_one = off.compressed(1)
    assert e_one == pytest.approx(16.0 / (16 + 4 + 1 + 0.25), rel=1e-5)
    ref = sing[0] * np.outer(u[:, 0].numpy(), v[:, 0].numpy())
    np.testing.assert_allclose(one.entries["w.weight"].delta().numpy(), ref, atol=1e-5)
    assert isinstance(one.entries["w.bias"], Dense)  # 1-D stays dense
    assert one.metadata["npo.svd_rank"] == "1"


def test_svd_compression_of_conv_keeps_shape():
    d = torch.randn(8, 4, 3, 3)
    out, energy = NPOOffset({"c.weight": Dense(d)}).compressed(5)
    e = out.entries["c.weight"]
    assert isinstance(e, LowRank) and e.up.shape == (8, 5, 1, 1) and e.down.shape == (5, 4, 3, 3)
    sv = np.linalg.svd(d.numpy().reshape(8, 36), compute_uv=False)
    assert energy == pytest.approx(float((sv[:5] ** 2).sum() / (sv**2).sum()), rel=1e-4)
    err = np.linalg.norm(e.delta().numpy() - d.numpy()) ** 2
    assert err == pytest.approx(float((sv[5:] ** 2).sum()), rel=1e-3)  # Eckart–Young residual
    full, e_full = NPOOffset({"c.weight": Dense(d)}).compressed(8)  # rank ≥ min(out, in·k): kept dense, lossless
    assert isinstance(full.entries["c.weight"], Dense) and e_full == 1.0
    with pytest.raises(NPOError, match="rank"):
        NPOOffset({"c.weight": Dense(d)}).compressed(0)


def test_negative_offset_matches_authors_merge_formula():
    torch.manual_seed(0)
    base = {"a.weight": torch.randn(3, 4), "b.weight": torch.randn(2, 2)}
    pos = {"a.weight": base["a.weight"] + torch.randn(3, 4), "b.weight": base["b.weight"].clone()}
    up, down = torch.randn(3, 2), torch.randn(2, 4)
    delta = NPOOffset({"a.weight": LowRank(up, down)})
    s, m = 0.7, 0.3
    neg = negative_offset(delta, s, m, pos, base)
    # θ_neg = θ_base + s·δ + (1 − m)(θ_pos − θ_base), written out by hand
    want = base["a.weight"] + s * (up @ down) + (1 - m) * (pos["a.weight"] - base["a.weight"])
    e = neg.entries["a.weight"]
    got = pos["a.weight"] + (e.delta() if isinstance(e, LowRank) else e.delta)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    assert "b.weight" not in neg.entries  # identical in pos and base: no term


def test_negative_offset_default_is_pos_plus_delta_and_needs_base_only_for_m():
    delta = NPOOffset({"a.weight": Dense(torch.ones(2, 2))})
    out = negative_offset(delta, 2.0)
    assert torch.equal(out.entries["a.weight"].delta, torch.full((2, 2), 2.0))
    with pytest.raises(NPOError, match="base_model"):
        negative_offset(delta, 1.0, 0.5)
    with pytest.raises(NPOError, match="merge_weight"):
        negative_offset(delta, 1.0, 1.5)


def test_full_weights_resolve_to_difference_and_block_arithmetic():
    val = torch.randn(3, 3)
    off = NPOOffset({"a.weight": FullWeight(val)})
    with pytest.raises(NPOError, match="resolved"):
        off.scaled(2.0)
    ref = torch.randn(3, 3)
    out = off.resolved_full_weights(lambda k: ref)
    assert torch.allclose(out.entries["a.weight"].delta, val - ref)
    with pytest.raises(NPOError, match="shape"):
        off.resolved_full_weights(lambda k: torch.zeros(2, 3))


def test_summary_names_format_rank_layers_arch():
    off = NPOOffset(
        {"x.to_q.weight": LowRank(torch.randn(4, 8), torch.randn(8, 4))},
        source_format="peft",
        base_arch="SD15",
        source="f.safetensors",
    )
    text = off.summary()
    for part in ("peft", "SD15", "rank: 8", "1 modules", "f.safetensors"):
        assert part in text


def test_lowrank_entries_above_the_rank_are_recompressed_exactly_like_dense_svd():
    g = torch.Generator().manual_seed(2)
    e = LowRank(torch.randn(10, 6, generator=g), torch.randn(6, 7, generator=g), 3.0)
    dense = e.delta()
    a, e_a = NPOOffset({"w.weight": e}).compressed(2)
    b, e_b = NPOOffset({"w.weight": Dense(dense)}).compressed(2)
    np.testing.assert_allclose(a.entries["w.weight"].delta().numpy(), b.entries["w.weight"].delta().numpy(), atol=1e-4)
    assert e_a == pytest.approx(e_b, rel=1e-5) and a.metadata["npo.svd_entries"] == "1"
    same, e_same = NPOOffset({"w.weight": e}).compressed(8)  # already rank ≤ 8: untouched
    assert same.entries["w.weight"] is e and e_same == 1.0 and same.metadata["npo.svd_entries"] == "0"
