"""`pez batch --ray`: the same job, the same rows, on a Ray cluster (Ray Data).

The driver selects the inputs as a local job does (shard, duplicates, side-output clashes) and
notes which file hashes --out already has a row for; it hashes and reads nothing, and keeps
nothing per input but a digest of its name: the listing goes to a temporary file, then to the
object store in partitions (put_partitions: about four per worker, at most 512 inputs each). It
maps them over a pool of actors with `Dataset.map_batches(Worker, compute=ActorPoolStrategy(size=N))`
(Ray 2.x), which Ray Data runs as a stream. Each actor loads the model once, hashes each input
of its block, answers "done" for those --out already holds, and runs the others through the same
engine as local `pez batch` (batch.BatchJob.decide, encode_images, solve_in_groups); it catches
failures per image (an error row, never a failed block) and returns rows as JSON strings.

Exactly-once output with at-least-once compute: the driver is the only writer. It streams
rows back (`iter_batches`), writes each image's side outputs and then its row (appended,
fsynced), skips a key it already wrote, and holds the lock on --out for the whole run, so a
second driver cannot write the same file. Killing the driver loses only work in flight; the
same command resumes from the rows. That is why Ray's own checkpointing and
`max_errored_blocks` are not used: the result file is the checkpoint, and a bad image is an
error row, not an errored block. Workers read images by path: the inputs must be on a file
system every node sees.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from pez_cli.batch import BatchJob, Group, Input, Pending, encode_images, name_digest, solve_in_groups
from pez_cli.errors import ConfigError, first_line
from pez_cli.models import compute_on
from pez_cli.results import error_row, json_line, result_row

RAY_PIP = "pip install 'pez-cli[ray]'  (or: pip install 'ray[data]')"


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ConfigError(f"--ray needs Ray Data, which is not installed: {RAY_PIP}") from None
    return ray


@dataclass
class RayOptions:
    """Where and how wide to run. address None: Ray's own resolution (RAY_ADDRESS, a running
    local cluster, else a new one); "auto": a running cluster, or an error; "local": always a
    new single-machine cluster."""

    address: str | None = None
    workers: int | None = None  # actors, each with the model loaded; default: the cluster's GPUs, else 1
    gpus_per_worker: float | None = None  # default: 1 on a cluster with GPUs, else 0

    def validate(self) -> "RayOptions":
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--ray-workers must be at least 1, got {self.workers}")
        if self.gpus_per_worker is not None and not 0 <= self.gpus_per_worker <= 64:
            raise ConfigError(f"--ray-gpus-per-worker must be between 0 and 64, got {self.gpus_per_worker}")
        return self


def connect(options: RayOptions) -> bool:
    """Join (or start) a cluster; returns whether this call started the connection."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level="error")
    try:
        if options.address is None:
            ray.init(**kwargs)
        else:
            ray.init(address=options.address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"at {options.address!r}" if options.address else ""
        raise ConfigError(f"cannot connect to a Ray cluster {where}: {first_line(e)}".replace("  ", " ")) from None
    return True


def plan_workers(options: RayOptions) -> tuple[int, float]:
    """(workers, GPUs per worker) from the options and the cluster's resources."""
    ray = import_ray()
    gpus = float(ray.cluster_resources().get("GPU", 0))
    per_worker = options.gpus_per_worker if options.gpus_per_worker is not None else (1.0 if gpus else 0.0)
    if per_worker > 0 and gpus < per_worker:
        raise ConfigError(f"--ray-gpus-per-worker {per_worker:g}: the cluster has {gpus:g} GPUs")
    workers = options.workers or (max(1, int(gpus // per_worker)) if per_worker else 1)
    return workers, per_worker


def worker_precision(precision: str, gpus_per_worker: float) -> str:
    """What `precision` resolves to on a worker's device (asked of a worker, not the driver,
    which may have no GPU): rows record the arithmetic that made them."""
    ray = import_ray()

    @ray.remote(num_cpus=0.01, num_gpus=gpus_per_worker)
    def resolve(name: str) -> str:
        return compute_on("auto", name)[1]

    return ray.get(resolve.remote(precision))


class Worker:
    """A Ray Data actor: the model loaded once, each batch of inputs hashed, checked, read and
    optimized as one group. JOB (the batch job, without its runner) is set on a subclass made
    per job (see RayRunner.run): no constructor arguments to keep in the object store."""

    JOB: BatchJob | None = None

    def __init__(self):
        from pez_cli.api import Pez

        self.job = self.JOB
        self.pez = Pez(self.job.settings, keep_image_tower=True)  # it encodes every batch

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        job = self.job
        rows: list[dict[str, Any]] = []
        todo = []
        for p, k, previous, e in zip(batch["path"], batch["key"], batch["previous"], batch["error"]):
            item = Pending(Path(os.fsdecode(bytes(p))), os.fsdecode(bytes(k)), None, str(e) or None)
            verdict = job.decide(Input(item, str(previous).split(",") if previous else []))
            if verdict == "done":
                rows.append({"path": item.key, "sha256": item.sha256, "error": item.error, DONE: True})
            elif verdict == "failed":
                rows.append(error_row(item, job.identity, job.sid))
            else:
                todo.append(item)
        good, feats, failed = encode_images(self.pez, todo)
        rows.extend(error_row(item, job.identity, job.sid) for item in failed)
        for start, results, seconds in solve_in_groups(self.pez, feats, max(1, len(good))):
            rows.extend(result_row(item, result, seconds) for item, result in zip(good[start:], results))
        return {"row": np.array([json_line(r) for r in rows], dtype=object)}


# A worker's answer for an input that is already done (its hash has a row, or its side outputs exist).
DONE = "_pez_done"


class RayRunner:
    """Groups run on a Ray cluster's workers (Ray Data's streaming execution: inputs are
    hashed, read, encoded and optimized on the workers, block by block, with backpressure);
    the driver only lists the inputs, writes side outputs and rows, and reports."""

    streams = True  # the inputs are never held whole (without side outputs; see BatchJob.run)

    def __init__(self, options: RayOptions):
        self.options = options

    def check(self, job: BatchJob) -> None:
        if job.shard is not None:
            raise ConfigError("--ray and --shard do not go together: Ray spreads the work itself")
        self.options.validate()
        connect(self.options)
        self.workers, self.gpus = plan_workers(self.options)

    def precision(self, settings) -> str:
        return worker_precision(settings.precision, self.gpus)

    def run(self, job_run, inputs, on_status: Callable[[str], None]) -> None:
        """Map the inputs over the cluster and hand each row, as it streams back, to the job.
        The driver keeps nothing per input: the inputs go into the object store a partition
        at a time as they are listed, and a row brings back what the driver needs of its input."""
        import copy
        import logging

        import ray.data

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # pez reports progress itself
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        job = job_run.job
        size = job.group_size or (64 if self.gpus else 16)
        partitions = list(put_partitions(inputs, size, self.workers))
        if not partitions:
            return
        shipped = copy.copy(job)
        shipped.runner = None
        worker = type("PezWorker", (Worker,), {"JOB": shipped})
        on_status(f"Running {job_run.summary.total} images on Ray ...")
        dataset = ray.data.from_arrow_refs(partitions).map_batches(
            worker, batch_size=size,
            compute=ray.data.ActorPoolStrategy(size=self.workers), num_gpus=self.gpus, num_cpus=1,
            batch_format="numpy",
        )
        del partitions
        written: set[int] = set()  # the rows handed on, as name digests
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for text in batch["row"]:
                row = json.loads(text)
                mark = name_digest(row["path"])
                if mark in written:  # a block computed twice (a worker retried): the row is already written
                    continue
                written.add(mark)
                item = Pending(Path(row["path"]), row["path"], row.get("sha256"))
                if row.get(DONE):
                    item.error = row.get("error")  # a clash noted before, which keeps its side outputs unwritten
                    group = Group()
                    job.settle_done(item, job_run.done, group)
                    job_run.settle(group)
                else:
                    job_run.accept(item, row)


# The most inputs in one partition: one actor takes a partition at a time and its rows come
# back when it finishes it, while each partition costs the driver a little (its metadata).
PARTITION = 512


def partition_rows(total: int, size: int, workers: int) -> int:
    """Inputs per partition: about four per worker, in whole groups of `size`, at most
    PARTITION (rounded up to a whole group), at least one group."""
    groups = -(-total // (4 * workers * size))  # ceil
    return size * max(1, min(groups, -(-PARTITION // size)))


def put_partitions(inputs: Iterable[Input], size: int, workers: int) -> Iterator[Any]:
    """The inputs as Arrow tables of partition_rows rows in Ray's object store (their
    references): a path and its key as bytes (names need not be UTF-8), the file hashes --out
    has a prompt for, and an error already known. The listing goes to a temporary file first
    (its length decides the partitions), so the driver's memory holds one partition."""
    import pickle
    import tempfile

    import pyarrow as pa
    import ray

    def put(part: list[tuple]):
        path, key, previous, error = zip(*part)
        return ray.put(pa.table({"path": pa.array(path, pa.binary()), "key": pa.array(key, pa.binary()),
                                 "previous": pa.array(previous, pa.string()), "error": pa.array(error, pa.string())}))

    with tempfile.TemporaryFile() as listing:
        total = 0
        for entry in inputs:
            item = entry.item
            pickle.dump((os.fsencode(str(item.path)), os.fsencode(item.key), ",".join(entry.previous), item.error or ""),
                        listing)
            total += 1
        listing.seek(0)
        rows = partition_rows(total, size, workers)
        part: list[tuple] = []
        for _ in range(total):
            part.append(pickle.load(listing))  # written just above by this process
            if len(part) == rows:
                yield put(part)
                part = []
        if part:
            yield put(part)
