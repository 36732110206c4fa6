#!/usr/bin/env python
"""Generate same-seed A/B image pairs from a checkpoint, an NPO offset and a prompt file (headless ComfyUI), then
score them with the authors' protocol (compare_rate.py).

Every prompt × seed is one pair: A samples with Apply NPO (the offset on the negative pass), B with plain CFG, the
same seed, prompt, negative and latent (or, with --offset-b, offset A against offset B). Runs a private ComfyUI
server (127.0.0.1, a temporary base directory: this pack in custom_nodes/, the checkpoint and the offsets linked
into models/) and writes the authors' folder layout, which scripts/npo_compare_folders.py reads too:

    OUT/NPO/00000_s0.png + 00000_s0.txt (the prompt), ...   A: <prompt index>_s<seed>
    OUT/plain/00000_s0.png + 00000_s0.txt, ...             B: the same names
    OUT/settings.json   the generation settings; a rerun with other settings is refused
    OUT/report.txt, .json, .csv   the scores, when a scorer option (--pickscore, --hps, ...) is given
    OUT/comfyui.log     the server's log (appended by each run)

Resumable: a rerun generates only what is missing (a pair is complete when both PNGs and both TXTs exist; a
half-done pair regenerates only its missing side); Ctrl-C keeps the finished pairs. Run it with the Python ComfyUI
runs with:

    python scripts/npo_generate_pairs.py --checkpoint v1-5-pruned-emaonly.safetensors \\
        --offset sd15_beta500_2kiter.safetensors --prompts pickapic_test_unique.txt --out npo_pairs \\
        --pickscore models/npo_scorers/PickScore_v1
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from npo_headless import find_comfyui, register_pack
from npo_headless.runner import (
    UsageError,
    api_titles,
    environment_problem,
    fmt_time,
    has_accelerator,
    interrupt,
    pack_object_info,
    prompt_failure,
    resolve_model_file,
    run_prompt,
    start_server,
)
from npo_headless.scoring import (
    add_scorer_arguments,
    build_scorers,
    compare_pairs,
    missing_scorer_files,
    sample_pairs,
    wants_scorers,
)
from npo_headless.server import ComfyServer, prepare_base_directory
from npo_headless.workflows import validate_against_object_info

SCRIPT = "scripts/npo_generate_pairs.py"
COMPARE_SCRIPT = Path(__file__).resolve().with_name("npo_compare_folders.py")
SETTINGS_FILE = "settings.json"
SETTINGS_FORMAT = "comfyui-npo-pairs/1"
REPORT_STEM = "report"
OFFSET_FOLDERS = ("npo", "loras")  # where NPO Load Offset finds offsets by name
COMPARE_DEFAULTS = {"count": 500, "report_seed": 0, "resamples": 10_000}  # npo_compare_folders.py's defaults

PICKAPIC_HELP = """\
The authors' prompts (gen.py): the 500 captions of Pick-a-Pic v1's test_unique split. Into a prompt file, one a line
(needs the datasets package; pickapic_v1_no_images has the same captions without the images):

    python -c "from datasets import load_dataset; print('\\n'.join(' '.join(c.split()) for c in \\
        load_dataset('yuvalkirstain/pickapic_v1_no_images', split='test_unique')['caption']))" \\
        > pickapic_test_unique.txt

