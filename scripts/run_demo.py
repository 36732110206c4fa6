#!/usr/bin/env python
"""Self-NPO demo, headless: train an NPO offset for a checkpoint and compare same-seed images with and without it.

Runs the example workflow "4 Train a Self-NPO offset and compare" on a private ComfyUI server (started here, on
127.0.0.1, with a temporary base directory: this pack in custom_nodes/, your checkpoint linked into
models/checkpoints/), shows progress, and copies the results into an output folder
(default ./self_npo_demo_output/<date-time>; --out sets another):

    self_npo_offset.safetensors   the trained offset (load it with Load NPO Offset from models/npo)
    self_npo_on.png / self_npo_off.png / comparison.png   same seed, with / without the offset
    loss_curve.png, training.txt, prompt_api.json, comfyui.log

Run it with the Python that runs your ComfyUI (it has ComfyUI's requirements), from the pack's folder:

    cd ComfyUI/custom_nodes/<pack>
    ../../venv/bin/python scripts/run_demo.py --checkpoint ~/models/v1-5-pruned-emaonly.safetensors

(your venv's python wherever it is; the Windows portable build: ..\\..\\..\\python_embeded\\python.exe).

The settings follow the checkpoint's family, read from its keys: SD1.x/SD2.x as template 4, SDXL as the authors
(1024x1024, teacher_guidance -5, zeroed negative, cfg 5), a DiT (SD3.5, ...) as the SD3.5 template (1024x1024,
20 steps of euler / sgm_uniform at cfg 4) with template 7's Self-NPO pool; --family overrides it.

Without --checkpoint it uses a tiny random SD1.5 checkpoint generated on the spot (the one the e2e tests
use): a quick smoke run of the whole pipeline on any CPU, not a quality demo; its images are noise.

ComfyUI is found at --comfyui, else the ComfyUI this pack is installed in (custom_nodes/<pack>), else
$COMFYUI_PATH, else ~/comfy/ComfyUI; the first line of output says which.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from npo_headless import REPO, find_comfyui, locate_comfyui  # noqa: F401 (find_comfyui: the tests')
from npo_headless.assets import TINY_CKPT, ensure_assets
from npo_headless.runner import (
    UsageError,
    api_titles,
    checkpoint_kind,
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
from npo_headless.server import prepare_base_directory
from npo_headless.workflows import EXAMPLE_SELF_NPO, ui_to_api, validate_against_object_info

WORKFLOW = REPO / "example_workflows" / f"{EXAMPLE_SELF_NPO}.json"
SCRIPT = "scripts/run_demo.py"
DEFAULT_OUT = Path("self_npo_demo_output")  # in the current folder; .gitignore keeps it out of the pack's repository
# Quick settings for the built-in tiny random checkpoint (a smoke run, not a real training).
TINY_DEFAULTS = {"steps": 10, "batch_size": 2, "pool_size": 4, "pool_steps": 4, "size": 64, "sample_steps": 10}
# Self-NPO Train's student_cond choices (training.tdft: auto, then STUDENT_CONDS)
STUDENT_CONDS = ("auto", "prompt", "negative", "mix")
FAMILIES = ("sd", "sdxl", "dit")
FAMILY_NAMES = {"sd": "SD1.x / SD2.x UNet", "sdxl": "SDXL UNet", "dit": "DiT"}
# Settings per family where they differ from template 4's (SD1.5): SDXL as the authors; a DiT as the SD3.5
# template (5) samples, and with template 7's Self-NPO pool (batch 2, 8 pool samples at the sampling cfg).
# learning_rate and student_cond stay "auto": Self-NPO Train picks them for the family (lora 1e-4 for DiTs;
# the negative student on flow models).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "sd": {},
    "sdxl": {"size": 1024, "teacher_guidance": -5.0, "cfg": 5.0, "zero_negative": True},
    "dit": {"size": 1024, "cfg": 4.0, "sample_steps": 20, "sampler": "euler", "scheduler": "sgm_uniform",
            "batch_size": 2, "pool_size": 8, "pool_cfg": 4.0},
}


# ---------------------------------------------------------------------------------------------
# the API prompt: find the workflow's nodes by structure and set the user's knobs
# ---------------------------------------------------------------------------------------------
class Graph:
    def __init__(self, prompt: dict[str, dict], object_info: dict):
        self.p, self.info = prompt, object_info

    def of_type(self, cls: str) -> list[str]:
        return sorted((nid for nid, e in self.p.items() if e["class_type"] == cls), key=int)

    def one(self, cls: str) -> str:
        ids = self.of_type(cls)
        if len(ids) != 1:
            raise SystemExit(f"error: the workflow should have exactly one {cls} node, it has {len(ids)}")
        return ids[0]

    def src(self, nid: str, name: str) -> str:
        value = self.p[nid]["inputs"][name]
        assert isinstance(value, list), f"{nid}.{name} is not a link"
        return str(value[0])

    def set(self, nid: str, **values: Any) -> None:
        for k, v in values.items():
            if v is not None:
                self.p[nid]["inputs"][k] = v

    def new_id(self) -> str:
        return str(max(int(k) for k in self.p) + 1)

    def add(self, cls: str, title: str, **inputs: Any) -> str:
        nid = self.new_id()
        self.p[nid] = {"class_type": cls, "inputs": inputs, "_meta": {"title": title}}
        return nid

    def prune(self) -> None:
        """Drop nodes no output node depends on (e.g. prompt encoders that were replaced)."""
        keep: set[str] = set()
        todo = [nid for nid, e in self.p.items() if self.info.get(e["class_type"], {}).get("output_node")]
        while todo:
            nid = todo.pop()
            if nid in keep:
                continue
            keep.add(nid)
            todo.extend(str(v[0]) for v in self.p[nid]["inputs"].values() if isinstance(v, list))
        for nid in set(self.p) - keep:
            del self.p[nid]

    def titles(self) -> dict[str, str]:
        return {nid: (e.get("_meta") or {}).get("title") or e["class_type"] for nid, e in self.p.items()}


def customize(prompt: dict, object_info: dict, ckpt_name: str, o: argparse.Namespace) -> dict:
    g = Graph(prompt, object_info)
    train = g.one("SelfNPOTrain")
    g.set(g.one("CheckpointLoaderSimple"), ckpt_name=ckpt_name)
    g.set(train, steps=o.steps, batch_size=o.batch_size, pool_size=o.pool_size, pool_steps=o.pool_steps,
          width=o.size, height=o.size, seed=o.seed, mode=o.mode, rank=o.rank, learning_rate=o.learning_rate,
          teacher_guidance=o.teacher_guidance, save_every=o.save_every, student_cond=o.student_cond,
          pool_cfg=o.pool_cfg)
    samplers = g.of_type("KSampler")
    for ks in samplers:
        g.set(ks, steps=o.sample_steps, cfg=o.cfg, seed=o.sample_seed, sampler_name=o.sampler, scheduler=o.scheduler)
        g.set(g.src(ks, "latent_image"), width=o.size, height=o.size)
    g.set(g.one("NPOApply"), strength=o.strength)
    clip = g.p[g.src(train, "negative")]["inputs"]["clip"]
    if o.prompt:  # replace the training prompts: CLIPTextEncode per prompt, chained with ConditioningCombine
        cond = None
        for i, text in enumerate(o.prompt):
            enc = g.add("CLIPTextEncode", f"Training prompt {i + 1}", text=text, clip=clip)
            cond = [enc, 0] if cond is None else [g.add("ConditioningCombine", "Conditioning (Combine)",
                                                        conditioning_1=cond, conditioning_2=[enc, 0]), 0]
        g.set(train, positive=cond)
    if o.test_prompt is not None:
        for ks in samplers:
            g.set(g.src(ks, "positive"), text=o.test_prompt)
    if o.zero_negative:  # SDXL, as the authors: the negative/unconditional branch gets an all-zero conditioning
        zero = g.add("ConditioningZeroOut", "ConditioningZeroOut (negative)",
                     conditioning=g.p[train]["inputs"]["negative"])
        for nid in [train, *samplers]:
            g.set(nid, negative=[zero, 0])
    g.prune()
    return g.p


def training_prompts(prompt: dict, train: str) -> list[str]:
    """The texts feeding Self-NPO Train's positive input, in order."""
    out: list[str] = []

    def walk(link):
        e = prompt[str(link[0])]
        if e["class_type"] == "ConditioningCombine":
            walk(e["inputs"]["conditioning_1"])
            walk(e["inputs"]["conditioning_2"])
        elif "text" in e["inputs"]:
            out.append(e["inputs"]["text"])

    walk(prompt[train]["inputs"]["positive"])
    return out


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
def collect(entry: dict, prompt: dict, base: Path, out: Path) -> dict[str, Path]:
    results: dict[str, Path] = {}
    outputs = entry.get("outputs") or {}
    for nid, node_out in outputs.items():
        cls = prompt.get(nid, {}).get("class_type")
        texts = node_out.get("text") or []
        if cls == "NPOSaveOffset" and texts:
            first = texts[0].splitlines()[0]  # "saved models/npo/<name>"
            rel = first.split("models/npo/", 1)[1].strip()
            src = base / "models" / "npo" / rel
            results["offset"] = shutil.copy2(src, out / "self_npo_offset.safetensors")
            results["offset_name"] = Path(rel)
        if cls == "SelfNPOTrain" and texts:
            (out / "training.txt").write_text("\n".join(texts) + "\n")
            results["training.txt"] = out / "training.txt"
        for i, rec in enumerate(node_out.get("images") or []):
            folder = {"output": "output", "temp": "temp", "input": "input"}[rec.get("type", "output")]
            src = base / folder / rec.get("subfolder", "") / rec["filename"]
            if cls == "SaveImage":
                name = prompt[nid]["inputs"].get("filename_prefix", f"image_{nid}")
            else:
                name = "loss_curve" if cls == "PreviewImage" else f"preview_{nid}"
            name += f"_{i + 1}" if i else ""
            results[name] = shutil.copy2(src, out / f"{name}{src.suffix}")
    return results


