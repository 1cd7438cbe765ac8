"""`pez serve`: a local web page (Gradio) over the same library calls as the commands.

Gradio is imported only here, and only when the command runs (pez-cli[ui]). The page's
settings are the CLI's: the same declarations (config.setting) make its fields, the same
resolve() merges them (page fields count as flags, over --preset, --config and defaults) and
the same one-line messages report what is wrong. A run happens in a worker thread through
Pez.solve or BatchJob.run; the page's Stop sets the `stop` event those check after every step,
so Stop keeps the best prompt, as Ctrl-C does.

Safe by default: the server binds to 127.0.0.1; folder inputs and result files must lie inside
the folders named with --root; uploads and everything the page offers for download live in one
temporary folder, removed when the server stops; nothing is written beside a user's images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import inspect
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from pez_cli.cli.display import PROGRESS_INTERVAL_S, best_text, remaining, scores_text
from pez_cli.config import LM_AUTO, LM_NONE, VOCAB_KINDS, Settings, preset_names, resolve, sd_model_for_settings
from pez_cli.errors import ConfigError, InputError, PezError, first_line, user_message
from pez_cli.images import IMAGE_SUFFIXES
from pez_cli.results import json_line
from pez_cli.session import Session

log = logging.getLogger("pez")

UI_PIP = 'pip install "pez-cli[ui]"'
# The settings the page shows, in order; every other setting comes from --preset, --config,
# the flags `pez serve` was started with, or its default.
# Page fields that may name a file or folder: a relative one is read against the first --root.
ROOTED_FIELDS = ("model", "vocab", "lm")
NOT_PATHS = (*VOCAB_KINDS, LM_AUTO, LM_NONE)  # --vocab kinds and --lm values that are not a model
MAIN_FIELDS = ("model", "steps", "prompt_len", "vocab", "lm", "seed")
MORE_FIELDS = ("lm_weight", "beam", "restarts", "refine", "prior", "block", "init")  # under "More settings"
PAGE_FIELDS = MAIN_FIELDS + MORE_FIELDS
# How long closing waits for a running job to finish its step.
JOIN_TIMEOUT_S = 120
# How often a running job's page is updated at most (each update decodes the best prompt).
UPDATE_INTERVAL_S = PROGRESS_INTERVAL_S
# Steps before a time left is shown: the first steps' rate says little.
RATE_AFTER_STEPS = 5
BATCH_HEADERS = ["image", "prompt", "similarity", "error"]
# What the scores mean, shown where a pointer rests on them.
SCORES_HELP = ("similarity: the cosine between the printed prompt's CLIP text features and the image's (the CLIP "
               "term); fluency: the language model's mean log-probability per token, in nats (higher reads more like "
               "text); objective: what chooses the prompt, CLIP's logit (its logit scale times the similarity) plus "
               "lm weight times the fluency; it never falls during a run")
CSS = """.pez-error { color: var(--error-text-color); background: var(--error-background-fill);
  border: 1px solid var(--error-border-color); border-radius: 6px; padding: 4px 10px; }
#batch-table td { max-width: 28em; overflow: hidden; text-overflow: ellipsis; }
.pez-thumbs .grid-container { grid-template-columns: repeat(auto-fill, 96px) !important; }
.pez-thumbs .thumbnail-item { width: 96px !important; height: 96px !important; }"""
# Finished runs a page lists (its session's history).
HISTORY = 50
# Dropped images shown as thumbnails (the drop area lists them all).
PREVIEWS = 16
# The page's batch groups on a CPU: small, so rows reach the table (and Stop keeps them) often.
PAGE_CPU_GROUP = 2


def _gradio():
    try:
        import gradio
    except ImportError:
        raise PezError(f"pez serve needs Gradio: {UI_PIP}") from None
    return gradio


# -- page values <-> settings --------------------------------------------------------------
def _field(name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(Settings) if f.name == name)


def _flag(name: str) -> str:
    return _field(name).metadata["flag_name"] or "--" + name.replace("_", "-")


def page_value(name: str, settings: Settings) -> Any:
    """What a page field shows for a setting's value."""
    value = getattr(settings, name)
    if isinstance(value, list):
        return "\n".join(value)
    return value


def flag_value(name: str, value: Any) -> Any:
    """A page field's value as the CLI flag would give it (None: not given)."""
    kind = _field(name).type.replace(" | None", "")
    if isinstance(value, str):
        value = value.strip()
        if kind in ("list[str]", "str | list[str]"):
            items = [line.strip() for line in value.splitlines() if line.strip()]
            return (items[0] if len(items) == 1 and kind == "str | list[str]" else items) or None
        if kind == "int" and value:
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"{_flag(name)} must be a whole number, got {value!r}") from None
        return value or None
    if kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def demo_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """--demo: the offline demo world's CLIP, its steps and (with transformers) its language
    model, where the flags name none."""
    from pez_cli import demo as demos

    out = dict(flags)
    out["model"] = out.get("model") or f"local-dir:{demos.CLIP_DIR}"
    out["steps"] = out.get("steps") or demos.DEMO_STEPS
    if demos.lm_available():
        out["lm"] = out.get("lm") or str(demos.LM_DIR)
    return out


@dataclass
class ServeConfig:
    """What `pez serve` was started with."""

    roots: list[Path]  # folders the page may read folder inputs from and write result files into
    preset: str | None = None
    config: Path | None = None
    flags: dict[str, Any] = field(default_factory=dict)  # settings given as flags: the page's starting values
    demo: bool = False  # --demo: the flags hold the demo world's models, and the page calls them "demo"
    judge_model: str | None = None


