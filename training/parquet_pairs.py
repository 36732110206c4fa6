"""Pick-a-Pic-style parquet shards as preference pairs, read with pyarrow where it is importable (never installed).

A shard has the columns ``caption`` (the prompt), ``jpg_0`` and ``jpg_1`` (encoded image bytes, or the
``{"bytes": …}`` struct Hugging Face's Image feature writes) and ``label_0``: 1 = people preferred jpg_0, 0 = they
preferred jpg_1, 0.5 = a tie. Rows are numbered from 0 in file order, as the dataset viewer numbers them. Ties and
rows whose two images are the same bytes carry no preference: they are skipped (Diffusion-DPO's own trainer drops
Pick-a-Pic's ties) or, when asked, refused naming the row. Any other problem (a missing column, an empty caption, a
label that is not 0, 0.5 or 1, a missing image) is an error naming the row.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .pairs import PairError

COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
TIES = ("skip", "error")
READ_BATCH = 64  # rows per pyarrow record batch: a few MB of JPEG bytes


@dataclass(frozen=True)
class ParquetPair:
    prompt: str
    preferred: bytes  # encoded image bytes (JPEG/PNG), as stored in the shard
    rejected: bytes
    item: str  # how messages name it: "train-0000.parquet row 17"


@dataclass(frozen=True)
class ParquetPairs:
    pairs: list[ParquetPair]
    rows_read: int
    skipped: int  # ties and same-image rows left out


def reader_missing() -> str | None:
    """Why no parquet reader can be used here (None when ``pyarrow.parquet`` imports)."""
    try:
        importlib.import_module("pyarrow.parquet")
    except ImportError as e:
        return (
            f"reading parquet needs pyarrow in the Python that runs ComfyUI ({e}); install it there yourself "
            "(pip install pyarrow; the pack never installs packages), or export the pairs to a pair folder."
        )
    return None


def _image_bytes(value: object, item: str, column: str) -> bytes:
    if isinstance(value, dict):
        value = value.get("bytes")
    if not isinstance(value, (bytes, bytearray, memoryview)) or len(value) == 0:
        raise PairError(f"{item}: '{column}' holds no image bytes (got {type(value).__name__}).")
    return bytes(value)


def _rows(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        shard = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a file that is not parquet
        raise PairError(f"{path.name}: not a readable parquet file ({e}).") from None
    missing = [c for c in COLUMNS if c not in shard.schema_arrow.names]
    if missing:
        raise PairError(
            f"{path.name}: no column {', '.join(missing)}; a Pick-a-Pic-style shard has {', '.join(COLUMNS)} "
            f"(this one has {', '.join(shard.schema_arrow.names[:12])})."
        )
    for batch in shard.iter_batches(batch_size=READ_BATCH, columns=list(COLUMNS)):
        yield from batch.to_pylist()


def read_parquet_pairs(path: str | Path, max_pairs: int = 0, ties: str = "skip") -> ParquetPairs:
    """The shard's pairs in file order (the first ``max_pairs`` usable ones; 0 = all), preferred = the image people
    picked; ties and same-image rows skipped (``ties="skip"``) or refused (``"error"``)."""
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}")
    missing = reader_missing()
    if missing:
        raise PairError(missing)
    path = Path(path)
    out: list[ParquetPair] = []
    skipped = rows = 0
    for n, row in enumerate(_rows(path)):
        rows = n + 1
        item = f"{path.name} row {n}"
        caption, label = row["caption"], row["label_0"]
        if not isinstance(caption, str) or not caption.strip():
            raise PairError(f"{item}: 'caption' must be non-empty text, got {caption!r:.60}.")
        if label not in (0, 0.5, 1):
            raise PairError(f"{item}: 'label_0' must be 1 (jpg_0 preferred), 0 (jpg_1) or 0.5 (a tie), got {label!r}.")
        first, second = _image_bytes(row["jpg_0"], item, "jpg_0"), _image_bytes(row["jpg_1"], item, "jpg_1")
        if label == 0.5 or first == second:
            if ties == "error":
                why = "is a tie (label_0 0.5)" if label == 0.5 else "has the same image twice"
                raise PairError(f"{item}: {why}: no preference to learn; set ties to skip, or drop the row.")
            skipped += 1
            continue
        preferred, rejected = (first, second) if label == 1 else (second, first)
        out.append(ParquetPair(caption, preferred, rejected, item))
        if max_pairs and len(out) >= max_pairs:
            break
    if not out:
        why = f" ({skipped} ties or same-image rows)" if skipped else ""
        raise PairError(f"{path.name}: no usable pairs in {rows} row(s){why}.")
    return ParquetPairs(out, rows, skipped)