SDXL as the authors: an SDXL offset, --size 1024 --zero-negative (cfg: the authors' gen_xl.py 7.5, the pack's
SDXL example 5)."""


@dataclass(frozen=True)
class Job:
    """One pair: prompt number ``index`` (0-based, empty lines not counted) sampled with ``seed``."""

    index: int
    seed: int
    prompt: str

    @property
    def name(self) -> str:
        return f"{self.index:05d}_s{self.seed}"


# ---------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; --size sets --width and --height both, --labels defaults to NPO / plain (offset names with
    --offset-b)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=PICKAPIC_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint file, or a name in ComfyUI's models/checkpoints")
    ap.add_argument("--offset", required=True,
                    help="NPO offset file (A's negative pass), or a name in ComfyUI's models/npo or models/loras")
    ap.add_argument("--offset-b", help="a second offset for B: compare offset A vs offset B instead of NPO vs plain")
    ap.add_argument("--prompts", required=True, type=Path,
                    help="text file, one prompt per line (empty lines skipped); see below for the authors' prompts")
    ap.add_argument("--limit", type=int, help="only the first N prompts")
    ap.add_argument("--seeds", type=int, default=1, help="seeds per prompt (default 1): --seed, --seed + 1, ...")
    ap.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    ap.add_argument("--out", type=Path, default=Path("npo_pairs"), help="output folder (default ./npo_pairs)")
    ap.add_argument("--labels", nargs=2, metavar=("LABEL_A", "LABEL_B"),
                    help="the two folder names and report labels (default: NPO plain; with --offset-b the offsets' "
                         "file names)")
    s = ap.add_argument_group("sampling (the authors' SD1.5 settings by default)")
    s.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    s.add_argument("--cfg", type=float, default=7.5, help="CFG scale (default 7.5); NPO does nothing at 1")
    s.add_argument("--sampler", default="dpmpp_2m",
                   help="KSampler sampler_name (default dpmpp_2m: with --scheduler normal ComfyUI's counterpart of "
                        "diffusers' DPMSolverMultistepScheduler, the authors'; the timestep spacing differs "
                        "slightly, so images are close to, not identical with, the authors')")
    s.add_argument("--scheduler", default="normal", help="KSampler scheduler (default normal)")
    s.add_argument("--width", type=int, help="image width (default 512)")
    s.add_argument("--height", type=int, help="image height (default 512)")
    s.add_argument("--size", type=int, help="width and height both")
    s.add_argument("--negative", default="", help='negative prompt (default "", the authors\')')
    s.add_argument("--zero-negative", action="store_true",
                   help="SDXL as the authors: the negative conditioning through ConditioningZeroOut (all zeros)")
    s.add_argument("--strength", type=float, default=1.0, help="Apply NPO strength (default 1.0)")
    r = ap.add_argument_group("server")
    r.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH, else ~/comfy/ComfyUI)")
    r.add_argument("--cpu", action="store_true", help="run ComfyUI with --cpu even when a GPU is available")
    r.add_argument("--threads", help="OMP/MKL threads for the server (CPU runs); default: torch's choice")
    r.add_argument("--port", type=int, help="server port on 127.0.0.1 (default: a free one)")
    add_scorer_arguments(ap)
    c = ap.add_argument_group("report (every pair in OUT, sampled as npo_compare_folders.py samples)")
    c.add_argument("--count", type=int, default=COMPARE_DEFAULTS["count"], help="pairs sampled (the authors: 500)")
    c.add_argument("--report-seed", type=int, default=COMPARE_DEFAULTS["report_seed"],
                   help="seed of the pair sample and of the bootstrap (default 0)")
    c.add_argument("--resamples", type=int, default=COMPARE_DEFAULTS["resamples"], help="bootstrap resamples")
    o = ap.parse_args(argv)
    o.width = o.width or o.size or 512
    o.height = o.height or o.size or 512
    for name in ("width", "height"):
        if getattr(o, name) < 16 or getattr(o, name) % 8:
            ap.error(f"--{name} must be a multiple of 8, at least 16")
    for name in ("steps", "seeds", "limit", "count"):
        if getattr(o, name) is not None and getattr(o, name) < 1:
            ap.error(f"--{name} must be at least 1")
    return o


def default_labels(o: argparse.Namespace) -> tuple[str, str]:
    """--labels, else NPO / plain, or the two offsets' file stems with --offset-b."""
    if o.labels:
        return o.labels[0], o.labels[1]
    if o.offset_b:
        a, b = Path(o.offset).stem, Path(o.offset_b).stem
        return (a, b) if a != b else ("A", "B")
    return "NPO", "plain"


def check_refusals(o: argparse.Namespace, labels: tuple[str, str]) -> None:
    """UsageError for settings that cannot give a meaningful comparison: cfg 1, unusable folder names."""
    if o.cfg == 1.0:
        raise UsageError("--cfg 1: NPO changes only the negative (unconditional) prediction, which CFG ignores at "
                         "cfg 1 (ComfyUI then skips it), so A and B would be the same images; use the model's usual "
                         "cfg (SD1.5: 7.5)")
    for label in labels:
        if not label or label in (".", "..") or "/" in label or "\\" in label or label == SETTINGS_FILE:
            raise UsageError(f"--labels {label!r}: each label is a folder name in --out")
    if labels[0] == labels[1]:
        raise UsageError(f"--labels: A and B need different folder names, both are {labels[0]!r}")