# -- one running job -----------------------------------------------------------------------
class Live:
    """A running job's state as the page shows it; written by the worker thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.version = 0
        self.stage = "Starting ..."
        self.step = self.steps = 0
        self.best = ""
        self.score = ""  # the best prompt's scores, as display.best_text words them
        self.total = 0  # batch: images this run has to do
        self.rows: list[list[Any]] = []  # batch: each row written so far (its count is the images done)
        self.started = time.monotonic()
        self._drawn = 0.0

    def _changed(self) -> None:
        self.version += 1

    def set_stage(self, text: str) -> None:
        with self.lock:
            self.stage = text
            self._changed()

    def due(self, final: bool) -> bool:
        now = time.monotonic()
        if final or now - self._drawn >= UPDATE_INTERVAL_S:
            self._drawn = now
            return True
        return False

    def on_progress(self, p) -> None:
        """Pez.solve's on_progress: the step always, the best prompt when due (and at step 1)."""
        if self.step == 0:
            with self.lock:
                self.started = time.monotonic()  # time left counts from the loop, not the loading
        if self.due(p.step == 1 or p.step == p.steps):
            best = p.best()[0]
            with self.lock:
                self.step, self.steps, self.best, self.score = p.step, p.steps, best.prompt, best_text(best)
                self.stage = ""
                self._changed()
        else:
            self.step, self.steps = p.step, p.steps

    def on_batch(self, p) -> None:
        """BatchJob.run's on_progress."""
        if self.due(False):
            with self.lock:
                self.total, self.step, self.steps = p.total, p.step, p.steps
                if p.steps:
                    self.stage = ""  # a group optimizes: "Reading ..." is over
                self._changed()

    def on_row(self, row: dict[str, Any]) -> None:
        with self.lock:
            self.rows.append(table_row(row))
            self._changed()

    def line(self) -> str:
        """The progress line: step, time left, best score."""
        with self.lock:
            if not self.steps:
                return self.stage
            elapsed = time.monotonic() - self.started
            left = remaining(self.step, self.steps, elapsed) if self.step >= RATE_AFTER_STEPS else ""
            parts = [f"step {self.step}/{self.steps}", f"{left} left" if left else "",
                     explained(f"best {self.score}") if self.score else "", self.stage]
            return " · ".join(p for p in parts if p)

    def batch_line(self) -> str:
        with self.lock:
            parts = [f"images {len(self.rows)}/{self.total}" if self.total else "",
                     f"group step {self.step}/{self.steps}" if self.steps else "", self.stage]
            return " · ".join(p for p in parts if p) or "Starting ..."


def explained(scores: str) -> str:
    """Scores as the page shows them: SCORES_HELP where the pointer rests on them."""
    return f'<span title="{html.escape(SCORES_HELP)}">{html.escape(scores)}</span>'


def short_model(name: str) -> str:
    """A model as a result line names it: a folder's or file's own name, a hub or open_clip name as given."""
    path = name.removeprefix("local-dir:")
    return Path(path).name if path != name or os.sep in path else name


def table_row(row: dict[str, Any]) -> list[Any]:
    """A result row as the batch table shows it."""
    score = row.get("similarity")
    return [Path(row["path"]).name, row.get("prompt") or "", "" if score is None else round(score, 4), row.get("error") or ""]


def local_paths(settings: Settings | None, sd_model: str | None = None,
                judge_model: str | None = None) -> list[tuple[str, str, str]]:
    """(what, as named, path) of every file or folder these settings and render fields read:
    a --vocab FILE, local CLIPs (folders and checkpoint files), a language-model folder, a
    Stable Diffusion folder and a local judge."""
    from pez_cli.config import VOCAB_KINDS, canonical_model, local_model_file, looks_like_folder, parse_model_spec

    found: list[tuple[str, str, str]] = []
    models = [name for name, _ in settings.models()] if settings is not None else []
    for what, name in [("model", m) for m in models] + ([("judge model", judge_model)] if judge_model else []):
        where = local_model_file(parse_model_spec(canonical_model(name))[0])
        bare = os.path.expanduser(name.removeprefix("local-dir:"))
        if where is not None:
            found.append((what, name, where[0]))
        elif name.startswith("local-dir:") or os.path.exists(bare):
            found.append((what, name, bare))
    if settings is not None:
        if settings.vocab not in VOCAB_KINDS:
            found.append(("vocab", settings.vocab, settings.vocab))
        if settings.uses_lm and settings.lm not in ("auto",) and looks_like_folder(settings.lm):
            found.append(("language model", settings.lm, os.path.expanduser(settings.lm)))
    if sd_model and (os.path.exists(os.path.expanduser(sd_model)) or sd_model.startswith(("/", ".", "~"))):
        found.append(("Stable Diffusion model", sd_model, os.path.expanduser(sd_model)))
    return found


