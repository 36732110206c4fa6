"""Preference-pair data: the pair folder's checks, the authors' image preparation, the pick of self-generated pairs."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torchvision import transforms

from comfyui_npo.training import pairs


def _png(path, w, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(arr).save(path)


def _folder(tmp_path, rows):
    for name in ("a.png", "b.png", "sub/c.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        _png(tmp_path / name, 40, 24)
    (tmp_path / pairs.INDEX).write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return tmp_path


def test_a_pair_folder_reads_in_order(tmp_path):
    rows = [{"prompt": "one", "preferred": "a.png", "rejected": "b.png"}, "",
            {"prompt": "two", "preferred": "sub/c.png", "rejected": "a.png"}]
    got = pairs.read_pair_folder(_folder(tmp_path, rows))
    assert [(p.prompt, p.preferred.name, p.rejected.name, p.item) for p in got] == [
        ("one", "a.png", "b.png", "pairs.jsonl line 1"),
        ("two", "c.png", "a.png", "pairs.jsonl line 3"),
    ]


@pytest.mark.parametrize(
    "row,match",
    [
        ("{not json", "line 1: not JSON"),
        ({"prompt": "x", "preferred": "a.png"}, "line 1: needs the keys prompt, preferred, rejected"),
        ({"prompt": "x", "preferred": "a.png", "rejected": "gone.png"}, "'rejected' image 'gone.png' is missing"),
        ({"prompt": "x", "preferred": "../a.png", "rejected": "b.png"}, "leaves the pair folder"),
        ({"prompt": "x", "preferred": "/etc/passwd", "rejected": "b.png"}, "leaves the pair folder"),
        ({"prompt": "x", "preferred": "a.png", "rejected": "./a.png"}, "same image is preferred and rejected"),
        ({"prompt": " ", "preferred": "a.png", "rejected": "b.png"}, "'prompt' must be non-empty"),
    ],
)
@pytest.mark.fault(
    "a pair folder line that is not JSON, lacks a key, names a missing image or one outside the folder, a tie, "
    "an empty prompt",
    "PairError naming pairs.jsonl and the line, before anything trains",
)
def test_bad_pair_lines_are_refused_naming_the_line(tmp_path, row, match):
    with pytest.raises(pairs.PairError, match=match):
        pairs.read_pair_folder(_folder(tmp_path, [row]))


def test_an_empty_or_missing_index_is_refused(tmp_path):
    with pytest.raises(pairs.PairError, match="no pairs.jsonl"):
        pairs.read_pair_folder(tmp_path)
    with pytest.raises(pairs.PairError, match="holds no pairs"):
        pairs.read_pair_folder(_folder(tmp_path, [""]))


@pytest.mark.parametrize("size", [(40, 24), (24, 40), (33, 33), (17, 50)])
@pytest.mark.parametrize("flip", [False, True])
def test_images_are_prepared_as_the_authors_transforms_do(tmp_path, size, flip):
    """Against torchvision's Resize(r, bilinear) → CenterCrop(r) → [flip] → ToTensor, the authors' pipeline
    (before their Normalize to [-1, 1], which ComfyUI's VAE encode does itself)."""
    _png(tmp_path / "x.png", *size, seed=4)
    steps = [transforms.Resize(16, interpolation=transforms.InterpolationMode.BILINEAR), transforms.CenterCrop(16)]
    if flip:
        steps.append(transforms.RandomHorizontalFlip(p=1.0))
    with Image.open(tmp_path / "x.png") as im:
        want = transforms.Compose([*steps, transforms.ToTensor()])(im.convert("RGB")).permute(1, 2, 0)
    got = pairs.prepared(tmp_path / "x.png", 16, "t", flip=flip)
    assert got.shape == (16, 16, 3) and torch.allclose(got, want, atol=1 / 255 + 1e-6)


def test_an_unreadable_image_is_named(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(pairs.PairError, match="pairs.jsonl line 2: cannot read bad.png"):
        pairs.prepared(tmp_path / "bad.png", 16, "pairs.jsonl line 2")


def test_self_generated_pairs_take_the_best_and_the_worst_sample():
    assert pairs.best_and_worst([0.2, 0.9, -0.1, 0.5], "p") == (1, 2)
    assert pairs.best_and_worst([0.3, 0.3, 0.1], "p") == (0, 2)  # the first of equal bests
    with pytest.raises(pairs.PairError, match="all 3 samples score 0.5: no preference"):
        pairs.best_and_worst([0.5, 0.5, 0.5], "a cat")
    with pytest.raises(pairs.PairError, match="a pair needs at least 2"):
        pairs.best_and_worst([0.5], "a cat")
