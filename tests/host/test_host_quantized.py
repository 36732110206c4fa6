"""Apply NPO on quantized Linear layers, loaded the way a user loads them: a tiny SD3 diffusion model written as
an fp8 (or GGUF) file and read by the loader a user runs, so the layers are the classes built for such files:

- ``comfy_quant`` (mixed precision; ComfyUI 0.14.1 and 0.33.0 here, not 0.3.64): ``<layer>.weight``
  float8_e4m3fn, ``<layer>.weight_scale``, ``<layer>.comfy_quant`` (the JSON ``{"format": "float8_e4m3fn"}`` as
  uint8), read by ``comfy.sd.load_diffusion_model`` (Load Diffusion Model). ComfyUI builds
  ``comfy.ops.mixed_precision_ops(...).MixedPrecisionOps.Linear``, an ``nn.Module`` that is *not* an
  ``nn.Linear``, whose weight is a ``QuantizedTensor``.
- ``scaled_fp8`` (the older file: a top-level ``scaled_fp8`` marker and ``<layer>.scale_weight``): ComfyUI 0.3.64
  builds ``comfy.ops.scaled_fp8_ops(...).scaled_fp8_op.Linear`` (an ``nn.Linear`` whose weight and bias are
  fp8); newer versions convert the file to ``comfy_quant`` on load (``comfy.utils.convert_old_quants``).
- GGUF (city96/ComfyUI-GGUF's Unet Loader (GGUF); needs the ``gguf`` package and ComfyUI-GGUF, else skipped):
  ``GGMLOps.Linear``, an ``nn.Linear`` whose weight is a ``GGMLTensor`` of Q8_0 blocks.

The reference negative pass is a plain float model built separately: each quantized weight dequantized by hand from
the file (fp8 value × scale; Q8_0 by the gguf package's numpy reference) plus s·ΔW, every other tensor as ComfyUI
stores it. On the CPU these layers compute with the dequantized weight (no fp8 matmul): the quantized model and that
float model agree to float rounding (measured ≤ 7e-6 on samples of magnitude ~8), so the comparison is as tight as
for float models (``fk.close``: 1e-5 + 1e-4 × the sample's scale), while the offset moves the sample by ~0.7.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import comfy.model_management
import comfy.ops
import comfy.sd
import comfy.utils
import comfyui_version
import folder_paths
import npo_familykit as fk
import npo_hostkit as kit
import pytest
import torch
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import comfyui_npo
from comfyui_npo.nodes.host import model_facts, sampling
from comfyui_npo.npo_core.errors import NPOError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_TYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
HAS_MIXED = hasattr(comfy.ops, "mixed_precision_ops")
HAS_SCALED = hasattr(comfy.ops, "scaled_fp8_ops") or hasattr(comfy.utils, "convert_old_quants")
# the fp8 file formats the running ComfyUI reads, collected only there (0.3.64 has no mixed-precision ops);
# test_the_formats_collected_are_the_ones_this_release_reads pins which
FORMATS = [f for f, here in (("comfy_quant", HAS_MIXED), ("scaled_fp8", HAS_SCALED)) if here]

try:
    from comfy.quant_ops import QuantizedTensor
except ImportError:  # ComfyUI 0.3.x has no comfy.quant_ops
    QuantizedTensor = None


def test_the_formats_collected_are_the_ones_this_release_reads():
    """ComfyUI 0.14 and later read both fp8 formats, 0.3.x only scaled_fp8: a loader that goes missing fails here."""
    version = tuple(int(p) for p in comfyui_version.__version__.split(".")[:2] if p.isdigit())
    want = ["comfy_quant", "scaled_fp8"] if version >= (0, 14) else ["scaled_fp8"]
    assert FORMATS == want, f"ComfyUI {comfyui_version.__version__} reads {FORMATS}, expected {want}"


@pytest.fixture(scope="module")
def fam():
    f = fk.family("sd3")
    assert f.available(), f"{f.config_class} is not in ComfyUI {comfyui_version.__version__}"
    return f


def _linear_names(fam) -> list[str]:
    """Every nn.Linear of the family's plain (float) model."""
    dm = fk.tiny_model(fam).model.diffusion_model
    return [n for n, m in dm.named_modules() if isinstance(m, torch.nn.Linear)]