# -- the server's state, shared by every page ------------------------------------------------
class Server:
    """Loaded models (kept between runs), the temporary folder, the stop events of running jobs."""

    def __init__(self, cfg: ServeConfig, tmp: Path):
        self.cfg = cfg
        self.roots = [Path(os.path.realpath(r)) for r in cfg.roots]
        self.tmp = tmp
        self.session = Session()  # models kept loaded between runs (the two used last)
        self.models, self.lms = self.session.models, self.session.lms
        self.pez = self.session.pez
        self.stops: dict[str, threading.Event] = {}
        self.threads: set[threading.Thread] = set()  # running jobs, joined before the server exits
        self.history: dict[str, list[list[Any]]] = {}  # each page's finished runs, newest first
        self.start = resolve(cfg.preset, cfg.config, cfg.flags).settings  # fails early on a bad flag
        # Files and folders the server's own command line named (the demo's models, say): the
        # page may use them wherever they are; any other path must be inside a --root.
        named = [path for _, _, path in local_paths(self.start)]
        if cfg.judge_model:
            named += [path for _, _, path in local_paths(None, judge_model=cfg.judge_model)]
        self.named = {os.path.realpath(p) for p in named}

    # settings and paths
    def settings(self, preset: str | None, values: Sequence[Any]) -> Settings:
        """The run's settings: page fields over the server's flags, --config, the preset, defaults."""
        flags = dict(self.cfg.flags)
        for name, value in zip(PAGE_FIELDS, values):
            if value is not None:  # None (an API call's null): the value the server started with
                flags[name] = flag_value(name, value)
                if name in ROOTED_FIELDS and flags[name] != self.cfg.flags.get(name) and flags[name] not in NOT_PATHS:
                    flags[name] = self.rooted(flags[name])
        settings = resolve(preset or None, self.cfg.config, flags).settings
        self.check_paths(settings)
        return settings

    def check_paths(self, settings: Settings | None, sd_model: str | None = None, judge_model: str | None = None) -> None:
        """Refuse, before anything opens them, the files and folders page fields name (a word
        list, a model or language-model folder, a checkpoint, a Stable Diffusion folder, a
        judge) outside every --root, after symlinks, unless the server's command line named them."""
        for what, text, path in local_paths(settings, sd_model, judge_model):
            if os.path.realpath(path) not in self.named:
                self.within_roots(Path(path), text, what)

    def rooted(self, value: Any) -> Any:
        """A relative path typed on the page (a word list, a model or language-model folder, a
        checkpoint, a Stable Diffusion folder; a list of models) read against the first --root,
        as folders and result files are, where it names something there (or with local-dir:).
        Names that are not paths there (hub ids, ARCH/TAG, vocab kinds) are left as they are."""
        if isinstance(value, list):
            return [self.rooted(v) for v in value]
        if not isinstance(value, str) or not value:
            return value
        prefix = "local-dir:" if value.startswith("local-dir:") else ""
        rest = value[len(prefix):]
        weight = ""
        if not prefix and "@" in rest:  # MODEL@WEIGHT
            rest, _, weight = rest.rpartition("@")
            weight = "@" + weight
        if not rest or os.path.isabs(os.path.expanduser(rest)):
            return value
        there = self.roots[0] / rest
        return f"{prefix}{there}{weight}" if prefix or os.path.lexists(there) else value

    def page_values(self, preset: str | None) -> list[Any]:
        """The page's fields for a preset chosen on the page: the preset's values (over --config
        and the defaults; the server's flags still decide the settings not on the page), or for
        none ("" or None) the values the server started with."""
        flags = self.cfg.flags if not preset else {k: v for k, v in self.cfg.flags.items() if k not in PAGE_FIELDS}
        settings = resolve(preset or None, self.cfg.config, flags).settings
        return [page_value(name, settings) for name in PAGE_FIELDS]

    def inside(self, text: str, what: str) -> Path:
        """A path typed on the page, relative to the first --root; refused outside every --root."""
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = self.roots[0] / path
        self.within_roots(path, text, what)
        return path

    def within_roots(self, path: Path, text: str, what: str) -> None:
        """An InputError naming `what` and `text` unless `path` resolves (after symlinks and
        ..) inside a --root."""
        real = Path(os.path.realpath(path))
        if not any(real == root or root in real.parents for root in self.roots):
            roots = ", ".join(str(r) for r in self.roots)
            raise InputError(f"{what} {text} is outside the folders this server may use (--root {roots})")

    def image_paths(self, files: Sequence[str] | None, folder: str | None, recursive: bool = False,
                    missing_ok: bool = False) -> list[Path]:
        from pez_cli.images import collect_paths

        inputs = [str(f) for f in files or []]
        if folder and folder.strip():
            inputs.append(str(self.inside(folder.strip(), "folder")))
        if not inputs:
            raise InputError("no images: drop one or more images, or name a folder")
        return collect_paths(inputs, recursive=recursive, missing_ok=missing_ok)

    def scratch(self, token: str, name: str, fresh: bool = True) -> Path:
        """This page's folder for files of one kind, inside the temporary folder: emptied first
        unless `fresh` is False (a batch's result file, kept so the same batch resumes)."""
        safe = hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:16]  # a client names its session
        folder = self.tmp / "pages" / safe / name
        if fresh:
            shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def keyed_uploads(self, files: Sequence[str] | None) -> list[str]:
        """Uploaded files at paths their content decides (uploads/<sha256>/<name>), so the same
        files uploaded again are the same inputs to a batch and its result file resumes them."""
        from pez_cli.batch import file_sha256

        keyed = []
        for name in files or []:
            src = Path(name)
            try:
                digest = file_sha256(src)
            except OSError:
                keyed.append(str(name))  # the batch reports it as unreadable, as pez batch does
                continue
            dest = self.tmp / "uploads" / digest[:32] / src.name
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest)
            keyed.append(str(dest))
        return keyed

    # models, kept loaded between runs
    def remember(self, token: str, kind: str, text: str, score: str = "") -> None:
        """A finished run in this page's history (the newest HISTORY kept)."""
        rows = self.history.setdefault(token, [])
        rows.insert(0, [time.strftime("%H:%M:%S"), kind, text, score])
        del rows[HISTORY:]

    def loaded_text(self) -> str:
        """The models this server holds loaded, as the page lists them."""
        names = [short_model(name) for name, _ in self.models] + [f"{short_model(name)} (language model)"
                                                                  for name, _, _ in self.lms]
        return f"Loaded: {', '.join(html.escape(n) for n in names)}" if names else "No model loaded yet"

    def loaded_label(self, settings: Settings) -> str:
        return f"Loading {settings.model_label} ..." if self.session.loading(settings) else f"Preparing {settings.model_label} ..."

    # running a job
    def stream(self, token: str, work: Callable[[Live, threading.Event], Any]) -> Iterator[tuple[str, Any]]:
        """Run work(live, stop) in a thread; yield ("live", live) when its state changes, then
        ("done", value) or ("error", "Error: ..."). Leaving early (the page closed) stops it."""
        stop = threading.Event()
        self.stops[token] = stop
        live = Live()
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = work(live, stop)
            except BaseException as e:  # reported on the page
                box["error"] = e

        thread = threading.Thread(target=target, name="pez-serve-run", daemon=True)
        self.threads.add(thread)
        thread.start()
        seen = -1
        try:
            while thread.is_alive():
                thread.join(0.1)
                if live.version != seen:
                    seen = live.version
                    yield "live", live
            if live.version != seen:  # what changed in its last moments
                yield "live", live
            if "error" in box:
                yield "error", error_line(box["error"], self.tmp)
            else:
                yield "done", box["value"]
        finally:
            stop.set()  # nothing if it finished; the page went away otherwise
            thread.join()
            self.threads.discard(thread)
            if self.stops.get(token) is stop:
                del self.stops[token]

    def stop(self, token: str) -> None:
        event = self.stops.get(token)
        if event is not None:
            event.set()


