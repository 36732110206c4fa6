"""ImageReward v1.0 through the ImageReward package, checked on a stand-in with the package's layout.

The package cannot be installed here (image-reward pins timm 0.6.13 and fairscale), so tests/host/imagereward_standin
holds a tiny model with its public layout (see its README). Reference: the stand-in package's own per-image
``score(prompt, image_path)`` on the PNG files SaveImage would write, with the weights the folder holds. What the
tests show: the pack builds the package's model from local files only (the BERT tokenizer the package asks the hub for
comes from the folder), reads the weights with weights_only, batches over images and prompts as the package scores one
image at a time, and refuses what it cannot load. What only the real package and ImageReward.pt can confirm: that the
real BLIP model has the same interface (image-reward 1.5's does, as read from its source).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import npo_scorerkit as kit  # noqa: E402  (ComfyUI IMAGE batches and their PNGs)

from comfyui_npo.evaluation import image_reward  # noqa: E402
from comfyui_npo.evaluation.image_reward import ImageRewardScorer  # noqa: E402
from comfyui_npo.npo_core.errors import NPOError  # noqa: E402

STANDIN = Path(__file__).resolve().parent / "imagereward_standin"
WORDS = ["a", "red", "cat", "lower", "newer", "wider", "x", "dog", "in", "the", "snow"]
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
MED = {"hidden_size": 32, "num_attention_heads": 4, "vocab_size": len(BERT_VOCAB) + 2, "max_position_embeddings": 40,
       "encoder_width": 24}  # + [DEC] and [ENC], which the package adds to the tokenizer
PROMPTS = ["a red cat", "lower newer wider", "x", "a red cat " * 15]  # the last: 45 tokens, truncated to 35


@pytest.fixture
def package(monkeypatch):
    """The stand-in ImageReward package importable for one test, then forgotten."""
    monkeypatch.syspath_prepend(str(STANDIN))
    yield
    for name in [n for n in sys.modules if n == "ImageReward" or n.startswith("ImageReward.")]:
        del sys.modules[name]


def write_folder(folder: Path) -> torch.nn.Module:
    """An ImageReward folder (ImageReward.pt, med_config.json, bert-base-uncased/vocab.txt) and the stand-in model
    holding its weights, built here with the tokenizer read directly (no code of the pack involved)."""
    import importlib

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bert-base-uncased").mkdir(exist_ok=True)
    (folder / "bert-base-uncased" / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    (folder / "med_config.json").write_text(json.dumps(MED))
    pretrain = importlib.import_module("ImageReward.models.BLIP.blip_pretrain")

    def local_tokenizer():
        tok = transformers.BertTokenizer.from_pretrained(str(folder / "bert-base-uncased"), local_files_only=True)
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        return tok

    real = pretrain.init_tokenizer
    pretrain.init_tokenizer = local_tokenizer
    try:
        torch.manual_seed(3)
        package_model = importlib.import_module("ImageReward.ImageReward").ImageReward
        model = package_model(med_config=str(folder / "med_config.json"))
    finally:
        pretrain.init_tokenizer = real
    with torch.no_grad():
        for p in model.mlp.parameters():
            p.mul_(4.0)  # spread the rewards (a wrong pairing of prompt and image must show)
    torch.save(model.state_dict(), folder / "ImageReward.pt")
    return model.eval()


def reference(model, images: torch.Tensor, prompts: list[str], tmp: Path) -> torch.Tensor:
    """The package's own score(prompt, image_path), one saved PNG at a time."""
    out = []
    with torch.no_grad():
        for i, (png, prompt) in enumerate(zip(kit.saved_pngs(images), prompts, strict=True)):
            path = tmp / f"ref_{i}.png"
            png.save(path)
            out.append(model.score(prompt, str(path)))
    return torch.tensor(out, dtype=torch.float32)


def test_unavailable_without_the_package(monkeypatch):
    """No ImageReward package: the reason names it and says the pack does not install it; loading says the same."""
    monkeypatch.setattr(image_reward.importlib.util, "find_spec", lambda name: None)
    reason = image_reward.unavailable_reason()
    assert reason and "ImageReward package is not installed" in reason and "never installs" in reason
    with pytest.raises(NPOError, match="ImageReward v1.0 is unavailable: the ImageReward package"):
        image_reward._package_model_class()


@pytest.mark.parametrize("h,w", kit.SIZES)
def test_scores_equal_the_package_scoring_one_png_at_a_time(package, tmp_path, h, w):
    model = write_folder(tmp_path / "ImageReward")
    assert image_reward.unavailable_reason() is None
    scorer = ImageRewardScorer.from_folder(tmp_path / "ImageReward")
    tok = scorer.model.blip.tokenizer
    assert set(WORDS) <= set(tok.get_vocab()) and len(tok) == MED["vocab_size"]  # the folder's, not the hub's
    assert len(tok(PROMPTS[-1])["input_ids"]) > image_reward.MAX_TOKENS
    images = kit.comfy_images(h, w, len(PROMPTS), seed=h)
    want = reference(model, images, PROMPTS, tmp_path)
    scorer.batch_size = 3  # batches of 3 and 1
    got = scorer.score(images, PROMPTS)
    assert got.shape == (4,) and got.dtype == torch.float32
    assert (got - want).abs().max().item() < 1e-5, (got, want)
    assert want.std() > 0.05, want  # the rewards spread
    assert (scorer.score(kit.saved_pngs(images), PROMPTS) - want).abs().max().item() < 1e-5  # PIL images in
    perm = [2, 0, 3, 1]
    assert (scorer.score(images[perm], [PROMPTS[i] for i in perm]) - want[perm]).abs().max().item() < 1e-5
    # the prompt matters: image 0 scored for another prompt differs
    other = scorer.score(images[:1], [PROMPTS[1]])
    assert (other - want[:1]).abs().item() > 1e-4


