"""Writing files without ever losing or damaging one: whole-or-nothing replacement, and path
identity for telling whether two names are one file."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Iterator


def temp_path(target: Path) -> Path:
    """Where a replacement of `target` is written first: a hidden name beside it, the same for
    every run, so one killed mid-write leaves at most one, removed by the next write."""
    return target.parent / f".{target.name}.pez-tmp"


@contextlib.contextmanager
def replacing(target: Path, mode: str = "wb", **kwargs) -> Iterator[IO]:
    """Write a new version of `target`: yields a file beside it that, when the block ends
    without error, is fsynced and renamed over the target (a symlink there is replaced, never
    followed), with the folder fsynced after. On error the target is left as it was."""
    target = Path(target)
    tmp = temp_path(target)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a stale one from a killed run (never followed if it is a link)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    try:
        with open(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_folder(target.parent)


def atomic_write(target: Path, data: bytes) -> None:
    """Write a file whole or not at all (see replacing)."""
    with replacing(target) as f:
        f.write(data)


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
