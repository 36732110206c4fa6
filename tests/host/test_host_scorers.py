"""PickScore and the LAION aesthetic head against transformers computing the same thing directly.

Tiny random CLIP models (hidden 32, 2 layers, 32 px images, patch 8) and a tiny CLIP BPE tokenizer are written in the
Hugging Face layout at test time; nothing is downloaded. References: CLIPModel.forward's logits_per_image (the model
card's logit_scale.exp() * cosine) on CLIPProcessor inputs, the PIL CLIP image processor (CLIPImageProcessorPil in
transformers 5, CLIPImageProcessor in 4) on the PNG bytes ComfyUI's SaveImage would write, and a hand-built
nn.Sequential for the aesthetic MLP. Host tier: the ComfyUI venvs have transformers, the unit venv does not.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

transformers = pytest.importorskip("transformers")

from npo_scorerkit import (  # noqa: E402  (the tiny scorer builders and the PickScore reference)
    MERGES,
    PROMPTS,
    SIZES,
    TINY,
    VOCAB,
    comfy_images,
    head_state_dict,
    head_weights,
    laion_preprocessor,
    pil_image_processor,
    reference_pickscore,
    saved_pngs,
    spread_weights,
    write_pickscore_folder,
)

from comfyui_npo.evaluation.aesthetic import AestheticHead, AestheticScorer, clip_image_embeds, load_clip_vision  # noqa: E402
from comfyui_npo.evaluation.clip_preprocess import ClipPreprocess  # noqa: E402
from comfyui_npo.evaluation.pickscore import PickScore  # noqa: E402
from comfyui_npo.npo_core.errors import NPOError  # noqa: E402


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny CLIPModel (projection 16, logit_scale exp = 20) in the HF layout with tokenizer and preprocessor."""
    return write_pickscore_folder(tmp_path_factory.mktemp("pickscore"))


@pytest.fixture(scope="module")
def vision_folder(tmp_path_factory):
    """A tiny CLIPVisionModelWithProjection with a 768-d projection (what the aesthetic head reads)."""
    folder = tmp_path_factory.mktemp("clip_l14")
    config = transformers.CLIPVisionConfig(**TINY, image_size=32, patch_size=8, projection_dim=768)
    torch.manual_seed(2)
    model = transformers.CLIPVisionModelWithProjection(config).eval()
    spread_weights(model, 3)
    model.save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps(laion_preprocessor(32, 32)))
    return folder


@pytest.mark.parametrize("h,w", SIZES)
def test_pickscore_equals_clip_model_and_processor(clip_folder, h, w):
    """Batched, one prompt per image (prompts of different lengths, one truncated at 77 tokens)."""
    images = comfy_images(h, w, len(PROMPTS), seed=h)
    scorer = PickScore.from_folder(clip_folder)
    assert len(scorer.tokenizer(PROMPTS[-1])["input_ids"]) > 77
    scorer.batch_size = 3  # two batches of 3 and 1
    got = scorer.score(images, PROMPTS)
    want = reference_pickscore(clip_folder, images, PROMPTS)
    assert got.shape == (len(PROMPTS),) and got.dtype == torch.float32
    diff = (got - want).abs().max().item()
    assert diff < 1e-5, diff  # measured: up to 9.5e-7 on scores of 0.1..4.2 (transformers 5.25, CPU)
    assert want.std() > 0.1, want  # the scores spread: a wrong preprocessing or prompt order shows
    # PIL images in, and the same prompts on shuffled images, give the matching scores
    pil = PickScore.from_folder(clip_folder).score(saved_pngs(images), PROMPTS)
    assert (pil - want).abs().max() < 1e-5
    perm = [2, 0, 3, 1]
    assert (scorer.score(images[perm], [PROMPTS[i] for i in perm]) - want[perm]).abs().max() < 1e-5


