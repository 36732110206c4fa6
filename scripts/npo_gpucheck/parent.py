"""The parent process: one worker per ComfyUI memory mode (its own process arguments), each row under its time
cap, the whole run under the budget (standard library only: the parent never imports torch, so it holds no CUDA
context while the workers measure)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import plan

GPU_CHECK = Path(__file__).resolve().parents[1] / "gpu_check.py"


def knows_disable_dynamic_vram(comfy: Path) -> bool:
    """Whether this ComfyUI has the --disable-dynamic-vram argument (read from comfy/cli_args.py)."""
    return "--disable-dynamic-vram" in (comfy / "comfy" / "cli_args.py").read_text(encoding="utf-8")


def placeholder(row: plan.Row, status: str, note: str = "", seconds: float = 0.0, error: str | None = None) -> dict:
    """The result of a row that did not report one itself (n/a, timed out, skipped, a crashed worker)."""
    return {"title": row.title, "kind": row.kind, "model": row.model, "dtype": row.dtype, "status": status,
            "seconds": round(seconds, 2), "numbers": {}, "checks": {}, "note": note, "error": error}


@dataclass
class Session:
    """One check run: where ComfyUI is, the profile, the scratch folder, the deadline and the results so far."""

    comfy: Path
    profile: plan.Profile
    workdir: Path
    deadline: float
    row_ids: list[str]
    t0: float = field(default_factory=time.time)
    results: dict[str, dict] = field(default_factory=dict)  # plan.row_key -> result
    modes: dict[str, dict] = field(default_factory=dict)  # mode -> {"argv": ..., "env": ...} or {"n/a": reason}

    def say(self, text: str) -> None:
        print(f"[{time.time() - self.t0:5.0f} s] {text}", flush=True)


def run_all(s: Session) -> None:
    """Every memory mode in turn (never two workers at once: they share the GPU)."""
    known = knows_disable_dynamic_vram(s.comfy)
    for mode in (plan.DEFAULT_MODE, plan.NO_DYNAMIC_MODE):
        rows = [r for r in plan.rows_for(mode) if r.id in s.row_ids]
        if not rows:
            continue
        if mode == plan.NO_DYNAMIC_MODE and not known:
            reason = "n/a: this ComfyUI has no --disable-dynamic-vram"
            s.modes[mode] = {"n/a": reason}
            for r in rows:
                s.results[plan.row_key(r.id, mode)] = placeholder(r, "n/a", reason)
            s.say(f"{mode}: {reason}")
            continue
        run_mode(s, mode, rows)


def run_mode(s: Session, mode: str, rows: list[plan.Row]) -> None:
    """The rows of one mode in workers; after a timed-out or crashed row, a fresh worker runs the rest."""
    argv = [*s.profile.argv, *plan.MODE_ARGV[mode]]
    s.modes[mode] = {"argv": argv, "env": None}
    remaining = [r.id for r in rows]
    attempt = 0
    while remaining:
        if time.time() >= s.deadline:
            for rid in remaining:
                _record(s, mode, rid, placeholder(plan.ROW_BY_ID[rid], "skipped: time budget",
                                                  f"the {s.profile.budget:.0f} s budget was spent"))
            return
        attempt += 1
        w = Worker(s, mode, argv, remaining, attempt)
        w.run()
        if w.env is not None and s.modes[mode]["env"] is None:
            s.modes[mode]["env"] = w.env
        remaining = [rid for rid in remaining if plan.row_key(rid, mode) not in s.results]
        if remaining and w.env is None:  # the worker never came up: the rest cannot run either
            for rid in remaining:
                _record(s, mode, rid, placeholder(plan.ROW_BY_ID[rid], "error", "the worker did not start",
                                                  error=w.problem))
            return


def _record(s: Session, mode: str, rid: str, result: dict) -> None:
    s.results[plan.row_key(rid, mode)] = result
    s.say(f"{plan.row_key(rid, mode)}: {result['status']} ({result['seconds']:.1f} s)")


class Worker:
    """One worker process and its watchdog: the row running past its cap, a start past the startup cap or the
    run past the budget kills the worker's process group."""

    def __init__(self, s: Session, mode: str, argv: list[str], row_ids: list[str], attempt: int) -> None:
        self.s, self.mode, self.row_ids = s, mode, row_ids
        self.dir = s.workdir / f"{'default' if mode == plan.DEFAULT_MODE else 'no-dynamic-vram'}-{attempt}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.progress = self.dir / "progress.jsonl"
        self.log = self.dir / "worker.log"
        self.spec = {"comfy": str(s.comfy), "argv": argv, "profile": s.profile.name, "mode": mode,
                     "rows": row_ids, "progress": str(self.progress), "workdir": str(self.dir)}
        self.env: dict | None = None
        self.problem: str | None = None
        self.current: tuple[str, float] | None = None  # (row id, start time) of the row running
        self.seen = 0

    def run(self) -> None:
        spec_path = self.dir / "spec.json"
        spec_path.write_text(json.dumps(self.spec, indent=1), encoding="utf-8")
        self.s.say(f"worker [{self.mode}] starts: ComfyUI {' '.join(self.spec['argv']) or '(no arguments)'}, "
                   f"{len(self.row_ids)} row(s)")
        t_start = time.time()
        with self.log.open("w", encoding="utf-8") as log:
            proc = subprocess.Popen([sys.executable, str(GPU_CHECK), "--worker", str(spec_path)], stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
            try:
                rc, killed = self._watch(proc, t_start)
            except BaseException:  # Ctrl-C: the worker (in its own session) goes too
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
        self._read_events()
        self._finish(rc, killed)

    def _watch(self, proc: subprocess.Popen, t_start: float) -> tuple[int, str | None]:
        """Follow the events until the worker exits or must be killed; returns (exit status, why it was killed)."""
        while True:
            self._read_events()
            rc = proc.poll()
            if rc is not None:
                return rc, None
            killed = self._overdue(t_start)
            if killed:
                os.killpg(proc.pid, signal.SIGKILL)  # the worker's own session: it and its children
                return proc.wait(), killed
            time.sleep(0.25)

    def _overdue(self, t_start: float) -> str | None:
        """Why the worker must be killed now, or None."""
        now = time.time()
        if self.env is None and self.problem is None and now - t_start > self.s.profile.startup_cap:
            return f"the worker did not import ComfyUI within {self.s.profile.startup_cap:.0f} s"
        if self.current is not None:
            rid, since = self.current
            cap = self.s.profile.caps[rid]
            if now - since > cap:
                return f"timed out: over its {cap:.0f} s cap; the worker was killed"
        if now > self.s.deadline:
            return f"timed out: the {self.s.profile.budget:.0f} s budget ran out"
        return None

    def _read_events(self) -> None:
        if not self.progress.exists():
            return
        complete = self.progress.read_bytes().decode("utf-8").split("\n")[:-1]  # a line still being written waits
        for line in complete[self.seen:]:
            self._handle(json.loads(line))
        self.seen = len(complete)

    def _handle(self, ev: dict) -> None:
        kind = ev["event"]
        if kind == "ready":
            self.env = ev["env"]
            self.s.say(f"worker [{self.mode}] ready: {self.env['card']}, torch {self.env['torch']}, ComfyUI "
                       f"{self.env['comfyui']}, DynamicVRAM {self.env['dynamic_vram']}")
        elif kind == "failed":
            self.problem = ev["error"]
        elif kind == "start":
            self.current = (ev["row"], ev["t"])
        elif kind == "done":
            self.current = None
            _record(self.s, self.mode, ev["row"], ev["result"])

    def _finish(self, rc: int, killed: str | None) -> None:
        """Results for the row that was running when the worker ended (timed out, or the worker crashed)."""
        if self.env is None and self.problem is None:
            self.problem = killed or f"the worker exited with status {rc} before ComfyUI was imported"
        if self.problem is not None:
            self.problem += "\n" + self.log_tail()
        if self.current is None:
            return
        rid, since = self.current
        row = plan.ROW_BY_ID[rid]
        if killed:
            result = placeholder(row, "timed out", killed, time.time() - since)
        else:
            result = placeholder(row, "error", "the worker died during this row", time.time() - since,
                                 f"worker exit status {rc}\n{self.log_tail()}")
        _record(self.s, self.mode, rid, result)

    def log_tail(self, lines: int = 25) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])