def error_line(e: BaseException, tmp: Path | None = None) -> str:
    """The line the CLI would print for an error; a bug's first line, its traceback in the log.
    A file in the server's temporary folder (an upload) is named by its own name."""
    message = user_message(e)
    if message is None:
        log.error("pez serve: a run failed", exc_info=e)
        message = f"{first_line(e)} (a bug in pez; the server's terminal has the traceback)"
    if tmp is not None:
        message = re.sub(re.escape(str(tmp)) + r"/(?:[^/\s]+/)*", "", message)
    return f"Error: {message}"


# -- the jobs a page runs ----------------------------------------------------------------------
def optimize_work(server: Server, kind: str, preset, values, files=None, folder=None, text=None, template=None):
    """One optimization job (jobs.py), as `pez invert`, `pez style` or `pez distill` runs it."""
    from pez_cli.jobs import Events, OptimizeJob, optimize

    def work(live: Live, stop: threading.Event):
        settings = server.settings(preset, values)
        paths = server.image_paths(files, folder) if kind != "distill" else ()
        job = OptimizeJob(kind, settings, images=paths, text=text, template=template or None)
        report = optimize(job, server.pez, Events(live.set_stage, live.on_progress, loading=server.loaded_label), stop)
        return report.result, report.data, report.notes

    return work


def result_texts(result, data: dict[str, Any]) -> tuple[str, str]:
    """The notes under a result: its scores, the similarity per model (named short), the round
    trip and the time split into loading and optimizing; or where it stopped."""
    scores = explained(scores_text(result.similarity, result.fluency, result.objective))
    if result.interrupted:
        return f"Stopped after {result.steps_done} steps; best prompt so far ({scores}).", ""
    each = ", ".join(f"{html.escape(short_model(name))} {value:.4f}" for name, value in result.similarities.items())
    trip = "re-tokenizes to exactly the optimized ids" if result.round_trip else "re-tokenizes differently from the optimized ids"
    loading = data["total_seconds"] - data["seconds"]
    return "", f"{scores} · {each} · {trip} · loading {loading:.1f} s, optimizing {data['seconds']:.1f} s"


def page_group_size(device) -> int:
    """Images a page's batch optimizes together by default: pez batch's on a GPU, few on a CPU."""
    from pez_cli.batch import default_group_size

    return PAGE_CPU_GROUP if device.type == "cpu" else default_group_size(device)


def batch_work(server: Server, token: str, preset, values, files, folder, recursive, out, fmt, group_size=None):
    """A batch job as `pez batch` runs it, in groups of `group_size` (--batch-images). Its rows
    go to the named result file, or to one this page keeps for the same inputs and format: either
    way the same batch run again resumes, and Stop keeps every finished group's rows."""
    from pez_cli.batch import BatchJob, LocalRunner
    from pez_cli.results import latest, read_rows

    def work(live: Live, stop: threading.Event):
        settings = server.settings(preset, values)
        size = None if group_size in (None, "") else _whole(group_size, "--batch-images")
        uploads = server.keyed_uploads(files)
        paths = server.image_paths(uploads, folder, recursive=recursive, missing_ok=True)
        fmt_ = fmt or None
        if out and out.strip():
            target = server.inside(out, "result file")
        else:
            inputs = "\n".join([*uploads, str(server.inside(folder.strip(), "folder")) if folder and folder.strip() else "",
                                str(bool(recursive))])
            digest = hashlib.sha256(inputs.encode("utf-8", "surrogatepass")).hexdigest()[:16]
            target = server.scratch(token, f"batch-{digest}", fresh=False) / f"pez-batch.{fmt_ or 'jsonl'}"
        live.set_stage(server.loaded_label(settings))
        pez = server.pez(settings.for_target("image"))
        job = BatchJob(settings, out=str(target), fmt=fmt_, runner=LocalRunner(pez=pez, stop=stop),
                       group_size=size if size is not None else page_group_size(pez.device))
        summary = job.run(paths, on_status=live.set_stage, on_progress=live.on_batch, on_row=live.on_row)
        if not target.exists():  # no result file was written: nothing to offer
            return summary, job, None, []
        download = server.scratch(token, "download") / target.name
        shutil.copyfile(target, download)  # what the page offers: a copy, served from the temporary folder
        return summary, job, download, [table_row(row) for row in latest(read_rows(target)).values()]

    return work


