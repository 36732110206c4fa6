"""Hostile offset files: every mutation ends in NPOError naming the file — never another exception,
a hang, or memory blown by a forged header (issue: hostile files)."""

from __future__ import annotations

import json
import math
import pickle
import struct

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from comfyui_npo.npo_core import formats
from comfyui_npo.npo_core.errors import NPOError

KEY = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
GOOD = save({f"{KEY}.lora.down.weight": torch.randn(2, 8), f"{KEY}.lora.up.weight": torch.randn(8, 2)})


def load_bytes(tmp_path, data: bytes, name: str = "fuzz.safetensors"):
    p = tmp_path / name
    p.write_bytes(data)
    return formats.load_offset(p)


def expect_npo_error(tmp_path, data: bytes, name: str = "fuzz.safetensors") -> None:
    try:
        load_bytes(tmp_path, data, name)
    except NPOError as e:
        assert name in str(e)
    # a mutation may leave a valid file (e.g. a flipped bit in tensor data): then it must parse


SETTINGS = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.fault(
    "any single byte of a valid offset file changed (hypothesis, 150 cases)",
    "NPOError naming the file, or the file still parses; never another exception or a hang",
)
@SETTINGS
@given(pos=st.integers(0, len(GOOD) - 1), byte=st.integers(0, 255))
def test_single_byte_mutations(tmp_path, pos, byte):
    data = bytearray(GOOD)
    data[pos] = byte
    expect_npo_error(tmp_path, bytes(data))


@pytest.mark.fault("an offset file truncated at any byte", "NPOError naming the file")
@SETTINGS
@given(cut=st.integers(0, len(GOOD) - 1))
def test_truncations(tmp_path, cut):
    with pytest.raises(NPOError, match="fuzz.safetensors"):
        load_bytes(tmp_path, GOOD[:cut])


def _with_header(header: dict, payload: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


@SETTINGS
@given(
    dtype=st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "XX"]),
    shape=st.lists(st.integers(0, 1 << 40), min_size=0, max_size=4),
    start=st.integers(0, 1 << 62),
    length=st.integers(0, 1 << 62),
)
@pytest.mark.fault(
    "a safetensors header claiming tensors of up to 2^40 elements at offsets up to 2^62 bytes (files of many GB)",
    "NPOError naming the file; the claimed size is never allocated",
)
def test_forged_headers_claiming_huge_tensors(tmp_path, dtype, shape, start, length):
    itemsize = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1, "BOOL": 1, "F64": 8}.get(dtype)
    claimed = math.prod(shape) * itemsize if itemsize else None
    # only headers that do not describe the 64-byte payload: those are the forgeries this test is about
    assume(itemsize is None or claimed != length or start + length > 64)
    data = _with_header(
        {f"{KEY}.lora.down.weight": {"dtype": dtype, "shape": shape, "data_offsets": [start, start + length]}},
        b"\0" * 64,
    )
    with pytest.raises(NPOError, match="fuzz.safetensors"):
        load_bytes(tmp_path, data)


@pytest.mark.fault(
    "a header-length field of 2^60, 0 or garbage; a file shorter than its header",
    "NPOError naming the file",
)
@pytest.mark.parametrize("prefix", [struct.pack("<Q", 1 << 60), struct.pack("<Q", 0), b"\xff" * 8, b"{}", b""])
def test_forged_header_lengths(tmp_path, prefix):
    with pytest.raises(NPOError, match="fuzz.safetensors"):
        load_bytes(tmp_path, prefix + b'{"a": 1}')


@pytest.mark.parametrize(
    "values,match", [(float("nan"), "NaN"), (float("inf"), "NaN or Inf"), (-float("inf"), "NaN or Inf")]
)
@pytest.mark.fault("NaN or ±Inf values in an offset tensor", "NPOError naming the file and the tensor")
def test_non_finite_values(tmp_path, values, match):
    data = save({f"{KEY}.lora.down.weight": torch.full((2, 8), values), f"{KEY}.lora.up.weight": torch.randn(8, 2)})
    with pytest.raises(NPOError, match=match):
        load_bytes(tmp_path, data)


@pytest.mark.fault(
    "integer or bool tensors where weights belong (wrong dtype)",
    "NPOError: offsets must be floating point",
)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, torch.uint8])
def test_wrong_dtypes(tmp_path, dtype):
    data = save({f"{KEY}.lora.down.weight": torch.zeros(2, 8, dtype=dtype), f"{KEY}.lora.up.weight": torch.randn(8, 2)})
    with pytest.raises(NPOError, match="floating"):
        load_bytes(tmp_path, data)


@pytest.mark.parametrize(
    "obj", [{"a": "not a tensor"}, [torch.zeros(2)], 42, {"state_dict": {"x": [1, 2]}}, {}, "text"]
)
@pytest.mark.fault(
    "a .pt/.ckpt pickle that is not a plain tensor dict (strings, lists, numbers, nesting)",
    "NPOError naming the file",
)
def test_pickles_that_are_not_plain_state_dicts(tmp_path, obj):
    p = tmp_path / "bad.pt"
    torch.save(obj, p)
    with pytest.raises(NPOError, match="bad.pt"):
        formats.load_offset(p)


@pytest.mark.fault("a pickle whose unpickling would run code", "refused (weights_only loading); the code never runs")
def test_pickle_with_code_is_refused_not_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("open('PWNED','w').write('x')",))

    p = tmp_path / "evil.ckpt"
    p.write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(NPOError, match="evil.ckpt: refused"):
        formats.load_offset(p)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.fault("random bytes named .safetensors or .pt (hypothesis)", "NPOError naming the file")
@SETTINGS
@given(garbage=st.binary(min_size=0, max_size=256))
def test_random_bytes_as_pickle_or_safetensors(tmp_path, garbage):
    # random bytes are never an offset: every path (safetensors and each pickle suffix) refuses them
    for name in ("g.safetensors", "g.pt", "g.ckpt", "g.bin"):
        with pytest.raises(NPOError) as refused:
            load_bytes(tmp_path, garbage, name)
        assert name in str(refused.value), (name, str(refused.value))
