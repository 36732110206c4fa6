"""NPO Pairs From Parquet on Pick-a-Pic-style shards written here with pyarrow (scripts/requirements-test.txt installs
it for the tests; the pack never does): which image is preferred follows label_0, ties and same-image rows are
skipped or refused, every bad row is named, and without pyarrow the node says what to install before anything runs.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from test_host_preference import StandInCLIP, StandInVAE

from comfyui_npo.nodes.preference import NPOPairsFromParquet
from comfyui_npo.npo_core.errors import NPOError
from comfyui_npo.training import parquet_pairs

COLOURS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230), "grey": (128, 128, 128)}


def _jpeg(colour: str, size=(80, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, COLOURS[colour]).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _shard(path, rows, struct_images=False, drop=()):
    """rows: (caption, colour of jpg_0, colour of jpg_1, label_0) → a parquet file with Pick-a-Pic's columns (and two
    of its other columns, which the reader ignores)."""
    def image(c):
        data = _jpeg(c) if c else b""
        return {"bytes": data, "path": None} if struct_images else data

    cols = {
        "caption": [r[0] for r in rows],
        "jpg_0": [image(r[1]) for r in rows],
        "jpg_1": [image(r[2]) for r in rows],
        "label_0": [r[3] for r in rows],
        "label_1": [None if r[3] is None else 1 - r[3] for r in rows],
        "ranking_id": list(range(len(rows))),
    }
    for name in drop:
        cols.pop(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path)


def _colour(image_row: torch.Tensor) -> str:
    """The name of the solid colour an IMAGE row [H, W, 3] in 0..1 shows (JPEG moves a level or two)."""
    rgb = (image_row.mean(dim=(0, 1)) * 255).tolist()
    return min(COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLOURS[c], rgb, strict=True)))


class DecodingVAE(StandInVAE):
    """Keeps what it encoded, so the test can see which image landed in which slot."""

    def __init__(self):
        self.encoded = []

    def encode(self, images):
        self.encoded.append(images.clone())
        return super().encode(images)


@pytest.fixture()
def input_dir(tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path))
    return tmp_path


def _run(file, vae=None, clip=None, **kw):
    args = dict(resolution=32, max_pairs=0, ties="skip", mirrored_copies=False)
    args.update(kw)
    return NPOPairsFromParquet.execute(file=file, clip=clip or StandInCLIP(), vae=vae or DecodingVAE(), **args)


@pytest.mark.parametrize("struct_images", [False, True], ids=["binary", "hf-image-struct"])
def test_label_0_picks_the_preferred_image_and_ties_are_skipped(input_dir, struct_images):
    _shard(input_dir / "pickapic" / "train-0000.parquet", [
        ("a red fox", "red", "green", 1.0),  # jpg_0 preferred
        ("a blue hut", "green", "blue", 0.0),  # jpg_1 preferred
        ("a tie", "red", "blue", 0.5),
        ("same twice", "grey", "grey", 1.0),
        ("a red fox", "blue", "red", 0.0),
    ], struct_images=struct_images)
    vae, clip = DecodingVAE(), StandInCLIP()
    out = _run("pickapic/train-0000.parquet", vae=vae, clip=clip)
    ps = out.result[0]
    preferred, rejected = vae.encoded
    assert [_colour(im) for im in preferred] == ["red", "blue", "red"]
    assert [_colour(im) for im in rejected] == ["green", "green", "blue"]
    assert preferred.shape == (3, 32, 32, 3)  # shorter side to 32, centre-cropped square
    assert ps.items == ["train-0000.parquet row 0", "train-0000.parquet row 1", "train-0000.parquet row 4"]
    assert ps.prompt_of.tolist() == [0, 1, 0] and clip.seen == ["a red fox", "a blue hut", ""]
    assert torch.allclose(ps.preferred, StandInVAE().encode(preferred))
    assert "3 pairs from 5 rows" in out.ui.as_dict()["text"][0] and "2 ties or same-image rows skipped" in \
        out.ui.as_dict()["text"][0]


def test_max_pairs_takes_the_first_usable_pairs_and_mirrored_copies_flip(input_dir):
    _shard(input_dir / "s.parquet", [("a", "red", "green", 1.0), ("b", "red", "blue", 0.5),
                                     ("c", "blue", "green", 1.0), ("d", "grey", "red", 0.0)])
    vae = DecodingVAE()
    ps = _run("s.parquet", vae=vae, max_pairs=2, mirrored_copies=True).result[0]
    assert ps.items == ["s.parquet row 0", "s.parquet row 2", "s.parquet row 0 (mirrored)",
                        "s.parquet row 2 (mirrored)"]
    assert torch.equal(vae.encoded[0][2], vae.encoded[0][0].flip(1))


@pytest.mark.fault(
    "NPO Pairs From Parquet: a shard without Pick-a-Pic's columns, a label that is not 0/0.5/1, an empty caption, a "
    "missing image, a tie with ties = error, only ties, a file that is not parquet or not there",
    "NPOError naming the file input, the row and the fix",
)
def test_bad_shards_are_refused_naming_the_row(input_dir):
    cases = [
        ([("a", "red", "green", 1.0)], {"drop": ("label_0",)}, "file: nolabel.parquet: no column label_0"),
        ([("a", "red", "green", 1.0), ("b", "red", "green", 0.3)], {}, r"row 1: 'label_0' must be 1 .* got 0.3"),
        ([("  ", "red", "green", 1.0)], {}, "row 0: 'caption' must be non-empty text"),
        ([("a", "red", None, 1.0)], {}, "row 0: 'jpg_1' holds no image bytes"),
        ([("a", "red", "blue", 0.5), ("b", "red", "blue", 0.5)], {}, r"no usable pairs in 2 row\(s\) \(2 ties"),
    ]
    for n, (rows, kw, message) in enumerate(cases):
        name = "nolabel.parquet" if kw.get("drop") else f"bad{n}.parquet"
        _shard(input_dir / name, rows, **kw)
        with pytest.raises(NPOError, match=message):
            _run(name)
    _shard(input_dir / "tie.parquet", [("a", "red", "green", 1.0), ("b", "red", "blue", 0.5)])
    with pytest.raises(NPOError, match="row 1: is a tie .*set ties to skip"):
        _run("tie.parquet", ties="error")
    (input_dir / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(NPOError, match="file: junk.parquet: not a readable parquet file"):
        _run("junk.parquet")
    assert "'gone.parquet' is not in ComfyUI's input folder" in NPOPairsFromParquet.validate_inputs(
        file="gone.parquet", resolution=32, max_pairs=0)
    assert "multiple of 8" in NPOPairsFromParquet.validate_inputs(file="tie.parquet", resolution=36, max_pairs=0)
    assert NPOPairsFromParquet.validate_inputs(file="tie.parquet", resolution=32, max_pairs=0) is True


@pytest.mark.fault(
    "NPO Pairs From Parquet where ComfyUI's Python has no pyarrow",
    "refused at validation: install pyarrow in ComfyUI's Python (the pack never installs it), or use a pair folder",
)
def test_without_pyarrow_the_node_says_what_to_install(input_dir, monkeypatch):
    _shard(input_dir / "s.parquet", [("a", "red", "green", 1.0)])
    real = parquet_pairs.importlib.import_module

    def no_pyarrow(name, *a, **k):
        if name.startswith("pyarrow"):
            raise ImportError(f"No module named '{name}'")
        return real(name, *a, **k)

    monkeypatch.setattr(parquet_pairs.importlib, "import_module", no_pyarrow)
    why = NPOPairsFromParquet.validate_inputs(file="s.parquet", resolution=32, max_pairs=0)
    assert "file: reading parquet needs pyarrow in the Python that runs ComfyUI" in why and "pip install pyarrow" in why
    with pytest.raises(NPOError, match="never installs packages"):
        _run("s.parquet")


def test_the_node_lists_the_input_folders_parquet_files(input_dir):
    _shard(input_dir / "b" / "x.parquet", [("a", "red", "green", 1.0)])
    _shard(input_dir / "a.parquet", [("a", "red", "green", 1.0)])
    (input_dir / "notes.txt").write_text("x")
    spec = next(i for i in NPOPairsFromParquet.define_schema().inputs if i.id == "file")
    assert list(spec.options) == ["a.parquet", "b/x.parquet"]