def test_pickscore_from_weights_only_bin(clip_folder, tmp_path):
    """A pytorch_model.bin that torch.load(weights_only=True) reads scores as model.safetensors does."""
    folder = tmp_path / "bin"
    shutil.copytree(clip_folder, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    model = transformers.CLIPModel.from_pretrained(str(clip_folder), local_files_only=True)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    images = comfy_images(*SIZES[0], 2, seed=5)
    got = PickScore.from_folder(folder).score(images, PROMPTS[:2])
    want = PickScore.from_folder(clip_folder).score(images, PROMPTS[:2])
    assert torch.equal(got, want)


class _Payload:
    """A pickled object that torch.load(weights_only=True) must refuse."""


def test_pickscore_refusals(clip_folder, tmp_path):
    """Missing tokenizer files, preprocessor config or weights, and a pickle that needs code, are refused by name."""
    no_tok = tmp_path / "no_tok"
    shutil.copytree(clip_folder, no_tok, ignore=shutil.ignore_patterns("tokenizer*", "vocab.json", "merges.txt"))
    with pytest.raises(NPOError, match="no CLIP tokenizer") as info:
        PickScore.from_folder(no_tok)
    for name in ("tokenizer.json", "vocab.json", "merges.txt", str(no_tok)):
        assert name in str(info.value)

    (no_tok / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(VOCAB)}))
    with pytest.raises(NPOError, match=r"tokenizer\.json, merges\.txt missing"):
        PickScore.from_folder(no_tok)
    (no_tok / "merges.txt").write_text("\n".join(MERGES) + "\n")  # vocab.json + merges.txt alone are enough
    minimal = PickScore.from_folder(no_tok)
    images = comfy_images(*SIZES[1], 2, seed=6)
    assert torch.equal(
        minimal.score(images, PROMPTS[:2]), PickScore.from_folder(clip_folder).score(images, PROMPTS[:2])
    )

    no_pre = tmp_path / "no_pre"
    shutil.copytree(clip_folder, no_pre, ignore=shutil.ignore_patterns("preprocessor_config.json"))
    with pytest.raises(NPOError, match="preprocessor_config.json is missing"):
        PickScore.from_folder(no_pre)

    no_weights = tmp_path / "no_weights"
    shutil.copytree(clip_folder, no_weights, ignore=shutil.ignore_patterns("model.safetensors"))
    with pytest.raises(NPOError, match="model.safetensors is missing"):
        PickScore.from_folder(no_weights)

    model = transformers.CLIPModel.from_pretrained(str(clip_folder), local_files_only=True)
    torch.save({**model.state_dict(), "payload": _Payload()}, no_weights / "pytorch_model.bin")
    with pytest.raises(NPOError, match=r"weights_only=True.*safetensors") as info:
        PickScore.from_folder(no_weights)
    assert str(no_weights / "pytorch_model.bin") in str(info.value)

    partial = tmp_path / "partial"
    shutil.copytree(clip_folder, partial, ignore=shutil.ignore_patterns("model.safetensors"))
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("text_projection")}
    save_file(sd, str(partial / "model.safetensors"))
    with pytest.raises(NPOError, match=r"1 weights missing.*text_projection\.weight"):
        PickScore.from_folder(partial)

    scorer = PickScore.from_folder(clip_folder)
    with pytest.raises(NPOError, match="prompts: expected a list of 2 strings"):
        scorer.score(images, PROMPTS[:1])
    with pytest.raises(NPOError, match=r"images: .*\[B, H, W, 3\]"):
        scorer.score(images[..., :2], PROMPTS[:2])


PREPROCESSORS = {
    "laion_224": laion_preprocessor(224, 224),  # the real CLIP / PickScore settings, old int format
    "dict_pad": {  # new dict format, a crop wider than some resized images (zero padding), non-square
        "do_resize": True,
        "size": {"shortest_edge": 40},
        "do_center_crop": True,
        "crop_size": {"height": 32, "width": 48},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.4, 0.3],
        "image_std": [0.2, 0.25, 0.3],
        "resample": 3,
        "image_processor_type": "CLIPImageProcessor",
    },
}


@pytest.mark.parametrize("config", sorted(PREPROCESSORS))
@pytest.mark.parametrize("h,w", [*SIZES, (517, 301), (225, 300), (64, 65)])  # 64x65: 224x227, margin 3
def test_preprocess_equals_clip_image_processor(tmp_path, config, h, w):
    """Backend "pil" equals the PIL CLIP image processor exactly; backend "torch" is within 2 uint8 levels."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSORS[config]))
    ours = ClipPreprocess.from_file(tmp_path)
    images = comfy_images(h, w, 2, seed=h * w)
    want = pil_image_processor(tmp_path)(images=saved_pngs(images), return_tensors="pt")["pixel_values"]
    got = ours(images)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max().item() < 1e-6  # measured: 0 (bit-equal)
    assert torch.equal(ours(saved_pngs(images)), got)  # PIL images in: the same pixels
    level = 1 / 255 / min(ours.std)  # one uint8 step after normalisation, at its largest
    fast = ours(images, backend="torch")
    err = (fast - want).abs()
    # measured (transformers 5.25, torch 2.14 CPU): at most 2 levels, on at most 1.3 % of the values
    assert err.max().item() <= 2 * level + 1e-5, err.max().item() / level
    assert (err > 1e-5).float().mean().item() < 0.02


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| over max |want|."""
    return ((got - want).abs().max() / want.abs().max()).item()


