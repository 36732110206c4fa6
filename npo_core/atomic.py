"""Atomic file writes: a hidden temporary in the same folder, then a rename.

A crash leaves the old file or the new one, never half of one. The file gets the permissions any
program's new file gets (0o666 less the process umask, as ComfyUI's own outputs), not mkstemp's
0o600. A hard kill (SIGKILL, power loss) can leave the hidden temporary
``.<name>.<pid>-<random>.tmp`` behind. The next write into the same
folder removes such leftovers of files with the same extension (a new run writes a new name, so
same-name clean-up alone would rarely happen) when their writer is gone: its process no longer
exists (POSIX), or nobody has touched the file for ``STALE_AFTER_S`` (everywhere).
"""

from __future__ import annotations

import os
import re
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


def _leftover_pattern(path: Path) -> re.Pattern:
    """``.<any name ending in path's extension>.<pid>-<mkstemp letters>.tmp``, and, for ``path`` itself,
    the pid-less ``.<name>.<letters>.tmp`` of earlier versions."""
    ext = re.escape(path.suffix) if path.suffix else r"[^/]*"
    return re.compile(rf"^\.(?:.+{ext}\.(?P<pid>\d+)-|{re.escape(path.name)}\.)[A-Za-z0-9_]+\.tmp$")


def remove_stale_temporaries(path: str | os.PathLike, max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the leftover temporaries of earlier writes into ``path``'s folder; returns what was removed."""
    p = Path(path)
    rx = _leftover_pattern(p)
    removed = []
    try:
        names = os.listdir(p.parent)
    except OSError:
        return removed
    for name in names:
        m = rx.match(name)
        if not m:
            continue
        cand = p.parent / name
        try:
            if cand.is_symlink() or not cand.is_file():
                continue
            stale = time.time() - cand.lstat().st_mtime > max_age_s
            if stale or (m.group("pid") is not None and _writer_gone(int(m.group("pid")))):
                cand.unlink()
                removed.append(cand)
        except OSError:  # gone meanwhile, or not ours to remove: leave it
            continue
    return removed


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p
