"""Batch jobs: one prompt per image, written as soon as each image finishes.

Pieces: deterministic sharding, the settings that identify a result, result files
(JSONL or CSV) that can be resumed after any crash, and the sidecar / PNG-metadata outputs.
The job loop itself lives in `run_batch`, which reports through callbacks and never prints.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TextIO

from PIL import Image, PngImagePlugin

from pez_cli.config import Settings
from pez_cli.errors import ConfigError, InputError

FORMATS = ("jsonl", "csv")
CSV_FIELDS = ("path", "sha256", "prompt", "similarity", "round_trip", "token_ids", "model",
              "settings_id", "seconds", "error", "settings")
# Settings that do not change which prompt an image gets.
NOT_IN_RESULT = ("device", "compile", "pack_weights", "sd_model")
# Images decoded and encoded by the image tower at a time.
ENCODE_CHUNK = 32
HASH_BLOCK = 1 << 20


# -- sharding ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    index: int  # 1-based
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, key: str) -> bool:
        """Whether this shard owns an input, by a hash of its path as given (stable everywhere)."""
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index - 1


def parse_shard(text: str) -> Shard:
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like K/N (e.g. 1/4), got {text!r}") from None
    if not 1 <= k <= n:
        raise ConfigError(f"--shard K/N needs 1 <= K <= N, got {text!r}")
    return Shard(k, n)


# -- identity of a result ------------------------------------------------------------------
def settings_record(settings: Settings) -> dict[str, Any]:
    """The settings that decide an image's prompt, as stored in every row."""
    record = dataclasses.asdict(settings)
    for name in NOT_IN_RESULT:
        record.pop(name, None)
    return record


def settings_id(record: dict[str, Any]) -> str:
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def row_key(row: dict[str, Any]) -> tuple[str, str | None, str]:
    return (str(row.get("path")), row.get("sha256") or None, str(row.get("settings_id")))


# -- result files --------------------------------------------------------------------------
def format_for(path: str | None, fmt: str | None) -> str:
    """The format to write: an existing result file's own (read from its content), else
    --format, else csv for a .csv name and jsonl for anything else."""
    if fmt and fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    existing = sniff_format(Path(path).expanduser()) if path and path != "-" else None
    if existing:
        if fmt and fmt != existing:
            raise ConfigError(f"{path} is a {existing} result file; --format {fmt} would mix formats in it")
        return existing
    if fmt:
        return fmt
    if path and path.lower().endswith(".csv"):
        return "csv"
    return "jsonl"


JSONL_START = b'{"path": '  # every JSONL row pez writes starts so (path is its first key)
CSV_HEADER = ",".join(CSV_FIELDS).encode()
SNIFF_LINES = 20


def sniff_format(path: Path) -> str | None:
    """The format of an existing result file, read from its content: 'jsonl' or 'csv', None
    when it is missing or empty. Anything that is not a pez result file is a ConfigError: pez
    appends only to its own results, never to (or "repairs") a user's other file."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise ConfigError(f"result file is a folder: {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read result file {path}: {e.strerror or e}") from None
    if not head.strip():
        return None
    lines = head.split(b"\n")[:SNIFF_LINES]
    if lines[0].rstrip(b"\r") == CSV_HEADER or (len(lines) == 1 and CSV_HEADER.startswith(lines[0])):
        return "csv"
    for line in lines:
        if line.startswith(JSONL_START) or (line is lines[-1] and line and JSONL_START.startswith(line)):
            return "jsonl"
    raise ConfigError(f"{path} holds something that is not a pez result file; pez only appends to its own results")


def _csv_row(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: row.get(k) for k in CSV_FIELDS}
    if isinstance(out["token_ids"], list):
        out["token_ids"] = " ".join(str(i) for i in out["token_ids"])
    if isinstance(out["settings"], dict):
        out["settings"] = json.dumps(out["settings"], sort_keys=True)
    return {k: "" if v is None else v for k, v in out.items()}


def _from_csv(row: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {k: (v if v != "" else None) for k, v in row.items()}
    if out.get("similarity") is not None:
        out["similarity"] = float(out["similarity"])
    if out.get("seconds") is not None:
        out["seconds"] = float(out["seconds"])
    if out.get("round_trip") is not None:
        out["round_trip"] = out["round_trip"] == "True"
    if out.get("token_ids") is not None:
        out["token_ids"] = [int(t) for t in out["token_ids"].split()]
    if out.get("settings") is not None:
        out["settings"] = json.loads(out["settings"])
    return out


def read_rows(path: Path, fmt: str) -> list[dict[str, Any]]:
    """Rows of a result file; a torn last line (the process was killed mid-write) is ignored."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    if fmt == "csv":
        return [_from_csv(r) for r in csv.DictReader(io.StringIO(text))]
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a damaged line; the image it belonged to will be redone
    return rows