def check_scorer_files(o: argparse.Namespace) -> None:
    """UsageError for a scorer option naming a path that does not exist (before generating, not after)."""
    missing = missing_scorer_files(o)
    if missing:
        raise UsageError(f"{missing[0]} not found")


def read_prompts(path: Path, limit: int | None) -> list[str]:
    """The file's non-empty lines, stripped (UTF-8, a BOM ignored), the first ``limit`` of them."""
    if not path.is_file():
        raise UsageError(f"prompt file {path} not found")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"prompt file {path} has no prompts (only empty lines)")
    return prompts[:limit] if limit else prompts


def plural(n: int, word: str) -> str:
    """'1 image', '2 images'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def plan(prompts: list[str], seeds: int, seed: int) -> list[Job]:
    """Every prompt × seed, prompt-major."""
    return [Job(i, seed + k, text) for i, text in enumerate(prompts) for k in range(seeds)]


# ---------------------------------------------------------------------------------------------
# the output folder: settings and what is done
# ---------------------------------------------------------------------------------------------
def image_settings(o: argparse.Namespace, ckpt: Path, offsets: tuple[Path, Path | None],
                   labels: tuple[str, str]) -> dict:
    """What the images depend on (files by name and size): a folder holds images of one such setting only."""

    def file(path: Path | None) -> dict | None:
        return None if path is None else {"name": path.name, "bytes": path.stat().st_size}

    return {
        "checkpoint": file(ckpt), "offset_a": file(offsets[0]), "offset_b": file(offsets[1]),
        "labels": list(labels), "sampler": o.sampler, "scheduler": o.scheduler, "steps": o.steps, "cfg": o.cfg,
        "width": o.width, "height": o.height, "strength": o.strength, "negative": o.negative,
        "zero_negative": o.zero_negative,
    }


def differences(old: dict, new: dict) -> list[str]:
    """'name: old -> new' for every setting that differs."""
    return [f"{k}: {json.dumps(old.get(k))} there, {json.dumps(new.get(k))} now"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def check_out_folder(out: Path, images: dict, labels: tuple[str, str]) -> None:
    """UsageError when ``out`` holds images made with other settings than ``images``, or images without a
    settings.json (not made by this script). A folder without images takes any settings."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file")
    if not any((out / label).is_dir() and any((out / label).glob("*.png")) for label in labels):
        return
    path = out / SETTINGS_FILE
    if not path.is_file():
        raise UsageError(f"{out} holds images but no {SETTINGS_FILE} (not made by this script): use another --out")
    try:
        old = json.loads(path.read_text(encoding="utf-8"))["images"]
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path} is not a settings file of this script ({e}); use another --out") from None
    diff = differences(old, json.loads(json.dumps(images)))
    if diff:
        raise UsageError(f"{out} holds pairs made with other settings ({'; '.join(diff)}). Use another --out for "
                         f"these settings (or the settings in {path}).")


def missing_sides(out: Path, labels: tuple[str, str], job: Job) -> list[int]:
    """The sides (0: A, 1: B) whose PNG or TXT is missing; UsageError when an existing TXT holds another prompt
    (the prompt file changed)."""
    sides = []
    for side, label in enumerate(labels):
        png, txt = out / label / f"{job.name}.png", out / label / f"{job.name}.txt"
        if txt.is_file() and txt.read_text(encoding="utf-8").strip() != job.prompt:
            raise UsageError(f"{txt} holds another prompt than prompt {job.index} of the prompt file "
                             f"({job.prompt[:60]!r}): the file changed; use another --out")
        if not (png.is_file() and txt.is_file()):
            sides.append(side)
    return sides


