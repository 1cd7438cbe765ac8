"""Result files: one row per image, JSONL or CSV. A batch job holds its file locked, reads
it (skipping and counting damaged lines), appends and fsyncs row by row, and at the end
rewrites it with one row per (path, file hash, settings) when later rows superseded earlier
ones. Paths that are not valid UTF-8 and names with line separators round-trip exactly."""

from __future__ import annotations

import collections
import contextlib
import csv
import fcntl
import io
import json
import os
import re
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Mapping, Sequence

from pez_cli.config import REVISION_NAMES, canonical_identity, settings_id
from pez_cli.errors import ConfigError
from pez_cli.files import replacing

FORMATS = ("jsonl", "csv")
# A result's keys, in order (api.PromptResult.to_dict): what a JSON object of one result holds.
RESULT_KEYS = ("prompt", "similarity", "similarities", "fluency", "objective", "t5_prompt", "token_ids", "round_trip",
               "optimized_similarity", "best_step", "steps_done", "interrupted", "model", "lm", "settings_id", "settings")
# A batch row, the one shape every row of a result file has (result_row, error_row): the image,
# its result, the time and the error. JSONL writes all of it; CSV the CSV_FIELDS of it.
ROW_KEYS = ("path", "sha256", *RESULT_KEYS, "seconds", "error")
CSV_FIELDS = ("path", "sha256", "prompt", "similarity", "round_trip", "token_ids", "model",
              "settings_id", "seconds", "error", "settings")
JSONL_START = b'{"path": '  # every JSONL row pez writes starts so (path is its first key)
CSV_HEADER = ",".join(CSV_FIELDS).encode()
SNIFF_LINES = 20  # lines looked at to recognise a result file
# CSV cells of these columns are text a spreadsheet could run as a formula; see _csv_text.
CSV_TEXT_FIELDS = ("path", "prompt", "model", "error")
FORMULA_START = tuple("=+-@\t\r'")
CSV_RECORD_LINES = 64  # a quoted CSV record spanning more lines than this is damage, not data
SURROGATE = re.compile("[\ud800-\udfff]")  # os.fsdecode's stand-ins for bytes that are not UTF-8
ENCODING = dict(encoding="utf-8", errors="surrogateescape")


def result_row(item, result, seconds: float) -> dict[str, Any]:
    """The row of an image done: item (its .key, the path as stored, and .sha256), its
    api.PromptResult and the seconds it took."""
    return {"path": item.key, "sha256": item.sha256, **result.to_dict(), "seconds": round(seconds, 3), "error": None}


def error_row(item, identity: dict[str, Any], sid: str) -> dict[str, Any]:
    """The row of an image that failed (item.error says why), with the settings it was tried with."""
    empty = dict.fromkeys(RESULT_KEYS)
    empty.update(model=identity["model"], settings_id=sid, settings=identity)
    return {"path": item.key, "sha256": item.sha256, **empty, "seconds": None, "error": item.error}


def json_line(obj: Any, indent: int | None = None) -> str:
    """Strict JSON on one line (or indented by `indent`, for people): readable UTF-8, except
    that a string holding bytes that are not UTF-8 (a file name) is written with \\u escapes,
    which json.loads turns back exactly."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, indent=indent)
    return json.dumps(obj, allow_nan=False, indent=indent) if SURROGATE.search(text) else text


def is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return True  # it will be created as a regular file
    except OSError as e:
        raise ConfigError(f"cannot use result file {path}: {e.strerror or e}") from None


def sniff_format(path: Path) -> str | None:
    """The format of an existing result file, read from its content: 'jsonl' or 'csv', None
    when it is missing, empty or not a regular file (/dev/null). Anything that is not a pez
    result file is a ConfigError: pez appends only to its own results, never to (or "repairs")
    a user's other file."""
    if not is_regular(path):
        return None
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


# -- rows ------------------------------------------------------------------------------------
def row_key(row: dict[str, Any]) -> tuple[str, str | None, str]:
    """What identifies a row: the path as given, the file's hash and the settings (their id
    with the models named as pez names them now: another spelling of a model's folder, or a
    row written before models were named by their resolved path, is the same settings)."""
    return (str(row.get("path")), row.get("sha256") or None, row_settings_id(row))


def row_settings_id(row: dict[str, Any]) -> str:
    settings = row.get("settings")
    if isinstance(settings, dict):
        canonical = canonical_identity(settings)
        if canonical != settings:
            return settings_id(canonical)
    return str(row.get("settings_id"))


