"""Batch jobs: one prompt per image, written as soon as each group of images finishes.

A `BatchJob` selects its inputs (shard, duplicates, side outputs that would land on a user's
file), then streams them: each input is hashed and checked against the rows `--out` already
holds as the job reaches it, and images are read, encoded and optimized a group at a time. What
runs a group is a runner: `LocalRunner` here, `ray_batch.RayRunner` on a cluster; both hand
rows back to the job, the only writer. It reports through callbacks and never prints.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from pez_cli.captions import CaptionStyle
from pez_cli.config import Settings, settings_id, with_contents
from pez_cli.errors import ConfigError, InputError, Interrupted, first_line
from pez_cli.files import atomic_write, location
from pez_cli.images import IMAGE_SUFFIXES, load_image, png_bytes
from pez_cli.render import copy_parameters
from pez_cli.results import ResultWriter, done_rows, error_row, format_for, result_row

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
        digest = hashlib.sha256(os.fsencode(key)).digest()  # the name's bytes, UTF-8 or not
        return int.from_bytes(digest[:8], "big") % self.count == self.index - 1


def parse_shard(text: str) -> Shard:
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like K/N (e.g. 1/4), got {text!r}") from None
    if not 1 <= k <= n:
        raise ConfigError(f"--shard K/N needs 1 <= K <= N, got {text!r}")
    return Shard(k, n)


def name_digest(name: str) -> int:
    """A file name as a 96-bit number: what remembering that a name was seen costs."""
    return int.from_bytes(hashlib.blake2b(os.fsencode(name), digest_size=12).digest(), "little")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def read_bytes(path: Path) -> bytes:
    """An input's bytes, read once: its row's sha256 and its picture both come from them, so a
    file rewritten meanwhile never pairs one version's hash with another's prompt."""
    with open(path, "rb") as f:
        return f.read()


# -- side outputs: caption files and PNG copies --------------------------------------------
def check_sidecar_ext(ext: str) -> str:
    """A caption file extension, with its dot: never empty, never a path, never an image type."""
    norm = ext if ext.startswith(".") else "." + ext
    if not norm.strip(".") or any(c in norm for c in "/\\\0") or norm != norm.strip():
        raise ConfigError(f"--sidecar-ext must be a file extension such as .txt, got {ext!r}")
    if norm.lower() in IMAGE_SUFFIXES:
        raise ConfigError(f"--sidecar-ext {ext!r} is an image type: captions would replace images")
    return norm


def sidecar_path(image: Path, ext: str) -> Path:
    return image.with_suffix(ext)


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
    owners: dict[str, dict[str, str]] = {}  # caption location -> {image file: the image as named}
    for p in paths:
        owners.setdefault(location(sidecar_path(p, ext)), {}).setdefault(os.path.realpath(p), str(p))
    conflicts: dict[str, str] = {}
    for p in paths:
        caption = sidecar_path(p, ext)
        where = location(caption)
        if where in protected:
            conflicts[location(p)] = f"caption file {caption} would replace an input or the --out file"
        elif len(owners[where]) > 1:
            names = sorted(owners[where].values())
            conflicts[location(p)] = (f"caption file {caption} would be shared by {', '.join(names[:-1])} and {names[-1]}; "
                                      "rename one of them")
    return conflicts


def write_sidecar(image: Path, ext: str, prompt: str, overwrite: bool) -> bool:
    """Write the caption file next to the image; False if one exists and overwrite is off."""
    target = sidecar_path(image, ext)
    if os.path.lexists(target) and not overwrite:
        return False
    atomic_write(target, (prompt + "\n").encode("utf-8"))
    return True


def write_png_copy(image: Path, folder: Path, parameters: str, details: dict[str, Any], sha: str, overwrite: bool,
                   protected: set[str] = frozenset()) -> Path | None:
    """A PNG copy of the image with `parameters` (the A1111 block) and pez's details in its text
    metadata. Never lands on an input
    (the original included) nor on a copy of another image that has the same name; returns
    None when the copy exists and overwrite is off."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{image.stem}.png"
    taken = location(target) in protected or os.path.realpath(target) == os.path.realpath(image)
    if taken or (os.path.lexists(target) and _png_details(target).get("source_sha256") != sha):
        target = folder / f"{image.stem}-{sha[:8]}.png"
        if location(target) in protected:
            raise InputError(f"PNG copy {target} would replace an input")
    if os.path.lexists(target) and not overwrite:
        return None
    atomic_write(target, png_bytes(load_image(image), parameters, {**details, "source_sha256": sha}))
    return target