def write_settings(out: Path, images: dict, o: argparse.Namespace, jobs: list[Job]) -> None:
    """settings.json: the image settings (compared on every rerun) and this run's prompt file and seeds."""
    doc = {
        "format": SETTINGS_FORMAT,
        "images": images,
        "pairs": {"prompts_file": str(o.prompts), "prompts": len({j.index for j in jobs}),
                  "seeds": sorted({j.seed for j in jobs}), "pairs": len(jobs)},
    }
    atomic_write_text(out / SETTINGS_FILE, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


def atomic_write_text(path: Path, text: str) -> None:
    """``path`` written through a temporary in its folder, then renamed (npo_core.atomic; umask permissions)."""
    register_pack()
    from comfyui_npo.npo_core.atomic import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def move_image(src: Path, dest: Path) -> None:
    """Copy ``src`` (the server's output) to ``dest`` through a temporary in dest's folder, then remove ``src``."""
    register_pack()
    from comfyui_npo.npo_core.atomic import atomic_write

    atomic_write(dest, lambda tmp: shutil.copyfile(src, tmp))
    src.unlink()


# ---------------------------------------------------------------------------------------------
# the API prompt
# ---------------------------------------------------------------------------------------------
def pair_prompt(o: argparse.Namespace, job: Job, sides: list[int], ckpt_name: str,
                offset_names: tuple[str, str | None], labels: tuple[str, str]) -> dict[str, dict]:
    """One API prompt for ``sides`` of the pair: shared loader, encoders and latent; per side (node ids 10+ for A,
    20+ for B) the model (Apply NPO with the side's offset, or the plain model), KSampler, VAE Decode, Save Image to
    output/npo_pairs/<a|b>/<name>. Node ids stay the same from pair to pair, so ComfyUI's cache keeps the loaded
    checkpoint, offsets and the negative encoding."""
    negative = ["3", 0]
    p: dict[str, dict] = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": job.prompt, "clip": ["1", 1]},
              "_meta": {"title": "positive"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": o.negative, "clip": ["1", 1]},
              "_meta": {"title": "negative"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": o.width, "height": o.height, "batch_size": 1}},
    }
    if o.zero_negative:
        p["4"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["3", 0]}}
        negative = ["4", 0]
    for side in sides:
        base, label, offset = 10 * (side + 1), labels[side], offset_names[side]
        model = ["1", 0]
        if offset is not None:
            p[str(base)] = {"class_type": "NPOLoadOffset", "inputs": {"offset_name": offset}}
            p[str(base + 1)] = {"class_type": "NPOApply", "inputs": {
                "model": ["1", 0], "npo_offset": [str(base), 0], "strength": o.strength, "start_percent": 0.0,
                "end_percent": 1.0}, "_meta": {"title": f"Apply NPO ({label})"}}
            model = [str(base + 1), 0]
        p[str(base + 2)] = {"class_type": "KSampler", "inputs": {
            "model": model, "seed": job.seed, "steps": o.steps, "cfg": o.cfg, "sampler_name": o.sampler,
            "scheduler": o.scheduler, "positive": ["2", 0], "negative": negative, "latent_image": ["5", 0],
            "denoise": 1.0}, "_meta": {"title": f"KSampler ({label})"}}
        p[str(base + 3)] = {"class_type": "VAEDecode", "inputs": {"samples": [str(base + 2), 0], "vae": ["1", 2]}}
        p[str(base + 4)] = {"class_type": "SaveImage", "inputs": {
            "images": [str(base + 3), 0], "filename_prefix": f"npo_pairs/{'ab'[side]}/{job.name}"}}
    return p


def check_sampler_names(o: argparse.Namespace, object_info: dict) -> None:
    """UsageError naming what this ComfyUI offers when --sampler or --scheduler is not among its KSampler's."""
    required = object_info["KSampler"]["input"]["required"]
    for option, key in (("sampler", "sampler_name"), ("scheduler", "scheduler")):
        spec = required[key]
        offered = spec[0] if isinstance(spec[0], list) else (spec[1] if len(spec) > 1 else {}).get("options", [])
        if getattr(o, option) not in offered:
            raise UsageError(f"--{option} {getattr(o, option)}: this ComfyUI offers {', '.join(offered)}")


# ---------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------
class StepLine:
    """A prompt's sampler steps on one live terminal line (\\r); nothing when stdout is not a terminal."""

    def __init__(self, titles: dict[str, str], prefix: str, stream=sys.stdout):
        self.titles, self.prefix, self.stream = titles, prefix, stream
        self.live = stream.isatty()
        self.open = False

    def executing(self, nid: str | None) -> None:
        pass

    def cached(self, nodes: list) -> None:
        pass

    def progress(self, nid: str, value: int, total: int) -> None:
        if self.live:
            self.stream.write(f"\r{self.prefix} {self.titles.get(nid, nid)} {value}/{total}\x1b[K")
            self.stream.flush()
            self.open = True

    def done(self) -> None:
        if self.open:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def save_outputs(entry: dict, server: ComfyServer, out: Path, labels: tuple[str, str], job: Job,
                 sides: list[int]) -> None:
    """Move each side's saved image into OUT/<label>/<name>.png, then write its prompt as <name>.txt."""
    for side in sides:
        records = (entry.get("outputs") or {}).get(str(10 * (side + 1) + 4), {}).get("images") or []
        if len(records) != 1:
            raise RuntimeError(f"pair {job.name}: Save Image ({labels[side]}) reported {len(records)} images")
        rec = records[0]
        src = server.base / rec.get("type", "output") / rec.get("subfolder", "") / rec["filename"]
        move_image(src, out / labels[side] / f"{job.name}.png")
        atomic_write_text(out / labels[side] / f"{job.name}.txt", job.prompt)


def generate(server: ComfyServer, o: argparse.Namespace, todo: list[tuple[Job, list[int]]], out: Path,
             names: tuple[str, tuple[str, str | None]], labels: tuple[str, str]) -> int:
    """Run every pair's prompt, one at a time, with a line per finished pair; the number of pairs done. Stops at the
    first failed prompt (RuntimeError with its node type and message)."""
    t0 = time.time()
    for done, (job, sides) in enumerate(todo, 1):
        prompt = pair_prompt(o, job, sides, names[0], names[1], labels)
        entry = run_prompt(server, prompt, progress=StepLine(api_titles(prompt), f"pair {done}/{len(todo)}"))
        failed = prompt_failure(entry)
        if failed:
            raise PairFailed(f"pair {job.name} failed in {failed[0]}: {failed[1]}", done - 1)
        save_outputs(entry, server, out, labels, job, sides)
        rate = (time.time() - t0) / done
        print(f"[{fmt_time(time.time() - t0)}] {done}/{len(todo)} pairs, {job.name}"
              f"{'' if len(sides) == 2 else f' ({labels[sides[0]]} only)'}: {rate:.1f} s/pair, "
              f"ETA {fmt_time(rate * (len(todo) - done))}", flush=True)
    return len(todo)


class PairFailed(RuntimeError):
    """A pair's prompt failed on the server; ``done``: the pairs finished before it."""

    def __init__(self, message: str, done: int):
        super().__init__(message)
        self.done = done


# ---------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------
def score(o: argparse.Namespace, out: Path, labels: tuple[str, str]) -> str:
    """The report of every pair in OUT (sample_pairs + compare_pairs), written to OUT/report.txt, .json, .csv."""
    pairs = sample_pairs(out / labels[0], out / labels[1], o.count, o.report_seed)
    scorers = build_scorers(o)
    return compare_pairs(scorers, pairs, labels, str(out / REPORT_STEM), o.resamples, o.report_seed, o.batch)


def compare_command(o: argparse.Namespace, out: Path, labels: tuple[str, str]) -> str:
    """The npo_compare_folders.py command that scores OUT later as this script would (shell-quoted)."""
    cmd = [sys.executable, str(COMPARE_SCRIPT), str(out / labels[0]), str(out / labels[1]), "--labels", *labels,
           "--out", str(out / REPORT_STEM)]
    for option, flag in (("count", "--count"), ("report_seed", "--seed"), ("resamples", "--resamples")):
        if getattr(o, option) != COMPARE_DEFAULTS[option]:
            cmd += [flag, str(getattr(o, option))]
    return shlex.join(cmd) + " --pickscore <PickScore folder>   (or --hps, --aesthetic, --image-reward)"


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def resolve_inputs(o: argparse.Namespace, comfy: Path) -> tuple[Path, tuple[Path, Path | None]]:
    """The checkpoint and offset files (UsageError for a missing one, or for two offsets ComfyUI cannot tell
    apart)."""
    ckpt = resolve_model_file(o.checkpoint, comfy, ("checkpoints",), "checkpoint")
    offset_a = resolve_model_file(o.offset, comfy, OFFSET_FOLDERS, "offset")
    offset_b = resolve_model_file(o.offset_b, comfy, OFFSET_FOLDERS, "offset") if o.offset_b else None
    if offset_b is not None and offset_b.name == offset_a.name:
        same = offset_b.resolve() == offset_a.resolve()
        raise UsageError(f"--offset and --offset-b {'are the same file' if same else 'have the same file name'} "
                         f"({offset_a.name}){'' if same else ': rename one'}")
    return ckpt, (offset_a, offset_b)


def append_log(log: Path, dest: Path) -> None:
    """Append this run's server log to ``dest`` under a dated header line (each run adds its own)."""
    if log.is_file():
        with open(dest, "a", encoding="utf-8") as f:
            f.write(f"==== {SCRIPT}, {time.strftime('%Y-%m-%d %H:%M:%S')} ====\n")
            f.write(log.read_text(encoding="utf-8", errors="replace").rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    o = parse_args(argv)
    labels = default_labels(o)
    out = o.out.expanduser().absolute()
    try:
        check_refusals(o, labels)
        prompts = read_prompts(o.prompts, o.limit)
        check_scorer_files(o)
        comfy = find_comfyui(o.comfyui)
        problem = environment_problem(comfy, SCRIPT)
        if problem:
            print(problem, file=sys.stderr)
            return 2
        ckpt, offsets = resolve_inputs(o, comfy)
        images = image_settings(o, ckpt, offsets, labels)
        check_out_folder(out, images, labels)
        jobs = plan(prompts, o.seeds, o.seed)
        todo = [(job, sides) for job in jobs if (sides := missing_sides(out, labels, job))]
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    out.mkdir(parents=True, exist_ok=True)
    write_settings(out, images, o, jobs)
    n_images = sum(len(sides) for _, sides in todo)
    print(f"{len(jobs)} pairs ({plural(len(prompts), 'prompt')} x {plural(o.seeds, 'seed')}) in {out}: "
          f"{len(jobs) - len(todo)} complete, "
          f"{len(todo)} to generate ({plural(n_images, 'image')})", flush=True)
    if todo:
        rc = run_generation(o, comfy, ckpt, offsets, todo, out, labels, len(jobs))
        if rc:
            return rc
    if not wants_scorers(o):
        print(f"\nscore them with:\n    {compare_command(o, out, labels)}")
        return 0
    register_pack()
    from comfyui_npo.npo_core.errors import NPOError

    try:
        text = score(o, out, labels)
    except (NPOError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted while scoring; the pairs are complete in {out}", file=sys.stderr)
        return 130
    print(text)
    return 0


def run_generation(o: argparse.Namespace, comfy: Path, ckpt: Path, offsets: tuple[Path, Path | None],
                   todo: list[tuple[Job, list[int]]], out: Path, labels: tuple[str, str], total: int) -> int:
    """Start the server, generate ``todo``, stop it (also on Ctrl-C, which keeps the finished pairs); 0 when all were
    generated, else the exit status."""
    accel = None if o.cpu else has_accelerator()
    base = Path(tempfile.mkdtemp(prefix="npo-pairs-"))
    server = None
    complete = f"{{}} of {total} pairs are complete in {out}"
    resume = " (kept); run the same command again to resume: nothing is generated twice."
    try:
        prepare_base_directory(base, checkpoints=(ckpt,), offsets=tuple(p for p in offsets if p is not None))
        server = start_server(comfy, base, accel, o.threads, o.port)
        object_info = pack_object_info(server, "NPOApply")
        if object_info is None:
            return 1
        check_sampler_names(o, object_info)
        names = (ckpt.name, (offsets[0].name, offsets[1].name if offsets[1] else None))
        problems = validate_against_object_info(pair_prompt(o, todo[0][0], [0, 1], names[0], names[1], labels),
                                                object_info)
        if problems:
            print("error: the prompt does not validate:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 2
        if accel is None:
            print("note: running on the CPU" + (" (a full-size checkpoint takes minutes per image)"
                                                if ckpt.stat().st_size > 10**9 else ""))
        t0 = time.time()
        done = generate(server, o, todo, out, names, labels)
        print(f"generated {plural(done, 'pair')} in {fmt_time(time.time() - t0)}: {out / labels[0]}, "
              f"{out / labels[1]} (server log: {out / 'comfyui.log'})")
        return 0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PairFailed as e:
        print(f"error: {e}\n{complete.format(total - len(todo) + e.done)} (kept: a rerun resumes there)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        interrupt(server)
        finished = sum(1 for job, _ in todo if not missing_sides(out, labels, job))
        print(f"\ninterrupted: {complete.format(total - len(todo) + finished)}{resume}", file=sys.stderr)
        return 130
    except Exception as e:  # a clear message plus the server's log, not only a traceback
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        if server is not None:
            print(server.log_tail(40), file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.stop()
        append_log(base / "comfyui.log", out / "comfyui.log")
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
