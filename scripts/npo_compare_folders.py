#!/usr/bin/env python
"""Compare two folders of images the way the authors' compare_rate.py does, and report it as NPO Compare Report does.

Pairs are same-named ``.png`` files in FOLDER_A and FOLDER_B with the prompt in ``name.txt`` beside each; up to
``--count`` (500, the authors') common names are sampled, reproducibly (``--seed``). A win is a strictly higher
score. Scorers (local files only, nothing is downloaded): PickScore v1 (``--pickscore`` folder in the Hugging Face
layout) and the LAION aesthetic predictor v2 (``--aesthetic`` head file with ``--clip-vision``, a CLIP ViT-L/14
folder in the Hugging Face layout). Run it with the Python your ComfyUI runs (it has torch and transformers):

    python scripts/npo_compare_folders.py out/npo out/plain --pickscore models/npo_scorers/PickScore_v1 \\
        --aesthetic models/npo_scorers/sac+logos+ava1-l14-linearMSE.pth --clip-vision path/to/clip-vit-large-patch14 \\
        --labels NPO plain --out npo_vs_plain

Prints the report and writes ``OUT.txt``, ``OUT.json`` (every number) and ``OUT.csv`` (one row per pair).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from npo_headless import register_pack


def _progress(what: str, done: int, total: int, started: float) -> None:
    rate = done / max(time.perf_counter() - started, 1e-9)
    print(f"\r{what}: {done}/{total} images ({rate:.1f}/s)", end="\n" if done == total else "", file=sys.stderr)


def score_folder(scorer, folder: Path, names: list[str], prompts: list[str], batch: int, label: str) -> list[float]:
    from PIL import Image

    out: list[float] = []
    started = time.perf_counter()
    for i in range(0, len(names), batch):
        images = []
        for n in names[i : i + batch]:
            with Image.open(folder / n) as img:
                images.append(img.convert("RGB"))
        out += [float(v) for v in scorer.score(images, prompts[i : i + batch])]
        _progress(f"{scorer.name} {label}", len(out), len(names), started)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder_a")
    p.add_argument("folder_b")
    p.add_argument("--pickscore", help="PickScore v1 folder (config.json, model.safetensors, tokenizer, preprocessor)")
    p.add_argument("--pickscore-processor", help="tokenizer + preprocessor_config.json folder, if not the model's")
    p.add_argument("--aesthetic", help="LAION aesthetic v2 head (sac+logos+ava1-l14-linearMSE .pth / .safetensors)")
    p.add_argument("--clip-vision", help="CLIP ViT-L/14 folder in the Hugging Face layout, for --aesthetic")
    p.add_argument("--count", type=int, default=500, help="pairs sampled (the authors: 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pair sample and of the bootstrap")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples")
    p.add_argument("--labels", nargs=2, default=["A", "B"], metavar=("LABEL_A", "LABEL_B"))
    p.add_argument("--out", default="npo_compare", help="output path prefix for .txt, .json, .csv")
    p.add_argument("--device", default="cpu", help="torch device for the scorers (cpu, cuda)")
    p.add_argument("--batch", type=int, default=16, help="images per scorer call")
    args = p.parse_args(argv)

    register_pack()  # the repository as the package comfyui_npo
    from comfyui_npo.evaluation import folders, report
    from comfyui_npo.npo_core.atomic import atomic_write
    from comfyui_npo.npo_core.errors import NPOError

    scorers = []
    try:
        if args.pickscore:
            from comfyui_npo.evaluation.pickscore import PickScore

            scorers.append(PickScore.from_folder(args.pickscore, args.device, processor_path=args.pickscore_processor))
        if args.aesthetic:
            if not args.clip_vision:
                p.error("--aesthetic needs --clip-vision (a CLIP ViT-L/14 folder in the Hugging Face layout)")
            from comfyui_npo.evaluation.aesthetic import AestheticScorer

            scorers.append(AestheticScorer.from_files(args.clip_vision, args.aesthetic, device=args.device))
        if not scorers:
            p.error("give at least one scorer: --pickscore and/or --aesthetic with --clip-vision")
        pairs = folders.common_pairs(args.folder_a, args.folder_b, args.count, args.seed)
    except (NPOError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{len(pairs.names)} pairs sampled of {pairs.common} common names"
        + (f"; {len(pairs.without_prompt)} left out without a .txt prompt" if pairs.without_prompt else ""),
        file=sys.stderr,
    )
    if pairs.prompt_differs:
        print(f"warning: {len(pairs.prompt_differs)} pairs have different prompts in the two folders, e.g. "
              f"{pairs.prompt_differs[0]}; folder A's prompt is used", file=sys.stderr)
    scores_a, scores_b = {}, {}
    for s in scorers:
        scores_a[s.name] = score_folder(s, pairs.folder_a, pairs.names, pairs.prompts, args.batch, args.labels[0])
        scores_b[s.name] = score_folder(s, pairs.folder_b, pairs.names, pairs.prompts, args.batch, args.labels[1])
    summaries = report.summarise(scores_a, scores_b, args.resamples, args.seed)
    text = report.text_report(summaries, *args.labels)
    named = zip(pairs.names, pairs.prompts, strict=True)
    listed = [{"pair": i, "name": n, "prompt": t} for i, (n, t) in enumerate(named)]
    outputs = {
        ".txt": text + "\n",
        ".json": report.json_report(summaries, *args.labels, listed),
        ".csv": report.csv_report(scores_a, scores_b, pairs.names),
    }
    for ext, content in outputs.items():
        atomic_write(args.out + ext, lambda tmp, c=content: Path(tmp).write_text(c, encoding="utf-8"))
    print(text)
    print(f"written: {', '.join(args.out + ext for ext in outputs)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
