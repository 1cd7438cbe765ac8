"""Writing files without ever losing or damaging one: atomic replacement and path identity."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path


def atomic_write(target: Path, data: bytes) -> None:
    """Write a file whole or not at all: a new file beside it, fsynced, renamed over the target
    (a symlink there is replaced, never followed), then the folder fsynced."""
    target = Path(target)
    tmp = target.parent / f".{target.name}.{os.getpid()}.{time.monotonic_ns()}.pez-tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_folder(target.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename or a new file in `folder` survive a power cut (best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def location(path: Path) -> str:
    """Where a name points, for comparing paths given differently: its folder resolved, its own
    name kept (a link at that name is that name; writes replace links, never follow them)."""
    path = Path(os.path.abspath(path))
    return os.path.join(os.path.realpath(path.parent), path.name)