def png_copy_of(image: Path, folder: Path, sha: str, sid: str) -> Path | None:
    """The PNG copy pez wrote of this image content with these settings, if there is one."""
    for target in (folder / f"{image.stem}.png", folder / f"{image.stem}-{sha[:8]}.png"):
        details = _png_details(target)
        if details.get("source_sha256") == sha and details.get("settings_id") == sid:
            return target
    return None


def _png_details(path: Path) -> dict[str, Any]:
    """The `pez` text of a PNG pez wrote; {} for anything else."""
    import json

    from PIL import Image

    try:
        with Image.open(path) as im:
            details = json.loads(im.text.get("pez", "{}"))
    except Exception:  # missing, unreadable or not a PNG: not one of pez's copies
        return {}
    return details if isinstance(details, dict) else {}


# -- the job -------------------------------------------------------------------------------
@dataclass
class Pending:
    path: Path
    key: str  # the path as given, used for sharding and in rows
    sha256: str | None
    error: str | None = None
    data: bytes | None = field(default=None, repr=False)  # the bytes hashed, until they are decoded


@dataclass
class Summary:
    total: int = 0  # images selected (after sharding, duplicates removed)
    skipped: int = 0  # already done with the same file hash and settings
    done: int = 0  # prompts written by this run
    failed: int = 0  # error rows written by this run
    duplicates: int = 0  # inputs that name a file already given (done once)
    unreadable: int = 0  # damaged lines in --out, skipped (their images are done again)
    damaged_file: str | None = None  # where those lines were moved, as they were
    outdated: dict[str, int] = field(default_factory=dict)  # images whose rows were made from files that changed since, by what
    restored: int = 0  # caption files or PNG copies written from earlier rows, without optimizing
    sidecars_kept: int = 0  # existing caption files left alone (no --overwrite)
    interrupted: bool = False

    @property
    def failures(self) -> int:
        return self.failed


def default_group_size(device) -> int:
    """Images optimized together: enough to fill a GPU; on a CPU, 16 gets most of the batching
    gain (benchmarks/batch.py) while rows still arrive every few minutes."""
    return {"cuda": 64}.get(device.type, 16)


@dataclass
class BatchProgress:
    """Where a batch job stands, handed to on_progress."""

    done: int  # images finished by this run (their rows written)
    running: int  # images in the group optimizing now (0 on Ray, where groups run on the workers)
    total: int  # images this run has to do, as far as it knows (already done ones found so far left out)
    step: int = 0  # the running group's step
    steps: int = 0


def solve_in_groups(pez, features, size: int, on_progress: Callable[[BatchProgress], None] | None = None,
                    stop=None):
    """One prompt per row of features (N, D), `size` images per Pez.solve. Yields (index of
    the group's first image, its results, seconds per image) as each group finishes."""
    parts = () if features is None else (features,) if isinstance(features, torch.Tensor) else tuple(features)
    total = len(parts[0]) if parts else 0
    for start in range(0, total, size):
        n = min(size, total - start)

        def progress(p, start=start, n=n):
            if on_progress is not None:
                on_progress(BatchProgress(start, n, total, p.step, p.steps))

        began = time.monotonic()
        targets = [tuple(f[start + i:start + i + 1] for f in parts) for i in range(n)]  # one tensor per model
        results = pez.solve(targets, "image", on_progress=progress, stop=stop)
        yield start, results, (time.monotonic() - began) / n


