"""The authors' scorers for the headless scripts: their command-line options, loading them from local files (nothing
is downloaded), and the two-folder comparison of compare_rate.py reported as NPO Compare Report reports it.

Imports the pack (``comfyui_npo``, registered on first use) and torch / transformers only when scorers are built."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import register_pack

SCORER_OPTIONS = ("--pickscore", "--hps", "--aesthetic", "--image-reward")
PATH_OPTIONS = (*SCORER_OPTIONS, "--pickscore-processor", "--hps-tokenizer", "--clip-vision")  # options naming files


def add_scorer_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("scorers (local files; give one or more)")
    g.add_argument("--pickscore", help="PickScore v1 folder (config.json, model.safetensors, tokenizer, preprocessor)")
    g.add_argument("--pickscore-processor", help="tokenizer + preprocessor_config.json folder, if not the model's")
    g.add_argument("--hps", help="HPS v2.1 checkpoint (HPS_v2.1_compressed.pt)")
    g.add_argument("--hps-tokenizer", help="CLIP tokenizer folder of laion/CLIP-ViT-H-14 (default: the .pt's folder)")
    g.add_argument("--aesthetic", help="LAION aesthetic v2 head (sac+logos+ava1-l14-linearMSE .pth / .safetensors)")
    g.add_argument("--clip-vision", help="CLIP ViT-L/14 folder in the Hugging Face layout, for --aesthetic")
    g.add_argument("--image-reward", help="ImageReward folder (ImageReward.pt, med_config.json, bert-base-uncased/); "
                                          "needs the ImageReward package installed in this Python")
    g.add_argument("--device", default="cpu", help="torch device for the scorers (cpu, cuda)")
    g.add_argument("--batch", type=int, default=16, help="images per scorer call")


def wants_scorers(args: argparse.Namespace) -> bool:
    return any(getattr(args, opt[2:].replace("-", "_")) for opt in SCORER_OPTIONS)


def missing_scorer_files(args: argparse.Namespace) -> list[str]:
    """'--option path' for each scorer option naming a path that does not exist (checked before long work)."""
    out = []
    for opt in PATH_OPTIONS:
        value = getattr(args, opt[2:].replace("-", "_"), None)
        if value and not Path(value).expanduser().exists():
            out.append(f"{opt} {value}")
    return out


def build_scorers(args: argparse.Namespace) -> list:
    """The scorers the options name, on ``args.device``; an NPOError or ValueError names a missing file."""
    register_pack()
    scorers = []
    if args.pickscore:
        from comfyui_npo.evaluation.pickscore import PickScore

        scorers.append(PickScore.from_folder(args.pickscore, args.device, processor_path=args.pickscore_processor))
    if args.hps:
        from comfyui_npo.evaluation.hps import HPSv21

        tokenizer = args.hps_tokenizer or str(Path(args.hps).parent)
        scorers.append(HPSv21.from_file(args.hps, tokenizer, args.device))
    if args.aesthetic:
        if not args.clip_vision:
            raise ValueError("--aesthetic needs --clip-vision (a CLIP ViT-L/14 folder in the Hugging Face layout)")
        from comfyui_npo.evaluation.aesthetic import AestheticScorer

        scorers.append(AestheticScorer.from_files(args.clip_vision, args.aesthetic, device=args.device))
    if args.image_reward:
        from comfyui_npo.evaluation.image_reward import ImageRewardScorer

        scorers.append(ImageRewardScorer.from_folder(args.image_reward, args.device))
    if not scorers:
        raise ValueError(f"give at least one scorer: {', '.join(SCORER_OPTIONS)}")
    for s in scorers:
        if hasattr(s, "batch_size"):
            s.batch_size = args.batch
    return scorers


def _progress(what: str, done: int, total: int, started: float) -> None:
    rate = done / max(time.perf_counter() - started, 1e-9)
    print(f"\r{what}: {done}/{total} images ({rate:.1f}/s)", end="\n" if done == total else "", file=sys.stderr)


def score_folder(scorer, folder: Path, names: list[str], prompts: list[str], batch: int, label: str) -> list[float]:
    """The scorer's score of ``folder/names[i]`` for ``prompts[i]``, in batches, with a progress line."""
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


def sample_pairs(folder_a, folder_b, count: int = 500, seed: int = 0):
    """The common pairs of two folders, sampled as compare_rate.py samples them (reproducibly), with a summary line."""
    register_pack()
    from comfyui_npo.evaluation import folders

    pairs = folders.common_pairs(folder_a, folder_b, count, seed)
    print(
        f"{len(pairs.names)} pairs sampled of {pairs.common} common names"
        + (f"; {len(pairs.without_prompt)} left out without a .txt prompt" if pairs.without_prompt else ""),
        file=sys.stderr,
    )
    if pairs.prompt_differs:
        print(f"warning: {len(pairs.prompt_differs)} pairs have different prompts in the two folders, e.g. "
              f"{pairs.prompt_differs[0]}; folder A's prompt is used", file=sys.stderr)
    return pairs


def compare_pairs(
    scorers: list, pairs, labels: tuple[str, str] = ("A", "B"), out: str = "npo_compare", resamples: int = 10_000,
    seed: int = 0, batch: int = 16,
) -> str:
    """Score both sides of the sampled pairs, write ``out`` + .txt, .json and .csv (atomically); the text report."""
    from comfyui_npo.evaluation import report
    from comfyui_npo.npo_core.atomic import atomic_write

    scores_a, scores_b = {}, {}
    for s in scorers:
        scores_a[s.name] = score_folder(s, pairs.folder_a, pairs.names, pairs.prompts, batch, labels[0])
        scores_b[s.name] = score_folder(s, pairs.folder_b, pairs.names, pairs.prompts, batch, labels[1])
    summaries = report.summarise(scores_a, scores_b, resamples, seed)
    text = report.text_report(summaries, *labels)
    named = zip(pairs.names, pairs.prompts, strict=True)
    listed = [{"pair": i, "name": n, "prompt": t} for i, (n, t) in enumerate(named)]
    outputs = {
        ".txt": text + "\n",
        ".json": report.json_report(summaries, *labels, listed),
        ".csv": report.csv_report(scores_a, scores_b, pairs.names),
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    for ext, content in outputs.items():
        atomic_write(out + ext, lambda tmp, c=content: Path(tmp).write_text(c, encoding="utf-8"))
    print(f"written: {', '.join(out + ext for ext in outputs)}", file=sys.stderr)
    return text