def _whole(value: Any, flag: str) -> int:
    """A page number that must be a whole number (RenderOptions checks its range)."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, (int, float)) and float(value).is_integer():
        return int(value)
    raise InputError(f"{flag} must be a whole number, got {value!r}")


def render_work(server: Server, token: str, preset, values, prompt, files, folder, sd_model, judge_model, images, sd_steps,
                size=None):
    """`--render`: renders of the prompt beside the originals, scored by the judge, and the sheet."""
    from pez_cli.images import load_images
    from pez_cli.jobs import Events, check_prompt, render_check
    from pez_cli.render import RenderOptions

    def work(live: Live, stop: threading.Event):
        settings = server.settings(preset, values)
        check_prompt(prompt)
        paths = server.image_paths(files, folder)
        originals = load_images(paths)
        options = RenderOptions(sd_model=server.rooted((sd_model or "").strip()) or None, images=_whole(images, "--images"),
                                steps=_whole(sd_steps, "--sd-steps"), out_dir=server.scratch(token, "renders"),
                                size=_whole(size, "--size") if size not in (None, "") else None)
        options = options.for_settings(settings)
        named_judge = server.rooted(judge_model.strip()) if judge_model and judge_model.strip() else None
        server.check_paths(None, options.sd_model, named_judge)
        done, judge = render_check(settings, options, prompt, originals, named_judge or server.cfg.judge_model,
                                   Events(live.set_stage, denoising=lambda n, total: live.set_stage(f"denoising step {n}/{total}")))
        return paths, done, judge

    return work


# -- the page ------------------------------------------------------------------------------
def _component(gr, name: str, value: Any):
    """A page field for a setting, from its declaration: label, help, choices."""
    f = _field(name)
    meta = f.metadata
    kind = f.type.replace(" | None", "")
    label = f"{name.replace('_', ' ')} ({_flag(name)})"
    common = dict(label=label, info=meta["help"].split(". ")[0].rstrip(".") + ".", elem_id=f"setting-{name}", min_width=160)
    if name == "vocab":
        return gr.Dropdown(choices=["words", "all"], value=value, allow_custom_value=True, **common)
    if meta["choices"]:
        return gr.Dropdown(choices=list(meta["choices"]), value=value, **common)
    if kind == "bool":
        return gr.Checkbox(value=bool(value), **common)
    if kind == "int" and f.default is None:  # a Number cannot be left empty (unset): text
        return gr.Textbox(value="" if value is None else str(value), lines=1, max_lines=1,
                          placeholder=meta["shown_default"] or "", **common)
    if kind == "int":
        return gr.Number(value=value, precision=0, **common)
    if kind == "float":
        return gr.Number(value=value, **common)
    lines = kind in ("list[str]", "str | list[str]")
    return gr.Textbox(value=value or "", lines=1, max_lines=6 if lines else 1,
                      placeholder=(meta["shown_default"] or "") + ("; one per line" if lines else ""), **common)


def build_page(server: Server):
    """The Gradio Blocks of the page."""
    gr = _gradio()
    start = [page_value(name, server.start) for name in PAGE_FIELDS]
    image_types = sorted(IMAGE_SUFFIXES)
    with gr.Blocks(title="pez", analytics_enabled=False) as page:
        gr.Markdown("# pez\nHard text prompts from images with PEZ, on this machine. "
                    f"Folders and result files: inside {', '.join(str(r) for r in server.roots)}.")
        loaded = gr.Markdown(server.loaded_text(), elem_id="loaded")
        history = gr.Dataframe(headers=["time", "tab", "prompt (a batch: its summary)", "scores"], value=[],
                               interactive=False, wrap=True, elem_id="history", render=False)  # shown under the tabs
        with gr.Accordion("Settings", open=False, elem_id="settings"):  # Run and the drop area stay above the fold
            start_label = "demo" if server.cfg.demo else "defaults"  # "": the values the server started with
            preset = gr.Dropdown(choices=[(start_label, "")] + [(n, n) for n in preset_names()], value=server.cfg.preset or "",
                                 label="preset (--preset)", info="Named settings; choosing one fills the fields below.",
                                 elem_id="setting-preset")
            values = dict(zip(PAGE_FIELDS, start))
            with gr.Row():
                main = [_component(gr, name, values[name]) for name in MAIN_FIELDS]
            with gr.Accordion("More settings", open=False):
                with gr.Row():
                    more = [_component(gr, name, values[name]) for name in MORE_FIELDS]
            settings_fields = main + more
        preset.change(server.page_values, inputs=preset, outputs=settings_fields, api_visibility="private")
        page.load(server.loaded_text, outputs=loaded, queue=False, api_visibility="private")
        run_group = dict(concurrency_limit=1, concurrency_id="pez-run")  # one run at a time; others queue

        def optimize_tab(kind: str, title: str):
            with gr.Tab(title, id=kind):
                with gr.Row():
                    with gr.Column():
                        if kind == "distill":
                            text = gr.Textbox(label="Text to distill", lines=4, elem_id=f"{kind}-text")
                            files = folder = template = None
                        else:
                            files = gr.File(file_count="multiple", file_types=image_types, type="filepath",
                                            label="Images (one prompt shared by all)", elem_id=f"{kind}-files")
                            previews(gr, files, f"{kind}-preview")
                            examples(gr, files, f"{kind}-examples")
                            folder = gr.Textbox(label="or a folder", placeholder="a folder inside --root",
                                                elem_id=f"{kind}-folder")
                            text = None
                            template = gr.Textbox(label="Template", value="a tiger in the style of {}",
                                                  elem_id=f"{kind}-template") if kind == "style" else None
                        with gr.Row():
                            run = gr.Button("Run", variant="primary", elem_id=f"{kind}-run")
                            stop = gr.Button("Stop", elem_id=f"{kind}-stop", visible=False)
                    with gr.Column():
                        progress = gr.Markdown("", elem_id=f"{kind}-progress")
                        best = gr.Textbox(label="Best prompt so far", interactive=False, elem_id=f"{kind}-best")
                        prompt = gr.Textbox(label="Prompt", buttons=["copy"], interactive=True, elem_id=f"{kind}-prompt")
                        styled = gr.Textbox(label="Styled", buttons=["copy"], interactive=False,
                                            elem_id=f"{kind}-styled") if kind == "style" else None
                        scores = gr.Markdown("", elem_id=f"{kind}-scores")
                        status = gr.Markdown("", elem_id=f"{kind}-status")
                        error_style(status)
                        with gr.Accordion("JSON (as --json prints it)", open=False):
                            data = gr.Code(language="json", elem_id=f"{kind}-json")
                if files is not None:  # a damaged or renamed file says so when dropped, not at Run
                    files.upload(lambda paths: dropped_error(server, paths), inputs=files, outputs=status,
                                 queue=False, api_visibility="private")
                if kind != "distill":
                    render_section(gr, server, kind, preset, settings_fields, prompt, files, folder, run_group)
            outputs = [progress, best, prompt, scores, status, data] + ([styled] if styled is not None else [])

            def handler(request, *args):
                tok = session(request)
                if kind == "distill":
                    text_, rest = args[0], args[1:]
                    work = optimize_work(server, kind, rest[0], rest[1:], text=text_)
                elif kind == "style":
                    files_, folder_, template_, rest = args[0], args[1], args[2], args[3:]
                    work = optimize_work(server, kind, rest[0], rest[1:], files_, folder_, template=template_)
                else:
                    files_, folder_, rest = args[0], args[1], args[2:]
                    work = optimize_work(server, kind, rest[0], rest[1:], files_, folder_)
                out = dict.fromkeys(outputs, gr.skip())
                yield {**out, best: "", prompt: "", scores: "", status: "", data: "", progress: "Starting ..."}
                for what, value in server.stream(tok, work):
                    if what == "live":
                        yield {**out, progress: value.line(), best: value.best}
                    elif what == "error":
                        yield {**out, progress: "", status: value}
                    else:
                        result, payload, notes = value
                        note, line = result_texts(result, payload)
                        note = " ".join([note, *(f"Note: {n}" for n in notes)]).strip()
                        server.remember(tok, kind, result.prompt, scores_text(result.similarity, result.fluency,
                                                                              result.objective))
                        done = {**out, progress: "", best: result.prompt, prompt: result.prompt, scores: line,
                                status: note, data: json_line(payload, indent=2)}
                        if styled is not None:
                            done[styled] = payload.get("styled", "")
                        yield done

            named = {"text": text} if kind == "distill" else {"images": files, "folder": folder}
            if template is not None:
                named["template"] = template
            named = {**named, "preset": preset, **dict(zip(PAGE_FIELDS, settings_fields))}
            runs_with_stop(gr, server, run, stop, (loaded, history), takes_request(gr, handler, named), inputs=list(named.values()),
                           outputs=outputs, api_name=kind, show_progress="minimal", show_progress_on=[progress],
                           **run_group)  # a queued run shows its place

        optimize_tab("invert", "Invert")
        optimize_tab("style", "Style")
        optimize_tab("distill", "Distill")
        batch_tab(gr, server, preset, settings_fields, run_group, image_types, (loaded, history))
        with gr.Accordion("This session's results", open=False, elem_id="history-panel"):
            history.render()
    return page


def previews(gr, files, elem_id: str) -> None:
    """Thumbnails of the first PREVIEWS dropped images, under the drop area."""
    gallery = gr.Gallery(label="Dropped images", columns=8, height=124, allow_preview=False, preview=False,
                         object_fit="contain", show_label=False, elem_classes=["pez-thumbs"],
                         visible=False, elem_id=elem_id)
    files.change(lambda paths: gr.update(value=list(paths or [])[:PREVIEWS], visible=bool(paths)), inputs=files,
                 outputs=gallery, queue=False, api_visibility="private")


def examples(gr, files, elem_id: str) -> None:
    """The demo world's scenes (shipped in the package) to click in place of a drop."""
    from pez_cli import demo as demos

    try:
        scenes = demos.scenes()
    except PezError:  # a damaged install: the page works without examples
        return
    gr.Examples([[[str(scene.image)]] for scene in scenes], inputs=[files], label="Examples (the demo world's scenes)",
                elem_id=elem_id, api_visibility="private")