class ResultWriter:
    """Appends rows to a JSONL or CSV file (or stdout), flushed and fsynced one by one."""

    def __init__(self, path: str, fmt: str, stdout: TextIO | None = None):
        self.fmt = fmt
        self.to_stdout = path == "-"
        if self.to_stdout:
            self.file = stdout or sys.stdout
            self.path = None
            needs_header = True
        else:
            self.path = Path(path).expanduser()
            if self.path.is_dir():
                raise ConfigError(f"--out is a folder, not a file: {path}")
            existing = sniff_format(self.path)  # refuses a file that is not a pez result
            if existing and existing != fmt:
                raise ConfigError(f"{path} is a {existing} result file, not {fmt}")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            repair_torn_line(self.path)
            needs_header = not self.path.exists() or self.path.stat().st_size == 0
            self.file = open(self.path, "a", encoding="utf-8", newline="")
        self.csv = None
        if fmt == "csv":
            self.csv = csv.DictWriter(self.file, fieldnames=CSV_FIELDS, lineterminator="\n")
            if needs_header:
                self.csv.writeheader()
                self._flush()

    def write(self, row: dict[str, Any]) -> None:
        if self.csv is not None:
            self.csv.writerow(_csv_row(row))
        else:
            self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._flush()

    def _flush(self) -> None:
        self.file.flush()
        if not self.to_stdout:
            os.fsync(self.file.fileno())

    def close(self) -> None:
        if not self.to_stdout:
            self.file.close()


def repair_torn_line(path: Path) -> bool:
    """Cut a partial last line left by a killed writer. Returns whether anything was cut."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return False
        f.seek(0)
        data = f.read()
        f.seek(data.rfind(b"\n") + 1)
        f.truncate()
    return True


def merge_rows(groups: Iterable[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Combine shard outputs: one row per (path, hash, settings), a success over an error."""
    merged: dict[tuple, dict[str, Any]] = {}
    for rows in groups:
        for row in rows:
            key = row_key(row)
            old = merged.get(key)
            if old is None or (old.get("error") and not row.get("error")):
                merged[key] = row
    return sorted(merged.values(), key=lambda r: (str(r.get("path")), str(r.get("settings_id"))))


# -- other outputs -------------------------------------------------------------------------
def check_sidecar_ext(ext: str) -> str:
    """A caption file extension, with its dot: never empty, never a path, never an image type."""
    from pez_cli.images import IMAGE_SUFFIXES

    norm = ext if ext.startswith(".") else "." + ext
    if not norm.strip(".") or any(c in norm for c in "/\\\0") or norm != norm.strip():
        raise ConfigError(f"--sidecar-ext must be a file extension such as .txt, got {ext!r}")
    if norm.lower() in IMAGE_SUFFIXES:
        raise ConfigError(f"--sidecar-ext {ext!r} is an image type: captions would replace images")
    return norm


def location(path: Path) -> str:
    """Where a name points, for comparing paths given differently: its folder resolved, its own
    name kept (a link at that name is that name; writes replace links, never follow them)."""
    path = Path(os.path.abspath(path))
    return os.path.join(os.path.realpath(path.parent), path.name)