def reference_aesthetic(folder, images: torch.Tensor, weights) -> torch.Tensor:
    """CLIPVisionModelWithProjection.image_embeds, normalised as LAION's numpy ``normalized``, then the MLP."""
    vision = transformers.CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True).eval()
    pixels = pil_image_processor(folder)(images=saved_pngs(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        emb = vision(pixel_values=pixels).image_embeds.numpy()
    norm = np.atleast_1d(np.linalg.norm(emb, 2, -1))
    norm[norm == 0] = 1
    emb = emb / np.expand_dims(norm, -1)
    mlp = nn.Sequential(
        nn.Linear(768, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    ).eval()
    with torch.no_grad():
        for layer, (w, b) in zip([m for m in mlp if isinstance(m, nn.Linear)], weights, strict=True):
            layer.weight.copy_(w)
            layer.bias.copy_(b)
        return mlp(torch.from_numpy(emb)).squeeze(-1)


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_aesthetic_equals_vision_model_and_mlp(vision_folder, tmp_path, h, w, suffix):
    weights = head_weights()
    path = tmp_path / f"sac+logos+ava1-l14-linearMSE{suffix}"
    if suffix == ".pth":
        torch.save(head_state_dict(weights), path)
    else:
        save_file(head_state_dict(weights), str(path))
    images = comfy_images(h, w, 5, seed=w)
    want = reference_aesthetic(vision_folder, images, weights)

    vision, preprocess = load_clip_vision(vision_folder)
    embeds = clip_image_embeds(vision, images, preprocess, batch_size=2)
    norms = embeds.norm(dim=-1)
    assert ((norms - 1).abs() > 0.5).all(), norms  # far from unit length: a missing normalisation shows
    got = AestheticHead.from_file(path).score(embeds)
    assert got.shape == (5,) and got.dtype == torch.float32
    rel = rel_err(got, want)
    assert rel < 2e-6, rel  # measured: up to 7.3e-7 (scores ~23, so 9 float32 steps; CLIP batches of 2 vs 5)
    assert want.std() > 0.1, want
    scorer = AestheticScorer.from_files(vision_folder, path)
    assert rel_err(scorer.score(images, ["unused"] * 5), want) < 2e-6
    # the head takes embeddings at any scale (it normalises them) and a zero vector stays finite
    scaled = AestheticHead.from_file(path).score(torch.cat([embeds * 7.0, torch.zeros(1, 768)]))
    assert rel_err(scaled[:5], want) < 2e-6 and torch.isfinite(scaled).all()


def test_aesthetic_refusals(tmp_path):
    """A pickle that needs more than weights_only, a wrong head shape, stray keys and other formats: refused by name."""
    sd = head_state_dict(head_weights())
    pickled = tmp_path / "needs_code.pth"
    torch.save({**sd, "meta": _Payload()}, pickled)
    with pytest.raises(
        NPOError, match=r"refused: torch\.load\(weights_only=True\) cannot read it.*safetensors"
    ) as info:
        AestheticHead.from_file(pickled)
    assert str(pickled) in str(info.value)

    narrow = tmp_path / "vit_b32_head.pth"
    torch.save(head_state_dict(head_weights(dims=(512, 1024, 128, 64, 16, 1))), narrow)
    with pytest.raises(NPOError, match=r"wrong head shape, layers\.0\.weight \(1024, 512\) \(expected \(1024, 768\)\)"):
        AestheticHead.from_file(narrow)

    prefixed = tmp_path / "prefixed.safetensors"
    save_file({f"model.{k}": v for k, v in sd.items()}, str(prefixed))
    with pytest.raises(NPOError, match=r"prefixed\.safetensors: not a LAION aesthetic v2 head.*model\.layers\.0\.bias"):
        AestheticHead.from_file(prefixed)

    for name, match in (("head.onnx", "unknown weights format '.onnx'"), ("absent.pth", "absent.pth not found")):
        if name.endswith(".onnx"):
            (tmp_path / name).write_bytes(b"\0")
        with pytest.raises(NPOError, match=match):
            AestheticHead.from_file(tmp_path / name)

    head = AestheticHead()
    with pytest.raises(NPOError, match=r"image_embeds: shape \(2, 16\)"):
        head.score(torch.zeros(2, 16))