@dataclass
class Input:
    """One selected input as the stream reaches it: what the job must do with it."""

    item: Pending
    previous: list[str]  # file hashes with a successful row for this path and these settings


@dataclass
class Group:
    """What a runner optimizes at once, read and decoded ahead of the group running now."""

    items: list[Pending] = field(default_factory=list)  # images to optimize, in order
    images: list[Any] = field(default_factory=list)  # their decoded pictures (local runs)
    failed: list[Pending] = field(default_factory=list)  # inputs that became errors (unreadable, clashes)
    restore: list[tuple[Pending, dict[str, Any]]] = field(default_factory=list)  # done, a side output missing
    skipped: int = 0  # already done


@dataclass
class BatchJob:
    """One prompt per image for many images. Validated on construction, before any model loads.

    The job streams: inputs are hashed, checked against --out, read and encoded a group at a
    time, so the first rows come after one group's work whatever the number of images, and
    memory does not grow with it. `runner` decides where groups run: LocalRunner (this process,
    the default) or ray_batch.RayRunner."""

    settings: Settings
    out: str | None = None  # result file (JSONL or CSV), appended and resumable; "-": stdout
    fmt: str | None = None  # jsonl or csv; default: the existing file's, else from out's name
    sidecar_ext: str | None = None  # write a caption file with this extension next to each image
    captions: CaptionStyle = field(default_factory=CaptionStyle)  # how a prompt becomes a caption file's text
    png_dir: Path | None = None  # write a PNG copy with the prompt in its metadata here
    overwrite: bool = False  # replace existing caption files and PNG copies
    force: bool = False  # redo images that --out already holds
    shard: Shard | None = None  # only this part of the inputs
    group_size: int | None = None  # images optimized together; None: the runner's default
    runner: Any = None  # LocalRunner() (default) or ray_batch.RayRunner
    identity: dict[str, Any] = field(init=False)  # the settings stored with every row
    sid: str = field(init=False)
    lm_source: Any = field(init=False, default=None)  # where the language model is (lm.LMSource), found once per job
    notes: list[str] = field(init=False, default_factory=list)  # what a front end should tell the user

    def __post_init__(self) -> None:
        settings = self.settings.for_target("image").validate()
        if self.out is None and self.sidecar_ext is None and self.png_dir is None:
            raise ConfigError("nothing to write: give --out FILE, --sidecar or --png-metadata DIR")
        if self.group_size is not None and self.group_size < 1:
            raise ConfigError(f"--batch-images must be at least 1, got {self.group_size}")
        if self.sidecar_ext is not None:
            self.sidecar_ext = check_sidecar_ext(self.sidecar_ext)
        self.fmt = format_for(self.out, self.fmt)
        if self.runner is None:
            self.runner = LocalRunner()
        self.runner.check(self)
        # The arithmetic decides the prompt, so rows record the precision `auto` resolves to
        # on the device that computes them (here, or on a Ray worker): the runner knows which.
        self.settings = replace(settings, precision=self.runner.precision(settings))
        # Rows record the language model actually used (and its revision): found once per job,
        # before any row is checked, so a changed model folder means its rows are not done.
        loaded = getattr(self.runner, "pez", None)
        if loaded is not None:
            self.settings = replace(self.settings, lm=loaded.settings.lm, lm_revision=loaded.settings.lm_revision,
                                    vocab_revision=loaded.settings.vocab_revision,
                                    model_revision=loaded.settings.model_revision)
            self.notes = list(loaded.notes)
        elif self.settings.uses_lm:
            from pez_cli.lm import settings_with_lm

            self.settings, self.lm_source, note = settings_with_lm(self.settings)
            self.notes = [note] if note else []
        self.settings = replace(self.settings, steps=self.settings.loop_steps)  # the language model is decided
        # What a --vocab FILE and local models hold, read once here: changed content means
        # changed settings, so their rows are not done.
        self.settings = with_contents(self.settings)
        self.identity = self.settings.identity()
        self.sid = settings_id(self.identity)

    def run(
        self,
        paths: Iterable[Path],
        on_status: Callable[[str], None] = lambda message: None,
        on_progress: Callable[[BatchProgress], None] | None = None,
        on_failure: Callable[[Pending], None] = lambda item: None,
        on_row: Callable[[dict[str, Any]], None] = lambda row: None,
    ) -> Summary:
        """Run the job on `paths`. on_progress(BatchProgress) every step; on_failure(item) for
        each image that becomes an error row; on_row(row) for each row this run writes (a
        prompt's or an error's; also without --out), after its side outputs. Ctrl-C keeps
        every finished group and returns a summary marked interrupted. --out is locked for the
        whole run."""
        writer = ResultWriter(self.out, self.fmt) if self.out else None
        summary = Summary()
        try:
            done, summary.unreadable, summary.outdated = done_rows(writer.path if writer is not None else None, self.identity)
            if self.force:
                done, summary.outdated = {}, {}
            selected: Iterable[Path] = self.select(paths, summary)
            side_outputs = bool(self.sidecar_ext) or self.png_dir is not None
            if side_outputs or not getattr(self.runner, "streams", False):
                selected = list(selected)  # side outputs check every input against every other
            protected = protected_locations(selected if side_outputs else (), self.out)
            conflicts = caption_conflicts(selected, self.sidecar_ext, protected) if self.sidecar_ext else {}
            job = _Run(self, summary, writer, protected, done, on_failure, on_progress, on_row)
            inputs = self._inputs(selected, done, conflicts)
            self.runner.run(job, inputs, on_status)
        except (KeyboardInterrupt, Interrupted):
            summary.interrupted = True
        finally:
            if writer is not None:
                try:
                    moved = writer.compact().damaged_file
                    summary.damaged_file = str(moved) if moved is not None else None
                finally:
                    writer.close()
        return summary

    def select(self, paths: Iterable[Path], summary: Summary) -> Iterator[Path]:
        """This shard's inputs as they come, each file once (by what its name resolves to; a
        12-byte digest of it is all that is kept per input), counted in summary.total."""
        seen: set[int] = set()
        for path in paths:
            if self.shard is not None and not self.shard.owns(str(path)):
                continue
            mark = name_digest(os.path.realpath(path))
            if mark in seen:
                summary.duplicates += 1
                continue
            seen.add(mark)
            summary.total += 1
            yield path

    def _inputs(self, selected: Iterable[Path], done: dict[tuple, dict[str, Any]],
                conflicts: dict[str, str]) -> Iterator[Input]:
        """The selected inputs, lazily, each with the hashes --out holds a prompt for."""
        by_key: dict[str, list[str]] = {}
        for key, sha, sid in done:
            row = done[(key, sha, sid)]
            if sid == self.sid and sha and not row.get("error"):
                by_key.setdefault(key, []).append(sha)
        for path in selected:
            key = str(path)
            yield Input(Pending(path, key, None, conflicts.get(location(path))), by_key.get(key, []))

    def missing_outputs(self, item: Pending) -> bool:
        """Whether a side output of this job is missing for the image (existing ones count, as
        they are kept without --overwrite; with it, nothing counts as done without a row)."""
        if self.overwrite:
            return True
        if self.sidecar_ext and not os.path.lexists(sidecar_path(item.path, self.sidecar_ext)):
            return True
        return self.png_dir is not None and png_copy_of(item.path, self.png_dir, item.sha256, self.sid) is None

    def decide(self, entry: Input) -> str:
        """Hash one input and say what it needs: "done" (a row for this content and these
        settings, or without --out its side outputs, exist), "failed" (item.error says why)
        or "todo"."""
        item = entry.item
        try:
            data = read_bytes(item.path)
        except OSError as e:
            item.error = f"cannot read {item.key}: {e.strerror or e}"
            return "failed"
        item.sha256 = hashlib.sha256(data).hexdigest()
        if item.sha256 in entry.previous:
            return "done"
        if not self.force and self.out is None and item.error is None and not self.missing_outputs(item):
            return "done"  # without a result file, existing side outputs mark an image done
        if item.error is not None:
            return "failed"
        item.data = data  # decoded from these bytes, not read again
        return "todo"

    def settle_done(self, item: Pending, done: dict[tuple, dict[str, Any]], group: Group) -> None:
        """An input found done: counted, and its missing side outputs restored from its row."""
        group.skipped += 1
        row = done.get((item.key, item.sha256, self.sid))
        if row is not None and item.error is None and self.missing_outputs(item):
            group.restore.append((item, row))