def protected_locations(paths: Iterable[Path], out: str | None) -> set[str]:
    """Files a side output must never replace: every input (as named and as resolved) and --out."""
    found: set[str] = set()
    for p in paths:
        found.add(location(p))
        found.add(os.path.realpath(p))
    if out and out != "-":
        found.add(location(Path(out).expanduser()))
    return found


def caption_conflicts(paths: Sequence[Path], ext: str, protected: set[str]) -> dict[str, str]:
    """Inputs whose caption file would land on an input or on the --out file, or would be
    shared with another image (a.png and a.jpg -> a.txt): {location of the image: reason}."""
    owners: dict[str, set[str]] = {}
    for p in paths:
        owners.setdefault(location(sidecar_path(p, ext)), set()).add(os.path.realpath(p))
    conflicts: dict[str, str] = {}
    for p in paths:
        caption = sidecar_path(p, ext)
        where = location(caption)
        if where in protected:
            conflicts[location(p)] = f"caption file {caption} would replace an input or the --out file"
        elif len(owners[where]) > 1:
            conflicts[location(p)] = f"caption file {caption} would be shared by {len(owners[where])} images; rename one of them"
    return conflicts


def sidecar_path(image: Path, ext: str) -> Path:
    ext = ext if ext.startswith(".") else "." + ext
    return image.with_suffix(ext)


def atomic_write(target: Path, data: bytes) -> None:
    """Write a file whole or not at all: a new file beside it, fsynced, renamed over the target
    (a symlink there is replaced, never followed), then the folder fsynced."""
    folder = target.parent
    tmp = folder / f".{target.name}.{os.getpid()}.{time.monotonic_ns()}.pez-tmp"
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
    fsync_folder(folder)


def fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_sidecar(image: Path, ext: str, prompt: str, overwrite: bool) -> bool:
    """Write the caption file next to the image; False if one exists and overwrite is off."""
    target = sidecar_path(image, ext)
    if os.path.lexists(target) and not overwrite:
        return False
    atomic_write(target, (prompt + "\n").encode("utf-8"))
    return True


def write_png_copy(image: Path, folder: Path, prompt: str, details: dict[str, Any], sha: str, overwrite: bool,
                   protected: set[str] = frozenset()) -> Path | None:
    """A PNG copy of the image with the prompt in its text metadata (the `parameters` key that
    Stable Diffusion UIs read). Never lands on an input (the original included) nor on a copy
    of another image that has the same name; returns None when the copy exists and overwrite
    is off."""
    from pez_cli.images import load_image

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{image.stem}.png"
    taken = location(target) in protected or os.path.realpath(target) == os.path.realpath(image)
    if taken or (os.path.lexists(target) and _png_sha(target) != sha):
        target = folder / f"{image.stem}-{sha[:8]}.png"
        if location(target) in protected:
            raise InputError(f"PNG copy {target} would replace an input")
    if os.path.lexists(target) and not overwrite:
        return None
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", prompt)
    info.add_text("pez", json.dumps({**details, "source_sha256": sha}, ensure_ascii=False))
    buffer = io.BytesIO()
    load_image(image).save(buffer, format="PNG", pnginfo=info)
    atomic_write(target, buffer.getvalue())
    return target


def _png_sha(path: Path) -> str | None:
    try:
        with Image.open(path) as im:
            return json.loads(im.text.get("pez", "{}")).get("source_sha256")
    except Exception:
        return None


# -- the job -------------------------------------------------------------------------------
@dataclass
class Pending:
    path: Path
    key: str  # the path as given, used for sharding and in rows
    sha256: str | None
    error: str | None = None


@dataclass
class Summary:
    total: int = 0  # images selected (after sharding)
    skipped: int = 0  # already in the output with the same hash and settings
    done: int = 0  # prompts written by this run
    failed: int = 0  # error rows written by this run
    failed_before: int = 0  # skipped images whose recorded row is an error
    sidecars_kept: int = 0  # existing sidecar files left alone (no --overwrite)
    interrupted: bool = False

    @property
    def failures(self) -> int:
        return self.failed + self.failed_before


