"""The authors' folder protocol (compare_rate.py): images of the same name in two folders are a pair, each
``name.png`` with its prompt in ``name.txt`` beside it; up to 500 common names are sampled at random.

Unlike compare_rate.py, the sample is reproducible (names sorted, then ``random.Random(seed).sample``) and a
pair whose prompt file is missing in either folder is left out of both sides (compare_rate.py drops it from
one side only, which misaligns the two score lists).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

AUTHORS_SAMPLE = 500


@dataclass(frozen=True)
class FolderPairs:
    """The sampled pairs: ``names[i]`` is ``folder_a/names[i]`` vs ``folder_b/names[i]`` with ``prompts[i]``."""

    folder_a: Path
    folder_b: Path
    names: list[str]
    prompts: list[str]
    common: int  # .png names in both folders
    without_prompt: list[str] = field(default_factory=list)  # common names left out: a .txt missing
    prompt_differs: list[str] = field(default_factory=list)  # sampled names whose two .txt files differ


def _pngs(folder: Path) -> set[str]:
    return {f for f in os.listdir(folder) if f.endswith(".png") and (folder / f).is_file()}


def _prompt(folder: Path, png: str) -> str | None:
    txt = folder / (png[: -len(".png")] + ".txt")
    if not txt.is_file():
        return None
    return txt.read_text(encoding="utf-8").strip()


def common_pairs(folder_a, folder_b, count: int = AUTHORS_SAMPLE, seed: int = 0) -> FolderPairs:
    """Sample up to ``count`` pairs of same-named .png files (with their .txt prompts) from two folders."""
    a, b = Path(folder_a), Path(folder_b)
    for name, folder in (("folder_a", a), ("folder_b", b)):
        if not folder.is_dir():
            raise ValueError(f"{name}: '{folder}' is not a folder")
    common = sorted(_pngs(a) & _pngs(b))
    with_prompt, without = [], []
    for png in common:
        (with_prompt if _prompt(a, png) is not None and _prompt(b, png) is not None else without).append(png)
    if not with_prompt:
        raise ValueError(
            f"folder_a / folder_b: no image name is in both folders with a .txt prompt beside it ({len(common)} "
            "common .png names). Save each image as name.png with its prompt in name.txt, the same names in both."
        )
    names = random.Random(seed).sample(with_prompt, min(count, len(with_prompt)))
    prompts = [_prompt(a, n) for n in names]
    differs = [n for n, p in zip(names, prompts, strict=True) if _prompt(b, n) != p]
    return FolderPairs(a, b, names, prompts, len(common), without, differs)