def supersedes(new: dict[str, Any], old: dict[str, Any] | None) -> bool:
    """Whether `new`, written after `old` for the same key, is the one to keep: the newest
    success wins, a success beats an error, a newer error replaces an older error."""
    return old is None or not new.get("error") or bool(old.get("error"))


def _valid(row: Any) -> bool:
    """A row as pez writes it (a damaged line can still be valid JSON)."""
    if not isinstance(row, dict) or not isinstance(row.get("path"), str) or not isinstance(row.get("settings_id"), str):
        return False
    if not isinstance(row.get("sha256"), (str, type(None))) or not isinstance(row.get("settings"), (dict, type(None))):
        return False
    error = row.get("error")
    return isinstance(error, str) if row.get("prompt") is None else isinstance(row.get("prompt"), str) and error is None


def _csv_text(value: str) -> str:
    """A text cell that no spreadsheet runs as a formula: a leading ' added before = + - @ tab
    CR and ' (removed again when pez reads the file)."""
    return "'" + value if value.startswith(FORMULA_START) else value


def _csv_row(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: row.get(k) for k in CSV_FIELDS}
    if isinstance(out["token_ids"], list):
        out["token_ids"] = " ".join(str(i) for i in out["token_ids"])
    if isinstance(out["settings"], dict):
        out["settings"] = json.dumps(out["settings"], sort_keys=True)
    for k in CSV_TEXT_FIELDS:
        if isinstance(out[k], str):
            out[k] = _csv_text(out[k])
    if isinstance(out["round_trip"], bool):  # as JSON writes it
        out["round_trip"] = "true" if out["round_trip"] else "false"
    return {k: "" if v is None else v for k, v in out.items()}


def _from_csv(cells: list[str]) -> dict[str, Any]:
    """A row from one CSV record; ValueError when it is not one of pez's rows."""
    if len(cells) != len(CSV_FIELDS) or tuple(cells) == CSV_FIELDS:
        raise ValueError("not a row")
    out: dict[str, Any] = {k: (v if v != "" else None) for k, v in zip(CSV_FIELDS, cells)}
    for k in CSV_TEXT_FIELDS:
        if out[k] is not None and out[k].startswith("'"):
            out[k] = out[k][1:]
    for k in ("similarity", "seconds"):
        if out[k] is not None:
            out[k] = float(out[k])
    if out["round_trip"] is not None:
        # true/false; True/False in files written before pez wrote them as JSON does
        out["round_trip"] = {"true": True, "false": False, "True": True, "False": False}[out["round_trip"]]
    if out["token_ids"] is not None:
        out["token_ids"] = [int(t) for t in out["token_ids"].split()]
    if out["settings"] is not None:
        out["settings"] = json.loads(out["settings"])
    return out


@dataclass
class Entry:
    """One line (JSONL) or record (CSV) of a result file: its text and its row, None if damaged."""

    text: str
    row: dict[str, Any] | None


def _jsonl_entries(lines: Iterable[str]) -> Iterator[Entry]:
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        yield Entry(line, row if _valid(row) else None)


def _csv_entries(lines: Iterable[str]) -> Iterator[Entry]:
    """CSV records, resynchronising after damage: a stray quote costs its own line only.
    Reads at most CSV_RECORD_LINES lines ahead of the record it parses."""
    source = iter(lines)
    ahead: collections.deque[str] = collections.deque()

    def fill(n: int) -> bool:  # at least n lines ahead, if the file has them
        while len(ahead) < n:
            line = next(source, None)
            if line is None:
                return False
            ahead.append(line)
        return True

    if fill(1) and ahead[0].rstrip("\r") == CSV_HEADER.decode():
        ahead.popleft()
    while fill(1):
        j, record = 0, ahead[0]
        while record.count('"') % 2 and j < CSV_RECORD_LINES and fill(j + 2):
            j += 1
            record += "\n" + ahead[j]
        if not record.strip():
            for _ in range(j + 1):
                ahead.popleft()
            continue
        try:
            [cells] = list(csv.reader([record], strict=True))
            row = _from_csv(cells)
        except (ValueError, KeyError, csv.Error):
            yield Entry(ahead.popleft(), None)
            continue
        for _ in range(j + 1):
            ahead.popleft()
        yield Entry(record, row if _valid(row) else None)


def _lines(path: Path) -> Iterator[str]:
    """The file's lines, split only at \n (names may hold U+2028, U+0085 or \r), one at a
    time; a torn last line (no \n: the writer was killed) is left out."""
    with open(path, "rb") as f:
        for raw in f:
            if raw.endswith(b"\n"):
                yield raw[:-1].decode(**ENCODING)