def read_groups(job: BatchJob, inputs: Iterable[Input], done: dict[tuple, dict[str, Any]], size: int) -> Iterator[Group]:
    """Groups of `size` images to optimize, decoded: each input hashed, checked and read, in
    order; what is done or failed on the way travels with the next group."""
    group = Group()
    for entry in inputs:
        item, verdict = entry.item, job.decide(entry)
        if verdict == "done":
            job.settle_done(item, done, group)
        elif verdict == "failed":
            group.failed.append(item)
        else:
            picture = read_image(item)
            if picture is None:
                group.failed.append(item)
            else:
                group.images.append(picture)
                group.items.append(item)
        if len(group.items) >= size:
            yield group
            group = Group()
    if group.items or group.failed or group.restore or group.skipped:
        yield group


def read_ahead(groups: Iterator[Group], depth: int = 1) -> Iterator[Group]:
    """Iterate `groups` with the next `depth` groups read in a background thread (hashing and
    image decoding wait on the disk or run in C, so they overlap the optimization). An error
    in the reader is raised here, in order; leaving the loop early stops the reader."""
    import queue
    import threading

    pipe: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(value) -> bool:
        while not stop.is_set():
            try:
                pipe.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            for group in groups:
                if not put((group, None)):
                    return
            put((end, None))
        except BaseException as e:  # handed over to the consumer, raised there
            put((None, e))

    thread = threading.Thread(target=reader, name="pez-batch-reader", daemon=True)
    thread.start()
    try:
        while True:
            value, error = pipe.get()
            if error is not None:
                raise error
            if value is end:
                return
            yield value
    finally:
        stop.set()