CAPTIONS = ("without Self-NPO", "with Self-NPO")


def caption_font(height: int):
    """PIL's built-in font at a size that reads at ``height`` pixels (Pillow < 10.1: its fixed bitmap font)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=height)
    except TypeError:  # pragma: no cover (Pillow < 10.1)
        return ImageFont.load_default()


def comparison_image(off: Path, on: Path, dest: Path) -> Path | None:
    """off | on side by side, each under its caption (CAPTIONS), centred in its column."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return None
    a, b = Image.open(off).convert("RGB"), Image.open(on).convert("RGB")
    scale = max(1, 256 // max(a.width, 1))  # tiny images (the smoke test's 64x64): enlarged, pixels kept sharp
    if scale > 1:
        a, b = (im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in (a, b))
    gap = max(8, a.width // 32)
    font = caption_font(max(16, min(a.width, b.width) // 14))
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [draw.textbbox((0, 0), text, font=font) for text in CAPTIONS]
    cap = max(box[3] for box in boxes) + 2 * gap
    im = Image.new("RGB", (a.width + b.width + gap, max(a.height, b.height) + cap), "white")
    draw = ImageDraw.Draw(im)
    for text, box, left, width in zip(CAPTIONS, boxes, (0, a.width + gap), (a.width, b.width), strict=True):
        draw.text((left + (width - (box[2] - box[0])) // 2 - box[0], gap), text, font=font, fill="black")
    im.paste(a, (0, cap))
    im.paste(b, (a.width + gap, cap))
    im.save(dest)
    return dest


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Train a Self-NPO offset for a checkpoint (headless ComfyUI) and compare same-seed images "
                    "with and without it. Unset knobs keep the example workflow's values (500 LoRA steps, "
                    "512x512, ...), or quick smoke-test values for the built-in tiny checkpoint.",
        epilog="The family (read from the checkpoint, or --family) sets the defaults: SDXL as the authors (1024x1024, "
               "teacher_guidance -5, zeroed negative, cfg 5); a DiT as the SD3.5 template (1024x1024, 20 steps "
               "euler / sgm_uniform, cfg 4) with batch 2 and a pool of 8 at cfg 4. Results go to --out, default "
               "./self_npo_demo_output/<date-time> (git-ignored inside the pack's folder).")
    ap.add_argument("--checkpoint", help="your checkpoint file (.safetensors); default: a tiny random SD1.5 "
                                         "generated on the spot (smoke test, images are noise)")
    ap.add_argument("--out", type=Path, help="output folder (default: ./self_npo_demo_output/<date-time>)")
    ap.add_argument("--comfyui", help="ComfyUI folder (default: the ComfyUI this pack is installed in, else "
                                      "$COMFYUI_PATH, else ~/comfy/ComfyUI)")
    ap.add_argument("--family", choices=["auto", *FAMILIES], default="auto",
                    help="the checkpoint's family, for the defaults: auto (read from its keys), sd (SD1.x/SD2.x), "
                         "sdxl, dit (SD3.5, ...)")
    t = ap.add_argument_group("training (Self-NPO Train)")
    t.add_argument("--steps", type=int, help="optimizer steps (workflow: 500; the authors: 1000)")
    t.add_argument("--batch-size", type=int, help="samples per step (workflow: 4)")
    t.add_argument("--prompt", action="append", help="a training prompt; repeat for several (replaces the "
                                                     "workflow's three)")
    t.add_argument("--pool-size", type=int, help="start latents sampled from the model first (workflow: 16)")
    t.add_argument("--pool-steps", type=int, help="sampling steps per pool latent (workflow: 20)")
    t.add_argument("--size", type=int, help="image size (pool and comparison), a multiple of 8 (workflow: 512)")
    t.add_argument("--mode", choices=["lora", "full"], help="lora (workflow) or full (all UNet weights)")
    t.add_argument("--rank", type=int, help="LoRA rank (workflow: 16)")
    t.add_argument("--learning-rate", help="auto (workflow; lora: 1e-4 SD1.5, 2e-5 SDXL) or a number, e.g. 5e-5")
    t.add_argument("--teacher-guidance", type=float, help="workflow: -1 (SD1.5); the authors used -5 for SDXL")
    t.add_argument("--student-cond", choices=STUDENT_CONDS,
                   help="Self-NPO Train's student_cond (workflow: auto = negative on flow-matching models such as "
                        "SD3.5, prompt on SD-style ones; prompt: the authors' code; mix: 50/50)")
    t.add_argument("--pool-cfg", type=float, help="CFG of the pool sampling (workflow: 7; DiT: 4)")
    t.add_argument("--seed", type=int, help="training seed (workflow: 0)")
    t.add_argument("--save-every", type=int, default=0,
                   help="resumable checkpoints every N steps (default 0: the temporary folder is deleted anyway)")
    s = ap.add_argument_group("comparison (two KSamplers, same seed)")
    s.add_argument("--test-prompt", help="the prompt of the comparison images")
    s.add_argument("--sample-steps", type=int, help="KSampler steps (workflow: 25)")
    s.add_argument("--cfg", type=float, help="CFG scale (workflow: 7.5; NPO does nothing at 1)")
    s.add_argument("--sample-seed", type=int, help="KSampler seed (workflow: 42)")
    s.add_argument("--sampler", help="KSampler sampler_name (workflow: dpmpp_2m; DiT: euler)")
    s.add_argument("--scheduler", help="KSampler scheduler (workflow: normal; DiT: sgm_uniform)")
    s.add_argument("--strength", type=float, help="Apply NPO strength (workflow: 1.0)")
    s.add_argument("--sdxl", action="store_true", help="the same as --family sdxl: 1024x1024, teacher_guidance -5, "
                                                       "zeroed negative (ConditioningZeroOut), cfg 5")
    r = ap.add_argument_group("server")
    r.add_argument("--cpu", action="store_true", help="run ComfyUI with --cpu even when a GPU is available")
    r.add_argument("--threads", help="OMP/MKL threads for the server (CPU runs); default: torch's choice, 1 for "
                                     "the tiny checkpoint")
    r.add_argument("--port", type=int, help="server port on 127.0.0.1 (default: a free one)")
    r.add_argument("--keep-base", action="store_true", help="keep the temporary ComfyUI base folder")
    o = ap.parse_args(argv)
    if o.sdxl:
        if o.family not in ("auto", "sdxl"):
            ap.error(f"--sdxl contradicts --family {o.family}")
        o.family = "sdxl"
    o.zero_negative = False
    if o.family != "auto":
        apply_family(o, o.family)
    if o.size is not None and (o.size < 64 or o.size % 8):
        ap.error("--size must be a multiple of 8, at least 64")
    return o


def apply_family(o: argparse.Namespace, family: str) -> None:
    """Fill the knobs the user left unset with ``family``'s settings (FAMILY_DEFAULTS)."""
    o.family = family
    for key, value in FAMILY_DEFAULTS[family].items():
        if key == "zero_negative":
            o.zero_negative = value
        elif getattr(o, key) is None:
            setattr(o, key, value)


def main(argv: list[str] | None = None) -> int:
    o = parse_args(argv)
    comfy, found_by = locate_comfyui(o.comfyui)
    problem = environment_problem(comfy, SCRIPT)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    print(f"ComfyUI: {comfy}  ({found_by})")
    ckpt: Path | None = None
    if o.checkpoint:
        try:
            ckpt = resolve_model_file(o.checkpoint, comfy, ("checkpoints",), "checkpoint")
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if o.family == "auto":
            kind = checkpoint_kind(ckpt)
            if kind is None:
                print(f"note: cannot tell the family of {ckpt.name} from its keys; using template 4's SD1.5 "
                      "settings (--family sdxl / dit for those)")
            apply_family(o, kind or "sd")
            print(f"family: {FAMILY_NAMES[o.family]}" + (" (read from the checkpoint's keys)" if kind else ""))
    else:
        o.family = "sd" if o.family == "auto" else o.family
        for k, v in TINY_DEFAULTS.items():
            if getattr(o, k) is None:
                setattr(o, k, v)

    out = (o.out or DEFAULT_OUT / time.strftime("%Y%m%d-%H%M%S")).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    accel = None if o.cpu else has_accelerator()
    base = Path(tempfile.mkdtemp(prefix="self-npo-demo-"))
    t_start = time.time()
    server = None
    try:
        # base directory: this pack + the checkpoint
        if ckpt is None:
            print("No --checkpoint: using the built-in tiny random SD1.5 checkpoint (a smoke test of the whole "
                  "pipeline; its images are noise).")
            ckpt = ensure_assets(comfy, sys.executable) / TINY_CKPT
        prepare_base_directory(base, checkpoints=(ckpt,))

        # The tiny model's ops are small: on a CPU one thread is fastest (several spin against each other on a
        # busy machine; measured 10x slower). A real checkpoint gets torch's default unless --threads.
        threads = o.threads or ("1" if accel is None and not o.checkpoint else None)
        server = start_server(comfy, base, accel, threads, o.port, announced=True)
        object_info = pack_object_info(server, "SelfNPOTrain")
        if object_info is None:
            return 1
        workflow = json.loads(WORKFLOW.read_text())
        prompt = customize(ui_to_api(workflow, object_info), object_info, ckpt.name, o)
        problems = validate_against_object_info(prompt, object_info)
        if problems:
            print("error: the prompt does not validate:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 2
        (out / "prompt_api.json").write_text(json.dumps(prompt, indent=1))

        train = next(nid for nid, e in prompt.items() if e["class_type"] == "SelfNPOTrain")
        ti = prompt[train]["inputs"]
        ks = next(e["inputs"] for e in prompt.values() if e["class_type"] == "KSampler")
        print(f"checkpoint: {ckpt.name}\n"
              f"training:   {ti['mode']}, {ti['steps']} steps x batch {ti['batch_size']}, pool {ti['pool_size']} "
              f"latents at {ti['width']}x{ti['height']} ({ti['pool_steps']} steps each), seed {ti['seed']}\n"
              f"prompts:    " + "\n            ".join(training_prompts(prompt, train)) + "\n"
              f"student:    student_cond {ti['student_cond']}, learning_rate {ti['learning_rate']}, pool cfg "
              f"{ti['pool_cfg']}\n"
              f"comparison: {ks['steps']} steps of {ks['sampler_name']} / {ks['scheduler']}, cfg {ks['cfg']}, seed "
              f"{ks['seed']}")
        if accel is None and o.checkpoint:
            print("note: running on the CPU; with a full-size checkpoint this takes hours.")

        entry = run_prompt(server, prompt, api_titles(prompt))
        failed = prompt_failure(entry)
        if failed:
            print(f"error: the workflow failed in {failed[0]}: {failed[1]}", file=sys.stderr)
            return 1

        results = collect(entry, prompt, base, out)
        if "self_npo_on" in results and "self_npo_off" in results:
            results["comparison"] = comparison_image(results["self_npo_off"], results["self_npo_on"],
                                                     out / "comparison.png")
        summary = (out / "training.txt").read_text().strip() if (out / "training.txt").is_file() else ""
        print(f"\n{summary}\ntotal time {fmt_time(time.time() - t_start)}\n\nresults in {out}:")
        for key in ("offset", "self_npo_on", "self_npo_off", "comparison", "loss_curve"):
            if results.get(key):
                print(f"  {results[key].name}")
        missing_out = [k for k in ("offset", "self_npo_on", "self_npo_off", "loss_curve") if k not in results]
        if missing_out:
            print(f"error: missing results: {missing_out}", file=sys.stderr)
            return 1
        print(f"\nUse the offset in ComfyUI: copy {results['offset'].name} to ComfyUI/models/npo/ and pick it in "
              "Load NPO Offset -> Apply NPO.")
        return 0
    except KeyboardInterrupt:
        interrupt(server)
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a clear message plus the server's log, not only a traceback
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        if server is not None:
            print(server.log_tail(40), file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.stop()
        if (base / "comfyui.log").is_file():  # start_server's log, also of a start that failed
            shutil.copy2(base / "comfyui.log", out / "comfyui.log")
        if o.keep_base:
            print(f"ComfyUI base folder kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