def iter_entries(path: Path) -> tuple[Iterator[Entry], str | None]:
    """The entries of a result file, read as they are consumed (memory does not grow with the
    file), and its format. Missing, empty and non-regular files have none."""
    found = sniff_format(path)
    if found is None:
        return iter(()), None
    return (_csv_entries if found == "csv" else _jsonl_entries)(_lines(path)), found


def read_entries(path: Path, fmt: str | None = None) -> tuple[list[Entry], str | None]:
    """The entries of a result file and its format, all at once (see iter_entries)."""
    entries, found = iter_entries(path)
    return list(entries), found or fmt


def done_rows(path: Path | None, identity: Mapping[str, Any] | None = None
              ) -> tuple[dict[tuple, dict[str, Any]], int, dict[str, int]]:
    """What resuming needs from a result file, read a line at a time: the row that counts for
    each key (by `supersedes`), kept slim (prompt, similarity, error), the number of damaged
    lines, and, given the job's settings `identity`, how many paths have a prompt only from
    settings that differ from it in what a file holds (REVISION_NAMES: a word list, model files,
    a language model), by what changed: those rows are not done."""
    done: dict[tuple, dict[str, Any]] = {}
    damaged = 0
    sid = settings_id(identity) if identity is not None else None
    base = _without_revisions(identity) if identity is not None else None
    current: set[str] = set()  # paths with a prompt from these very settings
    changed: dict[str, set[str]] = {}  # other paths: what changed since their prompt
    for entry in (iter_entries(path)[0] if path is not None else ()):
        row = entry.row
        if row is None:
            damaged += 1
            continue
        key = row_key(row)
        if supersedes(row, done.get(key)):
            done[key] = {"prompt": row.get("prompt"), "similarity": row.get("similarity"), "error": row.get("error")}
        if base is None or row.get("error"):
            continue
        if key[2] == sid:
            current.add(key[0])
        elif isinstance(row.get("settings"), dict):
            canonical = canonical_identity(row["settings"])
            if _without_revisions(canonical) == base:
                what = {name for k, name in REVISION_NAMES.items() if canonical.get(k) != identity.get(k)}
                changed.setdefault(key[0], set()).update(what)
    outdated = collections.Counter(name for p, names in changed.items() if p not in current for name in names)
    return done, damaged, dict(sorted(outdated.items()))


def _without_revisions(identity: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in identity.items() if k not in REVISION_NAMES}


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The readable rows of a result file, in file order."""
    return [e.row for e in read_entries(path)[0] if e.row is not None]


def latest(rows: Iterable[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """One row per key, by `supersedes`."""
    kept: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        key = row_key(row)
        if supersedes(row, kept.get(key)):
            kept[key] = row
    return kept


# -- writing ---------------------------------------------------------------------------------
def row_text(row: dict[str, Any], fmt: str) -> str:
    """One row as a line of a JSONL file or a record of a CSV file, with its newline."""
    if fmt == "jsonl":
        return json_line(row) + "\n"
    # "\r\n" makes every Python quote cells holding \r or \n; the record itself ends in \n.
    buffer = io.StringIO()
    csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\r\n").writerow(_csv_row(row))
    return buffer.getvalue()[:-2] + "\n"


def write_rows(file: IO[str], fmt: str, rows: Iterable[dict[str, Any]]) -> None:
    """A whole result file (a CSV header first) to an open text file."""
    if fmt == "csv":
        file.write(CSV_HEADER.decode() + "\n")
    for row in rows:
        file.write(row_text(row, fmt))


@dataclass
class Compacted:
    """What ResultWriter.compact did."""

    dropped: int = 0  # rows that later rows superseded
    moved: int = 0  # damaged lines moved to damaged_file
    damaged_file: Path | None = None


def damaged_path(target: Path) -> Path:
    """Where the damaged lines of a result file are kept: FILE.damaged beside it."""
    return target.with_name(target.name + ".damaged")


def append_lines(path: Path, lines: Sequence[str]) -> None:
    """Append lines to a file of pez's own (never through a link at its name), fsynced."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise ConfigError(f"cannot keep the damaged lines of the result file in {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "w", newline="", **ENCODING) as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


