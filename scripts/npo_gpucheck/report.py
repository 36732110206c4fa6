"""The JSON document of a check run and its printed table (standard library only)."""

from __future__ import annotations

import datetime
import json
import re
import subprocess
from pathlib import Path

from . import plan
from .parent import Session

PASSING = ("ok", "n/a", plan.NOT_IN_VERSION)  # statuses that do not fail the run


def git_commit(repo: Path) -> tuple[str | None, bool | None]:
    """(HEAD, whether the work tree has changes), or (None, None) without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    if head.returncode != 0:
        return None, None
    return head.stdout.strip(), bool(dirty.stdout.strip())


def comfyui_version_file(comfy: Path) -> str:
    """__version__ from ComfyUI's comfyui_version.py ("unknown" without it)."""
    path = comfy / "comfyui_version.py"
    found = re.search(r'__version__\s*=\s*"([^"]+)"', path.read_text(encoding="utf-8")) if path.exists() else None
    return found.group(1) if found else "unknown"


def document(s: Session, repo: Path, wall_s: float) -> dict:
    """Everything of the run: card, versions, commit, date, each mode's set-up and every row's numbers."""
    env = next((m["env"] for m in s.modes.values() if m.get("env")), None) or {}
    commit, dirty = git_commit(repo)
    rows = []
    for row in plan.ROWS:
        for mode in row.modes:
            key = plan.row_key(row.id, mode)
            if key in s.results:
                rows.append({"key": key, "row": row.id, "mode": mode, **s.results[key]})
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "profile": s.profile.name,
        "smoke": s.profile.name == "smoke",
        "card": env.get("card", "unknown (no worker started)"),
        "torch": env.get("torch"),
        "torch_cuda": env.get("torch_cuda"),
        "comfyui": env.get("comfyui") or comfyui_version_file(s.comfy),
        "comfyui_path": str(s.comfy),
        "python": env.get("python"),
        "commit": commit,
        "dirty": dirty,
        "budget_s": s.profile.budget,
        "wall_s": round(wall_s, 1),
        "modes": s.modes,
        "rows": rows,
    }


def out_path(out: str | None, today: datetime.date) -> Path:
    """--out as given, or gpu_check_<date>.json inside it when it is a folder (the current folder by default)."""
    name = f"gpu_check_{today.isoformat()}.json"
    if out is None:
        return Path(name)
    path = Path(out)
    return path / name if path.is_dir() or out.endswith(("/", "\\")) else path


def write(doc: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")


def exit_code(doc: dict) -> int:
    """0 when every row passed (or is n/a, or not in this version), else 1."""
    return 0 if all(r["status"] in PASSING for r in doc["rows"]) else 1


def table(doc: dict) -> str:
    """A Markdown table: one line per row and memory mode."""
    lines = [
        f"GPU check ({doc['profile']}): {doc['card']}, torch {doc['torch']}, ComfyUI {doc['comfyui']}, "
        f"commit {(doc['commit'] or 'unknown')[:10]}{' (dirty)' if doc['dirty'] else ''}, {doc['date']}, "
        f"{doc['wall_s']:.0f} s",
        "",
        "| row | memory mode | status | s | result |",
        "|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        result = summary(r)
        lines.append(f"| {r['title']} | {r['mode']} | {r['status']} | {r['seconds']:.1f} | {result} |")
    return "\n".join(lines)


def summary(r: dict) -> str:
    """The row's key numbers in one cell (its note or error when it has no numbers)."""
    n = r["numbers"]
    if not n:
        text = r["error"] or r["note"] or ""
        return text.splitlines()[0][:160] if text else ""
    if r["kind"] == "train":
        return _train_summary(n)
    if r["kind"] == "timing":
        peaks = (n["plain_sample_peak_gib"], n["npo_sample_peak_gib"])
        vram = (f"peak VRAM plain {_gib(peaks[0])} / NPO {_gib(peaks[1])}"
                if isinstance(peaks[0], (int, float)) else f"VRAM {peaks[0]}")
        return (f"plain {n['plain_step_s'] * 1e3:.1f} ms/step, NPO {n['npo_step_s'] * 1e3:.1f} ms/step, "
                f"NPO/plain {n['ratio']:.3f} (paired {n['paired_ratio']:.3f}); {n['size']}; {vram}")
    c = r["checks"]
    return (f"NPOError: {_yes(c.get('npo_error'))}, names remedies: {_yes(c.get('names_remedies'))}, "
            f"sample after OOM: {_yes(c.get('sample_after_oom'))}; {n['size']}"
            + (f"; other error: {n['other_error']}" if n.get("other_error") else ""))


def _train_summary(n: dict) -> str:
    losses = n.get("losses") or []
    loss = f"loss {losses[0]:.4g}→{losses[-1]:.4g}" if losses and all(isinstance(v, float) for v in losses) \
        else f"losses {losses}"
    estimate = f" (README estimate {n['estimate_gib']} GiB)" if "estimate_gib" in n else ""
    frac = n.get("loaded_fraction_min")
    loaded = f", loaded {frac:.0%}" if isinstance(frac, float) else ""
    peak = n.get("train_peak_gib")
    vram = (f"peak VRAM {_gib(peak)}{estimate}, device {_gib(n.get('train_device_peak_gib'))}"
            if isinstance(peak, (int, float)) else f"VRAM {peak}")
    return (f"{loss}; offset applies: {_yes(n.get('offset_applies'))} (Δ {n.get('sample_rel_max_diff')}); "
            f"{vram}{loaded}; {n['size']}, batch {n['batch']}, {n['steps']} steps")


def _gib(v) -> str:
    return f"{v:.2f} GiB" if isinstance(v, (int, float)) else str(v)


def _yes(v) -> str:
    return "yes" if v else "no"
