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


def new_file_mode() -> int:
    """The permissions a new file gets from this process's umask (0o666 less it): for files
    written by a library that chooses its own (safetensors writes 0600)."""
    umask = None
    with contextlib.suppress(OSError, ValueError):  # Linux says it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                umask = int(line.split()[1], 8)
    if umask is None:
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


# Bytes read at a time when hashing a file.
HASH_CHUNK = 1 << 20


def file_digest(path: Path, hasher=None) -> str:
    """The sha256 of a file's bytes, as hex (fed to `hasher` instead, when given)."""
    import hashlib

    h = hasher if hasher is not None else hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


# What content_digest has read in this process: (resolved path, recursive) -> (each file's
# name, size, mtime and inode; the digest). A long-lived process (pez serve, the Python API)
# reads a model's weights again only when they change.
_DIGESTS: dict[tuple[str, bool], tuple[tuple, str]] = {}


def content_digest(path: Path, recursive: bool = True) -> str:
    """What a file or folder holds, as 'sha256:<hex>': a file's bytes, or a folder's files (each
    one's name relative to the folder and its bytes, in name order, hidden names skipped; with
    recursive=False only its top-level files), so that equal content under any spelling of its
    path has one digest and changed content another. Files whose size, mtime and inode are
    those of the last reading in this process are not read again."""
    import hashlib

    path = Path(path)
    files = [(None, path)] if not path.is_dir() else list(_folder_files(path, recursive))
    stats = [(rel, full.stat()) for rel, full in files]
    signature = tuple((rel, st.st_size, st.st_mtime_ns, st.st_ino) for rel, st in stats)
    key = (os.path.realpath(path), recursive)
    known = _DIGESTS.get(key)
    if known is not None and known[0] == signature:
        return known[1]
    if not path.is_dir():
        digest = "sha256:" + file_digest(path)
    else:
        h = hashlib.sha256()
        for (rel, full), (_, st) in zip(files, stats):
            h.update(len(rel).to_bytes(8, "little") + rel + st.st_size.to_bytes(8, "little"))
            file_digest(full, h)
        digest = "sha256:" + h.hexdigest()
    _DIGESTS[key] = (signature, digest)
    return digest


def _folder_files(folder: Path, recursive: bool) -> Iterator[tuple[bytes, Path]]:
    """A folder's regular files as (name relative to it, as bytes; path), in name order, hidden
    names skipped; with recursive=False only its top-level ones."""
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        for name in sorted(n for n in names if not n.startswith(".")):
            full = Path(root) / name
            if full.is_file():
                yield full.relative_to(folder).as_posix().encode(), full