class ResultWriter:
    """Rows appended to a JSONL or CSV file (or stdout for "-"), flushed and fsynced one by one.
    A file is locked for as long as the writer is open: a second pez on it gets an error."""

    def __init__(self, path: str, fmt: str):
        self.fmt = fmt
        self.path: Path | None = None
        self.regular = False
        if path == "-":
            self.file = sys.stdout
            needs_header = True
        else:
            self.path = Path(path).expanduser()
            self.regular = is_regular(self.path)
            existing = sniff_format(self.path)  # refuses a file that is not a pez result
            if existing and existing != fmt:
                raise ConfigError(f"{path} is a {existing} result file, not {fmt}")
            self.file = _open_locked(self.path, path)
            if self.regular:
                repair_torn_line(self.path)
            needs_header = self.regular and os.fstat(self.file.fileno()).st_size == 0
        if fmt == "csv" and needs_header:
            self.file.write(CSV_HEADER.decode() + "\n")
            self._flush()

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(row_text(row, self.fmt))
        self._flush()

    def _flush(self) -> None:
        self.file.flush()
        if self.regular:
            os.fsync(self.file.fileno())

    def compact(self) -> Compacted:
        """Rewrite the file with one row per key when later rows superseded earlier ones or
        lines are damaged: damaged lines move, as they were, to the end of FILE.damaged beside
        it (so the result file stays valid for any CSV or JSONL reader and nothing is lost)."""
        done = Compacted()
        if self.path is None or not self.regular:
            return done
        # Two passes, a line at a time: which entry wins each key (its position and whether it
        # is an error is all `supersedes` needs), then the rewrite, only if something goes.
        winners: dict[tuple, tuple[int, dict[str, Any]]] = {}
        damaged: list[str] = []  # few: moved first, so a crash in the rewrite loses none
        count = 0
        for count, entry in enumerate(iter_entries(self.path)[0], 1):
            if entry.row is None:
                damaged.append(entry.text)
                continue
            key = row_key(entry.row)
            if supersedes(entry.row, winners.get(key, (0, None))[1]):
                winners[key] = (count, {"error": entry.row.get("error")})
        if not damaged and len(winners) == count:
            return done
        keep = {index for index, _ in winners.values()}
        del winners
        target = Path(os.path.realpath(self.path))  # a link named as --out stays a link
        if damaged:
            done.damaged_file = damaged_path(target)
            append_lines(done.damaged_file, damaged)
            done.moved = len(damaged)
        entries, fmt = iter_entries(self.path)
        mode = stat.S_IMODE(os.stat(target).st_mode)
        with replacing(target, "w", newline="", **ENCODING) as f:
            if fmt == "csv":
                f.write(CSV_HEADER.decode() + "\n")
            for index, entry in enumerate(entries, 1):
                if entry.row is not None and index in keep:
                    f.write(entry.text + "\n")
            os.chmod(f.fileno(), mode)
        done.dropped = count - len(keep) - len(damaged)
        return done

    def close(self) -> None:
        if self.path is not None:
            self.file.close()  # releases the lock


def _open_locked(target: Path, name: str):
    """Open for appending, holding an exclusive lock (an error, not a wait, if another pez has
    it). Re-checks that the name still points at the locked file (it may have been compacted)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        while True:
            f = open(target, "a", newline="", **ENCODING)
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                raise ConfigError(f"{name} is being written by another pez process; wait for it or use another --out") from None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(target).st_ino == os.fstat(f.fileno()).st_ino:
                    return f
            f.close()
    except IsADirectoryError:
        raise ConfigError(f"--out is a folder, not a file: {name}") from None
    except OSError as e:
        raise ConfigError(f"cannot write --out {name}: {e.strerror or e}") from None


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


@dataclass
class Merged:
    rows: int = 0  # rows written
    skipped: list[int] = field(default_factory=list)  # damaged lines skipped, per input file


def merge_files(files: Sequence[Path], out: str, fmt: str | None = None, overwrite: bool = False) -> Merged:
    """Write one row per (path, hash, settings) of result files to `out` ("-": stdout), sorted
    by path; the newest success wins. The output replaces `out` whole (it may be an input)."""
    entries = []
    for f in files:
        if not f.is_file():
            raise ConfigError(f"no such result file: {f}")
        entries.append(read_entries(f)[0])
    rows = sorted(latest(e.row for group in entries for e in group if e.row is not None).values(),
                  key=lambda r: (str(r.get("path")), str(r.get("settings_id"))))
    result = Merged(len(rows), [sum(e.row is None for e in group) for group in entries])
    if out == "-":
        write_rows(sys.stdout, format_for(None, fmt), rows)
        return result
    target = Path(out).expanduser()
    if os.path.lexists(target) and not overwrite:
        raise ConfigError(f"{out} already exists (use --overwrite to replace it)")
    fmt = fmt or ("csv" if out.lower().endswith(".csv") else "jsonl")
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    try:
        with replacing(target, "w", newline="", **ENCODING) as f:
            write_rows(f, fmt, rows)
    except OSError as e:
        raise ConfigError(f"cannot write {out}: {e.strerror or e}") from None
    return result
