"""HPS v2.1 against open_clip's own forward on the same checkpoint: the open_clip → CLIPModel key conversion.

A tiny random open_clip CLIP (embed 32 = width 32, so a missing transpose of a projection is no shape error; 2
layers, 4 heads, 32 px images, patch 8, GELU as ViT-H-14) is saved as HPS saves its checkpoint
(``{"state_dict": sd}``, also "module."-prefixed and in half precision); the tiny CLIP BPE tokenizer of
npo_scorerkit writes next to it. Reference: open_clip's ``encode_image`` / ``encode_text`` on open_clip's
own eval transform of the PNGs and the HF tokenizer's ids (padded with its pad token, EOT: open_clip's argmax
pooling takes the first EOT, so the padding must not matter), normalised, cosine.
Host tier: the ComfyUI venvs have transformers; open_clip (test-only) comes from the shared base venv.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

import npo_scorerkit as ref  # noqa: E402  (tiny tokenizer, images and PNGs)

from comfyui_npo.evaluation.hps import HPSv21, convert_open_clip, open_clip_preprocess  # noqa: E402
from comfyui_npo.npo_core.errors import NPOError  # noqa: E402

TINY_VISION = dict(width=32, layers=2, patch_size=8, image_size=32, head_width=8)  # 4 heads
TINY_TEXT = dict(context_length=77, vocab_size=len(ref.VOCAB), width=32, heads=4, layers=2)
HEADS = dict(vision_heads=4, text_heads=4)  # the table knows ViT-B/L/H/g/bigG widths, not 32


def tiny_open_clip(seed: int = 0):
    """open_clip.model.CLIP (GELU, not quick_gelu) with every weight re-drawn at std 0.1, LayerNorm scales ~1."""
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(embed_dim=32, vision_cfg=TINY_VISION, text_cfg=TINY_TEXT, quick_gelu=False).eval()
    assert isinstance(model.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "logit_scale":
                centre = 1.0 if ".ln_" in f".{name}" and name.endswith("weight") else 0.0
                p.copy_(centre + 0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    """(open_clip model, folder) with hps.pt, hps_module.pt (DataParallel keys), hps_half.pt and the tokenizer."""
    folder = tmp_path_factory.mktemp("hps")
    model = tiny_open_clip()
    sd = model.state_dict()
    torch.save({"state_dict": sd, "epoch": 3, "name": "tiny"}, folder / "hps.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, folder / "hps_module.pt")
    torch.save({"state_dict": {k: v.half() for k, v in sd.items()}}, folder / "hps_half.pt")
    ref.write_tokenizer(folder)
    return model, folder


def reference_hps(model, images: torch.Tensor, prompts: list[str], folder) -> torch.Tensor:
    """diag(normalize(encode_image) @ normalize(encode_text).T) on open_clip's transform and the HF token ids."""
    transform = open_clip.transform.image_transform(32, is_train=False)
    pixels = torch.stack([transform(im) for im in ref.saved_pngs(images)])
    tokenizer = transformers.CLIPTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    assert tokenizer.pad_token_id == ref.EOS  # padded with EOT: open_clip's argmax takes the first one
    ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        v = model.encode_image(pixels, normalize=True)
        t = model.encode_text(ids, normalize=True)
    return (v * t).sum(-1)