def _quantized_names(fam, fmt: str) -> list[str]:
    """scaled_fp8 files quantize every Linear; comfy_quant files are mixed: the transformer blocks' Linears in
    fp8, the embedders and final layer left in float (as released mixed checkpoints do)."""
    names = _linear_names(fam)
    return names if fmt == "scaled_fp8" else [n for n in names if n.startswith("joint_blocks.")]


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor float8_e4m3fn: (fp8 values, fp32 scale) with w ≈ fp8 · scale."""
    scale = (w.abs().max().float() / FP8_MAX).reshape(())
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_file(fam, fmt: str, path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Write the family's pristine weights as an fp8 diffusion-model file (bare keys, as files in
    models/diffusion_models are); returns {layer: (fp8 weight, scale)} as written."""
    sd = fk.pristine(fam)
    written: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        out[k] = v
    for name in _quantized_names(fam, fmt):
        q, scale = quantize(sd[f"{name}.weight"])
        written[name] = (q, scale)
        out[f"{name}.weight"] = q
        if fmt == "comfy_quant":
            out[f"{name}.weight_scale"] = scale
            conf = json.dumps({"format": "float8_e4m3fn"}).encode("utf-8")
            out[f"{name}.comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
        else:
            out[f"{name}.scale_weight"] = scale
    if fmt == "scaled_fp8":
        out["scaled_fp8"] = torch.empty(0, dtype=FP8)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    return written


def load_fp8(fam, fmt: str, tmp_path):
    """(ModelPatcher from ComfyUI's loader, {layer: (fp8, scale)} written)."""
    path = tmp_path / f"tiny_{fam.name}_{fmt}.safetensors"
    written = fp8_file(fam, fmt, path)
    with torch.inference_mode():  # as ComfyUI runs the loader node
        mp = comfy.sd.load_diffusion_model(str(path))
    assert type(mp.model.model_config).__name__ == fam.config_class
    return mp, written


def stored(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, scale) as the layer holds them, through its own state_dict (no dequantization)."""
    sd = module.state_dict()
    scale = sd.get("weight_scale", sd.get("scale_weight"))
    return sd["weight"], scale


def assert_quantized_layers(mp, written) -> None:
    """Every written layer is a quantized layer of ComfyUI's whose storage is the file's, bit for bit."""
    dm = mp.model.diffusion_model
    for name, (q, scale) in written.items():
        m = dm.get_submodule(name)
        if QuantizedTensor is not None and isinstance(m.weight, QuantizedTensor):
            assert not isinstance(m, torch.nn.Linear), type(m).__mro__  # ComfyUI's MixedPrecisionOps.Linear
        else:
            assert m.weight.dtype == FP8, f"{name}: {type(m).__name__} holds {m.weight.dtype}"
        w, s = stored(m)
        assert w.dtype == FP8 and torch.equal(w.view(torch.uint8), q.view(torch.uint8)), f"{name}: fp8 storage changed"
        assert torch.equal(s.float().reshape(()), scale), f"{name}: scale changed"


def dequantized_reference(fam, mp, written, delta: dict[str, torch.Tensor] | None = None, coef: float = 1.0):
    """A plain float model of the family: quantized weights = fp8 · scale by hand (from the file), every other
    tensor as ComfyUI stores it in ``mp`` (scaled_fp8 keeps the biases of its Linears in fp8), + coef·delta."""
    dm = mp.model.diffusion_model
    sd = {}
    for k in fk.pristine(fam):
        layer = k[: -len(".weight")] if k.endswith(".weight") else None
        if layer in written:
            q, scale = written[layer]
            sd[k] = q.float() * scale
        else:
            sd[k] = comfy.utils.get_attr(dm, k).detach().float().clone()
    if delta:
        sd = fk.merged(sd, delta, coef)
    return fk.model_from(fam, sd)


PACK_SOURCE = tuple(str(Path(comfyui_npo.__file__).parent / d) + os.sep for d in ("nodes", "npo_core"))
STOP = (os.path.join("torch", "nn", "modules", "module.py"), os.path.join("comfy", "model_patcher.py"))


def _pack_frame(frame) -> str | None:
    """The pack's frame that caused a read at ``frame``, or None when ComfyUI did: walking outwards, a frame of
    the pack's source (nodes/, npo_core/) before any layer call (torch's Module call, which a layer's own forward
    runs under) or ComfyUI's model patcher (loading, patching). A forward hook of the pack's runs inside the
    layer call, so it is found before the boundary; a pack function calling a ComfyUI helper that dequantizes
    is found past the helper's frames."""
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(PACK_SOURCE):
            return f"{os.path.relpath(name, Path(comfyui_npo.__file__).parent)}:{frame.f_lineno} {frame.f_code.co_name}"
        if name.endswith(STOP):
            return None
        frame = frame.f_back
    return None