def plan(
    paths: Sequence[Path],
    shard: Shard | None,
    done: dict[tuple, dict[str, Any]],
    sid: str,
    force: bool,
    skip_existing: Callable[[Path], bool] | None = None,
    conflicts: dict[str, str] | None = None,
) -> tuple[list[Pending], Summary]:
    """Select this shard's images and drop those already done with these settings. Images
    in `conflicts` ({location: reason}, see caption_conflicts) become errors, not work."""
    summary = Summary()
    todo: list[Pending] = []
    for path in paths:
        key = str(path)
        if shard is not None and not shard.owns(key):
            continue
        summary.total += 1
        try:
            sha = file_sha256(path)
        except OSError as e:
            todo.append(Pending(path, key, None, f"cannot read {key}: {e.strerror or e}"))
            continue
        if not force:
            previous = done.get((key, sha, sid))
            if previous is not None or (skip_existing is not None and skip_existing(path)):
                summary.skipped += 1
                if previous is not None and previous.get("error"):
                    summary.failed_before += 1
                continue
        todo.append(Pending(path, key, sha, (conflicts or {}).get(location(path))))
    return todo, summary


def encode_pending(pez, todo: Sequence[Pending], on_error: Callable[[Pending], None]) -> tuple[list[Pending], Any]:
    """Decode and encode images in chunks; unreadable ones go to on_error. Returns the good
    items and their features (N, D)."""
    import torch

    from pez_cli.images import load_image

    good: list[Pending] = []
    feats = []
    for start in range(0, len(todo), ENCODE_CHUNK):
        images = []
        for item in todo[start:start + ENCODE_CHUNK]:
            if item.error is None:
                try:
                    images.append(load_image(item.path))
                    good.append(item)
                    continue
                except InputError as e:
                    item.error = str(e)
            on_error(item)
        if images:
            feats.append(pez.image_features(images))
    if not feats:
        return good, None
    return good, torch.cat(feats)


def run_batch(
    pez,
    items: Sequence[Pending],
    features,
    group_size: int,
    emit: Callable[[Pending, Any, float], None],
    on_step: Callable[[int, int, int], None] | None = None,
) -> Iterator[int]:
    """Optimize items `group_size` at a time through the batched engine. Each finished group
    is handed to `emit(item, result, seconds)` image by image; yields images done so far."""
    done = 0
    for start in range(0, len(items), group_size):
        group = items[start:start + group_size]
        targets = [features[start + i:start + i + 1] for i in range(len(group))]
        began = time.monotonic()
        opt = pez.optimizer(targets)
        for step in opt.run():
            if on_step is not None:
                on_step(start, step, opt.steps)
        results = pez.finish(opt, targets)
        seconds = (time.monotonic() - began) / len(group)
        for item, result in zip(group, results):
            emit(item, result, seconds)
        done += len(group)
        yield done


def default_group_size(device) -> int:
    """Images optimized together: enough to fill a GPU; on a CPU, 16 gets most of the batching
    gain (benchmarks/batch.py) while rows still arrive every few minutes."""
    return {"cuda": 64}.get(device.type, 16)


def result_row(item: Pending, result, model: str, record: dict[str, Any], sid: str, seconds: float) -> dict[str, Any]:
    return {
        "path": item.key,
        "sha256": item.sha256,
        "prompt": result.prompt,
        "similarity": round(float(result.similarity), 6),
        "round_trip": result.round_trip,
        "token_ids": result.token_ids,
        "model": model,
        "settings_id": sid,
        "seconds": round(seconds, 3),
        "error": None,
        "settings": record,
    }


def error_row(item: Pending, model: str, record: dict[str, Any], sid: str) -> dict[str, Any]:
    return {
        "path": item.key, "sha256": item.sha256, "prompt": None, "similarity": None, "round_trip": None,
        "token_ids": None, "model": model, "settings_id": sid, "seconds": None,
        "error": item.error, "settings": record,
    }