@pytest.mark.parametrize("h,w", ref.SIZES)
@pytest.mark.parametrize("variant", ["hps.pt", "hps_module.pt", "hps_half.pt"])
def test_hps_equals_open_clip(hps_files, h, w, variant):
    """Batched, one prompt per image (prompts of different lengths, one truncated at 77 tokens)."""
    model, folder = hps_files
    if variant == "hps_half.pt":  # the reference runs on the same half-rounded weights, in float32
        model = tiny_open_clip()
        model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    images = ref.comfy_images(h, w, len(ref.PROMPTS), seed=h)
    scorer = HPSv21.from_file(folder / variant, folder, **HEADS)
    assert scorer.name == "HPS v2.1" and scorer.model.dtype == torch.float32
    scorer.batch_size = 3  # two batches of 3 and 1
    got = scorer.score(images, ref.PROMPTS)
    want = reference_hps(model, images, ref.PROMPTS, folder)
    assert got.shape == (len(ref.PROMPTS),) and got.dtype == torch.float32 and got.device.type == "cpu"
    diff = (got - want).abs().max().item()
    assert diff < 1e-5, diff  # measured: up to 8.9e-8 on cosines of -0.45..-0.17 (transformers 5.25, CPU)
    assert want.std() > 0.05, want  # the scores spread: a wrong conversion or prompt order shows
    pil = scorer.score(ref.saved_pngs(images), ref.PROMPTS)
    assert (pil - want).abs().max().item() < 1e-5
    perm = [2, 0, 3, 1]
    assert (scorer.score(images[perm], [ref.PROMPTS[i] for i in perm]) - want[perm]).abs().max().item() < 1e-5


def test_hps_token_ids_as_open_clip_lays_them_out(hps_files):
    """BOS, tokens, EOT, then zeros; the 107-token prompt is cut to BOS + 75 tokens + EOT, as open_clip cuts it."""
    _, folder = hps_files
    scorer = HPSv21.from_file(folder / "hps.pt", folder, **HEADS)
    ids = scorer.token_ids(ref.PROMPTS)
    full = scorer.tokenizer(ref.PROMPTS[-1], add_special_tokens=False)["input_ids"]
    assert len(full) > 76 and ids.shape == (4, 77)
    assert ids[3].tolist() == [ref.BOS, *full[:75], ref.EOS]
    short = scorer.tokenizer(ref.PROMPTS[0])["input_ids"]
    assert ids[0].tolist() == short + [0] * (77 - len(short))
    assert scorer.model.config.text_config.eos_token_id == ref.EOS


@pytest.mark.parametrize("h,w", [*ref.SIZES, (35, 32), (37, 32), (32, 32), (20, 24), (517, 301), (64, 65)])
def test_preprocess_equals_open_clip_transform(h, w):
    """The pixels open_clip's own eval transform gives on the PNGs (torchvision's rounded centre crop included).
    (37, 55) and (61, 29) crop 15 and 35 px: round, not floor; (35, 32): 3 px; (37, 32): 5 px, round half to even."""
    transform = open_clip.transform.image_transform(32, is_train=False)
    images = ref.comfy_images(h, w, 2, seed=h * w)
    want = torch.stack([transform(im) for im in ref.saved_pngs(images)])
    got = open_clip_preprocess(32)(images)
    assert got.shape == want.shape == (2, 3, 32, 32) and got.dtype == torch.float32
    diff = (got - want).abs().max().item()
    assert diff < 1e-6, diff  # measured: 0 (bit-equal; a floor crop is off by up to 2.2)