def dropped_error(server: Server, files: Sequence[str] | None) -> str:
    """The error line for the first dropped file that is not an image pez can read; "" when all are."""
    from pez_cli.images import load_image

    for name in files or []:
        try:
            load_image(name)
        except PezError as e:
            return error_line(e, server.tmp)
    return ""


def error_style(status) -> None:
    """Show `status` in the error style while it holds an error line. Done in the browser: the
    value stays the plain line, which is what an API client gets."""
    status.change(None, inputs=status, js=f"""(text) => {{
        const el = document.querySelector('#{status.elem_id}');
        if (el) el.classList.toggle('pez-error', typeof text === 'string' && text.startsWith('Error: '));
        return []; }}""", queue=False, api_visibility="private")


def takes_request(gr, handler: Callable, named: dict[str, Any] | None = None) -> Callable:
    """handler(request, *inputs): Gradio passes the request (its session) as the first argument.
    named: the inputs by name, in the order the event passes them (its `inputs` are the values);
    the page's HTTP API shows its parameters by these names (Gradio reads them from the
    signature; without them a handler taking *inputs has param_0, param_1, ...). Each may be left
    out by an API caller: it then takes its field's starting value (None for an empty drop area)."""
    handler.__annotations__ = {"request": gr.Request}
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    handler.__signature__ = inspect.Signature([inspect.Parameter("request", kind, annotation=gr.Request)]
                                              + [inspect.Parameter(name, kind, default=None) for name in named or {}])
    return handler