class QuantizedReads(TorchFunctionMode):
    """Every materialisation of a quantized weight in float, and who did it: ``QuantizedTensor.dequantize`` (every
    float read of a mixed-precision weight ends there), and any torch call taking an fp8 tensor that returns a
    float one (scaled_fp8 layers keep plain fp8 Parameters). ``reads``: how many; ``by_pack``: the pack's frames
    among them."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.reads = 0
        self.by_pack: list[str] = []
        if QuantizedTensor is not None:
            original = QuantizedTensor.dequantize

            def dequantize(qt, *a, **kw):
                self._seen(sys._getframe(1))
                return original(qt, *a, **kw)

            monkeypatch.setattr(QuantizedTensor, "dequantize", dequantize)

    def _seen(self, frame) -> None:
        self.reads += 1
        culprit = _pack_frame(frame)
        if culprit is not None:
            self.by_pack.append(culprit)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        if any(a.dtype in FP8_TYPES and not _is_quantized(a) for a in ins):
            if any(_is_float(o) for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)):
                self._seen(sys._getframe(1))
        return out


def _is_quantized(t: torch.Tensor) -> bool:
    return QuantizedTensor is not None and isinstance(t, QuantizedTensor)


def _is_float(t: torch.Tensor) -> bool:
    return not _is_quantized(t) and t.dtype.is_floating_point and t.dtype not in FP8_TYPES


def unload() -> None:
    """Unload under inference_mode, as ComfyUI's executor does: ComfyUI's quantized layers re-wrap their weights on
    every move (comfy.ops._quantized_apply), cloning them out of inference mode when moved outside it; a later load
    inside inference_mode then fails in ComfyUI itself ("Cannot set version_counter for inference tensor")."""
    with torch.inference_mode():
        comfy.model_management.unload_all_models()


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("fmt", FORMATS)
def test_apply_npo_on_fp8_linears_equals_a_hand_dequantized_merged_reference(fam, fmt, batch, tmp_path, load_offset):
    model, written = load_fp8(fam, fmt, tmp_path)
    assert_quantized_layers(model, written)
    assert set(fam.attention_linears) <= set(written)
    before = kit.state_hash(model.model.diffusion_model)

    factors = fk.attention_lora(fam, fk.tiny_model(fam))
    offset = load_offset(fk.comfy_lora_file(factors, alpha=2.0), f"{fmt}.safetensors")
    s = 0.8
    got = fk.sample(sampling.apply_offset(model, offset, s), fam, batch)

    truth = fk.dense_truth(factors, scale=2.0 / 4)  # alpha / rank
    reference = dequantized_reference(fam, model, written, truth, s)
    want = fk.sample(kit.with_reference_cfg(load_fp8(fam, fmt, tmp_path)[0], reference), fam, batch)
    plain = fk.sample(model, fam, batch)
    effect = fk.max_err(plain, want)
    assert fk.max_err(plain, fk.sample(fk.tiny_model(fam), fam, batch)) > 1e-3, "the model should be quantized"
    assert effect > 1e-3, f"the offset should change the sample (plain vs reference {effect:.2e})"
    err = fk.max_err(got, want)
    assert fk.close(got, want), (
        f"{fmt} batch {batch}: NPO vs hand-dequantized reference {err:.2e} (effect {effect:.2e})"
    )

    unload()
    assert kit.state_hash(model.model.diffusion_model) == before
    assert_quantized_layers(model, written)
    assert not kit.hooked_modules(model.model.diffusion_model)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_pack_never_dequantizes_a_quantized_weight(fam, fmt, tmp_path, load_offset, monkeypatch):
    """Loading, resolving and applying the offset and sampling with it read no quantized weight in float in the
    pack's code (the offset's response needs x and the layer's shapes only). The probe is live: it sees ComfyUI's
    own casts in the layers' forward, and a pack helper that reads a weight in float is caught."""
    model, written = load_fp8(fam, fmt, tmp_path)
    factors = fk.attention_lora(fam, fk.tiny_model(fam))
    probe = QuantizedReads(monkeypatch)
    with probe:
        offset = load_offset(fk.comfy_lora_file(factors), f"{fmt}.safetensors")
        patched = sampling.apply_offset(model, model_facts.resolve_for_model(offset, model), 1.0)
        assert probe.reads == 0, f"{probe.reads} float reads of quantized weights before sampling"
        fk.sample(patched, fam, 2)
    assert probe.reads >= len(written), f"the probe saw {probe.reads} reads of {len(written)} quantized layers"
    assert not probe.by_pack, f"the pack read quantized weights in float at {sorted(set(probe.by_pack))}"

    # the probe catches the pack reading a weight: a full-weight file is taken against the model's weight
    some = next(iter(written))
    full = {f"{fk.PREFIX}{some}.weight": fk.pristine(fam)[f"{some}.weight"]}
    with probe:
        model_facts.resolve_for_model(load_offset(full, f"{fmt}_full.safetensors"), model)
    assert probe.by_pack, "the probe missed the pack's read of a quantized weight (full-weight offset)"


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_full_weight_offset_on_quantized_layers_is_taken_against_the_dequantized_weight(
    fam, fmt, tmp_path, load_offset
):
    """A full-weight NPO file (the model's weights + D on the attention linears) resolves to δ = D: the weight it
    is taken against is the one the layer computes with (fp8 · scale), not the raw fp8 values."""
    model, written = load_fp8(fam, fmt, tmp_path)
    g = torch.Generator().manual_seed(11)
    full, want = {}, {}
    for name in fam.attention_linears:
        q, scale = written[name]
        want[name] = 1e-3 * torch.randn(q.shape, generator=g)
        full[f"{fk.PREFIX}{name}.weight"] = q.float() * scale + want[name]
    resolved = model_facts.resolve_for_model(load_offset(full, f"{fmt}_full.safetensors"), model)
    for name, d in want.items():
        got = resolved.entries[f"{name}.weight"].delta.float()
        assert fk.close(got, d, atol=1e-6), (
            f"{fmt} {name}: δ off by {fk.max_err(got, d):.3g} (|D| ≤ {d.abs().max():.2g})"
        )