class LocalRunner:
    """Groups optimized in this process, the next group read while this one runs. The image
    tower stays loaded (each group is encoded when its turn comes): it costs the tower's
    weights for the whole job and saves holding every image's features."""

    streams = False  # the inputs are listed whole before the first group (the progress knows the total)

    def __init__(self, pez=None, stop=None):
        self.pez = pez  # an already loaded Pez (tests, benchmarks); loaded on run otherwise
        self.stop = stop  # a threading.Event that ends the running group as Ctrl-C does (Pez.solve)

    def check(self, job: BatchJob) -> None:
        pass

    def precision(self, settings: Settings) -> str:
        from pez_cli.models import compute_on

        return self.pez.settings.precision if self.pez is not None else compute_on(settings.device, settings.precision)[1]

    def run(self, job: "_Run", inputs: Iterable[Input], on_status: Callable[[str], None]) -> None:
        from pez_cli.api import Pez

        pez = self.pez
        if pez is None:
            on_status(f"Loading {job.job.settings.model_label} ...")
            pez = Pez(job.job.settings, keep_image_tower=True, lm=job.job.lm_source)
        size = job.job.group_size or default_group_size(pez.device)
        first = min(size, job.summary.total)
        on_status(f"Reading the first {first} images ..." if first < job.summary.total else f"Reading {first} images ...")
        for group in read_ahead(read_groups(job.job, inputs, job.done, size)):
            job.settle(group)
            if not group.items:
                continue
            feats = pez.image_features(group.images)
            group.images.clear()

            running = len(group.items)

            def progress(p, running=running):
                job.progress(running, p.step, p.steps)

            for _, results, seconds in solve_in_groups(pez, feats, len(group.items), progress, self.stop):
                if results[0].interrupted:  # unfinished prompts are not results
                    job.summary.interrupted = True
                    return
                for item, result in zip(group.items, results):
                    job.accept(item, result_row(item, result, seconds))


