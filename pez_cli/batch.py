"""Batch jobs: one prompt per image, written as soon as each group of images finishes.

A `BatchJob` plans (shard, skip what `--out` already holds with the same file hash and
settings, refuse side outputs that would land on a user's file) and runs images a group at a
time through `Pez.solve`. It reports through callbacks and never prints.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from pez_cli.config import Settings, settings_id
from pez_cli.errors import ConfigError, InputError, Interrupted, first_line
from pez_cli.files import atomic_write, location
from pez_cli.images import IMAGE_SUFFIXES, load_image, png_bytes
from pez_cli.render import copy_parameters
from pez_cli.results import ResultWriter, format_for, latest, read_entries

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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


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


@dataclass
class Summary:
    total: int = 0  # images selected (after sharding, duplicates removed)
    skipped: int = 0  # already done with the same file hash and settings
    done: int = 0  # prompts written by this run
    failed: int = 0  # error rows written by this run
    duplicates: int = 0  # inputs that name a file already given (done once)
    unreadable: int = 0  # damaged lines in --out, skipped (their images are done again)
    damaged_file: str | None = None  # where those lines were moved, as they were
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

    done: int  # images finished (their rows written, or about to be)
    running: int  # images in the group optimizing now (0 on Ray, where groups run on the workers)
    total: int  # images this run has to do
    step: int = 0  # the running group's step
    steps: int = 0


def solve_in_groups(pez, features, size: int, on_progress: Callable[[BatchProgress], None] | None = None):
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
        results = pez.solve(targets, "image", on_progress=progress)
        yield start, results, (time.monotonic() - began) / n


@dataclass
class Plan:
    todo: list[Pending]  # images to optimize (or to record as errors)
    restore: list[tuple[Pending, dict[str, Any]]]  # done images whose side outputs are missing, with their row
    protected: set[str]  # locations no side output may replace
    summary: Summary


@dataclass
class BatchJob:
    """One prompt per image for many images. Validated on construction, before any model loads."""

    settings: Settings
    out: str | None = None  # result file (JSONL or CSV), appended and resumable; "-": stdout
    fmt: str | None = None  # jsonl or csv; default: the existing file's, else from out's name
    sidecar_ext: str | None = None  # write a caption file with this extension next to each image
    png_dir: Path | None = None  # write a PNG copy with the prompt in its metadata here
    overwrite: bool = False  # replace existing caption files and PNG copies
    force: bool = False  # redo images that --out already holds
    shard: Shard | None = None  # only this part of the inputs
    group_size: int | None = None  # images optimized together; None: default_group_size(device)
    ray: Any = None  # ray_batch.RayOptions: run on a Ray cluster instead of this process
    identity: dict[str, Any] = field(init=False)  # the settings stored with every row
    sid: str = field(init=False)

    def __post_init__(self) -> None:
        from pez_cli.models import pick_device, precision_name

        settings = self.settings.for_target("image").validate()
        if self.out is None and self.sidecar_ext is None and self.png_dir is None:
            raise ConfigError("nothing to write: give --out FILE, --sidecar or --png-metadata DIR")
        if self.group_size is not None and self.group_size < 1:
            raise ConfigError(f"--batch-images must be at least 1, got {self.group_size}")
        if self.sidecar_ext is not None:
            self.sidecar_ext = check_sidecar_ext(self.sidecar_ext)
        self.fmt = format_for(self.out, self.fmt)
        # The arithmetic decides the prompt, so rows record the precision `auto` resolves to
        # on the device that computes them: here, or on a Ray worker.
        if self.ray is not None:
            from pez_cli import ray_batch

            if self.shard is not None:
                raise ConfigError("--ray and --shard do not go together: Ray spreads the work itself")
            self.ray.validate()
            ray_batch.connect(self.ray)
            _, gpus = ray_batch.plan_workers(self.ray)
            precision = ray_batch.worker_precision(settings.precision, gpus)
        else:
            precision = precision_name(settings.precision, pick_device(settings.device))
        self.settings = replace(settings, precision=precision)
        self.identity = self.settings.identity()
        self.sid = settings_id(self.identity)

    def plan(self, paths: Sequence[Path], rows: Iterable[dict[str, Any]] = ()) -> Plan:
        """This shard's images, each file once, minus those `rows` (of --out) hold a prompt
        for with these settings; images whose caption would hit another file become errors."""
        done = latest(rows)
        protected = protected_locations(paths, self.out)
        conflicts = caption_conflicts(paths, self.sidecar_ext, protected) if self.sidecar_ext else {}
        plan = Plan([], [], protected, Summary())
        seen: set[str] = set()
        for path in paths:
            key = str(path)
            if self.shard is not None and not self.shard.owns(key):
                continue
            if key in seen or os.path.realpath(path) in seen:
                plan.summary.duplicates += 1
                continue
            seen.update((key, os.path.realpath(path)))
            plan.summary.total += 1
            try:
                sha = file_sha256(path)
            except OSError as e:
                plan.todo.append(Pending(path, key, None, f"cannot read {key}: {e.strerror or e}"))
                continue
            item = Pending(path, key, sha, conflicts.get(location(path)))
            previous = None if self.force else done.get((key, sha, self.sid))
            if previous is not None and not previous.get("error"):
                plan.summary.skipped += 1
                if item.error is None and self._missing_outputs(item):
                    plan.restore.append((item, previous))
            elif not self.force and self.out is None and item.error is None and not self._missing_outputs(item):
                plan.summary.skipped += 1  # without a result file, existing side outputs mark an image done
            else:
                plan.todo.append(item)
        return plan

    def _missing_outputs(self, item: Pending) -> bool:
        """Whether a side output of this job is missing for the image (existing ones count, as
        they are kept without --overwrite; with it, nothing counts as done without a row)."""
        if self.overwrite:
            return True
        if self.sidecar_ext and not os.path.lexists(sidecar_path(item.path, self.sidecar_ext)):
            return True
        return self.png_dir is not None and png_copy_of(item.path, self.png_dir, item.sha256, self.sid) is None

    def run(
        self,
        paths: Sequence[Path],
        pez=None,
        on_status: Callable[[str], None] = lambda message: None,
        on_progress: Callable[[BatchProgress], None] | None = None,
        on_failure: Callable[[Pending], None] = lambda item: None,
        on_encode: Callable[[int, int], None] = lambda done, total: None,
    ) -> Summary:
        """Plan and run. on_encode(images encoded, images to encode) comes as the images are
        read and encoded (all before the first group); on_progress(BatchProgress) every step;
        on_failure(item) for each image that becomes an error row.
        Ctrl-C keeps every finished group and returns a summary marked interrupted. --out is
        locked for the whole run."""
        writer = ResultWriter(self.out, self.fmt) if self.out else None
        summary = Summary()
        try:
            entries = read_entries(writer.path)[0] if writer is not None and writer.path is not None else []
            plan = self.plan(paths, (e.row for e in entries if e.row is not None))
            summary = plan.summary
            summary.unreadable = sum(e.row is None for e in entries)
            job = _Run(self, summary, writer, plan.protected, on_failure)
            job.restore(plan.restore)
            if plan.todo and self.ray is not None:
                from pez_cli import ray_batch

                on_status(f"Running {len(plan.todo)} images on Ray ...")
                ray_batch.run(job, plan.todo, self.ray, self.group_size, on_progress)
            elif plan.todo:
                job.run(plan.todo, pez, on_status, on_progress, on_encode)
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


@dataclass
class _Run:
    """One run of a job: writes side outputs and rows as groups finish."""

    job: BatchJob
    summary: Summary
    writer: ResultWriter | None
    protected: set[str]
    on_failure: Callable[[Pending], None]

    def run(self, todo: list[Pending], pez, on_status, on_progress, on_encode=None) -> None:
        from pez_cli.api import Pez

        if pez is None:
            on_status(f"Loading {self.job.settings.model_label} ...")
            pez = Pez(self.job.settings, keep_image_tower=False)
        on_status(f"Encoding {len(todo)} images ...")
        good, feats = self.encode(pez, todo, on_encode)
        size = self.job.group_size or default_group_size(pez.device)
        for start, results, seconds in solve_in_groups(pez, feats, size, on_progress):
            if results[0].interrupted:  # unfinished prompts are not results
                self.summary.interrupted = True
                return
            for item, result in zip(good[start:start + size], results):
                if self.side_outputs(item, result.prompt, result.similarity) and self.writer is not None:
                    self.writer.write(result_row(item, result, seconds))
                self.summary.done += item.error is None

    def encode(self, pez, todo: Sequence[Pending], on_encode=None):
        """encode_images, with an error row for each image that failed."""
        good, feats, failed = encode_images(pez, todo, on_encode)
        for item in failed:
            self.fail(item)
        return good, feats

    def accept(self, item: Pending, row: dict[str, Any]) -> None:
        """A row computed elsewhere (a Ray worker): side outputs, then the row itself."""
        if row.get("error"):
            item.error = row["error"]
            self.fail(item)
        elif self.side_outputs(item, row["prompt"], row.get("similarity")):
            if self.writer is not None:
                self.writer.write(row)
            self.summary.done += 1

    def side_outputs(self, item: Pending, prompt: str, similarity: float | None) -> bool:
        """Caption and PNG copy, each written whole, before the row that marks the image done.
        A failure becomes the image's error row; returns whether all went well."""
        job = self.job
        try:
            if job.sidecar_ext and not write_sidecar(item.path, job.sidecar_ext, prompt, job.overwrite):
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
        if self.writer is not None:
            self.writer.write(error_row(item, self.job.identity, self.job.sid))
        self.on_failure(item)


