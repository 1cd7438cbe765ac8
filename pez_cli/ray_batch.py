"""`pez batch --ray`: the same job, the same rows, on a Ray cluster (Ray Data).

The driver plans as a local job does (file hashes, rows already in --out, side-output
clashes), then maps the images still to do over a pool of actors with
`Dataset.map_batches(Worker, compute=ActorPoolStrategy(size=N))` (Ray 2.x). Each actor loads
the model once and runs the same batched engine as local `pez batch`; it catches failures per
image (an error row, never a failed block) and returns rows as JSON strings.

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from pez_cli.errors import ConfigError, first_line

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
        from pez_cli.models import pick_device, precision_name

        return precision_name(name, pick_device("auto"))

    return ray.get(resolve.remote(precision))


class Worker:
    """A Ray Data actor: the model loaded once, each batch of images a group of problems.
    SETTINGS is set on a subclass made per job (see run): no constructor arguments to keep in
    the object store."""

    SETTINGS: dict[str, Any] = {}

    def __init__(self):
        from pez_cli.api import Pez
        from pez_cli.config import Settings

        self.pez = Pez(Settings(**self.SETTINGS), keep_image_tower=True)  # it encodes every batch

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from pez_cli.batch import Pending, encode_images, error_row, result_row, solve_in_groups
        from pez_cli.results import json_line

        items = [Pending(Path(os.fsdecode(bytes(p))), os.fsdecode(bytes(k)), str(s) or None, str(e) or None)
                 for p, k, s, e in zip(batch["path"], batch["key"], batch["sha256"], batch["error"])]
        identity = self.pez.settings.identity()
        from pez_cli.config import settings_id

        sid = settings_id(identity)
        rows: list[dict[str, Any]] = []
        good, feats, failed = encode_images(self.pez, items)
        rows.extend(error_row(item, identity, sid) for item in failed)
        for start, results, seconds in solve_in_groups(self.pez, feats, max(1, len(good))):
            rows.extend(result_row(item, result, seconds) for item, result in zip(good[start:], results))
        return {"row": np.array([json_line(r) for r in rows], dtype=object)}


def run(job_run, todo: list, options: RayOptions, group_size: int | None,
        on_progress: Callable[[Any], None] | None) -> None:
    """Map `todo` over the cluster and hand each row, as it streams back, to job_run.accept."""
    import logging

    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # pez reports progress itself
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    workers, gpus = plan_workers(options)
    size = group_size or (64 if gpus else 16)
    items = [{"path": os.fsencode(str(item.path)), "key": os.fsencode(item.key), "sha256": item.sha256 or "",
              "error": item.error or ""} for item in todo]
    by_key = {item.key: item for item in todo}
    worker = type("PezWorker", (Worker,), {"SETTINGS": asdict(job_run.job.settings)})
    dataset = ray.data.from_items(items).map_batches(
        worker, batch_size=size,
        compute=ray.data.ActorPoolStrategy(size=workers), num_gpus=gpus, num_cpus=1, batch_format="numpy",
    )
    done = 0
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for text in batch["row"]:
            row = json.loads(text)
            item = by_key.pop(row["path"], None)
            if item is None:  # a block computed twice (a worker retried): the row is already written
                continue
            job_run.accept(item, row)
            done += 1
            if on_progress is not None:
                from pez_cli.batch import BatchProgress

                on_progress(BatchProgress(done, 0, len(todo)))