@dataclass
class _Run:
    """One run of a job: the only writer of side outputs and rows, whatever the runner."""

    job: BatchJob
    summary: Summary
    writer: ResultWriter | None
    protected: set[str]
    done: dict[tuple, dict[str, Any]]  # --out's rows by key
    on_failure: Callable[[Pending], None]
    on_progress: Callable[[BatchProgress], None] | None = None
    on_row: Callable[[dict[str, Any]], None] = lambda row: None

    def progress(self, running: int = 0, step: int = 0, steps: int = 0) -> None:
        if self.on_progress is not None:
            s = self.summary
            self.on_progress(BatchProgress(s.done + s.failed, running, s.total - s.skipped, step, steps))

    def settle(self, group: Group) -> None:
        """What a group brings besides images to optimize: skips, restores, failures."""
        self.summary.skipped += group.skipped
        self.restore(group.restore)
        for item in group.failed:
            self.fail(item)
        self.progress()

    def accept(self, item: Pending, row: dict[str, Any]) -> None:
        """A finished image's row (computed here or on a Ray worker): side outputs, then the row."""
        if row.get("error"):
            item.error = row["error"]
            self.fail(item)
        elif self.side_outputs(item, row["prompt"], row.get("similarity")):
            if self.writer is not None:
                self.writer.write(row)
            self.summary.done += 1
            self.on_row(row)
        self.progress()

    def side_outputs(self, item: Pending, prompt: str, similarity: float | None) -> bool:
        """Caption and PNG copy, each written whole, before the row that marks the image done.
        A failure becomes the image's error row; returns whether all went well."""
        job = self.job
        try:
            if job.sidecar_ext and not write_sidecar(item.path, job.sidecar_ext, job.captions.caption(prompt, item.path),
                                                     job.overwrite):
                self.summary.sidecars_kept += 1
            if job.png_dir is not None:
                details = {"prompt": prompt, "similarity": similarity, "model": job.settings.model, "settings_id": job.sid}
                parameters = copy_parameters(prompt, job.settings.model, job.settings.seed, similarity, job.settings.sd_model)
                write_png_copy(item.path, job.png_dir, parameters, details, item.sha256, job.overwrite, self.protected)
        except (OSError, InputError) as e:
            item.error = f"cannot write the caption or PNG copy of {item.key}: {getattr(e, 'strerror', None) or e}"
            self.fail(item)
            return False
        return True

    def restore(self, done: list[tuple[Pending, dict[str, Any]]]) -> None:
        """Side outputs for images already done (e.g. --sidecar added to a finished job), from
        their rows: nothing is optimized again."""
        for item, row in done:
            if self.side_outputs(item, row["prompt"], row.get("similarity")):
                self.summary.restored += 1

    def fail(self, item: Pending) -> None:
        self.summary.failed += 1
        row = error_row(item, self.job.identity, self.job.sid)
        if self.writer is not None:
            self.writer.write(row)
        self.on_failure(item)
        self.on_row(row)


def read_image(item: Pending):
    """The item's picture, or None with item.error saying why: one image never aborts a job."""
    data, item.data = item.data, None
    try:
        return load_image(item.path, data)
    except InputError as e:
        item.error = str(e)
    except Exception as e:
        item.error = f"cannot read image {item.key}: {first_line(e)}"
    return None


def encode_images(pez, todo: Sequence[Pending]):
    """Decode and encode images that are already hashed. Returns the good items, their
    features (N, D) (a tuple, one per model, for several; None when there are none) and the
    items that failed, each with its error: one image never aborts a job."""
    good, images, failed = [], [], []
    for item in todo:
        picture = read_image(item) if item.error is None else None
        if picture is None:
            failed.append(item)
        else:
            images.append(picture)
            good.append(item)
    return good, (pez.image_features(images) if images else None), failed
