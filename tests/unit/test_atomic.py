"""Atomic writes and the clean-up of temporaries left by killed writers (npo_core.atomic)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from comfyui_npo.npo_core.atomic import STALE_AFTER_S, atomic_write, remove_stale_temporaries


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def _touch(path, age_s: float = 0.0, text: str = "x"):
    path.write_text(text)
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))
    return path


@pytest.mark.skipif(os.name != "posix", reason="the dead-writer rule needs POSIX process ids")
def test_next_write_in_the_folder_removes_only_the_temporaries_of_gone_writers(tmp_path):
    dead, live = _dead_pid(), os.getppid()  # the parent (pytest's shell or runner) is alive
    target = tmp_path / "npo offset[1].safetensors"  # glob metacharacters in the name are literal
    name = target.name
    removed = {
        "dead writer": _touch(tmp_path / f".{name}.{dead}-a1b2.tmp"),
        "dead writer of another name, same extension (an earlier run)": _touch(
            tmp_path / f".self_npo_00001_.safetensors.{dead}-k1l2.tmp"
        ),
        "live writer, silent for over an hour": _touch(tmp_path / f".{name}.{live}-c3d4.tmp", STALE_AFTER_S + 60),
        "pre-pid naming, old": _touch(tmp_path / f".{name}.q9w8e7.tmp", STALE_AFTER_S + 60),
    }
    outside = _touch(tmp_path.parent / f"outside-{tmp_path.name}.txt", text="keep me")
    link = tmp_path / f".{name}.{dead}-link.tmp"
    link.symlink_to(outside)
    kept = {
        "live writer, fresh": _touch(tmp_path / f".{name}.{live}-e5f6.tmp"),
        "this process, fresh": _touch(tmp_path / f".{name}.{os.getpid()}-g7h8.tmp"),
        "another extension's temporary": _touch(tmp_path / f".other.ckpt.{dead}-i9j0.tmp"),
        "pre-pid naming, fresh": _touch(tmp_path / f".{name}.r5t4y3.tmp"),
        "pre-pid naming of another name, old": _touch(tmp_path / ".other.safetensors.m3n4.tmp", STALE_AFTER_S + 60),
        "not hidden": _touch(tmp_path / f"x.safetensors.{dead}-o5p6.tmp"),
        "a symlink (never followed or removed)": link,
    }
    atomic_write(target, lambda tmp: open(tmp, "w").write("new"))
    assert target.read_text() == "new"
    for why, path in removed.items():
        assert not os.path.lexists(path), why
    for why, path in kept.items():
        assert os.path.lexists(path), why
    assert outside.read_text() == "keep me"
    outside.unlink()


def test_age_rule_alone_and_return_value(tmp_path):
    target = tmp_path / "ck.pt"
    old = _touch(tmp_path / ".ck.pt.123456789-zz.tmp", 2 * STALE_AFTER_S)
    fresh = _touch(tmp_path / ".ck.pt.x-yy.tmp")
    assert remove_stale_temporaries(target) == [old]
    assert fresh.exists() and not old.exists()


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "ck.pt"
    target.write_text("old")

    def fail(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["ck.pt"]


def test_temporary_names_carry_the_writer_pid(tmp_path):
    seen = []
    atomic_write(tmp_path / "a.safetensors", lambda tmp: seen.append(os.path.basename(tmp)) or open(tmp, "w").close())
    assert seen[0].startswith(f".a.safetensors.{os.getpid()}-") and seen[0].endswith(".tmp")


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_get_the_permissions_the_umask_gives(tmp_path, umask):
    """As ComfyUI's own outputs (0o666 less the umask), not mkstemp's owner-only 0o600."""
    old = os.umask(umask)
    try:
        path = atomic_write(tmp_path / "f.safetensors", lambda t: Path(t).write_bytes(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