def test_refusals(package, tmp_path):
    """Missing files are named with the fix; a pickle that needs code is refused; a state dict of another model too."""
    folder = tmp_path / "ImageReward"
    write_folder(folder)
    (folder / "med_config.json").rename(tmp_path / "med.json")
    with pytest.raises(NPOError, match="med_config.json is missing"):
        ImageRewardScorer.from_folder(folder)
    (tmp_path / "med.json").rename(folder / "med_config.json")
    (folder / "bert-base-uncased" / "vocab.txt").rename(tmp_path / "vocab.txt")
    with pytest.raises(NPOError, match="vocab.txt .*is missing"):
        ImageRewardScorer.from_folder(folder)
    (tmp_path / "vocab.txt").rename(folder / "bert-base-uncased" / "vocab.txt")
    sd = torch.load(folder / "ImageReward.pt", weights_only=True)
    torch.save({"state": sd, "code": _Payload()}, folder / "ImageReward.pt")
    with pytest.raises(NPOError, match="weights_only=True"):
        ImageRewardScorer.from_folder(folder)
    torch.save({k: v for k, v in sd.items() if not k.startswith("mlp.")}, folder / "ImageReward.pt")
    with pytest.raises(NPOError, match="weights of the ImageReward model are missing .*mlp"):
        ImageRewardScorer.from_folder(folder)
    with pytest.raises(NPOError, match="is not a folder"):
        ImageRewardScorer.from_folder(tmp_path / "nothing")


def test_import_failure_names_the_transformers_mismatch(package, monkeypatch):
    """An installed package that cannot be imported (image-reward 1.x's BLIP imports helpers transformers 5 moved)."""

    def fail(name):
        raise ImportError("cannot import name 'find_pruneable_heads_and_indices' from 'transformers.modeling_utils'")

    monkeypatch.setattr(image_reward.importlib, "import_module", fail)
    with pytest.raises(NPOError, match="installed but cannot be imported .*written for transformers 4"):
        image_reward._package_model_class()


def test_load_scorer_and_score_images_nodes(package, tmp_path, monkeypatch):
    """NPO Load Scorer offers the ImageReward folder as one entry, its scorer runs under ComfyUI's model management
    in NPO Score Images and equals the package's own scores; without the package the choice says why."""
    import folder_paths

    from comfyui_npo.nodes import evaluate
    from comfyui_npo.nodes.host import scorers

    root = tmp_path / "npo_scorers"
    model = write_folder(root / "ImageReward")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, scorers.SCORER_FOLDER, ([str(root)], set()))
    assert scorers.scorer_entries() == ["ImageReward"]  # the folder, not the .pt inside it
    assert evaluate.image_reward_status() == "the ImageReward package is installed here."
    images = kit.comfy_images(40, 48, 3, seed=9)
    with torch.inference_mode():
        scorer = evaluate.NPOLoadScorer.execute(scorer=evaluate.IMAGE_REWARD, weights="ImageReward").result[0]
        out = evaluate.NPOScoreImages.execute(images=[images], scorer=[scorer], prompts=["\n".join(PROMPTS[:3])],
                                              frames_per_item=[1])
    want = reference(model, images, PROMPTS[:3], tmp_path)
    assert torch.tensor(out.result[0]) == pytest.approx(want.double(), abs=1e-5)
    assert out.result[1].startswith("ImageReward: mean")
    monkeypatch.setattr(image_reward.importlib.util, "find_spec", lambda name: None)
    assert evaluate.image_reward_status().startswith("unavailable here: the ImageReward package is not installed")
    with pytest.raises(NPOError, match="scorer: ImageReward v1.0 is unavailable"):
        evaluate.NPOLoadScorer.execute(scorer=evaluate.IMAGE_REWARD, weights="ImageReward")


def test_folder_script_scores_with_image_reward(package, tmp_path):
    """scripts/npo_compare_folders.py --image-reward on two folders of name.png + name.txt: the report's means are
    the package's own per-PNG scores."""
    import os
    import subprocess

    model = write_folder(tmp_path / "ImageReward")
    images = {"a": kit.comfy_images(33, 47, 3, seed=1), "b": kit.comfy_images(33, 47, 3, seed=2)}
    for side, batch in images.items():
        (tmp_path / side).mkdir()
        for i, png in enumerate(kit.saved_pngs(batch)):
            png.save(tmp_path / side / f"{i}.png")
            (tmp_path / side / f"{i}.txt").write_text(PROMPTS[i])
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(STANDIN), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, str(repo / "scripts" / "npo_compare_folders.py"), str(tmp_path / "a"), str(tmp_path / "b"),
         "--image-reward", str(tmp_path / "ImageReward"), "--out", str(tmp_path / "report"), "--resamples", "200"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert run.returncode == 0, run.stderr
    doc = json.loads((tmp_path / "report.json").read_text())
    order = [int(p["name"][0]) for p in doc["pairs"]]
    for side in ("a", "b"):
        want = reference(model, images[side][order], [PROMPTS[i] for i in order], tmp_path)
        assert doc["scorers"]["ImageReward"][f"mean_{side}"] == pytest.approx(float(want.double().mean()), abs=1e-5)


class _Payload:
    """A pickled object that torch.load(weights_only=True) must refuse."""