def test_vit_h14_config_from_shapes():
    """open_clip's own ViT-H-14 (built on the meta device) converts to the HPS v2.1 architecture."""
    cfg = open_clip.get_model_config("ViT-H-14")
    with torch.device("meta"):
        model = open_clip.model.CLIP(**cfg)
    config, sd = convert_open_clip(model.state_dict(), "ViT-H-14")
    v, t = config["vision_config"], config["text_config"]
    assert config["projection_dim"] == 1024
    assert (v["hidden_size"], v["num_hidden_layers"], v["num_attention_heads"]) == (1280, 32, 16)
    assert (v["patch_size"], v["image_size"], v["intermediate_size"], v["hidden_act"]) == (14, 224, 5120, "gelu")
    assert (t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"]) == (1024, 24, 16)
    assert (t["max_position_embeddings"], t["vocab_size"], t["intermediate_size"]) == (77, 49408, 4096)
    assert sd["visual_projection.weight"].shape == (1024, 1280) and sd["text_projection.weight"].shape == (1024, 1024)
    hf = transformers.CLIPConfig(**config)
    with torch.device("meta"):
        hf_model = transformers.CLIPModel(hf)
    shapes = {k: tuple(p.shape) for k, p in hf_model.state_dict().items()}
    assert {k: tuple(p.shape) for k, p in sd.items()} == {k: s for k, s in shapes.items() if k in sd}
    assert set(shapes) - set(sd) <= {"text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"}


class _Payload:
    """A pickled object that torch.load(weights_only=True) must refuse."""


def test_hps_refusals(hps_files, tmp_path):
    """A pickle that needs code, a checkpoint without the visual or text keys, unknown keys, heads that do not
    divide the width, and a missing tokenizer: refused by name."""
    model, folder = hps_files
    sd = model.state_dict()
    pickled = tmp_path / "needs_code.pt"
    torch.save({"state_dict": sd, "args": _Payload()}, pickled)
    with pytest.raises(NPOError, match=r"refused: torch\.load\(weights_only=True\) cannot read it") as info:
        HPSv21.from_file(pickled, folder, **HEADS)
    assert str(pickled) in str(info.value)

    text_only = tmp_path / "text_only.pt"
    torch.save({"state_dict": {k: v for k, v in sd.items() if not k.startswith("visual.")}}, text_only)
    with pytest.raises(NPOError, match=r"text_only\.pt: not an open_clip CLIP checkpoint, \d+ keys missing "
                       r"\(visual\.conv1\.weight, visual\.class_embedding"):  # fmt: skip
        HPSv21.from_file(text_only, folder, **HEADS)

    vision_only = tmp_path / "vision_only.pt"
    torch.save({"state_dict": {k: v for k, v in sd.items() if k.startswith("visual.")}}, vision_only)
    with pytest.raises(NPOError, match=r"keys missing \(token_embedding\.weight, positional_embedding, ln_final"):
        HPSv21.from_file(vision_only, folder, **HEADS)

    no_bias = tmp_path / "no_bias.pt"
    torch.save({"state_dict": {k: v for k, v in sd.items() if k != "transformer.resblocks.1.ln_2.bias"}}, no_bias)
    with pytest.raises(NPOError, match=r"transformer\.resblocks\.1\.ln_2\.bias is missing"):
        HPSv21.from_file(no_bias, folder, **HEADS)

    extra = tmp_path / "extra.pt"
    torch.save({"state_dict": {**sd, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(32)}}, extra)
    with pytest.raises(NPOError, match=r"1 keys this open_clip ViT conversion does not know.*ls_1\.gamma"):
        HPSv21.from_file(extra, folder, **HEADS)

    with pytest.raises(NPOError, match=r"vision tower is 32 wide and 0 attention heads"):
        HPSv21.from_file(folder / "hps.pt", folder)  # width 32 is in no table: 32 // 64 = 0
    with pytest.raises(NPOError, match=r"text tower is 32 wide and 5 attention heads"):
        HPSv21.from_file(folder / "hps.pt", folder, vision_heads=4, text_heads=5)

    with pytest.raises(NPOError, match="absent.pt not found"):
        HPSv21.from_file(tmp_path / "absent.pt", folder, **HEADS)
    with pytest.raises(NPOError, match="no CLIP tokenizer"):
        HPSv21.from_file(folder / "hps.pt", tmp_path, **HEADS)

    scorer = HPSv21.from_file(folder / "hps.pt", folder, **HEADS)
    images = ref.comfy_images(*ref.SIZES[0], 2, seed=7)
    with pytest.raises(NPOError, match="prompts: expected a list of 2 strings"):
        scorer.score(images, ref.PROMPTS[:1])
    with pytest.raises(NPOError, match=r"images: .*\[B, H, W, 3\]"):
        scorer.score(images[0], ref.PROMPTS[:1])