def encode_images(pez, todo: Sequence[Pending], on_encode: Callable[[int, int], None] | None = None):
    """Decode and encode images in chunks, calling on_encode(done, total) after each. Returns
    the good items, their features (N, D) (a tuple, one per model, for several; None when
    there are none) and the items that failed, each with its error: one image never aborts a job."""
    good, feats, failed = [], [], []
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
                except Exception as e:
                    item.error = f"cannot read image {item.key}: {first_line(e)}"
            failed.append(item)
        if images:
            chunk = pez.image_features(images)
            feats.append((chunk,) if isinstance(chunk, torch.Tensor) else chunk)
        if on_encode is not None:
            on_encode(min(start + ENCODE_CHUNK, len(todo)), len(todo))
    if not feats:
        return good, None, failed
    return good, tuple(torch.cat(per_model) for per_model in zip(*feats)), failed


def result_row(item: Pending, result, seconds: float) -> dict[str, Any]:
    return {"path": item.key, "sha256": item.sha256, **result.to_dict(), "seconds": round(seconds, 3), "error": None}


def error_row(item: Pending, identity: dict[str, Any], sid: str) -> dict[str, Any]:
    from pez_cli.api import PromptResult

    empty = dict.fromkeys(PromptResult.KEYS)
    empty.update(model=identity["model"], settings_id=sid, settings=identity)
    return {"path": item.key, "sha256": item.sha256, **empty, "seconds": None, "error": item.error}