def session(request) -> str:
    """Which page (browser tab, or API client) a call comes from."""
    return getattr(request, "session_hash", None) or "anonymous"


def runs_with_stop(gr, server: Server, run, stop, shared, handler: Callable, api_name: str, **event: Any) -> None:
    """Run's click runs `handler` (the API's `api_name`; its Stop is `api_name`_stop); on the
    page Run gives way to Stop while the job waits or runs, and comes back when it ends, with
    the page's `shared` parts (the loaded models, this session's history) brought up to date."""
    loaded, history = shared

    def swap(running: bool):
        return gr.update(visible=not running), gr.update(visible=running)

    def ended(request):
        return (*swap(False), server.loaded_text(), server.history.get(session(request), []))

    run.click(lambda: swap(True), outputs=[run, stop], queue=False, api_visibility="private") \
        .then(handler, api_name=api_name, **event) \
        .then(takes_request(gr, ended), outputs=[run, stop, loaded, history], queue=False, api_visibility="private")
    stop.click(stopper(gr, server), api_name=f"{api_name}_stop", concurrency_limit=None, show_progress="hidden")


def stopper(gr, server: Server) -> Callable:
    """Stop's handler: ends this page's running job after its current step."""
    return takes_request(gr, lambda request: server.stop(session(request)))


def render_section(gr, server: Server, kind: str, preset, settings_fields, prompt, files, folder, run_group) -> None:
    with gr.Accordion("Render with Stable Diffusion", open=False):
        with gr.Row():
            sd_model = gr.Textbox(label="Stable Diffusion (--sd-model)", value=sd_model_for_settings(server.start),
                                  elem_id=f"{kind}-sd-model")
            judge = gr.Textbox(label="Judge CLIP (--judge-model)", value=server.cfg.judge_model or "",
                               placeholder="one other than --model", elem_id=f"{kind}-judge")
            count = gr.Number(label="renders (--images)", value=4, precision=0, elem_id=f"{kind}-images")
            sd_steps = gr.Number(label="denoising steps (--sd-steps)", value=25, precision=0, elem_id=f"{kind}-sd-steps")
            size = gr.Textbox(label="size (--size)", placeholder="the model's native size", elem_id=f"{kind}-size")
        render = gr.Button("Render", elem_id=f"{kind}-render")
        status = gr.Markdown("", elem_id=f"{kind}-render-status")
        error_style(status)
        gallery = gr.Gallery(label="Original and renders (judge's similarity)", columns=5, elem_id=f"{kind}-gallery")
        sheet = gr.File(label="Contact sheet", elem_id=f"{kind}-sheet")

    def handler(request, prompt_, files_, folder_, sd_model_, judge_, count_, sd_steps_, size_, preset_, *values):
        tok = session(request)
        work = render_work(server, tok, preset_, values, prompt_, files_, folder_, sd_model_, judge_, count_, sd_steps_, size_)
        for what, value in server.stream(tok, work):
            if what == "live":
                yield {status: value.stage, gallery: gr.skip(), sheet: gr.skip()}
            elif what == "error":
                yield {status: value, gallery: gr.skip(), sheet: gr.skip()}
            else:
                paths, done, judge_name = value
                scores = done["render_similarity"]
                items = [(str(p), f"original {p.name}") for p in paths]
                items += [(r, f"render {i + 1}: {s:.4f}") for i, (r, s) in enumerate(zip(done["renders"], scores["per_render"]))]
                yield {status: f"render similarity {scores['mean']:.4f} (judge {judge_name})", gallery: items,
                       sheet: done["contact_sheet"]}

    named = {"prompt": prompt, "images": files, "folder": folder, "sd_model": sd_model, "judge_model": judge,
             "count": count, "sd_steps": sd_steps, "size": size, "preset": preset, **dict(zip(PAGE_FIELDS, settings_fields))}
    render.click(takes_request(gr, handler, named), inputs=list(named.values()),
                 outputs=[status, gallery, sheet], api_name=f"{kind}_render", show_progress="minimal", show_progress_on=[status],
                 **run_group)


