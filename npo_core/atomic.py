"""Atomic file writes: a hidden temporary in the same folder, then a rename.

A crash leaves the old file or the new one, never half of one. A hard kill (SIGKILL, power loss)
can leave the hidden temporary ``.<name>.<pid>-<random>.tmp`` behind; the next write of the same
name removes those whose writer is gone (its process no longer exists, on POSIX) or that nobody
has touched for ``STALE_AFTER_S`` (everywhere).
"""

from __future__ import annotations

import glob
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

STALE_AFTER_S = 3600.0  # a writer in progress keeps touching its file; an hour of silence means it is gone


def _writer_gone(pid: int) -> bool:
    """True only when the process surely no longer exists (POSIX). On Windows ``os.kill(pid, 0)`` would
    send CTRL_C_EVENT, so there the age rule alone decides."""
    if os.name != "posix" or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. PermissionError: it exists, under another user
        return False
    return False


def remove_stale_temporaries(path: str | os.PathLike, max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the leftover temporaries of earlier writes of ``path``; returns what was removed."""
    p = Path(path)
    prefix = f".{p.name}."
    removed = []
    for cand in p.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid_part = cand.name[len(prefix) :].split("-", 1)[0]
        try:
            st = cand.lstat()
            if not cand.is_file() or cand.is_symlink():
                continue
            stale = time.time() - st.st_mtime > max_age_s
            if stale or (pid_part.isdigit() and _writer_gone(int(pid_part))):
                cand.unlink()
                removed.append(cand)
        except OSError:  # gone meanwhile, or not ours to remove: leave it
            continue
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(temporary_path)``, then rename the temporary onto ``path``. On any error the
    temporary is removed and ``path`` is untouched."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(p)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.{os.getpid()}-", suffix=".tmp", dir=str(p.parent))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p
