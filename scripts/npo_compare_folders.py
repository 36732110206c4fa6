#!/usr/bin/env python
"""Compare two folders of images the way the authors' compare_rate.py does, and report it as NPO Compare Report does.

Pairs are same-named ``.png`` files in FOLDER_A and FOLDER_B with the prompt in ``name.txt`` beside each; up to
``--count`` (500, the authors') common names are sampled, reproducibly (``--seed``). A win is a strictly higher
score. Scorers (local files only, nothing is downloaded): PickScore v1 (``--pickscore`` folder in the Hugging Face
layout), HPS v2.1 (``--hps`` checkpoint), the LAION aesthetic predictor v2 (``--aesthetic`` head file with
``--clip-vision``, a CLIP ViT-L/14 folder in the Hugging Face layout) and ImageReward v1.0 (``--image-reward``
folder, only where the ImageReward package is installed). Run it with the Python your ComfyUI runs (it has torch
and transformers):

    python scripts/npo_compare_folders.py out/npo out/plain --pickscore models/npo_scorers/PickScore_v1 \\
        --hps models/npo_scorers/HPS_v2.1/HPS_v2.1_compressed.pt --labels NPO plain --out npo_vs_plain

Prints the report and writes ``OUT.txt``, ``OUT.json`` (every number) and ``OUT.csv`` (one row per pair).
"""

from __future__ import annotations

import argparse
import sys

from npo_headless import register_pack
from npo_headless.scoring import add_scorer_arguments, build_scorers, compare_pairs, sample_pairs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder_a")
    p.add_argument("folder_b")
    add_scorer_arguments(p)
    p.add_argument("--count", type=int, default=500, help="pairs sampled (the authors: 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pair sample and of the bootstrap")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples")
    p.add_argument("--labels", nargs=2, default=["A", "B"], metavar=("LABEL_A", "LABEL_B"))
    p.add_argument("--out", default="npo_compare", help="output path prefix for .txt, .json, .csv")
    args = p.parse_args(argv)

    register_pack()  # the repository as the package comfyui_npo
    from comfyui_npo.npo_core.errors import NPOError

    try:
        pairs = sample_pairs(args.folder_a, args.folder_b, args.count, args.seed)
        scorers = build_scorers(args)
        text = compare_pairs(scorers, pairs, tuple(args.labels), args.out, args.resamples, args.seed, args.batch)
    except (NPOError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