def batch_tab(gr, server: Server, preset, settings_fields, run_group, image_types, shared) -> None:
    from pez_cli.models import pick_device

    with gr.Tab("Batch", id="batch"):
        with gr.Row():
            with gr.Column():
                files = gr.File(file_count="multiple", file_types=image_types, type="filepath",
                                label="Images (one prompt each)", elem_id="batch-files")
                previews(gr, files, "batch-preview")
                folder = gr.Textbox(label="or a folder", placeholder="a folder inside --root", elem_id="batch-folder")
                recursive = gr.Checkbox(label="with sub-folders (--recursive)", value=False, elem_id="batch-recursive")
                out = gr.Textbox(label="Result file (--out)", placeholder="a file inside --root, to resume later; "
                                 "empty: a file this page keeps until the server stops", elem_id="batch-out")
                with gr.Row():
                    fmt = gr.Dropdown(choices=[("from the file", ""), ("jsonl", "jsonl"), ("csv", "csv")], value="",
                                      label="format (--format)", elem_id="batch-format")
                    group = gr.Number(value=page_group_size(pick_device(server.start.device)), precision=0, minimum=1,
                                      label="images at once (--batch-images)",
                                      info="Rows are written (and kept by Stop) as each group finishes.",
                                      elem_id="batch-group")
                with gr.Row():
                    run = gr.Button("Run batch", variant="primary", elem_id="batch-run")
                    stop = gr.Button("Stop", elem_id="batch-stop", visible=False)
            with gr.Column():
                progress = gr.Markdown("", elem_id="batch-progress")
                status = gr.Markdown("", elem_id="batch-status")
                error_style(status)
                table = gr.Dataframe(headers=BATCH_HEADERS, value=[], interactive=False, wrap=True, elem_id="batch-table")
                download = gr.File(label="Result file", elem_id="batch-download")

    def handler(request, files_, folder_, recursive_, out_, fmt_, group_, preset_, *values):
        from pez_cli.cli.display import batch_summary

        tok = session(request)
        work = batch_work(server, tok, preset_, values, files_, folder_, recursive_, out_, fmt_, group_)
        skip = {download: gr.skip()}
        yield {**skip, progress: "Starting ...", status: "", table: []}
        live_rows: list = []
        for what, value in server.stream(tok, work):
            if what == "live":
                live_rows = list(value.rows)
                yield {**skip, progress: value.batch_line(), status: gr.skip(), table: live_rows}
            elif what == "error":
                yield {**skip, progress: "", status: value, table: gr.skip()}
            else:
                summary, job, path, rows = value
                said = batch_summary(summary, job.shard)
                server.remember(tok, "batch", said)
                yield {progress: "", status: said.replace("run the same command", "run it"),
                       table: rows, download: None if path is None else str(path)}

    named = {"images": files, "folder": folder, "recursive": recursive, "out": out, "format": fmt, "batch_images": group,
             "preset": preset,
             **dict(zip(PAGE_FIELDS, settings_fields))}
    runs_with_stop(gr, server, run, stop, shared, takes_request(gr, handler, named), inputs=list(named.values()),
                   outputs=[progress, status, table, download], api_name="batch", show_progress="minimal",
                   show_progress_on=[progress], **run_group)


# -- serving -------------------------------------------------------------------------------
@dataclass
class Serving:
    """A started server: its address, and how to stop it (which removes the temporary folder)."""

    url: str
    share_url: str | None
    page: Any
    tmp: Path
    server: Server
    previous_temp_dir: str | None = None

    def close(self) -> None:
        """Stop running jobs after their step, stop the server, remove the temporary folder."""
        import contextlib
        import io

        for event in list(self.server.stops.values()):
            event.set()
        for thread in list(self.server.threads):  # each ends after its step: a torch thread killed
            thread.join(JOIN_TIMEOUT_S)             # at exit would abort the process
        http = getattr(self.page, "server", None)
        if http is not None and hasattr(http, "force_exit"):
            http.force_exit = True  # uvicorn would wait 5 s for open streams (a page watching a run) to close
        quiet = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.error")]  # the cut streams' tracebacks
        try:
            for logger in quiet:
                logger.disabled = True
            with contextlib.redirect_stdout(io.StringIO()):  # Gradio prints "Closing server ..."; stdout is not ours to fill
                self.page.close()
        finally:
            for logger in quiet:
                logger.disabled = False
            self.server.session.clear()  # Gradio may keep the page (and so the server) alive: free the models
            shutil.rmtree(self.tmp, ignore_errors=True)
            _restore_temp_dir(self.previous_temp_dir)


def _restore_temp_dir(previous: str | None) -> None:
    """GRADIO_TEMP_DIR as it was before the server set it."""
    if previous is None:
        os.environ.pop("GRADIO_TEMP_DIR", None)
    else:
        os.environ["GRADIO_TEMP_DIR"] = previous


def start(cfg: ServeConfig, host: str = "127.0.0.1", port: int | None = None, share: bool = False) -> Serving:
    """Start the page's server in the background and return at once (tests and `pez serve`)."""
    for root in cfg.roots:
        if not Path(root).is_dir():
            raise InputError(f"--root {root} is not a folder")
    tmp = Path(tempfile.mkdtemp(prefix="pez-serve-"))
    previous = os.environ.get("GRADIO_TEMP_DIR")
    try:
        # Uploads and downloads live in this folder; Gradio reads the variable for each upload.
        os.environ["GRADIO_TEMP_DIR"] = str(tmp)
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        server = Server(cfg, tmp)
        gr = _gradio()
        page = build_page(server)
        page.queue(default_concurrency_limit=1)
        try:
            _, url, share_url = page.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True,
                                            quiet=True, inbrowser=False, show_error=True, theme=gr.themes.Soft(), css=CSS)
        except OSError as e:
            raise InputError(f"cannot listen on {host}:{port or 'a port from 7860'}: {first_line(e)}") from None
        return Serving(url.rstrip("/"), share_url, page, tmp, server, previous)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _restore_temp_dir(previous)
        raise
