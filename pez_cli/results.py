"""Result files: one row per image, JSONL or CSV, appended and fsynced row by row, readable
after any crash, and merged across shards."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from pez_cli.errors import ConfigError

FORMATS = ("jsonl", "csv")
CSV_FIELDS = ("path", "sha256", "prompt", "similarity", "round_trip", "token_ids", "model",
              "settings_id", "seconds", "error", "settings")
JSONL_START = b'{"path": '  # every JSONL row pez writes starts so (path is its first key)
CSV_HEADER = ",".join(CSV_FIELDS).encode()
SNIFF_LINES = 20  # lines looked at to recognise a result file


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


def read_rows(path: Path, fmt: str | None = None) -> list[dict[str, Any]]:
    """Rows of a result file (format from its content unless given); a torn last line (the
    process was killed mid-write) and damaged JSONL lines are skipped."""
    found = sniff_format(path)  # also refuses a file that is not a pez result
    if found is None:
        return []
    fmt = fmt or found
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
    """Appends rows to a JSONL or CSV file (or stdout for "-"), flushed and fsynced one by one."""

    def __init__(self, path: str, fmt: str):
        self.fmt = fmt
        self.to_stdout = path == "-"
        if self.to_stdout:
            self.file = sys.stdout
            needs_header = True
        else:
            target = Path(path).expanduser()
            if target.is_dir():
                raise ConfigError(f"--out is a folder, not a file: {path}")
            existing = sniff_format(target)  # refuses a file that is not a pez result
            if existing and existing != fmt:
                raise ConfigError(f"{path} is a {existing} result file, not {fmt}")
            target.parent.mkdir(parents=True, exist_ok=True)
            repair_torn_line(target)
            needs_header = not target.exists() or target.stat().st_size == 0
            self.file = open(target, "a", encoding="utf-8", newline="")
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


def row_key(row: dict[str, Any]) -> tuple[str, str | None, str]:
    """What identifies a row: the path as given, the file's hash and the settings."""
    return (str(row.get("path")), row.get("sha256") or None, str(row.get("settings_id")))


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


def merge_files(files: Sequence[Path], out: str, fmt: str | None = None, overwrite: bool = False) -> int:
    """Write the merged rows of result files to `out` ("-": stdout). Returns the row count."""
    for f in files:
        if not f.is_file():
            raise ConfigError(f"no such result file: {f}")
    rows = merge_rows(read_rows(f) for f in files)
    if out != "-":
        target = Path(out).expanduser()
        if target.exists() and not overwrite:
            raise ConfigError(f"{out} already exists (use --overwrite to replace it)")
        if target.exists():
            target.unlink()
    writer = ResultWriter(out, format_for(out if out != "-" else None, fmt))
    try:
        for row in rows:
            writer.write(row)
    finally:
        writer.close()
    return len(rows)