# ---------------------------------------------------------------------------------------------
# GGUF (city96/ComfyUI-GGUF): GGMLOps.Linear, an nn.Linear whose weight is a GGMLTensor of Q8_0 blocks
# ---------------------------------------------------------------------------------------------
def comfyui_gguf():
    """ComfyUI-GGUF's nodes and ops modules, imported as ComfyUI imports a custom node folder: from
    $COMFYUI_GGUF_PATH or ComfyUI's custom_nodes/ComfyUI-GGUF. Skips without it or without the gguf package."""
    gguf = pytest.importorskip("gguf", reason="the gguf package (ComfyUI-GGUF's dependency) is not installed")
    root = Path(os.environ.get("COMFYUI_GGUF_PATH") or Path(folder_paths.base_path) / "custom_nodes" / "ComfyUI-GGUF")
    if not (root / "ops.py").is_file():
        pytest.skip(f"ComfyUI-GGUF not found at {root} (set COMFYUI_GGUF_PATH)")
    name = "comfyui_gguf_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, root / "__init__.py", submodule_search_locations=[str(root)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return gguf, importlib.import_module(f"{name}.nodes"), importlib.import_module(f"{name}.ops")


def gguf_file(fam, gguf, path) -> dict[str, tuple[bytes, torch.Tensor]]:
    """The family's pristine weights as a .gguf file (arch "sd3"), the attention linears in Q8_0 and every other
    tensor in F32, written as ComfyUI-GGUF's tools/convert.py does. Returns {layer: (Q8_0 bytes, the weight
    dequantized by the gguf package's own numpy reference)}."""
    q8 = gguf.GGMLQuantizationType.Q8_0
    writer = gguf.GGUFWriter(path=None, arch="sd3")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    written = {}
    for k, v in fk.pristine(fam).items():
        layer = k[: -len(".weight")] if k.endswith(".weight") else None
        if layer in fam.attention_linears:
            data = gguf.quants.quantize(v.float().numpy(), q8)
            dequant = torch.from_numpy(gguf.quants.dequantize(data, q8).copy()).reshape(v.shape)
            written[layer] = (data.tobytes(), dequant)
            writer.add_tensor(k, data, raw_dtype=q8)
        else:
            writer.add_tensor(k, v.float().numpy(), raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


@pytest.mark.parametrize("batch", [1, 2])
def test_apply_npo_on_gguf_q8_linears_equals_a_hand_dequantized_merged_reference(
    fam, batch, tmp_path, load_offset, monkeypatch
):
    gguf, gguf_nodes, gguf_ops = comfyui_gguf()
    unet_dir = tmp_path / "diffusion_models"
    unet_dir.mkdir()
    written = gguf_file(fam, gguf, unet_dir / "tiny_sd3_q8.gguf")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", ([str(unet_dir)], {".gguf"}))

    def load():
        with torch.inference_mode():
            return gguf_nodes.UnetLoaderGGUF().load_unet("tiny_sd3_q8.gguf")[0]

    model = load()
    dm = model.model.diffusion_model
    for name in written:
        m = dm.get_submodule(name)
        assert isinstance(m, gguf_ops.GGMLOps.Linear) and isinstance(m.weight, gguf_ops.GGMLTensor), type(m).__mro__
        assert m.weight.tensor_type == gguf.GGMLQuantizationType.Q8_0
    before = {n: bytes(dm.get_submodule(n).weight.data.contiguous().view(torch.uint8).numpy()) for n in written}
    assert all(before[n] == raw for n, (raw, _) in written.items()), "the loaded Q8_0 blocks are not the file's"

    factors = fk.attention_lora(fam, fk.tiny_model(fam))
    offset = load_offset(fk.comfy_lora_file(factors), "gguf.safetensors")
    got = fk.sample(sampling.apply_offset(model, offset, 1.0), fam, batch)

    sd = {k: v for k, v in fk.pristine(fam).items()}
    for name, (_, dequant) in written.items():
        sd[f"{name}.weight"] = dequant
    reference = fk.model_from(fam, fk.merged(sd, fk.dense_truth(factors), 1.0))
    want = fk.sample(kit.with_reference_cfg(load(), reference), fam, batch)
    plain = fk.sample(model, fam, batch)
    effect = fk.max_err(plain, want)
    assert fk.max_err(plain, fk.sample(fk.tiny_model(fam), fam, batch)) > 1e-4, "the model should be quantized"
    assert effect > 1e-3, f"the offset should change the sample (plain vs reference {effect:.2e})"
    assert fk.close(got, want), f"GGUF batch {batch}: NPO vs hand-dequantized reference {fk.max_err(got, want):.2e}"
    unload()
    after = {n: bytes(dm.get_submodule(n).weight.data.contiguous().view(torch.uint8).numpy()) for n in written}
    assert after == before, "Q8_0 blocks changed"
    assert not kit.hooked_modules(dm)


class PackedInt8Linear(torch.nn.Module):
    """A Linear of a third-party quantization loader the pack does not know: int8 weight + scale, its own forward,
    no in_features / out_features."""

    def __init__(self, linear_weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        scale = linear_weight.abs().max().float() / 127
        self.weight = torch.nn.Parameter((linear_weight / scale).round().to(torch.int8), requires_grad=False)
        self.register_buffer("weight_scale", scale.reshape(()))
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.to(x.dtype) * self.weight_scale.to(x.dtype), self.bias)


def _refusal(model, fam, offset, layer: str, kind: str) -> None:
    """Apply NPO refuses the offset with an NPOError naming the layer, its class and what to do, before or when
    sampling starts, and leaves the model as it was."""
    before = kit.state_hash(model.model.diffusion_model)
    with pytest.raises(NPOError) as info:
        fk.sample(sampling.apply_offset(model, offset, 1.0), fam, 1)
    msg = str(info.value)
    assert f"'{layer}'" in msg and kind in msg, msg
    assert "Leave this layer out of the offset" in msg, msg
    unload()
    assert kit.state_hash(model.model.diffusion_model) == before
    assert not kit.hooked_modules(model.model.diffusion_model)


@pytest.mark.fault(
    "an offset on a Linear of a quantization the pack does not know (int8 module without in_features/out_features)",
    "NPOError naming the layer and its class, saying to leave the layer out of the offset",
)
def test_an_offset_on_an_unknown_linear_kind_is_refused(fam, load_offset):
    model = fk.tiny_model(fam)
    layer = fam.attention_linears[0]
    parent, leaf = layer.rsplit(".", 1)
    old = model.model.diffusion_model.get_submodule(layer)
    setattr(model.model.diffusion_model.get_submodule(parent), leaf, PackedInt8Linear(old.weight, old.bias))
    factors = fk.attention_lora(fam, fk.tiny_model(fam))
    offset = load_offset(fk.comfy_lora_file({layer: factors[layer]}), "int8.safetensors")
    _refusal(model, fam, offset, layer, "PackedInt8Linear")


if fk.family("hunyuan_video15").available():  # not collected before its config class arrived (after 0.3.64)

    @pytest.mark.fault(
        "an offset on a layer kind the per-row response has no formula for (HunyuanVideo 1.5's nn.Embedding)",
        "NPOError naming the layer and its class, saying to leave the layer out of the offset",
    )
    def test_an_offset_on_an_embedding_is_refused(load_offset):
        fam = fk.family("hunyuan_video15")
        model = fk.tiny_model(fam)
        layer = "cond_type_embedding"
        emb = model.model.diffusion_model.get_submodule(layer)
        assert isinstance(emb, torch.nn.Embedding)
        n, d = emb.weight.shape
        g = torch.Generator().manual_seed(2)
        lora = {layer: (torch.randn(n, 2, generator=g), torch.randn(2, d, generator=g))}
        _refusal(model, fam, load_offset(fk.comfy_lora_file(lora), "embedding.safetensors"), layer, "Embedding")


@pytest.mark.parametrize("fmt", FORMATS)
def test_self_npo_train_on_fp8_base_layers(fam, fmt, tmp_path, out_dir):
    """lora mode on a quantized base: the adapters train in the training dtype on top of ComfyUI's quantized
    Linear layers, whose fp8 storage and scales are bit-identical afterwards."""
    model, written = load_fp8(fam, fmt, tmp_path)
    pos, neg = fam.conds(1)
    shape = fam.latent_shape(1)
    out = kit.self_npo_train(
        model, pos, neg, rank=2, truncation_steps=2, pool_cfg=fam.cfg, width=shape[-1] * 8, height=shape[-2] * 8
    )
    offset = out.result[0]
    assert out.result[2] == 3 and offset.entries
    assert set(m.rsplit(".", 1)[0] for m in offset.entries) <= set(written) | set(_linear_names(fam))
    assert any(float(e.up.abs().max()) > 0 for e in offset.entries.values()), "the LoRA never moved"
    assert all(torch.isfinite(e.up).all() and torch.isfinite(e.down).all() for e in offset.entries.values())
    unload()
    assert_quantized_layers(model, written)
    assert not kit.hooked_modules(model.model.diffusion_model)


if HAS_MIXED:  # QuantizedTensor weights: not collected on a ComfyUI without mixed-precision ops (0.3.x)

    @pytest.mark.fault(
        "Self-NPO Train in full mode on a checkpoint with quantized (QuantizedTensor) weights",
        "NPOError naming the quantized weight and mode lora; the weights stay as loaded",
    )
    def test_full_mode_on_quantized_weights_is_refused(fam, tmp_path, out_dir):
        model, written = load_fp8(fam, "comfy_quant", tmp_path)
        pos, neg = fam.conds(1)
        shape = fam.latent_shape(1)
        with pytest.raises(NPOError, match="is quantized .*use mode lora"):
            kit.self_npo_train(
                model, pos, neg, mode="full", pool_cfg=fam.cfg, width=shape[-1] * 8, height=shape[-2] * 8
            )
        unload()
        assert_quantized_layers(model, written)
